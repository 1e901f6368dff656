"""Speculative decoding: proposers (prompt lookup, a draft model, drafts over the target's own
hidden states: Medusa, EAGLE, early exit), the rejection sampler that verifies their tokens
against the target's distribution, and the acceptance counters."""
