"""kiln's ablation table (`kiln bench ablate`, kiln.eval.ablate) on a Qwen3-0.6B-shaped random
bfloat16 model: every optimization switched off in turn, all rows measured in one run.

    PYTHONPATH=src python3 benchmarks/bench_ablate.py --out DIR            # GPU, ~6 minutes
    PYTHONPATH=src python3 benchmarks/bench_ablate.py --tiny --out DIR     # CPU smoke run

Writes DIR/ablate.md (the table), DIR/ablate.json and DIR/ablate.png. Extra arguments go to
`kiln bench ablate` (e.g. --only "CUDA graphs" "KV cache", --repeat 3).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from shapes import QWEN3_0_6B

from kiln.eval import ablate

# A 4096-token context and an 8 GiB KV pool (about 75k token slots at 112 KiB a token): room
# for 18 sequences preallocated contiguously at max_model_len, against up to 256 paged ones.
GPU_ARGS = ["--max-model-len", "4096", "--kv-cache-memory-bytes", str(8 * 2**30)]
TINY = dict(QWEN3_0_6B, vocab_size=512, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=512)  # fmt: skip
TINY_ARGS = ["--latency-prompt", "16", "--latency-tokens", "8", "--num-prompts", "8",
             "--input-len", "8", "64", "--output-len", "4", "16", "--prefix-len", "128",
             "--prefix-requests", "8", "--suffix-len", "8", "--prefix-output", "4",
             "--kv-prompt", "32", "--kv-tokens", "16", "--kv-batch", "2",
             "--dtype", "float32", "--device", "cpu", "--repeat", "1"]  # fmt: skip


def build_model(out: Path, shape: dict, device: str, dtype: torch.dtype) -> None:
    import transformers

    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.Qwen3Config(**shape), dtype=dtype
        )
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--tiny", action="store_true", help="a tiny Qwen3 on CPU (smoke run)")
    args, rest = ap.parse_known_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(tempfile.mkdtemp())
    if args.tiny:
        build_model(model_dir, TINY, "cpu", torch.float32)
        extra = TINY_ARGS
    else:
        build_model(model_dir, {**QWEN3_0_6B, "max_position_embeddings": 4096}, "cuda",
                    torch.bfloat16)  # fmt: skip
        extra = GPU_ARGS
    parser = argparse.ArgumentParser(prog="bench_ablate")
    ablate.add_arguments(parser)
    parsed = parser.parse_args(["--model", str(model_dir), *extra, *rest,
                                "--json", str(out / "ablate.json"),
                                "--plot", str(out / "ablate.png")])  # fmt: skip
    ablate.main(parsed)
    import json

    (out / "ablate.md").write_text(ablate.table(json.loads((out / "ablate.json").read_text())))


if __name__ == "__main__":
    main()
