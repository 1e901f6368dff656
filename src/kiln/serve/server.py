"""Running the app: uvicorn with a drain on SIGTERM, and the demo's `serve_demo`."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import uvicorn
from fastapi import FastAPI

from kiln.serve.api import DEFAULT_MAX_QUEUE, create_app


class DrainingServer(uvicorn.Server):
    """uvicorn's server that, on SIGTERM/SIGINT, first turns new requests away with 503.

    uvicorn then stops listening, lets in-flight responses finish, and runs the app's shutdown,
    which drains the engine."""

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self.gate = app.state.ctx.gate

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.gate.draining = True
        super().handle_exit(sig, frame)


def build_engine(model: str | os.PathLike, **engine_args: Any):
    """An AsyncLLM over a model directory (not started: the app starts it)."""
    from kiln.engine.async_engine import AsyncLLM

    return AsyncLLM(str(model), **engine_args)


def serve(
    model: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    served_model_name: str | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
    log_level: str = "info",
    **engine_args: Any,
) -> None:
    """Load `model`, serve it over HTTP until SIGTERM/SIGINT, then drain and return;
    EngineDeadError (the CLI exits non-zero) if the engine core process dies."""
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from kiln.engine.async_engine import EngineDeadError

    engine = build_engine(model, **engine_args)
    app = create_app(engine, served_model_name or str(model), api_key=api_key, max_queue=max_queue)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False)
    server = DrainingServer(config, app)
    dead: list[int | None] = []

    def engine_died(exitcode: int | None) -> None:  # fail fast: a supervisor restarts us
        dead.append(exitcode)
        server.should_exit = True

    engine.on_dead.append(engine_died)
    server.run()
    if dead:
        raise EngineDeadError(f"the engine core process died (exit code {dead[0]}); stopped")


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
    from kiln.tokenizer.hf import load_tokenizer

    if model_dir is None:
        from kiln.demo import ensure_default_model

        model_dir = ensure_default_model()
    chat = load_tokenizer(model_dir).chat_template is not None
    print(demo_examples(f"http://{host}:{port}", served_model_name, chat), flush=True)
    serve(model_dir, host=host, port=port, served_model_name=served_model_name)
