"""`kiln demo`: build the bundled default model once (kiln BPE + pretraining on the bundled
Shakespeare, then a short SFT pass on the bundled chat set; on CPU, a few minutes), then
generate a sample from it.

The build is what these two commands do, with the pretraining cached in models/default/pretrain
and the chat model in models/default/chat:

    kiln pretrain --config configs/default.toml
    kiln sft --model models/default/pretrain/model --out models/default/chat <SFT_FLAGS>
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from kiln.train.default_model import CORPUS, DEFAULT_CONFIG, default_dir

# About two epochs of the bundled chat set (kiln/data/sft/shakespeare.jsonl), a tenth of the
# pretraining's compute: enough for the model to keep to ChatML turns and end its own with
# <|im_end|> (more steps lower the train loss, not the validation loss).
SFT_FLAGS = [
    "--max-steps", "40", "--batch-size", "16", "--pack", "--lr", "1e-3", "--warmup-steps", "10",
    "--eval-steps", "2",
]  # fmt: skip
DEMO_MESSAGE = "Continue this line from Hamlet:\nTo be, or not to be, that is the question:"


def ensure_default_model(out_dir: str | Path | None = None) -> Path:
    """The default model's HF directory (models/default/chat), built and cached on first use.

    An interrupted build resumes from its last checkpoint. Each stage's export writes its
    config.json last, so its presence means that stage is complete.
    """
    from kiln.train.checkpoint import CHECKPOINT_NAME
    from kiln.train.config import load_config
    from kiln.train.pretrain import run_pretrain
    from kiln.train.sft import run_sft, sft_args

    root = Path(out_dir) if out_dir is not None else default_dir()
    cfg = load_config(DEFAULT_CONFIG)
    cfg.data.corpus = str(CORPUS)
    cfg.train.out_dir = str(root / "pretrain")
    base, chat = root / "pretrain" / "model", root / "chat"
    if not (base / "config.json").is_file():
        run_pretrain(cfg, resume=(root / "pretrain" / CHECKPOINT_NAME).is_file())
    if not (chat / "config.json").is_file():
        argv = ["--model", str(base), "--out", str(chat), "--device", cfg.train.device]
        if (chat / "run" / CHECKPOINT_NAME).is_file():
            argv.append("--resume")
        run_sft(sft_args([*argv, *SFT_FLAGS]))
    return chat


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build the default model if needed, sample, serve it")
    p.add_argument("--prompt", default="ROMEO.\n", help="text to continue")
    p.add_argument("--message", default=DEMO_MESSAGE, help="a user message to answer in chat")
    p.add_argument("--max-tokens", type=int, default=120)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None, help="where to build/cache (default models/default)")
    p.add_argument("--no-serve", action="store_true", help="print samples and exit, no server")
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

    def continuation(ids: list[int]) -> str:
        room = model.config.max_position_embeddings - len(ids)
        out = generate(
            model,
            torch.tensor([ids]),
            min(args.max_tokens, room),
            temperature=args.temperature,
            top_k=args.top_k,
            seed=args.seed,
            eos_token_ids=tok.eos_token_ids,
        )
        return tok.decode(out[0, len(ids) :].tolist())

    messages = [{"role": "user", "content": args.message}]
    print("-" * 60)
    print(args.prompt + continuation(tok.encode(args.prompt)))
    print("-" * 60)
    print(f"user: {args.message}")
    print(f"assistant: {continuation(tok.apply_chat_template(messages, tokenize=True))}")
    print("-" * 60)
    if not args.no_serve:
        serve_demo(model_dir, port=args.port)


def demo_examples(base_url: str, model_name: str, chat: bool) -> str:
    """A curl command and an `openai` client snippet that talk to the served model: chat
    completions when the model has a chat template, plain completions otherwise."""
    if chat:
        route, field = "chat/completions", {"messages": [{"role": "user", "content": "Hello!"}]}
        call = "client.chat.completions.create"
        piece = "chunk.choices[0].delta.content or ''"
    else:
        route, field = "completions", {"prompt": "ROMEO.\n"}
        call, piece = "client.completions.create", "chunk.choices[0].text"
    body = {"model": model_name, **field, "max_tokens": 64}
    args = ", ".join(f"{k}={v!r}" for k, v in body.items())
    return f"""\
Serving {model_name!r} at {base_url}/v1 (Ctrl-C to stop). Try:

  curl {base_url}/v1/{route} -H 'Content-Type: application/json' \\
    -d '{json.dumps(body)}'

or from Python (pip install openai):

from openai import OpenAI
client = OpenAI(base_url="{base_url}/v1", api_key="unused")
for chunk in {call}({args}, stream=True):
    print({piece}, end="", flush=True)
print()
"""


def serve_demo(
    model_dir: str | os.PathLike | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str = "kiln-demo",
) -> None:
    """Serve the demo model (built first if needed) and print how to talk to it."""
    from kiln.serve.server import serve
    from kiln.tokenizer.hf import load_tokenizer

    if model_dir is None:
        model_dir = ensure_default_model()
    chat = load_tokenizer(model_dir).chat_template is not None
    print(demo_examples(f"http://{host}:{port}", served_model_name, chat), flush=True)
    serve(model_dir, host=host, port=port, served_model_name=served_model_name)
