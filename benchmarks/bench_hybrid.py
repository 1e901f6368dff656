"""Hybrid SSM/attention vs all-attention: decode latency and memory at long context.

The models differ by one config change, `layer_types` (kiln.model.ssm): the same llama-like
stack with every layer attending, with the pattern given (default one attention layer in
four, the rest Mamba-2), and with every layer Mamba-2. Each decode step runs with a cache
already `context` tokens long (the reference ContiguousKVCache: K/V for the attention layers,
the conv + SSM state for the others, filled with random values: the step's cost does not
depend on them), so 64k context needs no 64k prefill.

    python benchmarks/bench_hybrid.py                                  # GPU sizes
    python benchmarks/bench_hybrid.py --tiny --contexts 64 256 1024   # CPU smoke run
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from kiln.config import ModelConfig
from kiln.model.attention import ContiguousKVCache
from kiln.model.transformer import Transformer

SIZES = {  # ~1B llama-like, and a tiny one for CPU
    "gpu": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                num_attention_heads=16, num_key_value_heads=8, mamba_head_dim=64,
                mamba_state_size=128, mamba_n_groups=8),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, mamba_head_dim=16,
                 mamba_state_size=16, mamba_n_groups=2),
}  # fmt: skip


def build(size: str, layer_types: list[str], max_len: int, dtype, device) -> Transformer:
    hf = dict(model_type="llama", vocab_size=32000, max_position_embeddings=max_len)
    hf |= SIZES[size]
    hf["layer_types"] = layer_types
    with torch.device(device):
        model = Transformer(ModelConfig.from_hf(hf))
    model.init_weights(0.02)
    return model.to(dtype).eval()


def cache_bytes(cache: ContiguousKVCache) -> int:
    tensors = [cache.k, cache.v]
    if cache.ssm is not None:
        tensors += [*cache.ssm.conv.values(), *cache.ssm.ssm.values()]
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.inference_mode()
def decode_step_ms(model, batch: int, context: int, steps: int, device) -> tuple[float, int, int]:
    """(ms per decode step at `context`, cache bytes, peak bytes on CUDA or 0)."""
    dtype = next(model.parameters()).dtype
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cache = ContiguousKVCache(model.config, batch, context + steps + 2, dtype, device)
    cache.k.normal_(0, 1)
    cache.v.normal_(0, 1)
    if cache.ssm is not None:
        for t in (*cache.ssm.conv.values(), *cache.ssm.ssm.values()):
            t.normal_(0, 0.1)
    cache.length = context
    tok = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)

    @torch.inference_mode()  # (no autograd records: the reference loop as kiln generate runs it)
    def step():
        pos = torch.full((batch, 1), cache.length, device=device)
        logits = model(tok, pos, cache)
        cache.advance(1)
        return logits

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) * 1e3 / steps
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return ms, cache_bytes(cache), peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke run)")
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--pattern", default="attention,mamba2,mamba2,mamba2",
                   help="the hybrid's layer types, repeated over the layers")  # fmt: skip
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--png", default="notes/figures/hybrid_decode.png")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    size = "tiny" if args.tiny else "gpu"
    n = SIZES[size]["num_hidden_layers"]
    pattern = args.pattern.split(",")
    variants = {
        "attention": ["attention"] * n,
        "hybrid": [pattern[i % len(pattern)] for i in range(n)],
        "mamba2": ["mamba2"] * n,
    }
    max_len = max(args.contexts) + args.steps + 2
    rows = []
    for name, types in variants.items():
        model = build(size, types, max_len, dtype, device)
        for ctx in args.contexts:
            ms, cache, peak = decode_step_ms(model, args.batch, ctx, args.steps, device)
            rows.append((name, ctx, ms, cache / 2**20, peak / 2**20))
        del model
    print(f"\n{size} model, batch {args.batch}, {dtype}, {device}; hybrid = {args.pattern}")
    print(f"{'model':<10} {'context':>8} {'ms/step':>9} {'cache MiB':>10} {'peak MiB':>9}")
    for name, ctx, ms, cache, peak in rows:
        print(f"{name:<10} {ctx:>8} {ms:>9.2f} {cache:>10.1f} {peak:>9.1f}")
    plot(rows, args.contexts, Path(args.png))


def plot(rows, contexts, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, mem) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r[0] for r in rows):
        mine = [r for r in rows if r[0] == name]
        lat.plot(contexts, [r[2] for r in mine], marker="o", label=name)
        mem.plot(contexts, [r[3] for r in mine], marker="o", label=name)
    for ax, title in ((lat, "decode ms / step"), (mem, "cache MiB (KV + SSM state)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
