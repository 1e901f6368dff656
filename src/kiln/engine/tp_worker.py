"""Tensor-parallel engine: rank 0 (the driver) in the engine's process, ranks 1..N-1 in worker
processes it spawns (torch.multiprocessing) and supervises.

The scheduler, the block manager and the sampler run once, on the driver. Every rank holds
its slice of the model (kiln.model.parallel) and a paged KV pool for its own KV heads, with
the same number of blocks, so one block table addresses all of them. Each step the driver
sends the workers a small header over a pipe (the step's shape, its block copies, which CUDA
graph runs it) and broadcasts the staged device inputs (torch.distributed: NCCL on CUDA, gloo
on CPU); then every rank runs the same forward, whose all-reduces and all-gather meet.

A worker that dies is a WorkerDiedError on the driver's next step (or during it: a collective
with a dead peer fails, on gloo at once, on NCCL after TP_TIMEOUT_S); the engine then fails
every request and shuts the other workers down. Workers exit when the driver goes away.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kiln.config import ModelConfig
from kiln.engine.attention import AttentionMetadata
from kiln.engine.config import EngineConfig
from kiln.errors import ConfigError, WorkerDiedError
from kiln.model.parallel import check_tp_size, load_model_shard
from kiln.model.quantized import read_quant_config

log = logging.getLogger("kiln.engine")

TP_TIMEOUT_S = 300  # a collective (or the start-up rendezvous) that takes longer fails
POLL_S = 0.5  # how often a waiting process checks that its peers are alive


@dataclass
class StepHeader:
    """What a worker needs, besides the broadcast tensors, to run the driver's step."""

    block_copies: list = field(default_factory=list)  # (src, dst) KV blocks, before the step
    graph: tuple[str, int] | None = None  # the CUDA graph that runs it (its buffers broadcast)
    replay_rows: int = 0  # the graph's rows of logits
    num_tokens: int = 0  # eager: N
    width: int = 0  # eager: block-table columns
    num_decodes: int = 0
    query_lens: list[int] = field(default_factory=list)  # eager: [B]
    num_rows: int = -1  # eager: logits rows (-1: every row)
    prompt_rows: list[int] = field(default_factory=list)  # rows scored for prompt logprobs
    logits: bool = True  # whether the step computes logits (some row samples)


def device_for(device: str | torch.device | None, rank: int) -> torch.device:
    """Rank `rank`'s device: cuda:(base + rank) on CUDA, the CPU otherwise."""
    from kiln.model.loader import default_device

    device = torch.device(device or default_device())
    if device.type == "cuda":
        return torch.device("cuda", (device.index or 0) + rank)
    return device


def check_devices(world: int, device: torch.device) -> None:
    """ConfigError when there are fewer devices (GPUs; on CPU, cores) than ranks."""
    if device.type == "cuda":
        have, what = torch.cuda.device_count() - (device.index or 0), "GPU"
    else:
        have, what = os.cpu_count() or 1, "CPU core"
    if world > have:
        raise ConfigError(
            f"tensor_parallel_size={world} needs {world} {what}s, this host has {have} "
            f"(from {device})"
        )


def check_tp_engine(cfg: EngineConfig, model_config: ModelConfig, device) -> None:
    """What tensor_parallel_size > 1 needs of the model, the engine and the host."""
    world = cfg.tensor_parallel_size
    check_tp_size(model_config, world)
    check_devices(world, device_for(device, 0))
    if read_quant_config(model_config.hf_config) is not None and cfg.quantization != "none":
        raise ConfigError(
            "tensor parallelism runs GPTQ / AWQ weights dequantized: pass quantization='none'"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_group(rank: int, world: int, port: int, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=TP_TIMEOUT_S),
    )
    # the first collective sets up the communicator (NCCL: before any CUDA graph captures one)
    dist.all_reduce(torch.zeros(1, device=device))


class TPDriver:
    """Rank 0: spawns ranks 1..N-1, loads its own shard, mirrors each step to the workers."""

    def __init__(self, path: Path, cfg: EngineConfig, engine_args: dict, max_model_len: int,
                 dtype, device) -> None:  # fmt: skip
        if dist.is_initialized():
            raise ConfigError(
                "tensor_parallel_size > 1 starts its own process group; this process already "
                "has a torch.distributed one"
            )
        self.world = cfg.tensor_parallel_size
        self.device = device_for(device, 0)
        self.dead: str | None = None
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.procs, self.conns = [], []
        for rank in range(1, self.world):
            ours, theirs = ctx.Pipe()
            args = (rank, self.world, port, str(path), dtype, str(device_for(device, rank)),
                    engine_args, max_model_len, theirs)  # fmt: skip
            proc = ctx.Process(target=_worker_main, args=args, name=f"kiln-tp{rank}", daemon=True)
            proc.start()
            theirs.close()
            self.procs.append(proc)
            self.conns.append(ours)
        atexit.register(self.close)
        try:
            for rank in range(1, self.world):  # imported, about to join the group
                self._expect(rank, "joining")
            _init_group(0, self.world, port, self.device)
        except BaseException:
            self.close()
            raise
        log.info("tensor parallel: %d ranks (%s), workers %s", self.world,
                 dist.get_backend(), [p.pid for p in self.procs])  # fmt: skip

    def load_shard(self, path: Path, dtype):
        return load_model_shard(path, 0, self.world, dtype, self.device)

    def wait_ready(self, num_blocks: int) -> None:
        """Wait for every worker's runner; they must have sized the same KV pool."""
        try:
            for rank in range(1, self.world):
                theirs = self._expect(rank, "ready")
                assert theirs == num_blocks, f"rank {rank}: {theirs} KV blocks, 0: {num_blocks}"
        except BaseException:
            self.close()
            raise

    def _expect(self, rank: int, what: str):
        """The next message from worker `rank`, which must be (`what`, value)."""
        conn, proc = self.conns[rank - 1], self.procs[rank - 1]
        while not conn.poll(POLL_S):
            if not proc.is_alive():
                raise WorkerDiedError(f"tensor-parallel rank {rank} died while starting "
                                      f"(exit code {proc.exitcode})")  # fmt: skip
        try:
            kind, value = conn.recv()
        except EOFError:
            raise WorkerDiedError(f"tensor-parallel rank {rank} died while starting") from None
        if kind == "error":
            raise ConfigError(f"tensor-parallel rank {rank} failed to start: {value}")
        assert kind == what, (kind, what)
        return value

    # ------------------------------------------------------------------ each step

    def check_alive(self) -> None:
        """WorkerDiedError (and shut down) if a worker is gone or died before."""
        if self.dead is None:
            for rank, proc in enumerate(self.procs, 1):
                if not proc.is_alive():
                    self.dead = (f"tensor-parallel worker rank {rank} (pid {proc.pid}) died "
                                 f"(exit code {proc.exitcode})")  # fmt: skip
                    break
        if self.dead is not None:
            self.close()
            raise WorkerDiedError(self.dead)

    @contextmanager
    def guard(self):
        """Run a step: a failure while a worker is dead (a collective with it) or dies is a
        WorkerDiedError."""
        self.check_alive()
        try:
            yield
        except Exception:
            deadline = time.monotonic() + 2 * POLL_S  # its exit may take a moment to show
            while time.monotonic() < deadline and all(p.is_alive() for p in self.procs):
                time.sleep(POLL_S / 10)
            self.check_alive()
            raise

    def _send(self, msg) -> None:
        for rank, conn in enumerate(self.conns, 1):
            try:
                conn.send(msg)
            except (BrokenPipeError, ConnectionResetError, EOFError):
                self.check_alive()
                raise WorkerDiedError(f"tensor-parallel rank {rank} stopped listening") from None

    def send_step(self, plan, block_copies, graphs) -> None:
        """Send the workers the step `plan` (kiln.engine.model_runner.StepPlan) and broadcast
        its staged inputs (a CUDA-graph step's: the buffers of `graphs`, the driver's
        CudaGraphRunner); their forward then meets the driver's."""
        md = plan.metadata
        head = StepHeader(list(block_copies), plan.graph, logits=bool(plan.seqs))
        if plan.graph is not None:
            head.replay_rows = plan.num_logits if plan.graph[0] == "mixed" else md.num_seqs
            self._send(("step", head))
            for buf in graph_buffers(graphs, plan.graph):
                dist.broadcast(buf, 0)
            return
        head.num_tokens, head.width = len(plan.input_ids), md.block_tables.shape[1]
        head.num_decodes, head.query_lens = md.num_decodes, list(md.query_lens)
        if plan.logits_rows is not None:
            head.num_rows = len(plan.logits_rows)
        if plan.prompt is not None:
            head.prompt_rows = list(plan.prompt.prompt_rows)
        self._send(("step", head))
        parts64 = [plan.input_ids, md.positions, md.slot_mapping]
        if plan.logits_rows is not None:
            parts64.append(plan.logits_rows)
        dist.broadcast(torch.cat(parts64), 0)
        parts32 = [md.context_lens, md.cu_seqlens_q, md.block_tables.reshape(-1)]
        dist.broadcast(torch.cat(parts32), 0)

    def send_embed(self, ids: list[int]) -> None:
        self._send(("embed", ids))

    def close(self) -> None:
        """Stop the workers (politely, then not) and leave the process group."""
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for conn in self.conns:
            conn.close()
        self.conns = []
        if dist.is_initialized():
            dist.destroy_process_group()
        atexit.unregister(self.close)


def graph_buffers(graphs, graph: tuple[str, int]) -> tuple[torch.Tensor, ...]:
    """The device buffers a CUDA graph's inputs are staged in (kiln.engine.cuda_graphs)."""
    owner = graphs.mixed_buffers if graph[0] == "mixed" else graphs
    return owner.i64, owner.i32


# ---------------------------------------------------------------------- the worker side


def _worker_main(rank, world, port, path, dtype, device, engine_args, max_model_len, conn):
    """Rank `rank`: join the group, load the shard, build a runner, then run steps."""
    from kiln.engine.model_runner import ModelRunner

    device = torch.device(device)
    if device.type == "cpu":  # share the cores with the other ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    elif "OMP_NUM_THREADS" not in os.environ:  # host work only (see core_client.core_threads)
        torch.set_num_threads(1)
    try:
        conn.send(("joining", None))
        _init_group(rank, world, port, device)
        model = load_model_shard(path, rank, world, dtype, device)
        runner = ModelRunner(model, EngineConfig.from_kwargs(engine_args), max_model_len)
        conn.send(("ready", runner.num_blocks))
    except Exception as e:
        traceback.print_exc()
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    try:
        _serve(runner, conn)
    except (EOFError, OSError):
        pass  # the driver went away
    except Exception:
        traceback.print_exc()
        os._exit(1)  # a collective failed: the driver sees this rank gone
    if dist.is_initialized():
        dist.destroy_process_group()


def _serve(runner, conn) -> None:
    parent = os.getppid()
    while True:
        while not conn.poll(POLL_S):
            if os.getppid() != parent:
                return
        msg = conn.recv()
        if msg is None:
            return
        kind, body = msg
        with torch.inference_mode():
            if kind == "step":
                _run_step(runner, body)
            else:  # "embed": the driver runs kiln.engine.pooling.embed_ids on the same ids
                runner.model.hidden_states(torch.tensor([body], device=runner.device))


def _run_step(runner, head: StepHeader) -> None:
    """The worker's half of ModelRunner._forward, on inputs broadcast by the driver."""
    from kiln.engine.model_runner import PROMPT_LOGPROBS_ROWS

    runner.kv_cache.copy_blocks(head.block_copies)
    if head.graph is not None:
        for buf in graph_buffers(runner.graph_runner, head.graph):
            dist.broadcast(buf, 0)
        runner.graph_runner.replay(head.graph, head.replay_rows)
        return
    n, b, dev, model = head.num_tokens, len(head.query_lens), runner.device, runner.model
    i64 = torch.empty(3 * n + max(head.num_rows, 0), dtype=torch.int64, device=dev)
    dist.broadcast(i64, 0)
    i32 = torch.empty(2 * b + 1 + b * head.width, dtype=torch.int32, device=dev)
    dist.broadcast(i32, 0)
    md = AttentionMetadata(
        positions=i64[n : 2 * n],
        slot_mapping=i64[2 * n : 3 * n],
        block_tables=i32[2 * b + 1 :].view(b, head.width),
        context_lens=i32[:b],
        cu_seqlens_q=i32[b : 2 * b + 1],
        num_decodes=head.num_decodes,
        query_lens=head.query_lens,
    )
    runner.backend.set_metadata(md)
    hidden = model.hidden_states(i64[:n], md.positions, runner.backend)
    if head.prompt_rows:
        rows = torch.tensor(head.prompt_rows, device=dev)
        for at in range(0, len(rows), PROMPT_LOGPROBS_ROWS):
            model.compute_logits(hidden[rows[at : at + PROMPT_LOGPROBS_ROWS]])
    if head.logits:
        model.compute_logits(hidden if head.num_rows < 0 else hidden[i64[3 * n :]])
