"""Weight quantization: round-to-nearest, GPTQ and AWQ, written as GPTQ / AWQ checkpoints."""
