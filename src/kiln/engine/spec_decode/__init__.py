"""Speculative decoding: proposers (prompt lookup, a draft model), the rejection sampler that
verifies their tokens against the target's distribution, and the acceptance counters."""
