"""Evaluation: benchmarks and perplexity."""

from kiln import lazy_attributes

__getattr__ = lazy_attributes("kiln.eval", {"perplexity": "kiln.eval.ppl"})
