"""Tensor parallelism (issue 23): TP=1 against TP=2 on a random Llama-3-8B-shaped checkpoint.

    PYTHONPATH=src python3 benchmarks/bench_tp.py [--tp 1 2] [--layers 32] [--cache DIR]

(one size per call also works: --tp 1, then --tp 2 compares against the TP=1 numbers kept
beside the cached checkpoint)

For each tensor_parallel_size: batch-1 greedy decode tokens/s through kiln.LLM (from the
first token to the last), offline throughput on nano-vllm's workload (kiln.eval.workload), and
whether the greedy tokens of a few prompts equal TP=1's (bf16 may part ways at a near-tie:
the table says at which token). TP=2 needs 2 GPUs of one host (NCCL). Without CUDA it runs a
tiny model on gloo workers, to show that it works.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from kiln.engine import LLM, SamplingParams
from kiln.eval.workload import offline_workload, run_offline

LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
    rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
    eos_token_id=2, torch_dtype="bfloat16", model_type="llama", architectures=["LlamaForCausalLM"],
)  # fmt: skip
TINY = {**LLAMA3_8B, "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 1024, "torch_dtype": "float32"}  # fmt: skip


def random_checkpoint(out: Path, config: dict, device: str) -> Path:
    """A Llama checkpoint of `config` with N(0, 0.02) weights (norms 1), written once."""
    if (out / "done").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    d = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * d
    dtype = getattr(torch, config["torch_dtype"])
    gen = torch.Generator(device).manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen, device=device) * 0.02).to(dtype).cpu()

    state = {"model.embed_tokens.weight": rand(v, h), "lm_head.weight": rand(v, h),
             "model.norm.weight": torch.ones(h, dtype=dtype)}  # fmt: skip
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h),
              "mlp.down_proj": (h, i)}  # fmt: skip
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        state |= {f"{p}{name}.weight": rand(*shape) for name, shape in shapes.items()}
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"{p}{norm}.weight"] = torch.ones(h, dtype=dtype)
    save_file(state, str(out / "model.safetensors"), {"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "done").touch()
    return out


def decode_rate(llm: LLM, prompt_len: int, new_tokens: int) -> float:
    """Batch-1 decode tokens/s: from the first token to the last."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompt_token_ids=[[7] * prompt_len], sampling_params=params)  # warm up
    out = llm.generate(prompt_token_ids=[list(range(11, 11 + prompt_len))], sampling_params=params)
    m = out[0].metrics
    return (new_tokens - 1) / (m.finished_time - m.first_token_time)


def greedy(llm: LLM, vocab: int, new_tokens: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 37, 120, 300)]
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts,
                                                          sampling_params=params)]  # fmt: skip


def agreement(got: list[list[int]], want: list[list[int]]) -> str:
    """'4/4 equal', or the prompts that part ways and at which generated token."""
    parted = [f"#{i} at {next(j for j, (a, b) in enumerate(zip(g, w)) if a != b)}"
              for i, (g, w) in enumerate(zip(got, want)) if g != w]  # fmt: skip
    return f"{len(want) - len(parted)}/{len(want)} equal" + (
        f" ({', '.join(parted)})" if parted else ""
    )


def measure(path: Path, tp: int, cuda: bool, args) -> dict:
    engine = dict(tensor_parallel_size=tp, max_num_seqs=256 if cuda else 16)
    if not cuda:
        engine |= dict(device="cpu", max_num_batched_tokens=512)
    start = time.perf_counter()
    llm = LLM(str(path), **engine)
    row = {"tp": tp, "startup_s": time.perf_counter() - start}
    try:
        row["decode"] = decode_rate(llm, args.prompt_len, args.new_tokens)
        vocab = llm.engine.model_config.vocab_size
        row["greedy"] = greedy(llm, vocab, 32 if cuda else 8)
        n, lens = (256, (100, 1024)) if cuda else (16, (16, 64))
        run_offline(llm, offline_workload(min(n, 32), lens, lens, vocab, seed=1))  # warm-up
        row["offline"] = run_offline(llm, offline_workload(n, lens, lens, vocab, seed=0))
    finally:
        llm.engine.core.close()
        del llm
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="sizes to run")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (default: the 8B's)")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/kiln-bench-tp"))
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=None, help="batch-1 decode tokens")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    config = dict(LLAMA3_8B if cuda else TINY)
    if args.layers:
        config["num_hidden_layers"] = args.layers
    args.new_tokens = args.new_tokens or (256 if cuda else 32)
    name = f"llama3-8b-shaped-{config['num_hidden_layers']}l" if cuda else "tiny-llama"
    path = random_checkpoint(args.cache / name, config, "cuda" if cuda else "cpu")
    device = torch.cuda.get_device_name() if cuda else "CPU (gloo workers)"
    print(f"{name}, {device}, batch-1 decode of {args.new_tokens} tokens after "
          f"{args.prompt_len}", flush=True)  # fmt: skip
    lines = ["| TP | batch-1 decode tok/s | x TP=1 | offline output tok/s | x TP=1 | "
             "greedy vs TP=1 | start-up s |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    print("\n".join(lines), flush=True)
    for tp in args.tp:
        row = measure(path, tp, cuda, args)
        # each size's numbers are kept beside the checkpoint: TP=1 may have run in an earlier
        # call (one size per call fits a 5-minute slot on an 8B model)
        (path / f"result-tp{tp}.json").write_text(json.dumps(row))
        base_file = path / "result-tp1.json"
        base = json.loads(base_file.read_text()) if base_file.exists() else row
        off, off0 = row["offline"]["output_tok_s"], base["offline"]["output_tok_s"]
        lines.append(
            f"| {tp} | {row['decode']:.1f} | {row['decode'] / base['decode']:.2f} | {off:.0f} | "
            f"{off / off0:.2f} | {agreement(row['greedy'], base['greedy'])} | "
            f"{row['startup_s']:.1f} |"
        )
        print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
