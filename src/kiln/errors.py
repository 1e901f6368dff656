"""kiln's exception types: raised at the boundary (CLI, API, loaders) with the bad value named."""


class KilnError(Exception):
    """Base class for every error kiln reports to a user as one line."""


class ConfigError(KilnError):
    """A config.json (or a training config) that kiln cannot use."""


class CheckpointError(KilnError):
    """Missing, misshapen or unsafe weights."""


class TokenizerError(KilnError):
    """A tokenizer that cannot be trained, loaded or applied."""


class MissingTokenizerError(TokenizerError):
    """A model directory with no tokenizer.json (unlike one whose tokenizer does not load)."""


class InputError(KilnError, ValueError):
    """A request or argument outside what kiln accepts (empty prompt, bad sampling value...);
    `param` names the field at fault when there is one (the server's 400 carries it)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthError(InputError):
    """A prompt that leaves no room in the model's context (the server's 400 says
    context_length_exceeded)."""


class WorkerDiedError(KilnError):
    """A tensor-parallel worker process is gone: no step can run any more."""
