"""`kiln serve --model DIR`: the OpenAI-compatible server."""

from __future__ import annotations

import argparse
import os

from kiln.engine.config import EngineConfig


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model directory over OpenAI's /v1/completions and "
        "/v1/chat/completions, with /health and Prometheus /metrics.",
    )
    p.add_argument("--model", required=True, help="model directory (Hugging Face layout)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key", default=os.environ.get("KILN_API_KEY"),
        help="require `Authorization: Bearer KEY` on every route but /health "
        "(default: $KILN_API_KEY)",
    )  # fmt: skip
    p.add_argument(
        "--public-metrics", action="store_true",
        help="with --api-key, leave /metrics open (for a scraper without the key)",
    )  # fmt: skip
    p.add_argument("--served-model-name", default=None, help="the name clients ask for")
    p.add_argument(
        "--max-queue",
        type=int,
        default=None,
        help="sequences that may wait beyond --max-num-seqs before new requests get 429 "
        "(default 256)",
    )
    p.add_argument(
        "--drain-timeout", type=float, default=30.0,
        help="on SIGTERM, seconds to let in-flight requests finish (new ones get 503) before "
        "aborting the rest and exiting 0",
    )  # fmt: skip
    p.add_argument(
        "--stream-send-timeout", type=float, default=60.0,
        help="abort a stream whose client has read nothing for this many seconds",
    )  # fmt: skip
    p.add_argument("--max-connections", type=int, default=4096,
                   help="open connections beyond this get 503")  # fmt: skip
    p.add_argument(
        "--http",
        default="auto",
        choices=["auto", "h11", "httptools"],
        help="uvicorn's HTTP parser (auto: httptools when installed)",
    )
    p.add_argument(
        "--loop",
        default="auto",
        choices=["auto", "asyncio", "uvloop"],
        help="uvicorn's event loop (auto: uvloop when installed)",
    )
    p.add_argument("--backlog", type=int, default=4096,
                   help="connections the kernel queues before they are accepted (capped at "
                   "net.core.somaxconn)")  # fmt: skip
    p.add_argument(
        "--api-server-count", type=int, default=1,
        help="API processes in front of the one engine core, sharing the listener (a burst "
        "of requests is admitted by several CPUs). Per process: --max-queue is split among "
        "them (rounded up), --max-connections applies to each, and /metrics shows the "
        "request counters and latency histograms of the process that answers the scrape "
        "(the engine's gauges are the same in all)",
    )  # fmt: skip
    p.add_argument(
        "--tool-call-parser", default=None, choices=["hermes", "llama3_json"],
        help="how tool calls are found in a model's answer when tool_choice is auto: "
        "hermes (<tool_call> JSON blocks: Qwen, Hermes) or llama3_json (a JSON object)",
    )  # fmt: skip
    p.add_argument(
        "--lora-modules", nargs="+", default=[], metavar="NAME=DIR",
        help="LoRA adapters (PEFT directories) served under NAME (with --enable-lora)",
    )  # fmt: skip
    p.add_argument(
        "--lora-root", default=None,
        help="the directory under which POST /v1/load_lora_adapter may load adapters "
        "(unset: no loading at run time)",
    )  # fmt: skip
    p.add_argument(
        "--rollout-config", default=None, metavar="FILE",
        help="a JSON routing table: public model names -> versions with canary weights, "
        "shadow targets and rollback rules (kiln.serve.rollout)",
    )  # fmt: skip
    p.add_argument(
        "--guardrails", default=None, metavar="CONFIG",
        help="a TOML/JSON file of input and output checks (prompt injection, PII, denylist, "
        "regex/JSON, moderation hook) applied to the completion routes (kiln.serve.guardrails)",
    )  # fmt: skip
    p.add_argument("--dtype", default=None, help="bfloat16, float16 or float32")
    p.add_argument("--device", default=None)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    EngineConfig.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kiln.errors import InputError
    from kiln.serve.lora import parse_lora_modules
    from kiln.serve.server import serve

    if not 1 <= args.port <= 65535:
        raise InputError(f"--port must be in [1, 65535], got {args.port}")
    if args.stream_send_timeout <= 0:
        raise InputError(f"--stream-send-timeout must be > 0, got {args.stream_send_timeout}")
    if args.drain_timeout < 0:
        raise InputError(f"--drain-timeout must be >= 0, got {args.drain_timeout}")
    if args.max_connections < 1:
        raise InputError(f"--max-connections must be >= 1, got {args.max_connections}")
    if args.backlog < 1:
        raise InputError(f"--backlog must be >= 1, got {args.backlog}")
    if args.api_server_count < 1:
        raise InputError(f"--api-server-count must be >= 1, got {args.api_server_count}")
    if args.max_queue is not None and args.max_queue < 0:
        raise InputError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.guardrails is not None:  # a bad file fails before the model loads
        from kiln.apps.guardrails import GuardrailsConfig

        GuardrailsConfig.from_file(args.guardrails)
    engine_args = EngineConfig.args_from(args)
    if args.dtype:
        engine_args["dtype"] = args.dtype
    if args.device:
        engine_args["device"] = args.device
    queue = {} if args.max_queue is None else {"max_queue": args.max_queue}
    serve(
        args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        served_model_name=args.served_model_name,
        log_level=args.log_level,
        drain_timeout=args.drain_timeout,
        max_connections=args.max_connections,
        backlog=args.backlog,
        http=args.http,
        loop=args.loop,
        public_metrics=args.public_metrics,
        stream_send_timeout=args.stream_send_timeout,
        api_server_count=args.api_server_count,
        tool_call_parser=args.tool_call_parser,
        lora_modules=parse_lora_modules(args.lora_modules),
        lora_root=args.lora_root,
        rollout_config=args.rollout_config,
        guardrails=args.guardrails,
        **queue,
        **engine_args,
    )
    return 0
