"""Tune the fused MoE kernel's launch settings per token count; write them as the JSON file
kiln.kernels.fused_moe reads for that shape and device.

    python benchmarks/tune_moe.py --shape mixtral-8x7b            # GPU: writes into
    python benchmarks/tune_moe.py --shape qwen3-30b-a3b           #   kiln/kernels/configs/fused_moe
    python benchmarks/tune_moe.py --shape tiny --out /tmp/moe      # CPU: interpreter, 2 configs

For each token count (1 to 2048; get_config takes the nearest), every candidate (BLOCK_M,
BLOCK_N, BLOCK_K and num_stages; num_warps and GROUP_M follow the tile) runs the whole fused
layer (both grouped GEMMs and the SiLU-mul) on random routing; the fastest that matches the
per-expert reference is kept. Prints a table of the winners (about 5 minutes a shape on an
H100, most of it compiling).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_moe import layer, timer  # noqa: E402
from moe_shapes import MOE_SHAPES  # noqa: E402

from kiln.kernels.fused_moe import (  # noqa: E402
    CONFIG_DIR,
    config_name,
    fused_moe_ref,
    fused_moe_triton,
)
from kiln.model.layers import route  # noqa: E402

TOKENS = [1, 8, 32, 64, 128, 512, 2048]  # get_config takes the nearest


def candidates(device: str) -> list[dict]:
    if device != "cuda":  # the interpreter: enough to exercise the loop
        small = dict(GROUP_M=1, num_warps=4, num_stages=2)
        return [dict(small, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32),
                dict(small, BLOCK_M=32, BLOCK_N=16, BLOCK_K=16)]  # fmt: skip
    # 48 tiles (BLOCK_M x BLOCK_N x BLOCK_K x stages); warps and grouping follow the tile
    grid = itertools.product([16, 32, 64, 128], [64, 128, 256], [64, 128], [3, 4])
    out = []
    for bm, bn, bk, ns in grid:
        if ns * (bm + bn) * bk * 2 <= 200 * 1024:  # shared memory of the pipelined tiles
            nw, gm = (8 if bm * bn >= 128 * 128 else 4), (1 if bm <= 32 else 8)
            out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=nw,
                            num_stages=ns))  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", required=True, choices=sorted(MOE_SHAPES))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--tokens", type=int, nargs="+", default=None)
    ap.add_argument("--out", type=Path, default=CONFIG_DIR, help="directory for the JSON file")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    tokens = args.tokens or (TOKENS if device == "cuda" else [1, 8])
    shape = MOE_SHAPES[args.shape]
    w13, w2 = layer(shape, dtype, device)
    ms, cands = timer(device), candidates(device)
    best: dict[int, dict] = {}
    start = time.time()
    print(f"{'tokens':>7}{'best ms':>10}{'default ms':>12}  config")
    for n in tokens:
        x = torch.randn(n, shape["hidden"], device=device, dtype=dtype)
        weights, ids = route(torch.randn(n, shape["experts"], device=device), shape["top_k"], True)
        ref = fused_moe_ref(x, w13, w2, weights, ids).float()
        results = []
        for cfg in cands:
            try:
                out = fused_moe_triton(x, w13, w2, weights, ids, cfg).float()
            except Exception as e:  # out of shared memory / registers for this tile
                print(f"  skip {cfg}: {type(e).__name__}", file=sys.stderr)
                continue
            if (out - ref).abs().max() > 3e-2 * ref.abs().max():
                continue
            run = functools.partial(fused_moe_triton, x, w13, w2, weights, ids, cfg)
            results.append((ms(run), cfg))
        t, cfg = min(results, key=lambda r: r[0])
        default = ms(functools.partial(fused_moe_triton, x, w13, w2, weights, ids))
        best[n] = cfg
        print(f"{n:>7}{t:>10.3f}{default:>12.3f}  {cfg}")
    name = config_name(shape["experts"], shape["inter"], shape["hidden"], dtype,
                       torch.device(device))  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / name).write_text(json.dumps({str(k): v for k, v in best.items()}, indent=1) + "\n")
    print(f"wrote {args.out / name} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
