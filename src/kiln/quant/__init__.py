"""Weight quantization: round-to-nearest and GPTQ, written as GPTQ / AWQ checkpoints."""
