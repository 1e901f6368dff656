"""Multi-LoRA offline throughput: 1, 4 and 16 distinct rank-16 adapters in the batch against
the base model alone (issue 20's target: 16 adapters >= 80% of base).

Random-weight Qwen3-0.6B-shaped model (bfloat16, GPU) or a tiny one (--tiny, CPU); random
rank-16 adapters on all seven projections, written in PEFT's format. Requests take the
adapters round-robin; every run is the same nano-vllm-style workload (ignore_eos).

    PYTHONPATH=src python benchmarks/bench_lora.py              # H100: Qwen3-0.6B shape
    PYTHONPATH=src python benchmarks/bench_lora.py --tiny       # CPU smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from shapes import QWEN3_0_6B

from kiln.engine import LLM, LoRARequest, SamplingParams
from kiln.eval.workload import offline_workload

TINY = dict(QWEN3_0_6B, vocab_size=512, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=512)  # fmt: skip
PROJECTIONS = {  # HF module -> (in, out) as functions of the config
    "self_attn.q_proj": lambda c: (c["hidden_size"], c["num_attention_heads"] * c["head_dim"]),
    "self_attn.k_proj": lambda c: (c["hidden_size"], c["num_key_value_heads"] * c["head_dim"]),
    "self_attn.v_proj": lambda c: (c["hidden_size"], c["num_key_value_heads"] * c["head_dim"]),
    "self_attn.o_proj": lambda c: (c["num_attention_heads"] * c["head_dim"], c["hidden_size"]),
    "mlp.gate_proj": lambda c: (c["hidden_size"], c["intermediate_size"]),
    "mlp.up_proj": lambda c: (c["hidden_size"], c["intermediate_size"]),
    "mlp.down_proj": lambda c: (c["intermediate_size"], c["hidden_size"]),
}


def build_model(config: dict, out: Path, device: str) -> None:
    import transformers

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.Qwen3Config(**config), dtype=dtype
        )
    model.generation_config.eos_token_id = None
    model.save_pretrained(out)


def write_adapter(config: dict, out: Path, rank: int, seed: int) -> None:
    """A random PEFT LoRA adapter (all seven projections of every layer) in `out`."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module, shape in PROJECTIONS.items():
            n_in, n_out = shape(config)
            key = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, n_in, generator=g) / n_in**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, rank, generator=g) * 0.01
    out.mkdir(parents=True)
    save_file(
        {k: v.to(torch.bfloat16) for k, v in tensors.items()}, out / "adapter_model.safetensors"
    )
    targets = sorted({m.rsplit(".", 1)[1] for m in PROJECTIONS})
    cfg = dict(peft_type="LORA", task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank,
               target_modules=targets, bias="none", lora_dropout=0.0)  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(cfg))


def run(llm, workload, loras, repeat: int = 1) -> dict:
    """Generate the workload in one batch (request i with loras[i % len], None: base); the
    fastest of `repeat` runs."""
    return max((run_once(llm, workload, loras) for _ in range(repeat)), key=lambda r: r["tok_s"])


def run_once(llm, workload, loras) -> dict:
    prompts = [p for p, _ in workload]
    params = [SamplingParams(temperature=0.6, max_tokens=n, ignore_eos=True) for _, n in workload]
    per_request = [loras[i % len(loras)] for i in range(len(workload))]
    start = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, lora_request=per_request)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"seconds": elapsed, "output_tokens": tokens, "tok_s": tokens / elapsed}


def free(llm) -> None:
    del llm.engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random model on CPU")
    ap.add_argument("--requests", type=int, default=None, help="default 256 (tiny: 16)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--adapters", default="1,4,16", help="adapter counts to run")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each (the fastest counts)")
    args = ap.parse_args()
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    config = dict(TINY if args.tiny else QWEN3_0_6B, max_position_embeddings=4096)
    counts = [int(n) for n in args.adapters.split(",")]
    if args.tiny:
        work = offline_workload(args.requests or 16, (8, 48), (8, 32), config["vocab_size"])
    else:
        work = offline_workload(args.requests or 256, (100, 1024), (100, 1024), 32000)
    engine_args = {} if device == "cuda" else dict(max_num_seqs=16)
    warm = [([5] * 16, 4)] * 4
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_model(config, tmp / "model", device)
        loras = []
        for i in range(max(counts)):
            write_adapter(config, tmp / f"lora{i}", args.rank, seed=i)
            loras.append(LoRARequest(f"lora{i}", i + 1, str(tmp / f"lora{i}")))
        rows = []
        llm = LLM(str(tmp / "model"), **engine_args)
        run(llm, warm, [None])
        rows.append(("base model (enable_lora off)", run(llm, work, [None], args.repeat)))
        free(llm)
        llm = LLM(str(tmp / "model"), enable_lora=True, max_loras=max(counts),
                  max_lora_rank=args.rank, **engine_args)  # fmt: skip
        run(llm, warm * max(counts), loras)  # reads every adapter once, compiles the kernels
        rows.append(("base requests, enable_lora on", run(llm, work, [None], args.repeat)))
        for n in counts:
            rows.append(
                (
                    f"{n} adapter{'s' * (n > 1)} (rank {args.rank})",
                    run(llm, work, loras[:n], args.repeat),
                )
            )
        free(llm)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\nmulti-LoRA offline throughput ({name}; {len(work)} requests, "
          f"{'tiny' if args.tiny else 'Qwen3-0.6B-shaped'} model)")  # fmt: skip
    print("| run | output tokens | seconds | output tok/s | vs base |\n|---|---|---|---|---|")
    base = rows[0][1]["tok_s"]
    for label, r in rows:
        print(f"| {label} | {r['output_tokens']} | {r['seconds']:.2f} | {r['tok_s']:.0f} | "
              f"{r['tok_s'] / base:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
