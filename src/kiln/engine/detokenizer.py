"""Incremental detokenization and stop strings, a few new tokens at a time.

Text grows by decoding a short window of recent tokens (vLLM's prefix/read offsets) rather than
the whole output, and waits while the window ends in half a multi-byte character. Stop strings
are searched only where the new text could complete one; the text is cut before the match.
`SeqText.text` holds the text not yet handed out when outputs are deltas (the caller trims it),
or all of it otherwise: per token, the work is bounded by the window and the stop strings.
"""

from __future__ import annotations


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

    @property
    def text_len(self) -> int:
        return self.text_start + len(self.text)

    def append(self, tokenizer, token: int) -> str:
        """Add one token; return the text it completes (appended to `text`)."""
        ids = self.token_ids
        ids.append(token)
        if tokenizer is None:
            return ""
        skip = self.skip_special_tokens
        prefix = tokenizer.decode(ids[self.prefix_offset : self.read_offset], skip)
        full = tokenizer.decode(ids[self.prefix_offset :], skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        new = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        self.text += new
        return new

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
