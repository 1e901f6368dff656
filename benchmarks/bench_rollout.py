"""RL rollouts: tokens/s sampled through kiln's engine vs transformers' generate for the same
policy, and the time of one GRPO step split into its parts.

One random-weight policy (Qwen3-0.6B's shape on a GPU, a small Qwen3 on CPU) saved once; the
engine starts from that directory, HF generate runs the transformers model of it. Workload:
--prompts prompts of --prompt-len random tokens, --n samples each (temperature 1, ignore_eos:
every completion is --max-tokens long, so both sides generate the same token count). The
GRPO step is kiln's: policy weights synced into the engine, the rollout sampled, a reward
(the completion's share of even token ids: cheap, arbitrary), the reference's logps, then the
GRPO loss's forward, backward and AdamW step over the rollout (bf16 autocast on CUDA). The last
line is the mean |engine - trainer| log-probability per sampled token: the engine sampled from
the weights just synced into it.

    PYTHONPATH=src python benchmarks/bench_rollout.py                  # GPU: Qwen3-0.6B shape
    PYTHONPATH=src python benchmarks/bench_rollout.py --cpu            # the CPU table
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from shapes import QWEN3_0_6B

from kiln.config import ModelConfig
from kiln.engine import LLM, SamplingParams
from kiln.model.loader import load_model, save_model
from kiln.model.transformer import Transformer
from kiln.train.config import GRPOConfig
from kiln.train.grpo import GRPOLoss, group_advantages
from kiln.train.loop import to_device
from kiln.train.rl import sample_batch, token_logps
from kiln.train.rollout import Prompt, Sample

CPU_SHAPE = dict(QWEN3_0_6B, vocab_size=4096, hidden_size=256, intermediate_size=768,
                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 max_position_embeddings=1024)  # fmt: skip


def build_policy(shape: dict, out: Path) -> Path:
    config = ModelConfig.from_hf(dict(shape, model_type="qwen3", bos_token_id=1, eos_token_id=2))
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights()
    save_model(model, out)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def engine_rollout(llm: LLM, prompts: list[list[int]], args) -> tuple[list, int]:
    params = SamplingParams(n=args.n, temperature=1.0, max_tokens=args.max_tokens,
                            ignore_eos=True)  # fmt: skip
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    return outs, sum(len(c.token_ids) for o in outs for c in o.outputs)


def hf_rollout(hf, prompts: list[list[int]], args, device) -> int:
    ids = torch.tensor(prompts, device=device)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                          temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.max_tokens,
                          min_new_tokens=args.max_tokens, num_return_sequences=args.n,
                          pad_token_id=0)  # fmt: skip
    return (out.shape[1] - ids.shape[1]) * out.shape[0]


def grpo_step(llm, policy, reference, optimizer, prompts, args, device) -> dict[str, float]:
    """One GRPO step (one rollout, one optimizer step), each part timed."""
    from kiln.model.lora import merged_state_dict

    ctx = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else _null()
    parts = {}
    _, parts["sync"] = timed(lambda: llm.engine.core.load_weights(merged_state_dict(policy)),
                             device)  # fmt: skip
    (outs, _), parts["rollout"] = timed(lambda: engine_rollout(llm, prompts, args), device)
    t = time.perf_counter()
    samples = [
        Sample(
            Prompt("", p, {}), list(c.token_ids), "", c.cumulative_logprob or 0.0, c.finish_reason
        )
        for p, o in zip(prompts, outs)
        for c in o.outputs
    ]
    rewards = torch.tensor([sum(t % 2 == 0 for t in s.completion_ids) / len(s.completion_ids)
                            for s in samples])  # fmt: skip
    batch = sample_batch(samples, 0) | {
        "rewards": rewards,
        "advantages": group_advantages(rewards, args.n),
    }
    batch = to_device(batch, device)
    batch["tokens_per_micro_batch"] = (batch["labels"] != -100).sum().float()
    sync(device)
    parts["batch"] = time.perf_counter() - t

    def reference_logps():
        with torch.no_grad(), ctx:
            logits = reference(batch["input_ids"], batch["positions"])
            batch["ref_logps"] = token_logps(logits, batch["labels"])[0]

    _, parts["reference"] = timed(reference_logps, device)
    loss_fn = GRPOLoss(GRPOConfig(), args.max_tokens)

    def train():
        gaps = []
        for i in range(0, len(samples), args.micro_batch):
            micro = {k: v[i : i + args.micro_batch] if torch.is_tensor(v) and v.dim() else v
                     for k, v in batch.items()}  # fmt: skip
            with ctx:
                loss, metrics = loss_fn(policy, micro)
            (loss * len(micro["input_ids"]) / len(samples)).backward()
            gaps.append(float(metrics["logprob_gap"]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return sum(gaps) / len(gaps)

    gap, parts["train"] = timed(train, device)
    parts["total"] = sum(parts.values())
    return parts, gap


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="the small shape on CPU")
    p.add_argument("--prompts", type=int, default=None, help="prompts a rollout (64; CPU 8)")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--prompt-len", type=int, default=None, help="tokens a prompt (128; CPU 32)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens a completion (256; CPU 32)")
    p.add_argument("--micro-batch", type=int, default=None, help="rows a training micro-batch")
    p.add_argument("--steps", type=int, default=3, help="GRPO steps timed (after one warm-up)")
    p.add_argument("--skip-hf", action="store_true")
    args = p.parse_args()
    gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if gpu else "cpu")
    args.prompts = args.prompts or (64 if gpu else 8)
    args.prompt_len = args.prompt_len or (128 if gpu else 32)
    args.max_tokens = args.max_tokens or (256 if gpu else 32)
    args.micro_batch = args.micro_batch or (8 if gpu else 64)  # GPU: [8, T, 151936] logits
    shape = QWEN3_0_6B if gpu else CPU_SHAPE
    tmp = Path(tempfile.mkdtemp(prefix="bench_rollout_"))
    path = build_policy(shape, tmp / "policy")
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, shape["vocab_size"], (args.prompts, args.prompt_len),
                            generator=g).tolist()  # fmt: skip
    name = "Qwen3-0.6B shape" if gpu else "small Qwen3 (4 x 256)"
    where = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}, {where}: {args.prompts} prompts x n={args.n}, prompt {args.prompt_len} "
          f"tokens, {args.max_tokens} new tokens each\n")  # fmt: skip

    engine_args = {"gpu_memory_utilization": 0.3} if gpu else {}
    llm = LLM(str(path), device=device, **engine_args)
    engine_rollout(llm, prompts[:2], args)  # warm-up (CUDA graphs are captured at start)
    rows = []
    (_, tokens), secs = timed(lambda: engine_rollout(llm, prompts, args), device)
    rows.append(("kiln engine", tokens, secs))
    if not args.skip_hf:
        import transformers

        dtype = torch.bfloat16 if gpu else torch.float32
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        hf_rollout(hf, prompts[:1], args, device)
        tokens, secs = timed(lambda: hf_rollout(hf, prompts, args, device), device)
        rows.append(("HF generate", tokens, secs))
        del hf
    print("| rollout | new tokens | seconds | tokens/s |\n|---|---:|---:|---:|")
    for label, tokens, secs in rows:
        print(f"| {label} | {tokens} | {secs:.2f} | {tokens / secs:,.0f} |")
    if len(rows) == 2:
        print(f"\nengine / HF generate: {rows[0][1] / rows[0][2] / (rows[1][1] / rows[1][2]):.1f}x")

    policy = load_model(path, dtype=torch.float32, device=device).requires_grad_(True).train()
    reference = load_model(path, device=device)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6, fused=gpu)
    grpo_step(llm, policy, reference, optimizer, prompts, args, device)  # warm-up
    steps, gaps = zip(*[grpo_step(llm, policy, reference, optimizer, prompts, args, device)
                        for _ in range(args.steps)])  # fmt: skip
    print(f"\nGRPO step ({args.prompts * args.n} completions, mean of {args.steps}):\n")
    print("| part | seconds | share |\n|---|---:|---:|")
    total = sum(s["total"] for s in steps) / len(steps)
    for part in ("sync", "rollout", "batch", "reference", "train", "total"):
        secs = sum(s[part] for s in steps) / len(steps)
        print(f"| {part} | {secs:.3f} | {secs / total:.0%} |")
    print(f"\nengine vs trainer log-probability per completion token (mean |gap|, the synced "
          f"weights sampled): {sum(gaps) / len(gaps):.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
