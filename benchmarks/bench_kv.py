"""KV cache capacity and speed, bf16 vs fp8 KV (kv_cache_dtype), on a Qwen3-0.6B-shaped
random bf16 model (nothing is downloaded).

    PYTHONPATH=src:benchmarks python benchmarks/bench_kv.py                 # H100, ~4 min
    PYTHONPATH=src:benchmarks python benchmarks/bench_kv.py --part decode   # 32k decode only
    PYTHONPATH=src:benchmarks python benchmarks/bench_kv.py --tiny          # CPU, to see it work

(1) capacity and offline throughput: the pool's tokens, how many sequences of the workload
fit at once (pool tokens / tokens per sequence, and the most that ran at once), and output
tokens/s, on 64 requests of 8k prompt / 512 output (greedy, ignore_eos);
(2) batch-1 decode tokens/s at a 32k-token context (first token to last, 256 new tokens).
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
from kiln.engine.core import EngineCore
from kiln.kernels.paged_decode_attention import CUDA_CONFIG

TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            tie_word_embeddings=True, max_position_embeddings=2048)  # fmt: skip


def build_model(out: Path, shape: dict, device: str) -> None:
    import transformers

    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.Qwen3Config(**shape), dtype=torch.bfloat16 if device == "cuda" else None
        )
    model.generation_config.eos_token_id = None
    model.save_pretrained(out)


def capacity(model: Path, kv: str, requests: int, prompt: int, output: int, engine: dict):
    """Pool tokens, sequences that fit, the most that ran at once, output tokens/s."""
    core = EngineCore(str(model), kv_cache_dtype=kv, max_model_len=prompt + output, **engine)
    g = torch.Generator().manual_seed(0)
    vocab = core.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=output, ignore_eos=True)
    core.add_request("warm", [5] * 16, SamplingParams(temperature=0.0, max_tokens=4))
    while core.has_work():
        core.step()
    for i in range(requests):
        core.add_request(str(i), torch.randint(0, vocab, (prompt,), generator=g).tolist(), params)
    most, generated = 0, 0
    start = time.perf_counter()
    while core.has_work():
        generated += len(core.step())
        most = max(most, len(core.scheduler.running))
    seconds = time.perf_counter() - start
    pool = core.block_manager.num_blocks * core.block_manager.block_size
    row = dict(kv=kv, pool_tokens=pool, fit=pool // (prompt + output), most_running=most,
               preemptions=core.scheduler.num_preemptions, seconds=seconds,
               output_tok_s=generated / seconds)  # fmt: skip
    del core
    return row


def decode_rate(model: Path, kv: str, context: int, new: int, engine: dict) -> float:
    """Batch-1 decode tokens/s at a context of `context` tokens."""
    llm = LLM(str(model), kv_cache_dtype=kv, max_model_len=context + new, **engine)
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    llm.generate(prompt_token_ids=[[7] * 64], sampling_params=params)  # warm up (graphs)
    vocab = llm.engine.model_config.vocab_size
    prompt = torch.randint(0, vocab, (context,), generator=torch.Generator().manual_seed(1))
    out = llm.generate(prompt_token_ids=[prompt.tolist()], sampling_params=params)
    m = out[0].metrics
    del llm
    return (new - 1) / (m.finished_time - m.first_token_time)


def release(device: str) -> None:
    """Free the last engine's memory before the next one sizes its pool."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a tiny CPU model at tiny sizes")
    p.add_argument("--part", choices=["capacity", "decode", "all"], default="all")
    p.add_argument("--kv", default="auto,fp8", help="kv_cache_dtype values to compare")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--json", default=None)
    p.add_argument(
        "--decode-configs", nargs="*", default=[], metavar="BLOCK_N:WARPS:STAGES",
        help="also time batch-1 decode of the last --kv value under these decode-attention "
        "launch settings (kiln.kernels.paged_decode_attention.CUDA_CONFIG), e.g. 128:4:2",
    )  # fmt: skip
    args = p.parse_args()
    if args.tiny:
        shape, device = TINY, "cpu"
        sizes = dict(requests=8, prompt=96, output=16, context=900, new=16)
        engine = dict(device="cpu", kv_cache_memory_bytes=2**20)
    else:
        shape, device = {**QWEN3_0_6B, "max_position_embeddings": 40960}, "cuda"
        sizes = dict(requests=64, prompt=8192, output=512, context=32768, new=256)
        engine = dict(gpu_memory_utilization=args.gpu_memory_utilization)
    kvs = args.kv.split(",")
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp)
        build_model(model, shape, device)
        if args.part in ("capacity", "all"):
            rows = []
            for kv in kvs:
                rows.append(capacity(model, kv, sizes["requests"], sizes["prompt"],
                                     sizes["output"], engine))  # fmt: skip
                release(device)
            print(f"\n(1) {sizes['requests']} requests x {sizes['prompt']} prompt / "
                  f"{sizes['output']} output tokens")  # fmt: skip
            print(f"{'kv':>6} {'pool tokens':>12} {'seqs fit':>9} {'ran at once':>12} "
                  f"{'preempt':>8} {'s':>7} {'out tok/s':>10}")  # fmt: skip
            for r in rows:
                print(f"{r['kv']:>6} {r['pool_tokens']:>12} {r['fit']:>9} "
                      f"{r['most_running']:>12} {r['preemptions']:>8} {r['seconds']:7.1f} "
                      f"{r['output_tok_s']:10.0f}")  # fmt: skip
            result["capacity"] = rows
        if args.part in ("decode", "all"):
            rates = {}
            for kv in kvs:
                rates[kv] = decode_rate(model, kv, sizes["context"], sizes["new"], engine)
                release(device)
            default = dict(CUDA_CONFIG)
            for spec in args.decode_configs:  # the dict decode_qkv shares: patch it in place
                block_n, warps, stages = (int(x) for x in spec.split(":"))
                CUDA_CONFIG.update(BLOCK_N=block_n, num_warps=warps, num_stages=stages)
                name = f"{kvs[-1]} {spec}"
                rates[name] = decode_rate(model, kvs[-1], sizes["context"], sizes["new"], engine)
                CUDA_CONFIG.update(default)
                release(device)
            print(f"\n(2) batch-1 decode at {sizes['context']} tokens of context")
            base = rates[kvs[0]]
            for kv, r in rates.items():
                print(f"{kv:>14} {r:8.1f} tok/s  {100 * (r / base - 1):+6.1f}%")
            result["decode"] = rates
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
