"""Prompt lookup (n-gram) proposals: no model, only the sequence's own tokens.

The last n tokens of the sequence (n from prompt_lookup_max down to prompt_lookup_min) are
looked up earlier in the prompt and output; the tokens that followed their newest earlier
occurrence (with k tokens after it) are the proposal. Copying work (editing, summarizing,
code rewriting) repeats long spans of the prompt, which is where this wins.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from kiln.engine.sequence import Sequence


def ngram_proposal(token_ids: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k tokens that followed an earlier occurrence of the longest suffix of token_ids
    (between min_n and max_n tokens long) that occurs earlier; [] if none does."""
    tokens = np.asarray(token_ids)
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        # windows of n tokens that end before the last token, so that a token follows each
        windows = sliding_window_view(tokens[:-1], n)
        hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
        if hits.size:
            # the newest match with k tokens after it; else the oldest (the most tokens after
            # it: in a run of repeats the newest match is followed by the run's end)
            full = hits[hits + n + k <= len(tokens)]
            start = (full[-1] if full.size else hits[0]) + n
            return tokens[start : start + k].tolist()
    return []


class NgramProposer:
    """Proposals by prompt lookup; point-mass drafts (seq.spec_probs stays None)."""

    def __init__(self, num_speculative_tokens: int, prompt_lookup_min: int, prompt_lookup_max: int):
        self.k = num_speculative_tokens
        self.min_n, self.max_n = prompt_lookup_min, prompt_lookup_max

    def propose(self, seqs: list[Sequence], ks: list[int], sampler) -> list[list[int]]:
        """Up to ks[i] tokens for seqs[i]."""
        return [ngram_proposal(s.token_ids, k, self.min_n, self.max_n) for s, k in zip(seqs, ks)]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """No KV of its own."""
