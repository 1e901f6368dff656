"""Incremental detokenization and stop strings, a few new tokens at a time.

Text grows one token at a time through the `tokenizers` library's DecodeStream (one call into
Rust per token; primed, as vLLM primes it, with a few prompt tokens that decode cleanly, so a
leading space comes out right). A tokenizer without one decodes a short window of recent tokens
instead (vLLM's prefix/read offsets), twice per token. Either waits while the text ends in half
a multi-byte character. Stop strings
are searched only where the new text could complete one; the text is cut before the match.
`SeqText.text` holds the text not yet handed out when outputs are deltas (the caller trims it),
or all of it otherwise: per token, the work is bounded by the window and the stop strings.
"""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer as HFTokenizer

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21
    DecodeStream = None

_CONTEXT_MAX = 24  # prompt tokens tried as the stream's context, newest first


class SeqText:
    """The decoded text of one sequence and its decode window into `token_ids`."""

    def __init__(self, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.token_ids = list(prompt_token_ids)  # prompt + output (appended as they come)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.skip_special_tokens = skip_special_tokens
        # the window starts a few tokens into the prompt (context for leading spaces)
        self.prefix_offset = max(self.num_prompt_tokens - 5, 0)
        self.read_offset = self.num_prompt_tokens
        self.text = ""
        self.text_start = 0  # chars of the whole text before `text` (handed out already)
        self._stream: Any = None  # DecodeStream once opened; False: use the window

    @property
    def text_len(self) -> int:
        return self.text_start + len(self.text)

    def append(self, tokenizer, token: int) -> str:
        """Add one token; return the text it completes (appended to `text`)."""
        ids = self.token_ids
        ids.append(token)
        if tokenizer is None:
            return ""
        if self._stream is None:
            self._stream = self._open_stream(tokenizer)
        if self._stream is not False:
            try:
                new = self._stream.step(tokenizer.tokenizer, token)
            except Exception:  # the stream lost its place: go on with the window
                self._stream = False
                self.prefix_offset = max(len(ids) - 6, self.num_prompt_tokens - 5, 0)
                self.read_offset = len(ids) - 1
            else:
                if new:
                    self.text += new
                return new or ""
        skip = self.skip_special_tokens
        prefix = tokenizer.decode(ids[self.prefix_offset : self.read_offset], skip)
        full = tokenizer.decode(ids[self.prefix_offset :], skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        new = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        self.text += new
        return new

    def _open_stream(self, tokenizer) -> Any:
        """A DecodeStream primed with the shortest prompt suffix (5 tokens or more, as the
        window) that decodes without a broken character; False (use the window) when the
        tokenizer has no DecodeStream or the prompt's end has no clean suffix."""
        if DecodeStream is None or not isinstance(
            getattr(tokenizer, "tokenizer", None), HFTokenizer
        ):
            return False
        prompt = self.token_ids[: self.num_prompt_tokens]
        for i in range(min(5, len(prompt)), min(len(prompt), _CONTEXT_MAX) + 1):
            if "\ufffd" not in tokenizer.decode(prompt[-i:], self.skip_special_tokens):
                return DecodeStream(prompt[-i:], skip_special_tokens=self.skip_special_tokens)
        return False

    def find_stop(self, stops: list[str], new_text: str) -> str | None:
        """The stop string that the newest text completes (the text is cut before it)."""
        start = max(len(self.text) - len(new_text) - max(map(len, stops)) + 1, 0)
        hits = [(i, s) for s in stops if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return None
        cut, stop = min(hits)
        self.text = self.text[:cut]
        return stop

    def visible_len(self, stops: list[str], finished: bool) -> int:
        """Chars of the whole text to show now: while running, hold back what could begin a
        stop string."""
        if finished or not stops:
            return self.text_len
        hold = max(map(len, stops)) - 1
        return max(self.text_len - hold, self.text_start)

    def take(self, upto: int) -> str:
        """Hand out the text up to char `upto` of the whole text and forget it (delta mode)."""
        cut = upto - self.text_start
        piece, self.text = self.text[:cut], self.text[cut:]
        self.text_start = upto
        return piece
