"""Model compression beyond quantization: pruning (unstructured, N:M, heads and MLP channels),
knowledge distillation and quantization-aware training (`kiln prune`, `kiln distill`,
`kiln qat`). Weight sharing lives with the model: kiln.model.sharing."""
