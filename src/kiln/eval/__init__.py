"""Evaluation: benchmarks (and, later, perplexity)."""
