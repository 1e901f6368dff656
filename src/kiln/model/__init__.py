"""The model: one decoder-only Transformer for every family, its layers, and its loader."""

from kiln.model.loader import load_model, save_model
from kiln.model.transformer import Transformer

__all__ = ["Transformer", "load_model", "save_model"]
