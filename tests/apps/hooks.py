"""Hooks a guardrails config names by "apps.hooks:function" (tests only)."""


def moderate(text: str) -> str | None:
    """A moderation model's stand-in: flags any text that shouts."""
    return "shouting" if "!!!" in text else None


def classify(text: str) -> float:
    """An injection classifier's stand-in (that breaks on one input)."""
    if "crash" in text:
        raise RuntimeError("classifier is down")
    return 0.99 if "pineapple protocol" in text.lower() else 0.0
