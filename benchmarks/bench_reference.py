"""Reference decode speed: kiln's contiguous-KV loop beside transformers `generate`.

    python benchmarks/bench_reference.py                 # tiny model, CPU
    python benchmarks/bench_reference.py --qwen3-0.6b    # Qwen3-0.6B-shaped random bf16 (GPU)

Prints a table of decode tokens/s (median of --repeats runs) and checks that both produce
the same greedy tokens (reporting the first divergence otherwise).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from shapes import QWEN3_0_6B  # noqa: E402

import kiln  # noqa: E402
from kiln.generate import generate  # noqa: E402

QWEN3_06B = QWEN3_0_6B
TINY = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    tie_word_embeddings=True,
    max_position_embeddings=1024,
)


def build(out: Path, shape: dict, dtype: torch.dtype, device: str):
    import transformers

    config = transformers.Qwen3Config(**shape, dtype=dtype)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.Qwen3ForCausalLM(config).to(dtype).eval()
    model.save_pretrained(out)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> tuple[float, torch.Tensor]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument(
        "--qwen3-0.6b", dest="qwen3", action="store_true", help="the Qwen3-0.6B shape in bf16"
    )
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    big = args.qwen3
    dtype = torch.bfloat16 if big else torch.float32
    shape = QWEN3_06B if big else TINY
    with tempfile.TemporaryDirectory() as tmp:
        hf = build(Path(tmp), shape, dtype, device)
        model = kiln.load_model(tmp, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (args.batch, args.prompt_len), generator=g)
    ids = ids.to(device)
    n = args.new_tokens

    def run_kiln():
        return generate(model, ids, max_new_tokens=n)

    def run_hf():
        with torch.inference_mode():
            return hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
            )

    rows = []
    outs = {}
    for name, fn in [("kiln reference", run_kiln), ("transformers generate", run_hf)]:
        sec, outs[name] = timed(fn, device, args.repeats)
        rows.append((name, sec, args.batch * n / sec))
    a, b = (
        outs["kiln reference"][:, args.prompt_len :],
        outs["transformers generate"][:, args.prompt_len :],
    )
    same = torch.equal(a, b)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(
        f"\ndevice: {name} ({torch.get_num_threads()} CPU threads) | dtype {dtype} | "
        f"params {model.num_parameters() / 1e6:.1f}M | batch {args.batch} | prompt "
        f"{args.prompt_len} | new tokens {n} | median of {args.repeats}"
    )
    print(f"{'implementation':<24}{'seconds':>10}{'tokens/s':>12}{'ratio':>8}")
    for impl, sec, tps in rows:
        print(f"{impl:<24}{sec:>10.3f}{tps:>12.1f}{tps / rows[1][2]:>8.2f}")
    if same:
        print("greedy tokens: identical")
    else:
        diff = (a != b).nonzero()
        row, col = diff[0].tolist()
        print(
            f"greedy tokens: first divergence at row {row}, new token {col} "
            f"(kiln {a[row, col].item()} vs HF {b[row, col].item()})"
        )


if __name__ == "__main__":
    main()
