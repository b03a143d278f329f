"""The one adapter to the Hugging Face format: loading tokenizers and models, writing exports.

An export is what plain transformers loads with
`AutoModelForSequenceClassification.from_pretrained(dir)` or `pipeline("text-classification")`:
`config.json` (the architecture's `*ForSequenceClassification`, num_labels=1, pad_token_id set,
`problem_type: "regression"` so that pipelines and vLLM return the raw score), sharded
`model-0000k-of-0000N.safetensors` + `model.safetensors.index.json`, the tokenizer files with the
chat template the model was trained with (:mod:`rmtrain.text`), and a `README.md` model card.
Written by transformers 5, it also loads in transformers 4.x from 4.34.1 on
(:func:`add_legacy_keys`; `tests/test_export_compat.py`).

The name ``tiny`` is resolved here, and only here, to the toy model and tokenizer
(:mod:`rmtrain.toy`); every other name is a local directory or a hub id.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import save_torch_state_dict
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from rmtrain import arch, text, toy
from rmtrain.config import Config, LoRAConfig, ModelConfig
from rmtrain.errors import ConfigError
from rmtrain.files import atomic_directory
from rmtrain.model import score_model_class

PAD_TOKEN = "<pad>"
# The config keys that fix the shape of the weights: a checkpoint resumes only into the same.
ARCHITECTURE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "tie_word_embeddings",
)


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer with a real pad token distinct from EOS.

    A pad equal to EOS is the field's most common silent bug (trl#2758, RLHFlow#49): when a
    tokenizer has none, `<pad>` is added and the embeddings are resized in `build_score_model`.
    """
    tok: PreTrainedTokenizerBase
    if toy.is_toy(cfg.name_or_path) and cfg.tokenizer is None:
        from rmtrain.toy.tokenizer import build_tiny_tokenizer

        tok = build_tiny_tokenizer()
    else:
        key = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
        tok = _load(
            AutoTokenizer.from_pretrained,
            key,
            cfg.tokenizer or cfg.name_or_path,
            revision=cfg.revision,
        )
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    if tok.eos_token is None:
        raise ConfigError(f"model.name_or_path={cfg.name_or_path}: its tokenizer has no EOS token")
    tok.padding_side = cfg.padding_side
    return tok


def load_text_format(cfg: Config) -> tuple[Any, dict[str, Any]]:
    """The tokenizer with the chat template the run trains and exports, and the model's
    architecture record (checked against a resumed checkpoint's)."""
    tokenizer = load_tokenizer(cfg.model)
    text.use_template(tokenizer, cfg.data.template)
    model_config = score_model_config(cfg.model, tokenizer)
    check_training(model_config, cfg.model, cfg.trainer.packing)
    context = getattr(model_config, "max_position_embeddings", None)
    if context is not None and cfg.data.max_length > context:
        raise ConfigError(
            f"data.max_length={cfg.data.max_length} exceeds the model's context "
            f"({context} positions)"
        )
    return tokenizer, architecture(model_config, tokenizer)


def _load(loader: Any, key: str, name: str, **kwargs: Any) -> Any:
    """`loader(name)`, with a missing directory or an unloadable hub id as one clear error."""
    if name.startswith(("/", ".", "~")) and not Path(name).expanduser().is_dir():
        raise ConfigError(f"{key}={name}: no such directory")
    try:
        return loader(name, **kwargs)
    except OSError as err:
        raise ConfigError(f"{key}={name}: cannot load it ({err})") from err


def score_model_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """The score model's transformers config (num_labels=1, the tokenizer's special ids); a
    backbone rmtrain cannot train is one `ConfigError` naming its model_type (`rmtrain.arch`)."""
    config: PretrainedConfig
    if toy.is_toy(cfg.name_or_path):
        config = toy.model_config(cfg.toy, len(tokenizer))
    else:
        config = _load(
            AutoConfig.from_pretrained,
            "model.name_or_path",
            cfg.name_or_path,
            revision=cfg.revision,
        )
    arch.resolve(config, where=f"model.name_or_path={cfg.name_or_path}")
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    return config


def trained_vocab_size(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> int:
    """The embedding rows the score model has: the checkpoint's, or more when tokens (`<pad>`)
    were added, rounded up to a multiple of 64 so GPU kernels stay aligned."""
    if len(tokenizer) <= config.vocab_size:
        return int(config.vocab_size)
    return -(-len(tokenizer) // 64) * 64


def architecture(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """The shape-defining part of the score model's config (recorded in checkpoints).
    `head_dim` only where it is not hidden / heads (Qwen3, Gemma), so the record of a LLaMA
    checkpoint written before it existed still matches."""
    shape = {k: getattr(config, k, None) for k in ARCHITECTURE_KEYS}
    shape["vocab_size"] = trained_vocab_size(config, tokenizer)
    head_dim = getattr(config, "head_dim", None)
    if head_dim and head_dim * config.num_attention_heads != config.hidden_size:
        shape["head_dim"] = head_dim
    return shape


def check_training(model_config: PretrainedConfig, cfg: ModelConfig, packing: bool) -> str:
    """The attention implementation the run builds with; one `ConfigError` for a setting the
    backbone's architecture does not support (sdpa for Gemma 2, packing where unverified)."""
    return arch.check_training(arch.resolve(model_config), cfg.attn_implementation, packing)


def random_init(cfg: ModelConfig) -> bool:
    """Whether the backbone starts from random weights (the toy) rather than a checkpoint."""
    return toy.is_toy(cfg.name_or_path)


def build_score_model(
    cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype
) -> Any:
    """Random-init tiny model, or a checkpoint (causal LM or base) with a fresh score head, as
    the architecture's score model (`rmtrain.model.score_model_class`).

    Call inside `engine.model_init_context` so ZeRO-3 shards while loading.
    """
    config = score_model_config(cfg, tokenizer)
    architecture = arch.resolve(config)
    model_class: Any = score_model_class(config.model_type)
    if tokenizer.pad_token_id >= config.vocab_size:
        # `<pad>` was added to the tokenizer: build with the checkpoint's vocabulary (an embedding
        # cannot have padding_idx outside it), resize, then record the pad id.
        config.pad_token_id = None
    impl = architecture.check_attention(cfg.attn_implementation)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": impl}
    if random_init(cfg):
        model = model_class._from_config(config, **kwargs)
    else:
        model = model_class.from_pretrained(
            cfg.name_or_path, config=config, revision=cfg.revision or "main", **kwargs
        )
    if trained_vocab_size(config, tokenizer) > model.config.vocab_size:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        model = add_lora(model, cfg.lora)
    return model


def lora_targets(model: Any, lora: LoRAConfig) -> list[str]:
    """`lora.target_modules`, or the architecture's projections when it is empty; a name no
    linear layer of the backbone has is a `ConfigError` listing the names it has."""
    targets = list(lora.target_modules) or list(arch.resolve(model.config).lora_targets)
    linear = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.startswith("score")
    }
    missing = [t for t in targets if t not in linear]
    if missing:
        raise ConfigError(
            f"model.lora.target_modules: {', '.join(missing)} not in this "
            f"{model.config.model_type} backbone; its linear layers: {', '.join(sorted(linear))}"
        )
    return targets


def add_lora(model: Any, lora: LoRAConfig) -> Any:
    """peft LoRA adapters on `lora_targets`; the score head is trained in full
    (`modules_to_save`). The result's forward is the score model's."""
    from peft import LoraConfig, get_peft_model

    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_targets(model, lora),
        modules_to_save=["score"],
    )
    if getattr(model, "is_gradient_checkpointing", False):
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks need a grad
    return get_peft_model(model, peft_config)


_PEFT_PREFIX = "base_model.model."


def merge_lora(state_dict: dict[str, torch.Tensor], lora: LoRAConfig) -> dict[str, torch.Tensor]:
    """A peft LoRA score model's full state dict → the plain score model's, adapters merged:
    W + (alpha / r) · B @ A for every adapted layer, the trained copy of the score head, and
    peft's prefixes and frozen originals dropped (what peft's merge_and_unload gives)."""
    scaling = lora.alpha / lora.r
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = key.removeprefix(_PEFT_PREFIX)
        if ".lora_A." in name or ".lora_B." in name or ".original_module." in name:
            continue
        if name.endswith(".base_layer.weight"):
            stem = name.removesuffix(".base_layer.weight")
            a = state_dict[f"{_PEFT_PREFIX}{stem}.lora_A.default.weight"].float()
            b = state_dict[f"{_PEFT_PREFIX}{stem}.lora_B.default.weight"].float()
            merged = value.float() + scaling * (b @ a)
            out[f"{stem}.weight"] = merged.to(value.dtype)
        elif name.endswith(".base_layer.bias"):
            out[name.replace(".base_layer.bias", ".bias")] = value
        else:
            out[name.replace(".modules_to_save.default.", ".")] = value
    return out


def save_adapter(peft_model: Any, state_dict: dict[str, torch.Tensor], out_dir: Path) -> Path:
    """The adapter alone (and the trained score head), in peft's own format, from the full
    gathered `state_dict` (rank 0 under ZeRO-3, where the module's own tensors are shards)."""
    peft_model.save_pretrained(out_dir, state_dict=state_dict)
    return out_dir


def export(
    state_dict: dict[str, torch.Tensor],
    model_config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    max_shard_size: str | int,
    extra_config: dict[str, Any],
    model_card: str,
) -> Path:
    """Write an export atomically: build it in `<out_dir>.tmp`, then move it into place.

    `tokenizer` carries the chat template the model was trained with, so that
    `apply_chat_template(chat, tokenize=False)` on the export gives exactly the text it scores.
    """
    out_dir = Path(out_dir)
    bad = [k for k, v in state_dict.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(
            f"refusing to export to {out_dir}: {len(bad)} weight tensors hold NaN/inf "
            f"(first: {bad[0]}); the run diverged"
        )
    try:
        with atomic_directory(out_dir) as tmp:  # never a half-written export
            _write_export(state_dict, model_config, tokenizer, tmp, max_shard_size, extra_config)
            (tmp / "README.md").write_text(model_card)
    except Exception as err:  # safetensors reports a full disk as its own error type
        if getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err):
            raise OSError(errno.ENOSPC, f"no space left on device at {out_dir}") from None
        raise
    return out_dir


def _write_export(
    state_dict: dict[str, torch.Tensor],
    model_config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    tmp: Path,
    max_shard_size: str | int,
    extra_config: dict[str, Any],
) -> None:
    config = model_config.__class__.from_dict(model_config.to_dict())
    config.architectures = [arch.sequence_classifier(config.model_type).__name__]
    config.num_labels = 1
    # a regression head: transformers' text-classification pipeline and vLLM's pooling runner
    # then return the raw score by default instead of a sigmoid of it
    config.problem_type = "regression"
    config.pad_token_id = tokenizer.pad_token_id
    config.dtype = next(iter(state_dict.values())).dtype
    for key, value in extra_config.items():
        setattr(config, key, value)
    config.save_pretrained(tmp)
    save_torch_state_dict(state_dict, tmp, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(tmp)
    add_legacy_keys(tmp, list(tokenizer.model_input_names))


# The tokenizer classes transformers 5 writes that 4.x does not know, and the class 4.x loads the
# same `tokenizer.json` with.
_V5_TOKENIZER_CLASSES = ("TokenizersBackend",)


def add_legacy_keys(export_dir: Path, model_input_names: list[str]) -> None:
    """Make an export written by transformers 5 load, with the same weights, template and ids,
    in transformers 4.x down to 4.34 (RLHF stacks that consume reward models often run it).

    Only keys 4.x reads are added or rewritten; transformers 5 reads the export as before:

    - config.json: ``torch_dtype`` next to ``dtype``, and ``rope_theta`` (+ ``rope_scaling`` for a
      non-default RoPE) next to ``rope_parameters`` — without them 4.x silently uses its default
      theta (10000), wrong for most real backbones;
    - tokenizer_config.json: ``tokenizer_class`` PreTrainedTokenizerFast in place of 5's
      TokenizersBackend; a list of ``extra_special_tokens`` as ``additional_special_tokens``
      (4.x wants a dict there; 5 reads the old key as the same list); ``model_input_names``
      (4.x's default adds ``token_type_ids``, which LlamaForSequenceClassification.forward
      rejects before 4.47); the chat template inline as ``chat_template`` too (4.x before
      4.50 does not read ``chat_template.jinja``);
    - tokenizer.json: BPE merges as ``"a b"`` strings, the format tokenizers < 0.20
      (transformers < 4.45) reads, unless a merged piece contains a space.
    """
    cfg_path = export_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if "dtype" in cfg:
        cfg.setdefault("torch_dtype", cfg["dtype"])
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:  # one global RoPE (LLaMA), not per layer
        cfg.setdefault("rope_theta", rope["rope_theta"])
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling.get("rope_type", "default") != "default":
            cfg.setdefault("rope_scaling", scaling)
    _write_json(cfg_path, cfg, sort_keys=True)

    tok_path = export_dir / "tokenizer_config.json"
    if tok_path.is_file():
        tok_cfg = json.loads(tok_path.read_text())
        if tok_cfg.get("tokenizer_class") in _V5_TOKENIZER_CLASSES:
            tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        extra = tok_cfg.get("extra_special_tokens")
        if isinstance(extra, list):
            tok_cfg.pop("extra_special_tokens")
            tok_cfg.setdefault("additional_special_tokens", extra)
        tok_cfg.setdefault("model_input_names", model_input_names)
        template_file = export_dir / "chat_template.jinja"
        if template_file.is_file():
            tok_cfg.setdefault("chat_template", template_file.read_text())
        _write_json(tok_path, tok_cfg, sort_keys=True)

    tok_json = export_dir / "tokenizer.json"
    if tok_json.is_file():
        data = json.loads(tok_json.read_text(encoding="utf-8"))
        model = data.get("model") or {}
        merges = model.get("merges")
        if (
            model.get("type") == "BPE"
            and isinstance(merges, list)
            and all(isinstance(m, list) and len(m) == 2 for m in merges)
            and not any(" " in part for m in merges for part in m)
        ):
            model["merges"] = [f"{a} {b}" for a, b in merges]
            _write_json(tok_json, data, sort_keys=False)


def _write_json(path: Path, obj: Any, sort_keys: bool) -> None:
    text = json.dumps(obj, indent=2, sort_keys=sort_keys, ensure_ascii=False)
    path.write_text(text + "\n", encoding="utf-8")
