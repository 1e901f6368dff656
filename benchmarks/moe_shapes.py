"""MoE layer shapes the MoE benchmarks share: (experts, top_k, hidden, expert intermediate)."""

MOE_SHAPES = {
    "mixtral-8x7b": dict(experts=8, top_k=2, hidden=4096, inter=14336),
    "qwen3-30b-a3b": dict(experts=128, top_k=8, hidden=2048, inter=768),
    "tiny": dict(experts=4, top_k=2, hidden=64, inter=64),  # CPU (Triton's interpreter)
}
