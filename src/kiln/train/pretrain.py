"""`kiln pretrain`: corpus -> tokenizer -> token memmaps -> Transformer -> loop -> HF export.

    kiln pretrain --config configs/shakespeare_char.toml --max-steps 100 --set lr=1e-3
    torchrun --nproc_per_node 2 -m kiln.cli pretrain --config ...      # DDP (or --fsdp)
    torchrun --nproc_per_node 4 -m kiln.cli pretrain --config ... --pipeline-parallel 2 \
        --grad-accum 4 [--pipeline-schedule gpipe]     # 2 stages x 2 data-parallel replicas

Everything lands in train.out_dir: tokenizer/, data/{train,val}.bin, checkpoint.safetensors,
log.jsonl, loss.png, and model/ (config.json, model.safetensors, tokenizer.json, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

from kiln.errors import ConfigError
from kiln.flags import add_flags, flags_given
from kiln.train.config import SECTIONS, ModelSpec, PretrainConfig, load_config

# ChatML, Qwen's chat format. With chat_template = "chatml" the tokenizer holds its turn markers
# as special tokens (one id each) and its template, and the model stops at the end of a turn.
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n'"
    " + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def model_config(
    spec: ModelSpec, vocab_size: int, bos_id: int | None, eos_id: int | list[int] | None
):
    """The kiln ModelConfig of a ModelSpec, built through the HF config it exports as."""
    from kiln.config import ModelConfig

    h, heads = spec.hidden_size, spec.num_heads
    if spec.model_type not in ("llama", "gpt2", "mixtral", "qwen3_moe"):
        raise ConfigError(
            f"model_type must be llama, gpt2, mixtral or qwen3_moe, got {spec.model_type!r}"
        )
    if h % heads:
        raise ConfigError(f"hidden_size {h} is not a multiple of num_heads {heads}")
    vocab = -(-vocab_size // 64) * 64  # round up: tensor-core friendly, like nanoGPT's 50304
    ids = {"bos_token_id": bos_id, "eos_token_id": eos_id}
    if spec.model_type == "gpt2":
        hf = dict(
            model_type="gpt2", vocab_size=vocab, n_embd=h, n_layer=spec.num_layers, n_head=heads,
            n_inner=spec.intermediate_size or 4 * h, n_positions=spec.block_size,
            tie_word_embeddings=spec.tie_word_embeddings, **ids,
        )  # fmt: skip
    else:
        inter = spec.intermediate_size or -(-(8 * h // 3) // 64) * 64
        hf = dict(
            model_type="llama", vocab_size=vocab, hidden_size=h, intermediate_size=inter,
            num_hidden_layers=spec.num_layers, num_attention_heads=heads,
            num_key_value_heads=spec.num_kv_heads or heads, max_position_embeddings=spec.block_size,
            rope_theta=spec.rope_theta, tie_word_embeddings=spec.tie_word_embeddings, **ids,
        )  # fmt: skip
        hf |= moe_fields(spec)
    return ModelConfig.from_hf(hf)


def moe_fields(spec: ModelSpec) -> dict:
    """The HF config fields of a mixtral / qwen3_moe ModelSpec's experts (each expert as wide
    as the dense MLP would be); Switch routing is top-1 without renormalization."""
    if spec.model_type not in ("mixtral", "qwen3_moe"):
        return {}
    top_k = 1 if spec.switch_routing else spec.num_experts_per_tok
    if spec.model_type == "mixtral":
        if spec.switch_routing:
            raise ConfigError("switch_routing needs model_type qwen3_moe (Mixtral renormalizes)")
        return dict(model_type="mixtral", num_local_experts=spec.num_experts,
                    num_experts_per_tok=top_k)  # fmt: skip
    inter = spec.intermediate_size or -(-(8 * spec.hidden_size // 3) // 64) * 64
    return dict(model_type="qwen3_moe", num_experts=spec.num_experts, num_experts_per_tok=top_k,
                moe_intermediate_size=inter, norm_topk_prob=not spec.switch_routing)  # fmt: skip


def add_dropout(model, p: float) -> None:
    """Dropout as a transformation of a plain Transformer: on the embeddings entering block 0
    and on every attention and MLP output (nanoGPT's places, minus attention-probability
    dropout). Active only in model.train()."""
    import torch.nn.functional as F

    if p <= 0:
        return

    def on_output(module, args, output):
        return F.dropout(output, p, module.training)

    def on_input(module, args):
        return (F.dropout(args[0], p, module.training), *args[1:])

    model.layers[0].register_forward_pre_hook(on_input)
    for layer in model.layers:
        layer.self_attn.register_forward_hook(on_output)
        layer.mlp.register_forward_hook(on_output)


def lm_loss(model, batch):
    """Next-token cross entropy of (x, y) [B, T]; logits upcast to float32 for the softmax."""
    import torch.nn.functional as F

    x, y = batch
    logits = model(x)  # [B, T, vocab]
    loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    return loss, {"num_tokens": y.numel()}


def compiled_loss():
    """lm_loss under torch.compile: lm_head and cross entropy fuse, float32 logits never land in
    memory (the model's own compile leaves the loss outside the graph)."""
    import torch

    return torch.compile(lm_loss)


def prepare_tokenizer(cfg: PretrainConfig, files: list[Path]) -> Path:
    """The run's tokenizer directory: an existing one, or one trained on the corpus (cached)."""
    from kiln.train.data import EOT

    data = cfg.data
    if data.chat_template not in ("", "chatml"):
        raise ConfigError(f'chat_template must be "" or "chatml", got {data.chat_template!r}')
    if data.tokenizer not in ("bpe", "char"):
        if data.chat_template:
            raise ConfigError("chat_template needs a tokenizer kiln trains (bpe or char)")
        path = Path(data.tokenizer)
        if not (path / "tokenizer.json").is_file():
            raise ConfigError(
                f"tokenizer {data.tokenizer!r}: bpe, char, or a dir with tokenizer.json"
            )
        return path
    out = Path(cfg.train.out_dir) / "tokenizer"
    spec = {"tokenizer": data.tokenizer, "files": [str(f.resolve()) for f in files]}
    if data.tokenizer == "bpe":
        spec |= {"vocab_size": data.vocab_size, "pattern": data.pattern}
    if data.chat_template:
        spec["chat_template"] = data.chat_template
    spec_file = out / "kiln_tokenizer_spec.json"
    if spec_file.is_file() and json.loads(spec_file.read_text()) == spec:
        return out
    specials = [EOT, IM_START, IM_END] if data.chat_template else [EOT]
    if data.tokenizer == "char":
        from kiln.train.data import train_char_tokenizer

        train_char_tokenizer(files, out, specials)
    else:
        from kiln.tokenizer.bpe import BPETokenizer

        tok = BPETokenizer.train(files, data.vocab_size, data.pattern, specials, progress=False)
        tok.save(out)
    if data.chat_template:
        config_file = out / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) | {"chat_template": CHATML_TEMPLATE}
        config_file.write_text(json.dumps(config, indent=2) + "\n")
    spec_file.write_text(json.dumps(spec, indent=2) + "\n")
    return out


def run_pretrain(cfg: PretrainConfig, resume: bool = False) -> dict:
    """Prepare tokenizer and data (rank 0), train, and export out_dir/model (rank 0)."""
    import torch

    from kiln.model.transformer import Transformer
    from kiln.tokenizer.hf import load_tokenizer
    from kiln.train import distributed
    from kiln.train.data import TokenWindows, corpus_files, prepare_data
    from kiln.train.loop import train

    cfg.train.validate()
    info = distributed.init(cfg.train.device)
    out = Path(cfg.train.out_dir)
    files = corpus_files(cfg.data.corpus)
    if info.is_main:
        tok_dir = prepare_tokenizer(cfg, files)
        prepare_data(files, tok_dir, out / "data", cfg.data.val_fraction, cfg.train.seed)
    distributed.barrier()
    tok_dir = prepare_tokenizer(cfg, files)  # cached by rank 0 by now
    meta = json.loads((out / "data" / "meta.json").read_text())
    tok = load_tokenizer(tok_dir)
    spec, bs = cfg.model, cfg.train.batch_size
    windows = dict(dtype=meta["dtype"], block_size=spec.block_size, batch_size=bs)
    train_batch = TokenWindows(out / "data" / "train.bin", seed=cfg.train.seed, **windows)
    val_batch = None
    if meta["num_tokens"]["val"]:
        val_batch = TokenWindows(out / "data" / "val.bin", seed=cfg.train.seed + 1, **windows)
    torch.manual_seed(cfg.train.seed)
    eos = tok.eos_token_id
    if cfg.data.chat_template:
        eos = [eos, tok.token_to_id(IM_END)]  # generation stops at a chat turn's end too
    config = model_config(spec, tok.vocab_size, tok.bos_token_id, eos)
    model = Transformer(config)
    model.init_weights(spec.init_std)
    sharing = spec.share_layers != 1 or spec.embedding_size != 0
    if sharing:
        from kiln.model.sharing import apply_sharing

        if cfg.train.pipeline_parallel > 1 or cfg.train.fsdp:
            raise ConfigError("share_layers / embedding_size train on one process or with DDP")
        apply_sharing(model, spec.share_layers, spec.embedding_size, spec.init_std)
    add_dropout(model, spec.dropout)
    if cfg.train.pipeline_parallel > 1:
        from kiln.train.pipeline import train_pipeline

        if resume or cfg.train.compile:
            raise ConfigError("pipeline_parallel runs without resume and compile")
        if config.num_experts:
            raise ConfigError("pipeline_parallel does not carry the MoE router losses yet")
        result = train_pipeline(model, cfg.train, train_batch, val_batch)
    else:
        loss_fn = compiled_loss() if cfg.train.compile else lm_loss
        if config.num_experts:  # router losses; per-expert load in the log
            from kiln.train.moe import moe_loss

            coefs = spec.router_aux_loss_coef, spec.router_z_loss_coef
            loss_fn = moe_loss(loss_fn, config.num_experts_per_tok, *coefs)
        result = train(model, cfg.train, train_batch, loss_fn, val_batch, resume=resume)
    result["export"] = str(export(model, tok_dir, out / "model", info.is_main))
    result["num_params"] = config.num_params  # the exported model's
    if sharing:
        result["trained_params"] = model.num_parameters()  # each shared weight once
    return result


def export(model, tokenizer_dir: Path, out_dir: Path, is_main: bool) -> Path:
    """Write an HF model directory (weights gathered from every rank; rank 0 writes)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from kiln.model.loader import save_model
    from kiln.model.sharing import plain_state
    from kiln.model.transformer import Transformer

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=opts)
    if is_main:
        plain = Transformer(model.config)
        plain.load_state_dict(plain_state(state))  # copies: a shared weight materializes
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(tokenizer_dir / name, out_dir / name)
        save_model(plain, out_dir)  # config.json last: its presence marks a complete export
    return out_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pretrain a model from a TOML config",
        description="Pretrain a model. Every config field can be overridden: --max-steps 100 "
        "(or --max_steps 100), or --set train.lr=1e-3 (values in TOML syntax).",
    )
    p.add_argument("--config", default=None, help="TOML file with [data], [model], [train]")
    p.add_argument("--resume", action="store_true", help="continue from out_dir's checkpoint")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override")
    for section, cls in SECTIONS.items():
        add_flags(p, cls, section, config_keys=True)
    p.set_defaults(func=_cli)


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    """The config a `kiln pretrain` command line asks for: the dataclasses' defaults, under the
    TOML file's values, under --set, under the flags."""
    overrides = {}
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--set wants KEY=VALUE, got {item!r}")
        overrides[key.strip()] = value.strip()
    cfg = load_config(args.config, overrides)
    for section, cls in SECTIONS.items():
        setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **flags_given(cls, args)))
    return cfg


def _cli(args: argparse.Namespace) -> None:
    result = run_pretrain(config_from_args(args), resume=args.resume)
    if "val_loss" in result:
        print(f"val loss {result['val_loss']:.4f}, perplexity {result['val_ppl']:.2f}")
    print(f"model: {result['export']}  log: {result['log']}  plot: {result.get('plot')}")
