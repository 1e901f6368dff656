"""`kiln demo`: build the bundled default model once (kiln BPE + pretraining on the bundled
Shakespeare, on CPU, a few minutes), then generate a sample from it."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "configs" / "default.toml"


def ensure_default_model(out_dir: str | Path | None = None) -> Path:
    """The default model's HF directory (models/default/model), built and cached on first use.

    An interrupted build resumes from its last checkpoint. The export's config.json is written
    last, so its presence means the model is complete.
    """
    from kiln.train.checkpoint import CHECKPOINT_NAME
    from kiln.train.config import load_config
    from kiln.train.pretrain import run_pretrain

    cfg = load_config(DEFAULT_CONFIG)
    cfg.data.corpus = str(REPO / cfg.data.corpus)
    out = Path(out_dir) if out_dir is not None else REPO / cfg.train.out_dir
    cfg.train.out_dir = str(out)
    model_dir = out / "model"
    if not (model_dir / "config.json").is_file():
        run_pretrain(cfg, resume=(out / CHECKPOINT_NAME).is_file())
    return model_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build the default model if needed, sample, serve it")
    p.add_argument("--prompt", default="ROMEO.\n")
    p.add_argument("--max-tokens", type=int, default=120)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None, help="where to build/cache (default models/default)")
    p.add_argument("--no-serve", action="store_true", help="print a sample and exit, no server")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> None:
    import torch

    from kiln.generate import generate
    from kiln.model.loader import load_model
    from kiln.tokenizer.hf import load_tokenizer

    start = time.perf_counter()
    model_dir = ensure_default_model(args.out_dir)
    print(f"default model: {model_dir} (ready in {time.perf_counter() - start:.0f} s)")
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, device="cpu")
    ids = torch.tensor([tok.encode(args.prompt)])
    out = generate(
        model,
        ids,
        args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        eos_token_ids=tok.eos_token_ids,
    )
    print("-" * 60)
    print(tok.decode(out[0].tolist()))
    print("-" * 60)
    if not args.no_serve:
        from kiln.serve.server import serve_demo

        serve_demo(model_dir, port=args.port)
