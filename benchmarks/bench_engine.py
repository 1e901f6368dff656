"""Engine benchmarks on a Qwen3-0.6B-shaped random bfloat16 model (GPU).

Prints (1) offline throughput on nano-vllm's workload, kiln vs HF transformers generate;
(2) batch-1 decode tokens/s against the roofline (weight bytes / measured copy bandwidth);
(3) the greedy check: Triton backend (+ CUDA graphs) vs kiln's torch backend.

    PYTHONPATH=src python3 benchmarks/bench_engine.py [--out DIR] [--hf-requests 32]
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch
from shapes import QWEN3_0_6B

from kiln.engine import LLM, SamplingParams
from kiln.eval.workload import offline_workload, run_offline

QWEN3_06B = {**QWEN3_0_6B, "max_position_embeddings": 4096}


def build_model(out: Path):
    import transformers

    config = transformers.Qwen3Config(**QWEN3_06B)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out)
    return model


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), median of 20."""
    x = torch.empty(2**30 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    times = []
    for _ in range(25):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y.copy_(x)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    t = sorted(times[5:])[len(times[5:]) // 2]
    return 2 * x.numel() * x.element_size() / t


def decode_rate(llm, prompt_len=128, new_tokens=512) -> float:
    """Batch-1 decode tokens/s: time from the first token to the last."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompt_token_ids=[[7] * prompt_len], sampling_params=params)  # warm up
    out = llm.generate(prompt_token_ids=[list(range(11, 11 + prompt_len))], sampling_params=params)
    m = out[0].metrics
    return (new_tokens - 1) / (m.finished_time - m.first_token_time)


def hf_throughput(model, workload, new_tokens: int) -> dict:
    """HF generate over a batch (left-padded), every row making `new_tokens` tokens."""
    prompts = [p for p, _ in workload]
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad():
        model.generate(
            ids[:2, -16:], attention_mask=mask[:2, -16:], max_new_tokens=4, do_sample=False
        )
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=True,
            temperature=0.6,
            top_k=0,
        )
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {
        "requests": len(prompts),
        "output_tokens": len(prompts) * new_tokens,
        "seconds": elapsed,
        "output_tok_s": len(prompts) * new_tokens / elapsed,
    }


def greedy_check(path, n_prompts=8, new_tokens=64) -> list[str]:
    """Triton+graphs vs torch backend greedy tokens; explain a divergence by the logit gap."""
    work = offline_workload(n_prompts, (20, 700), (1, 1), QWEN3_06B["vocab_size"], seed=5)
    prompts = [p for p, _ in work]
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, logprobs=2)
    runs = {}
    for name, args in {
        "torch": dict(attention_backend="torch", use_cuda_graph=False, fuse_weights=False),
        "triton": dict(attention_backend="triton"),
    }.items():
        llm = LLM(str(path), kv_cache_memory_bytes=4 * 2**30, **args)
        runs[name] = [
            o.outputs[0] for o in llm.generate(prompt_token_ids=prompts, sampling_params=params)
        ]
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    lines = []
    for i, (ref, out) in enumerate(zip(runs["torch"], runs["triton"])):
        if ref.token_ids == out.token_ids:
            lines.append(f"prompt {i} ({len(prompts[i])} tok): identical {new_tokens} tokens")
            continue
        j = next(k for k, (a, b) in enumerate(zip(ref.token_ids, out.token_ids)) if a != b)
        top = sorted(ref.logprobs[j].values(), reverse=True)
        gap = top[0] - top[1] if len(top) > 1 else float("nan")
        lines.append(
            f"prompt {i} ({len(prompts[i])} tok): first divergence at token {j}; "
            f"torch backend's top-2 logprob gap there {gap:.4f}"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--hf-requests", type=int, default=32)
    ap.add_argument("--hf-new-tokens", type=int, default=256)
    ap.add_argument("--skip", nargs="*", default=[])
    ap.add_argument("--trace-every", type=float, default=120.0, help="dump stacks (seconds)")
    args = ap.parse_args()
    import faulthandler
    import logging
    import sys

    logging.basicConfig(
        level=logging.INFO, format="%(relativeCreated)7.0f ms %(name)s: %(message)s"
    )
    faulthandler.dump_traceback_later(args.trace_every, repeat=True, file=sys.stderr)
    tmp = Path(tempfile.mkdtemp())
    hf_model = build_model(tmp)
    device = torch.cuda.get_device_name()
    report = [f"device: {device}; torch {torch.__version__}"]
    workload = offline_workload(256, (100, 1024), (100, 1024), QWEN3_06B["vocab_size"], seed=0)
    results = {}
    if "check" not in args.skip:
        report += ["", "## greedy check: Triton backend + CUDA graphs vs torch backend (bf16)"]
        report += greedy_check(tmp)
        print("\n".join(report), flush=True)
    if "hf" not in args.skip:
        hf = hf_throughput(hf_model, workload[: args.hf_requests], args.hf_new_tokens)
        results["hf"] = hf
        logging.info("HF: %s", hf)
    del hf_model
    gc.collect()
    torch.cuda.empty_cache()
    bw = copy_bandwidth()
    variants = [
        ("kiln", {}),
        ("kiln_lockstep", {"async_scheduling": False}),
        ("kiln_cublas", {"gemv_max_batch": 0}),  # batch-1 decode only
    ]
    for name, extra in variants:
        llm = LLM(str(tmp), max_model_len=4096, attention_backend="triton", **extra)
        # Warm-up: mixed prefill/decode steps of many shapes, so that nothing left to load or
        # compile lands in the timed run (whichever instance runs first).
        run_offline(llm, offline_workload(64, (16, 300), (4, 32), QWEN3_06B["vocab_size"], 1))
        results[name] = {} if name == "kiln_cublas" else run_offline(llm, workload)
        results[name]["decode_tok_s"] = decode_rate(llm)
        logging.info("%s: %s", name, results[name])
        weight_bytes = sum(
            p.numel() * p.element_size() for p in llm.engine.runner.model.parameters()
        )
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    roofline = bw / weight_bytes
    d_graph = results["kiln"]["decode_tok_s"]
    d_lockstep = results["kiln_lockstep"]["decode_tok_s"]
    d_cublas = results["kiln_cublas"]["decode_tok_s"]
    llm = LLM(
        str(tmp),
        max_model_len=4096,
        attention_backend="triton",
        use_cuda_graph=False,
        kv_cache_memory_bytes=2**30,
    )
    d_eager = decode_rate(llm)
    k, lk = results["kiln"], results["kiln_lockstep"]
    report += [
        "",
        "## offline throughput, nano-vllm workload (256 req, in/out U[100,1024], ignore_eos)",
        "| engine | requests | output tokens | seconds | output tok/s |",
        "|---|---|---|---|---|",
        f"| kiln (Triton, CUDA graphs, async scheduling) | {k['requests']} | "
        f"{k['output_tokens']} | {k['seconds']:.1f} | {k['output_tok_s']:.0f} |",
        f"| kiln, lockstep scheduling | {lk['requests']} | {lk['output_tokens']} | "
        f"{lk['seconds']:.1f} | {lk['output_tok_s']:.0f} |",
    ]
    if "hf" in results:
        h = results["hf"]
        report.append(
            f"| HF transformers generate (subset: first {h['requests']} prompts in one "
            f"left-padded batch, {args.hf_new_tokens} new tokens each; tok/s of that subset) "
            f"| {h['requests']} | {h['output_tokens']} | {h['seconds']:.1f} | "
            f"{h['output_tok_s']:.0f} |"
        )
    report += [
        "",
        "## batch-1 decode vs roofline",
        f"weights {weight_bytes / 1e9:.3f} GB; copy bandwidth {bw / 1e12:.2f} TB/s; "
        f"roofline {roofline:.0f} tok/s",
        "| path | tok/s | % of roofline |",
        "|---|---|---|",
        f"| kiln, CUDA graphs, async scheduling, fused Triton GEMVs (the default) | "
        f"{d_graph:.0f} | {100 * d_graph / roofline:.0f}% |",
        f"| kiln, same with cuBLAS projections (gemv_max_batch=0) | {d_cublas:.0f} | "
        f"{100 * d_cublas / roofline:.0f}% |",
        f"| kiln, CUDA graphs, lockstep | {d_lockstep:.0f} | {100 * d_lockstep / roofline:.0f}% |",
        f"| kiln, eager | {d_eager:.0f} | {100 * d_eager / roofline:.0f}% |",
    ]
    text = "\n".join(report)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_engine.md").write_text(text + "\n")
        (Path(args.out) / "bench_engine.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
