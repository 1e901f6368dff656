"""Model shapes the benchmarks share (built with random weights: nothing is downloaded)."""

# Qwen3-0.6B: the issues' reference shape for GPU numbers (transformers Qwen3Config kwargs).
QWEN3_0_6B = dict(
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    tie_word_embeddings=True,
    max_position_embeddings=40960,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
)
