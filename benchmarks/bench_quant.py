"""Weight-only quantized inference (issue 16): W4A16 / W8A16 kernels and engine speed.

    PYTHONPATH=src:benchmarks python3 benchmarks/bench_quant.py --part gemv [--tiny]
    PYTHONPATH=src:benchmarks python3 benchmarks/bench_quant.py --part kernels [--sweep]
    PYTHONPATH=src:benchmarks python3 benchmarks/bench_quant.py --part decode
    PYTHONPATH=src:benchmarks python3 benchmarks/bench_quant.py --part offline

- gemv: the split-K decode GEMV (kiln.kernels.quant_gemv) at M = 1, 2, 4 on Llama-3-8B's
  projections, W4 g128 (symmetric and asymmetric) and W8 per channel: microseconds a call
  (median of CUDA-graph replays over rotating weight copies), the weight bytes' GB/s, cuBLAS
  bf16 F.linear's microseconds and the ratio, for the default launch settings and the best of
  quant_gemv.sweep_configs (each tile at every SPLIT_K; 2-4 minutes on an H100 by estimate,
  about 50 compiles included: not yet run there); then the best per (bits, K, N, M) as the
  dict literal of quant_gemv.TUNED. --tiny: tiny shapes and a few candidates (on a CPU, under
  Triton's interpreter: to show that it works);
- kernels: kiln.kernels.quant_linear (W4 g128, W8 per channel) against cuBLAS bf16
  (F.linear) on Llama-3-8B's projections at M = 1, 16, 64, 256 (and 2048: the dequantize +
  cuBLAS path): median microseconds of CUDA-graph replays over rotating weight copies (so that
  the weights come from HBM, as in decode), ratio to bf16; --sweep also tries every candidate
  launch config (kiln.kernels.quant_linear.sweep_configs) and prints the best;
- decode: batch-1 greedy decode tokens/s through kiln.LLM, bf16 vs W4A16 g128 vs W8A16, on a
  random Llama-3-8B-shaped checkpoint (RTN-quantized on the GPU, written once to --cache);
- offline: nano-vllm's offline workload (kiln.eval.workload), W4A16 vs bf16.
Without CUDA every other part runs at tiny sizes (the torch reference path) to show that it
works.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

if not torch.cuda.is_available():  # --part gemv runs the kernels under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before kiln.kernels defines them

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from kiln.eval.workload import offline_workload, run_offline  # noqa: E402
from kiln.kernels import quant_gemv  # noqa: E402
from kiln.kernels._triton import num_sms  # noqa: E402
from kiln.kernels.quant_layout import PackedWeight, dequantize_ref, pack  # noqa: E402
from kiln.kernels.quant_linear import (  # noqa: E402
    dequantize_triton,
    pick_config,
    quant_matmul,
    quant_matmul_ref,
    quant_matmul_triton,
    sweep_configs,
)
from kiln.model.quantized import IntWeight, pack_gptq  # noqa: E402
from kiln.quant.rtn import grid, to_int  # noqa: E402

LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
    rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
    eos_token_id=2, torch_dtype="bfloat16",
)  # fmt: skip
TINY = {**LLAMA3_8B, "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 1024}  # fmt: skip
# name -> (bits, group_size); "bf16": not quantized
VARIANTS = {"bf16": None, "w4a16-g128": (4, 128), "w8a16": (8, -1)}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rtn(w: torch.Tensor, bits: int, group_size: int, sym: bool = True) -> IntWeight:
    """Round-to-nearest of w [N, K] (kiln.quant.rtn's grid), every group at once (on w's
    device)."""
    n, k = w.shape
    size = k if group_size == -1 else group_size
    rows = w.float().reshape(n * (k // size), size)
    scale, zero = grid(rows, bits, sym)
    q = to_int(rows, scale, zero, bits).reshape(n, k)
    g = k // size
    g_idx = (torch.arange(k, device=w.device) // size).to(torch.int32)
    return IntWeight(
        q.t().contiguous(), scale.reshape(n, g).t().half(), zero.reshape(n, g).t(), g_idx, bits
    )


# ---------------------------------------------------------------- (a) kernels


def graph_time(fn, reps: int = 20) -> float:
    """Seconds per call of fn(i) (i = 0..reps-1), replayed from a CUDA graph; median of 10."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(i)
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / reps)
    return statistics.median(times)


def cpu_time(fn, reps: int = 5) -> float:
    fn(0)
    times = []
    for i in range(reps):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copies(make, nbytes: int, total: int = 256 * 2**20) -> list:
    """Enough copies of a weight that cycling through them overflows L2 (50 MB on an H100)."""
    return [make() for _ in range(max(1, min(16, -(-total // nbytes))))]


def bench_kernels(cuda: bool, sweep: bool) -> list[str]:
    c = LLAMA3_8B if cuda else TINY
    h, inter = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    shapes = {  # name -> (K, N), fused as the engine runs them
        "qkv": (h, h + 2 * kv), "o": (h, h), "k/v": (h, kv),
        "gate_up": (h, 2 * inter), "down": (inter, h),
    }  # fmt: skip
    rows = (1, 16, 64, 256, 2048) if cuda else (1, 16, 64)
    lines = [
        "| shape (K x N) | M | bf16 cuBLAS us | W4A16 g128 us | x | W8A16 us | x "
        "| W4 dequantize + cuBLAS us |" + (" best W4 config (us) |" if sweep else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if sweep else ""),
    ]
    print("\n".join(lines), flush=True)
    for name, (k, n) in shapes.items():
        for line in bench_shape(f"{name} {k}x{n}", k, n, rows, cuda, sweep):
            lines.append(line)
            print(line, flush=True)
    return lines


def bench_shape(name: str, k: int, n: int, rows, cuda: bool, sweep: bool):
    """Table rows for one projection shape: bf16 F.linear, W4 g128 and W8 per channel."""
    dev = "cuda" if cuda else "cpu"
    timer = graph_time if cuda else cpu_time

    def make16():
        return torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02

    w16 = copies(make16, 2 * n * k)
    packed = {}
    for variant, (bits, group) in [("w4", (4, 128)), ("w8", (8, -1))]:
        w = rtn(w16[0], bits, group)
        one = pack(w.q, w.scales, w.zeros, w.g_idx, bits, group)
        packed[variant] = copies(lambda one=one: _clone(one), one.qweight.numel() * 4)
    for m in rows:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)

        def run16(i, x=x):
            return F.linear(x, w16[i % len(w16)])

        def runq(i, ws, x=x, config=None):
            w = ws[i % len(ws)]
            return (
                quant_matmul(x, w) if config is None else quant_matmul_triton(x, w, config=config)
            )

        def run_dequant(i, x=x, ws=packed["w4"]):
            return F.linear(x, dequantize(ws[i % len(ws)], x.dtype))

        t16 = timer(run16)
        t4 = timer(functools.partial(runq, ws=packed["w4"]))
        t8 = timer(functools.partial(runq, ws=packed["w8"]))
        td = timer(run_dequant)
        line = (
            f"| {name} | {m} | {t16 * 1e6:.1f} | {t4 * 1e6:.1f} | {t16 / t4:.2f} | "
            f"{t8 * 1e6:.1f} | {t16 / t8:.2f} | {td * 1e6:.1f} |"
        )
        if sweep and cuda and m <= 256:
            timed = []
            for cfg in sweep_configs(m):
                try:
                    t = graph_time(functools.partial(runq, ws=packed["w4"], config=cfg))
                except triton.runtime.errors.OutOfResources:  # too much shared memory: skip
                    continue
                timed.append((t, str(cfg)))
            best = min(timed)
            line += f" {best[1]} ({best[0] * 1e6:.1f}) |"
        yield line


def dequantize(w, dtype):
    """The weight in dtype: the Triton kernel on CUDA, the reference elsewhere."""
    return dequantize_triton(w, dtype) if w.qweight.is_cuda else dequantize_ref(w).to(dtype)


def _clone(w: PackedWeight) -> PackedWeight:
    zeros = None if w.zeros is None else w.zeros.clone()
    return replace(w, qweight=w.qweight.clone(), scales=w.scales.clone(), zeros=zeros)


# ---------------------------------------------------------------- (a') the decode GEMV

GEMV_SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672),
               "down": (14336, 4096)}  # fmt: skip
TINY_GEMV_SHAPES = {"qkv": (256, 48), "down": (512, 16)}
# name -> (bits, group_size, symmetric)
GEMV_WEIGHTS = {"W4 g128 sym": (4, 128, True), "W4 g128 asym": (4, 128, False),
                "W8 channel": (8, -1, True)}  # fmt: skip
GEMV_ROWS = (1, 2, 4)


def weight_nbytes(w: PackedWeight) -> int:
    """Bytes a product reads from the weight: the packed words, scales and zeros."""
    tensors = [w.qweight, w.scales] + ([w.zeros] if w.zeros is not None else [])
    return sum(t.numel() * t.element_size() for t in tensors)


def config_name(c: dict) -> str:
    return (f"n{c['BLOCK_N']} w{c['BLOCK_W']} split{c['SPLIT_K']} warps{c['num_warps']} "
            f"stages{c['num_stages']}")  # fmt: skip


def gemv_times(x: torch.Tensor, ws: list[PackedWeight], candidates: list[dict], timer):
    """(seconds a call, config) of each candidate whose output matches the reference (and
    that fits the GPU), cycling through the weight copies ws."""
    ref = quant_matmul_ref(x, ws[0]).float()
    out = []
    for config in candidates:

        def run(i, config=config):
            return quant_matmul_triton(x, ws[i % len(ws)], config=config)

        try:
            y = run(0).float()
        except triton.runtime.errors.OutOfResources:
            continue
        err = ((y - ref).abs().max() / ref.abs().max()).item()
        assert err < 2e-2, (config, err)  # bfloat16 outputs
        out.append((timer(run), config))
    return out


def bench_gemv(cuda: bool, tiny: bool) -> list[str]:
    """The table of --part gemv, then quant_gemv.TUNED's literal (see the module doc)."""
    dev = "cuda" if cuda else "cpu"
    timer = graph_time if cuda else functools.partial(cpu_time, reps=1)
    sms = num_sms(torch.device(dev))
    lines = [
        "| shape (K x N) | weights | M | bf16 us | default us | GB/s | x bf16 | best us | GB/s "
        "| x bf16 | best config (default) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    start = time.perf_counter()
    totals: dict[tuple, dict[str, float]] = {}  # (bits, K, N, M) -> config name -> seconds
    named: dict[str, dict] = {}
    for name, (k, n) in (TINY_GEMV_SHAPES if tiny else GEMV_SHAPES).items():
        make16 = functools.partial(torch.randn, n, k, device=dev, dtype=torch.bfloat16)
        w16 = copies(make16, 2 * n * k)
        xs = {m: torch.randn(m, k, device=dev, dtype=torch.bfloat16) for m in GEMV_ROWS}
        t16 = {m: timer(lambda i, x=xs[m], ws=w16: F.linear(x, ws[i % len(ws)])) for m in GEMV_ROWS}
        print(f"({name}: bf16 timed at {time.perf_counter() - start:.0f} s)", file=sys.stderr)
        for label, (bits, group, sym) in GEMV_WEIGHTS.items():
            q = rtn(w16[0], bits, group, sym)
            one = pack(q.q, q.scales, q.zeros, q.g_idx, bits, group)
            ws = copies(functools.partial(_clone, one), weight_nbytes(one))
            gb = weight_nbytes(one) / 1e9
            for m in GEMV_ROWS:
                default = pick_config(m, one, cuda, sms)
                candidates = quant_gemv.sweep_configs(m)
                if tiny:  # each tile once, at SPLIT_K 1 or 2 in turn (the interpreter is slow)
                    n_split = len(quant_gemv.SPLIT_K_CHOICES)  # (candidates: tile by tile)
                    candidates = [c for i, c in enumerate(candidates)
                                  if i % n_split == i // n_split % 2]  # fmt: skip
                timed = gemv_times(xs[m], ws, [default] + candidates, timer)
                t_default, best = timed[0][0], min(timed, key=lambda tc: tc[0])
                for t, config in timed[1:]:
                    named[config_name(config)] = config
                    per_config = totals.setdefault((bits, k, n, m), {})
                    per_config[config_name(config)] = per_config.get(config_name(config), 0) + t
                lines.append(
                    f"| {name} {k}x{n} | {label} | {m} | {t16[m] * 1e6:.1f} | "
                    f"{t_default * 1e6:.1f} | {gb / t_default:.0f} | {t16[m] / t_default:.2f} | "
                    f"{best[0] * 1e6:.1f} | {gb / best[0]:.0f} | {t16[m] / best[0]:.2f} | "
                    f"{config_name(best[1])} ({config_name(default)}) |"
                )
                print(f"{lines[-1]}  [{time.perf_counter() - start:.0f} s]", flush=True)
    # the best of each (bits, K, N, M), by the summed time over its weights (sym + asym)
    tuned = ["TUNED = {  # kiln.kernels.quant_gemv, from benchmarks/bench_quant.py --part gemv"]
    for key, t in totals.items():
        best = named[min(t, key=t.get)]
        tuned.append(f"    {key}: dict({', '.join(f'{k}={v}' for k, v in best.items())}),")
    tuned.append("}")
    print("\n".join(tuned), flush=True)
    return lines + tuned


# ---------------------------------------------------------------- checkpoints


def write_checkpoints(root: Path, cfg: dict, names: list[str], device: str) -> dict[str, Path]:
    """Random Llama-shaped checkpoints (bf16, and GPTQ v1 RTN-quantized from the same weights)
    under root/<name>; reused when already there."""
    import transformers

    dirs = {name: root / name for name in names}
    todo = [n for n, d in dirs.items() if not (d / "done").is_file()]
    if not todo:
        return dirs
    gen = torch.Generator(device=device).manual_seed(0)
    states: dict[str, dict[str, torch.Tensor]] = {n: {} for n in todo}
    h, v = cfg["hidden_size"], cfg["vocab_size"]

    def randn(*shape, std=0.02):
        return (torch.randn(*shape, generator=gen, device=device) * std).to(torch.bfloat16)

    plain = {
        "model.embed_tokens.weight": randn(v, h),
        "lm_head.weight": randn(v, h),
        "model.norm.weight": torch.ones(h, dtype=torch.bfloat16, device=device),
    }
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    inter = cfg["intermediate_size"]
    shapes = {
        "self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
        "mlp.down_proj": (h, inter),
    }  # fmt: skip
    for i in range(cfg["num_hidden_layers"]):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            plain[f"model.layers.{i}.{norm}.weight"] = plain["model.norm.weight"]
        for proj, shape in shapes.items():
            w = randn(*shape)
            prefix = f"model.layers.{i}.{proj}"
            for name in todo:
                if VARIANTS[name] is None:
                    states[name][f"{prefix}.weight"] = w.cpu()
                else:
                    bits, group = VARIANTS[name]
                    tensors = pack_gptq(rtn(w, bits, group))
                    states[name] |= {f"{prefix}.{p}": t.cpu() for p, t in tensors.items()}
    plain = {k: t.cpu() for k, t in plain.items()}
    for name in todo:
        out = dirs[name]
        out.mkdir(parents=True, exist_ok=True)
        config = transformers.LlamaConfig(**cfg).to_dict()
        if VARIANTS[name] is not None:
            bits, group = VARIANTS[name]
            config["quantization_config"] = {
                "quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False,
                "sym": True, "checkpoint_format": "gptq",
            }  # fmt: skip
        state = {k: t.clone() for k, t in plain.items()} | states.pop(name)
        save_file(state, str(out / "model.safetensors"), {"format": "pt"})
        (out / "config.json").write_text(json.dumps(config, indent=2))
        (out / "done").touch()
        del state
        gc.collect()
    return dirs


def with_engine(path: Path, fn, **engine_args):
    """fn(llm) on a fresh kiln.LLM of path; the engine and its GPU memory are released before
    returning (two 8B engines do not fit side by side)."""
    from kiln.engine import LLM

    if not torch.cuda.is_available():
        engine_args = dict(engine_args, device="cpu")
        engine_args.pop("kv_cache_memory_bytes", None)
    llm = LLM(str(path), **engine_args)
    try:
        return fn(llm)
    finally:
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- (b) decode, (c) offline


def decode_rate(llm, prompt_len: int, new_tokens: int) -> float:
    """Batch-1 decode tokens/s: from the first token to the last."""
    from kiln.engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompt_token_ids=[[7] * prompt_len], sampling_params=params)  # warm up
    out = llm.generate(prompt_token_ids=[list(range(11, 11 + prompt_len))], sampling_params=params)
    m = out[0].metrics
    return (new_tokens - 1) / (m.finished_time - m.first_token_time)


def weight_bytes(model) -> int:
    """Bytes a decode step reads: every parameter and buffer but the embedding table."""
    tensors = {id(t): t for n, t in [*model.named_parameters(), *model.named_buffers()]
               if "embed_tokens" not in n and "cos_sin" not in n}  # fmt: skip
    return sum(t.numel() * t.element_size() for t in tensors.values())


def bench_decode(dirs: dict[str, Path], new_tokens: int, prompt_len: int) -> list[str]:
    lines = ["| model | decode tok/s | x bf16 | weights read / token (MB) | GB/s |",
             "|---|---|---|---|---|"]  # fmt: skip
    print("\n".join(lines), flush=True)
    base = None
    runs = [(name, path, {}) for name, path in dirs.items()]
    # the quantized GEMVs without the norm / SiLU-mul prologues (separate kernels)
    runs += [(f"{n} unfused", p, {"gemv_max_batch": 0}) for n, p in dirs.items() if n != "bf16"]
    for name, path, extra in runs:

        def measure(llm):
            rate = decode_rate(llm, prompt_len, new_tokens)
            return rate, weight_bytes(llm.engine.runner.model)

        rate, nbytes = with_engine(
            path, measure, max_num_seqs=4, max_cuda_graph_tokens=256,
            kv_cache_memory_bytes=2**30, **extra,
        )  # fmt: skip
        base = base or rate
        lines.append(
            f"| {name} | {rate:.1f} | {rate / base:.2f} | {nbytes / 1e6:.1f} | "
            f"{rate * nbytes / 1e9:.0f} |"
        )
        print(lines[-1], flush=True)
    return lines


def bench_offline(dirs: dict[str, Path], work, vocab: int) -> list[str]:
    lines = ["| model | output tok/s | x bf16 | seconds | output tokens |", "|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    base = None
    for name, path in dirs.items():

        def measure(llm):
            run_offline(llm, offline_workload(32, (16, 300), (4, 32), vocab, seed=1))  # warm-up
            return run_offline(llm, work)

        r = with_engine(path, measure)
        base = base or r["output_tok_s"]
        lines.append(
            f"| {name} | {r['output_tok_s']:.0f} | {r['output_tok_s'] / base:.2f} | "
            f"{r['seconds']:.1f} | {r['output_tokens']} |"
        )
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["gemv", "kernels", "decode", "offline"], default="kernels")
    ap.add_argument("--sweep", action="store_true", help="kernels: also sweep launch configs")
    ap.add_argument("--tiny", action="store_true", help="gemv: tiny shapes (always on a CPU)")
    ap.add_argument("--cache", default="/tmp/kiln_bench_quant", help="checkpoint folder")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--num-prompts", type=int, default=256)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "CPU (tiny sizes, torch reference)"
    if not cuda and args.part == "gemv":
        device = "CPU (tiny sizes, the Triton interpreter)"
    print(f"device: {device}; torch {torch.__version__}", flush=True)
    if args.part == "gemv":
        bench_gemv(cuda, args.tiny or not cuda)
        return
    if args.part == "kernels":
        bench_kernels(cuda, args.sweep)
        return
    cfg = LLAMA3_8B if cuda else TINY
    root = Path(args.cache) / ("llama3_8b" if cuda else "tiny")
    names = list(VARIANTS) if args.part == "decode" else ["bf16", "w4a16-g128"]
    start = time.perf_counter()
    dirs = write_checkpoints(root, cfg, names, "cuda" if cuda else "cpu")
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    print(f"checkpoints ready in {time.perf_counter() - start:.0f} s", flush=True)
    if args.part == "decode":
        bench_decode(dirs, args.new_tokens if cuda else 16, 128 if cuda else 16)
    else:
        lens = ((100, 1024), (100, 1024)) if cuda else ((8, 32), (8, 32))
        work = offline_workload(args.num_prompts if cuda else 8, *lens, cfg["vocab_size"], seed=0)
        bench_offline(dirs, work, cfg["vocab_size"])


if __name__ == "__main__":
    main()
