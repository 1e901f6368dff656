"""kiln behind Ray Serve: N replicas, each a whole kiln server (its own engine), behind one
OpenAI endpoint, scaled on the requests each replica has in flight (`target_ongoing_requests`).

    python deploy/ray/serve.py --model DIR --min-replicas 1 --max-replicas 4 [kiln engine flags]

Each replica builds the same FastAPI app `kiln serve` runs (kiln.serve.api.create_app over an
AsyncLLM), so every route, error, /metrics and /health behaves as on one server; request ids
carry the replica (`chatcmpl-r<id>-...`). Ray's controller replaces a replica that dies. Needs
`pip install kiln[ray]`.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from typing import Any

from kiln.engine.config import EngineConfig
from kiln.errors import InputError, KilnError

DEFAULT_TARGET_ONGOING = 8  # requests in flight per replica before Serve adds one


class KilnReplica:
    """One replica: kiln's app over its own engine (started by the app's lifespan)."""

    def __init__(self, model: str, served_model_name: str, app_options: dict, engine_args: dict):
        self.args = (model, served_model_name, app_options, engine_args)

    def __serve_build_asgi_app__(self):
        from ray import serve

        from kiln.engine.async_engine import AsyncLLM
        from kiln.serve.api import create_app

        model, name, app_options, engine_args = self.args
        tag = serve.get_replica_context().replica_id.unique_id
        engine = AsyncLLM(model, **engine_args)
        return create_app(engine, name, request_id_tag=f"r{tag}-", **app_options)


def deployment_options(
    num_replicas: int | None = None,
    min_replicas: int = 1,
    max_replicas: int = 1,
    target_ongoing_requests: float = DEFAULT_TARGET_ONGOING,
    max_ongoing_requests: int = 64,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
) -> dict[str, Any]:
    """serve.deployment's options: a fixed `num_replicas`, else autoscaling between min and
    max replicas on `target_ongoing_requests`."""
    if num_replicas is not None and num_replicas < 1:
        raise InputError(f"--num-replicas must be >= 1, got {num_replicas}")
    if num_replicas is None and not 1 <= min_replicas <= max_replicas:
        raise InputError(
            f"need 1 <= --min-replicas <= --max-replicas, got {min_replicas} {max_replicas}"
        )
    if target_ongoing_requests <= 0 or max_ongoing_requests < 1:
        raise InputError("--target-ongoing-requests must be > 0 and --max-ongoing-requests >= 1")
    options: dict[str, Any] = dict(
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        health_check_period_s=5,
        graceful_shutdown_timeout_s=30,
    )
    if num_replicas is not None:
        options["num_replicas"] = num_replicas
    else:
        options["autoscaling_config"] = dict(
            min_replicas=min_replicas, max_replicas=max_replicas,
            target_ongoing_requests=target_ongoing_requests,
            upscale_delay_s=10, downscale_delay_s=120,
        )  # fmt: skip
    return options


def build_app(
    model: str,
    served_model_name: str | None = None,
    app_options: dict | None = None,
    engine_args: dict | None = None,
    **options: Any,
):
    """The Serve application: KilnReplica with `deployment_options(**options)`, bound."""
    from ray import serve

    if not os.path.isfile(os.path.join(model, "config.json")):
        raise InputError(f"no config.json in {model!r}")
    deployment = serve.deployment(
        serve.ingress()(KilnReplica), name="kiln", **deployment_options(**options)
    )
    name = served_model_name or os.path.basename(os.path.normpath(model))
    return deployment.bind(model, name, app_options or {}, engine_args or {})


def connect(address: str | None, num_cpus: int | None = None) -> None:
    """ray.init: a running cluster at `address` ("auto": the local one), else a new local one.
    An address that cannot be reached is an InputError (one line)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address not in (None, "auto", "local"):
        check_reachable(address)  # ray.init retries a dead address for minutes
    try:
        ray.init(address=address, num_cpus=num_cpus, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)  # fmt: skip
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot reach the Ray cluster at {address!r}: {first}") from None


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """InputError unless a TCP connection to `address` ([ray://]host:port) opens."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--address must be host:port or auto, got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise InputError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deploy/ray/serve.py", description="kiln replicas behind one Ray Serve endpoint"
    )
    p.add_argument("--model", required=True, help="model directory (on every Ray node)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", default=None,
                   help="a Ray cluster (host:port or auto); default: a new local one")  # fmt: skip
    p.add_argument("--num-replicas", type=int, default=None,
                   help="a fixed number of replicas (default: autoscale)")  # fmt: skip
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=1)
    p.add_argument("--target-ongoing-requests", type=float, default=DEFAULT_TARGET_ONGOING,
                   help="requests in flight per replica that autoscaling aims for")  # fmt: skip
    p.add_argument("--max-ongoing-requests", type=int, default=64,
                   help="requests a replica takes at once; more wait in Serve's queue")  # fmt: skip
    p.add_argument("--num-cpus-per-replica", type=float, default=1.0)
    p.add_argument("--num-gpus-per-replica", type=float, default=0.0)
    p.add_argument("--api-key", default=os.environ.get("KILN_API_KEY"))
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    EngineConfig.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Start (or join) a Ray cluster, deploy kiln, and serve until interrupted."""
    args = parser().parse_args(argv)
    try:
        import ray  # noqa: F401
        from ray import serve
    except ImportError:
        print("deploy/ray/serve.py: error: Ray is not installed (pip install 'kiln[ray]')",
              file=sys.stderr)  # fmt: skip
        return 2
    engine_args = EngineConfig.args_from(args)
    for key in ("dtype", "device"):
        if getattr(args, key):
            engine_args[key] = getattr(args, key)
    try:
        app = build_app(
            args.model, args.served_model_name, {"api_key": args.api_key}, engine_args,
            num_replicas=args.num_replicas, min_replicas=args.min_replicas,
            max_replicas=args.max_replicas, target_ongoing_requests=args.target_ongoing_requests,
            max_ongoing_requests=args.max_ongoing_requests, num_cpus=args.num_cpus_per_replica,
            num_gpus=args.num_gpus_per_replica,
        )  # fmt: skip
        connect(args.address)
    except KilnError as e:
        print(f"deploy/ray/serve.py: error: {e}", file=sys.stderr)
        return 2
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name="kiln", route_prefix="/")
    print(f"kiln on Ray Serve: http://{args.host}:{args.port}/v1", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0
