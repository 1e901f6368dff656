"""LoRA adapters over HTTP: the `model` field names one, /v1/models lists them, and
POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's routes, behind the API key)
change them at run time.

Adapters come from `kiln serve --lora-modules name=DIR ...` and, at run time, only from
directories under `--lora-root`. Each load gets a fresh lora_int_id, never reused, so the
engine's prefix cache and host copies of an unloaded adapter can never be mistaken for a
later one's. Unloading removes the name: new requests for it get 404, requests already
running hold their LoRARequest and finish with it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from kiln.engine.lora import LoRARequest, check_lora
from kiln.errors import InputError
from kiln.serve.protocol import APIError, _Request, input_error, parse_request


class LoadLoRAAdapterRequest(_Request):
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(_Request):
    lora_name: str
    lora_int_id: int | None = None


class LoRARegistry:
    """Served adapter name -> LoRARequest; checks new ones against the base model."""

    def __init__(self, engine, base_name: str, lora_root: str | None = None):
        self.engine, self.base_name = engine, base_name
        self.root = Path(lora_root).resolve() if lora_root else None
        self.adapters: dict[str, LoRARequest] = {}
        self._static_ids = itertools.count(1)
        # run-time ids: distinct between the API processes of one engine core
        self._runtime_ids = itertools.count((os.getpid() << 20) + 1)

    def __contains__(self, name: str) -> bool:
        return name in self.adapters

    def get(self, name: str | None) -> LoRARequest | None:
        return self.adapters.get(name) if name is not None else None

    def add_static(self, name: str, path: str) -> None:
        """A --lora-modules adapter (the operator's path: no --lora-root check)."""
        self._add(LoRARequest(name, next(self._static_ids), str(Path(path).resolve())))

    async def load(self, name: str, path: str) -> LoRARequest:
        """A run-time adapter from under --lora-root (400 otherwise, or if it does not fit)."""
        if self.root is None:
            raise APIError(400, "loading adapters at run time needs --lora-root", param="lora_path")
        resolved = Path(self.root, path).resolve()
        if not resolved.is_relative_to(self.root):
            raise APIError(400, f"lora_path {path!r} is outside --lora-root", param="lora_path")
        if name == self.base_name or name in self.adapters:
            raise APIError(400, f"the model name {name!r} is already in use", param="lora_name")
        request = LoRARequest(name, next(self._runtime_ids), str(resolved))
        await asyncio.to_thread(self._add, request)
        return request

    def _add(self, request: LoRARequest) -> None:
        check_lora(self.engine.model_config, request, self.engine.config.max_lora_rank)
        self.adapters[request.lora_name] = request

    def unload(self, name: str) -> None:
        if self.adapters.pop(name, None) is None:
            raise APIError(404, f"no LoRA adapter named {name!r} is loaded", param="lora_name",
                           code="model_not_found")  # fmt: skip


def parse_lora_modules(specs: list[str]) -> dict[str, str]:
    """--lora-modules name=DIR ... -> {name: DIR}."""
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--lora-modules takes name=DIR, got {spec!r}")
        if name in out:
            raise InputError(f"--lora-modules names {name!r} twice")
        out[name] = path
    return out


def lora_routes(
    router: APIRouter, registry: LoRARegistry, max_body_bytes: int, read_body, deps: list
) -> None:
    """vLLM's adapter routes, on `router` (with `deps`)."""

    @router.post("/v1/load_lora_adapter", dependencies=deps)
    async def load(request: Request) -> PlainTextResponse:
        req = parse_request(LoadLoRAAdapterRequest, await read_body(request, max_body_bytes))
        try:
            await registry.load(req.lora_name, req.lora_path)
        except InputError as e:
            raise input_error(e) from None
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @router.post("/v1/unload_lora_adapter", dependencies=deps)
    async def unload(request: Request) -> PlainTextResponse:
        req = parse_request(UnloadLoRAAdapterRequest, await read_body(request, max_body_bytes))
        registry.unload(req.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")
