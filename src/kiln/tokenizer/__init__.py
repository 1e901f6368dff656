"""Tokenizers: own byte-level BPE (bpe.py), tokenizer.json loading (hf.py), chat templates."""

from kiln.tokenizer.hf import Tokenizer, load_tokenizer

__all__ = ["Tokenizer", "load_tokenizer"]
