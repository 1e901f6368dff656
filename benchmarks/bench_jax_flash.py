"""FlashAttention in JAX against the plain masked softmax: memory and time across sequence
lengths (CPU or whatever JAX runs on).

    python benchmarks/bench_jax_flash.py [--lengths 256 512 1024 2048 4096] [--out PNG]

One causal layer's attention, batch 1, 4 heads of 64, float32. Memory is XLA's scratch
(`temp_size_in_bytes` of the compiled function: what it allocates beyond inputs and outputs)
for the forward and for the forward plus the gradient of q, k and v; time is the median of
5 runs of each, jitted, after a warm-up. Writes a table and a PNG (default
notes/figures/jax_flash_<backend>.png).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kiln.jax.attention import causal_attention  # noqa: E402
from kiln.jax.flash import flash_attention  # noqa: E402

HEADS, HEAD_DIM = 4, 64
FNS = {"naive": causal_attention, "flash": flash_attention}


def programs(fn):
    """(forward, forward + gradients) of fn over q, k, v [1, T, H, D], jitted."""

    def loss(q, k, v):
        return fn(q, k, v, HEAD_DIM**-0.5).sum()

    return jax.jit(lambda q, k, v: fn(q, k, v, HEAD_DIM**-0.5)), jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1, 2))
    )


def measure(program, args) -> tuple[float, float]:
    """(scratch MiB, median ms)."""
    compiled = program.lower(*args).compile()
    mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return mib, 1e3 * statistics.median(times)


def plot(rows, lengths, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, speed) = plt.subplots(1, 2, figsize=(10, 4))
    for name in FNS:
        for part, style in (("fwd", "--"), ("fwd+bwd", "-")):
            pts = [rows[(name, part, t)] for t in lengths]
            mem.plot(lengths, [p[0] for p in pts], style, marker="o", label=f"{name} {part}")
            speed.plot(lengths, [p[1] for p in pts], style, marker="o", label=f"{name} {part}")
    for ax, label in ((mem, "XLA scratch memory (MiB)"), (speed, "time (ms, median of 5)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"JAX attention on {jax.devices()[0].device_kind}: batch 1, {HEADS} heads x {HEAD_DIM}, "
        "float32, causal"
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--out", type=Path, default=None)
    a = parser.parse_args()
    backend = jax.default_backend()
    out = a.out or Path(__file__).resolve().parents[1] / f"notes/figures/jax_flash_{backend}.png"
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    head = f"{'T':>6} {'attention':>9} {'fwd MiB':>9} {'fwd ms':>9} {'f+b MiB':>9} {'f+b ms':>9}"
    print(head)
    print("-" * len(head))
    rows = {}
    for t in a.lengths:
        keys = jax.random.split(jax.random.PRNGKey(t), 3)
        args = [jax.random.normal(key, (1, t, HEADS, HEAD_DIM), jnp.float32) for key in keys]
        for name, fn in FNS.items():
            fwd, grad = programs(fn)
            rows[(name, "fwd", t)] = measure(fwd, args)
            rows[(name, "fwd+bwd", t)] = measure(grad, args)
            (fm, ft), (bm, bt) = rows[(name, "fwd", t)], rows[(name, "fwd+bwd", t)]
            print(f"{t:>6} {name:>9} {fm:>9.1f} {ft:>9.1f} {bm:>9.1f} {bt:>9.1f}", flush=True)
    plot(rows, a.lengths, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
