"""Incremental detokenization and stop checks, one new token at a time.

Text grows by decoding a short window of recent tokens (vLLM's prefix/read offsets) rather than
the whole output, and waits while the window ends in half a multi-byte character. Stop strings
are searched only where the new text could complete one; the text is cut before the match.
"""

from __future__ import annotations

from kiln.engine.sequence import Sequence


def init_offsets(seq: Sequence) -> None:
    """Start the decode window a few tokens into the prompt (context for leading spaces)."""
    seq.prefix_offset = max(seq.num_prompt_tokens - 5, 0)
    seq.read_offset = seq.num_prompt_tokens


def detokenize_incrementally(tokenizer, seq: Sequence) -> str:
    """Append the text the newest token completes to seq.text; return that new text."""
    ids, skip = seq.token_ids, seq.params.skip_special_tokens
    prefix = tokenizer.decode(ids[seq.prefix_offset : seq.read_offset], skip_special_tokens=skip)
    full = tokenizer.decode(ids[seq.prefix_offset :], skip_special_tokens=skip)
    if len(full) <= len(prefix) or full.endswith("\ufffd"):
        return ""
    new = full[len(prefix) :]
    seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
    seq.text += new
    return new


def check_stop(seq: Sequence, new_text: str, max_model_len: int) -> None:
    """Finish seq if its newest token (and new_text) ends it: EOS, stop ids/strings, length."""
    p = seq.params
    token = seq.token_ids[-1]
    if seq.num_output_tokens >= p.min_tokens:
        if not p.ignore_eos and token in seq.eos_token_ids:
            return seq.finish("stop")
        if token in p.stop_token_ids:
            return seq.finish("stop", token)
        if new_text and p.stop:
            start = max(len(seq.text) - len(new_text) - max(map(len, p.stop)) + 1, 0)
            hits = [(seq.text.find(s, start), s) for s in p.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                cut, stop = min(hits)
                seq.text = seq.text[:cut]
                return seq.finish("stop", stop)
    if (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens) or len(
        seq.token_ids
    ) >= max_model_len:
        seq.finish("length")


def visible_text(seq: Sequence) -> str:
    """The text to show now: while running, hold back what could begin a stop string."""
    stops = seq.params.stop
    if seq.is_finished or not stops:
        return seq.text
    hold = max(map(len, stops)) - 1
    return seq.text[: max(len(seq.text) - hold, 0)] if hold else seq.text
