"""`kiln distill`: train a student to match a teacher (Hinton et al., 2015), in the shared loop.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
         + (1 - alpha) * cross-entropy(student, next token)
         + hidden_weight * mean_j ||P_j h_student,j - h_teacher,m(j)||^2 / mean(h_teacher^2)

The student may have fewer layers (student layer j is matched to teacher layer
m(j) = round((j + 1) * L_t / L_s) - 1, the last to the last) or a smaller width (a learned
projection P_j per matched layer, trained with the student and not exported). The two must
share one vocabulary. Teacher logits come on the fly (the teacher beside the student), or from
a cache of its top-k logits per token computed in one pass first (then the teacher leaves
memory; the KL is taken over those k, renormalized: exact when k is the vocabulary).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kiln.compress.config import DistillConfig, TextData
from kiln.config import ModelConfig
from kiln.errors import ConfigError, InputError
from kiln.model.transformer import Transformer
from kiln.train.config import FinetuneConfig


def student_config(teacher: ModelConfig, student: str) -> tuple[ModelConfig, Path | None]:
    """The student's config and the directory of its weights (None: a fresh student).

    `student` is a model directory (its weights are the start), or a config: a JSON file, a
    directory with config.json only, or inline JSON; its fields override the teacher's HF
    config, so `{"num_hidden_layers": 2}` is the teacher with two layers."""
    path = Path(student)
    if path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return ModelConfig.from_dir(path), path
    if path.is_dir():
        path = path / "config.json"
    try:
        text = student if student.lstrip().startswith("{") else path.read_text()
        fields = json.loads(text)
    except (OSError, ValueError) as e:
        raise InputError(
            f"--student {student!r}: not a model directory, a JSON config file or JSON ({e})",
            param="student",
        ) from None
    if not isinstance(fields, dict):
        raise InputError(f"--student {student!r}: expected a JSON object", param="student")
    base = teacher.to_hf()
    if {"hidden_size", "num_attention_heads"} & fields.keys() and "head_dim" not in fields:
        base.pop("head_dim", None)  # derived from the student's own width
    return ModelConfig.from_hf(base | fields), None


def check_vocab(teacher: ModelConfig, student: ModelConfig) -> None:
    """InputError unless the student speaks the teacher's vocabulary."""
    if student.vocab_size != teacher.vocab_size:
        raise InputError(
            f"student vocab_size {student.vocab_size} differs from the teacher's "
            f"{teacher.vocab_size}: logit distillation needs one vocabulary",
            param="student",
        )


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """The teacher layer each student layer's output is matched to."""
    return [round((j + 1) * teacher_layers / student_layers) - 1 for j in range(student_layers)]


class LayerOutputs:
    """Records the output of each decoder block of `model` during its forward passes."""

    def __init__(self, model: Transformer):
        self.outputs: list[torch.Tensor] = []
        for layer in model.layers:
            layer.register_forward_hook(lambda mod, args, out: self.outputs.append(out))

    def take(self) -> list[torch.Tensor]:
        out, self.outputs = self.outputs, []
        return out


class Student(nn.Module):
    """The student the loop trains, with the projections hidden-state matching needs:
    forward(ids [B, T]) -> (logits [B, T, V], [each layer's output [B, T, H_teacher]])."""

    def __init__(self, model: Transformer, teacher_hidden: int, match_hidden: bool):
        super().__init__()
        self.model = model
        h = model.config.hidden_size
        self.match_hidden = match_hidden
        self.proj = nn.ModuleList()
        if match_hidden and h != teacher_hidden:
            self.proj = nn.ModuleList(
                nn.Linear(h, teacher_hidden, bias=False) for _ in model.layers
            )
        self.layers = LayerOutputs(model) if match_hidden else None

    def forward(self, ids: torch.Tensor):
        logits = self.model(ids)
        if self.layers is None:
            return logits, []
        hidden = self.layers.take()
        if len(self.proj):
            hidden = [p(h) for p, h in zip(self.proj, hidden)]
        return logits, hidden


def kl_to_teacher(student_logits, teacher, temperature: float) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) at `temperature`; teacher is its logits
    [B, T, V] or a top-k cache (values [B, T, k], ids [B, T, k]), renormalized over the k."""
    s = F.log_softmax(student_logits.float() / temperature, -1)
    if isinstance(teacher, tuple):
        values, ids = teacher
        s = s.gather(-1, ids.long())
        t = F.log_softmax(values.float() / temperature, -1)
    else:
        t = F.log_softmax(teacher.float() / temperature, -1)
    return (t.exp() * (t - s)).sum(-1).mean()


def hidden_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over the matched layers of the relative squared error."""
    errs = [(s.float() - t.float()).pow(2).mean() / t.float().pow(2).mean() for s, t in
            zip(student, teacher)]  # fmt: skip
    return torch.stack(errs).mean()


class DistillLoss:
    """The loop's loss_fn: batches are (x, y) with the teacher on the fly, or (x, y, values,
    ids) from the top-k cache."""

    def __init__(self, cfg: DistillConfig, teacher: Transformer | None, student_layers: int):
        self.cfg, self.teacher = cfg, teacher
        self.teacher_layers = None
        if teacher is not None and cfg.hidden_weight:
            self.teacher_layers = LayerOutputs(teacher)
            self.matched = layer_map(student_layers, teacher.config.num_layers)

    def __call__(self, model, batch):
        x, y = batch[0], batch[1]
        logits, hidden = model(x)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        metrics = {"num_tokens": y.numel(), "ce": ce.detach()}
        teacher = tuple(batch[2:])  # the cache's (values, ids); the teacher itself beats it
        if self.teacher is not None:
            with torch.no_grad():
                teacher = self.teacher(x)
        loss = ce
        if self.cfg.alpha:
            t = self.cfg.temperature
            kl = kl_to_teacher(logits, teacher, t)
            loss = self.cfg.alpha * t * t * kl + (1 - self.cfg.alpha) * ce
            metrics["kl"] = kl.detach()
        if self.teacher_layers is not None:
            outputs = self.teacher_layers.take()
            h = hidden_loss(hidden, [outputs[m] for m in self.matched])
            loss = loss + self.cfg.hidden_weight * h
            metrics["hidden"] = h.detach()
        return loss, metrics


@torch.no_grad()
def cache_teacher(teacher: Transformer, batches, count: int, k: int, where: Path, key: dict):
    """The teacher's top-k logits (values float16 [count, B, T, k], ids int32) of batches(i)
    for i < count, as .npy files in `where` (reused when `key` matches); read-only memmaps."""
    meta = where / "meta.json"
    key = key | {"count": count, "top_k": k}
    if not (meta.is_file() and json.loads(meta.read_text()) == key):
        where.mkdir(parents=True, exist_ok=True)
        meta.unlink(missing_ok=True)
        device = next(teacher.parameters()).device
        x = batches(0)[0]
        shape = (count, *x.shape, k)
        values = np.lib.format.open_memmap(where / "values.npy", "w+", np.float16, shape)
        ids = np.lib.format.open_memmap(where / "ids.npy", "w+", np.int32, shape)
        for i in range(count):
            top = torch.topk(teacher(batches(i)[0].to(device)).float(), k, dim=-1)
            values[i] = top.values.half().cpu().numpy()
            ids[i] = top.indices.int().cpu().numpy()
        values.flush()
        ids.flush()
        del values, ids
        meta.write_text(json.dumps(key, indent=2) + "\n")
    return np.load(where / "values.npy", mmap_mode="r"), np.load(where / "ids.npy", mmap_mode="r")


def with_cache(batches, values, ids):
    """batch(i) with the teacher's cached top-k logits appended: (x, y, values, ids)."""

    def batch(i: int):
        return (*batches(i), torch.from_numpy(np.array(values[i])),
                torch.from_numpy(np.array(ids[i])))  # fmt: skip

    return batch


def distill(
    teacher_dir: str | os.PathLike,
    student: str,
    out_dir: str | os.PathLike,
    cfg: DistillConfig | None = None,
    train: FinetuneConfig | None = None,
    data: TextData | None = None,
) -> dict:
    """Distill the teacher in teacher_dir into `student` (a model directory or a config, see
    student_config) on corpus text, and write the student to out_dir with the teacher's
    tokenizer; the loop's result."""
    from kiln.compress.training import run_config, text_windows
    from kiln.model.loader import load_model
    from kiln.tokenizer.hf import load_tokenizer
    from kiln.train.distributed import init, resolve_device
    from kiln.train.finetune import export
    from kiln.train.loop import train as train_loop

    cfg, train, data = cfg or DistillConfig(), train or FinetuneConfig(), data or TextData()
    check_options(cfg)
    if Path(out_dir).exists():
        raise InputError(f"--out {str(out_dir)!r} already exists", param="out")
    teacher_config = ModelConfig.from_dir(teacher_dir)
    config, weights = student_config(teacher_config, student)
    check_vocab(teacher_config, config)
    tok = load_tokenizer(teacher_dir)
    device = resolve_device(train.device)
    teacher = None  # alpha 0 without hidden matching: plain LM training, the teacher idle
    if cfg.alpha or cfg.hidden_weight:
        teacher = load_model(teacher_dir, device=device)
    run = run_config(train, out_dir, lr=1e-4 if weights is not None else 1e-3)
    if weights is not None:
        model = load_model(weights, dtype="float32", device=device)
    else:
        torch.manual_seed(run.seed)  # one seed, one initial student, whatever the loss
        model = Transformer(config)
        model.init_weights()
    model.requires_grad_(True)
    context = min(config.max_position_embeddings, teacher_config.max_position_embeddings)
    train_batch, val_batch, seq_len = text_windows(teacher_dir, data, context, run)
    if cfg.teacher_cache is not None and teacher is not None:
        key = dict(teacher=str(Path(teacher_dir).resolve()), corpus=str(data.corpus),
                   seq_len=seq_len, batch_size=run.batch_size, seed=run.seed,
                   val_fraction=data.val_fraction)  # fmt: skip
        k = min(cfg.top_k, config.vocab_size)
        train_batch, val_batch = cached_batches(
            teacher, train_batch, val_batch, run, k, Path(cfg.teacher_cache), key
        )
        teacher = None  # out of memory: training reads the cache
    wrapped = Student(model, teacher_config.hidden_size, bool(cfg.hidden_weight))
    loss_fn = DistillLoss(cfg, teacher, config.num_layers)
    result = train_loop(wrapped, run, train_batch, loss_fn, val_batch)
    if init(run.device).is_main:
        export(model.requires_grad_(False).eval(), tok, str(out_dir), str(teacher_dir), False)
    return result


def cached_batches(teacher, train_batch, val_batch, run: FinetuneConfig, k, where: Path, key):
    """train_batch and val_batch with the teacher's top-k logits of every batch the run reads
    (train: max_steps * grad_accum, val: eval_steps) appended, cached under `where`."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--teacher-cache runs in one process")
    n = run.max_steps * run.grad_accum
    train_batch = with_cache(train_batch, *cache_teacher(teacher, train_batch, n, k,
                                                         where / "train", key))  # fmt: skip
    if val_batch is not None:
        cached = cache_teacher(teacher, val_batch, run.eval_steps, k, where / "val", key)
        val_batch = with_cache(val_batch, *cached)
    return train_batch, val_batch


def check_options(cfg: DistillConfig) -> None:
    """InputError naming the first option out of range."""
    if not cfg.temperature > 0:
        raise InputError(f"--temperature {cfg.temperature} must be > 0", param="temperature")
    if not 0 <= cfg.alpha <= 1:
        raise InputError(f"--alpha {cfg.alpha} must be in [0, 1]", param="alpha")
    if cfg.hidden_weight < 0:
        raise InputError(f"--hidden-weight {cfg.hidden_weight} must be >= 0")
    if cfg.top_k < 1:
        raise InputError(f"--top-k {cfg.top_k} must be >= 1", param="top_k")
    if cfg.teacher_cache is not None and cfg.hidden_weight:
        raise InputError("--hidden-weight needs the teacher on the fly, not --teacher-cache")
