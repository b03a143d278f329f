"""Typed configuration schemas.

One dataclass per Hydra config group, registered in Hydra's ConfigStore as the schema of the
primary config (``configs/config.yaml`` starts from ``rmtrain_schema``). Hydra therefore rejects an
unknown key or a wrong type while composing, and :func:`to_config` turns the composed DictConfig
into these dataclasses, which runs the cross-field checks in ``__post_init__``. Both happen before
any process group is created, so a typo never reaches a rank.

Each field's docstring is its help text: ``rmtrain config`` prints them (:func:`field_help`).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from rmtrain.errors import ConfigError

# The YAML config tree (`configs/` of a checkout, `rmtrain/configs` of an installed wheel).
CONFIG_DIR = next(
    p
    for p in (Path(__file__).parent / "configs", Path(__file__).parents[1] / "configs")
    if p.is_dir()
)


def _choice(key: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}")


# The architectures `model.toy.model_type` builds (rmtrain.arch.VERIFIED; a test checks they agree).
TOY_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")


@dataclass
class ToyConfig:
    """Shape of the random-init tiny model (used only when model.name_or_path=tiny)."""

    model_type: str = "llama"
    """Architecture of the tiny model: llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3
    (each with its own features: sliding windows, Gemma 2's soft-capping, Phi-3's fused
    projections, head_dim other than hidden/heads for qwen3 and Gemma)."""
    hidden_size: int = 64
    """Width of the tiny model."""
    intermediate_size: int = 128
    """MLP width."""
    num_hidden_layers: int = 2
    """Decoder layers."""
    num_attention_heads: int = 4
    """Attention heads; hidden_size must be divisible by it."""
    num_key_value_heads: int = 2
    """Key/value heads (grouped-query attention); divides num_attention_heads."""
    max_position_embeddings: int = 1024
    """Context length."""
    sliding_window: int = 16
    """Window of the sliding-window layers (mistral, phi3: every layer; qwen2/qwen3: the layers
    after the first; gemma2/gemma3_text: alternating), small so that sample sequences are
    longer than it; llama ignores it."""
    head_dim: int | None = None
    """Width of one attention head; None: hidden_size / num_attention_heads, but twice that for
    qwen3, gemma2 and gemma3_text (whose real checkpoints have head_dim > hidden / heads)."""

    def __post_init__(self) -> None:
        _choice("model.toy.model_type", self.model_type, TOY_MODEL_TYPES)
        if self.sliding_window < 1 or (self.head_dim is not None and self.head_dim < 1):
            raise ConfigError("model.toy.sliding_window and model.toy.head_dim must be >= 1")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                "model.toy.hidden_size must be divisible by model.toy.num_attention_heads"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                "model.toy.num_attention_heads must be divisible by model.toy.num_key_value_heads"
            )


@dataclass
class LoRAConfig:
    """Low-rank adapters (peft) on the backbone; the score head is always fully trained."""

    enabled: bool = False
    """Train LoRA adapters instead of every weight."""
    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """Scaling numerator: adapters are scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=list)
    """Linear layers that get adapters; empty: the architecture's attention and MLP projections
    (q/k/v/o_proj + gate/up/down_proj; Phi-3: qkv_proj, o_proj, gate_up_proj, down_proj)."""
    save_adapter: bool = False
    """Also write the adapter alone (peft format) to <export>/adapter."""

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0:
            raise ConfigError("model.lora.r must be >= 1 and model.lora.alpha > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("model.lora.dropout must be in [0, 1)")


@dataclass
class ModelConfig:
    """The backbone the score model is built on."""

    name_or_path: str = MISSING
    """A local directory or hub id of a decoder checkpoint (causal LM or base; the score head
    starts fresh): LLaMA, Mistral, Qwen2/3, Gemma 2/3, Phi-3 or another decoder transformers
    loads as a sequence classifier (README "Architectures"), or "tiny": a random-init tiny
    model (model.toy.model_type) with rmtrain's own tokenizer."""
    revision: str | None = None
    """Hub revision of the checkpoint (pin it for reproducible runs)."""
    toy: ToyConfig = field(default_factory=ToyConfig)
    """Shape of the tiny model (name_or_path=tiny only)."""
    tokenizer: str | None = None
    """Tokenizer directory or hub id; defaults to name_or_path."""
    padding_side: str = "right"
    """Padding side used when batching ("left" or "right"); scores do not depend on it."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% more compute)."""
    attn_implementation: str = "auto"
    """Attention kernel passed to transformers: "auto" (the architecture's recommended one:
    eager for Gemma 2, whose soft-capping sdpa cannot apply; sdpa otherwise), "sdpa", "eager",
    "flash_attention_2", "flash_attention_3", "flex_attention"."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA adapters (off by default: full fine-tuning)."""

    def __post_init__(self) -> None:
        _choice("model.padding_side", self.padding_side, ("left", "right"))
        _choice(
            "model.attn_implementation",
            self.attn_implementation,
            ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"),
        )


FORMATS = (
    "auto",
    "pku_saferlhf",
    "ultrafeedback_completions",
    "ranked",
    "ultrafeedback",
    "conversational",
    "conversational_implicit",
    "rewardbench2",
    "rmbench",
    "rewardbench",
    "hh_rlhf",
    "standard",
    "standard_implicit",
)
"""Accepted row layouts (rmtrain.data.formats has one adapter per name); "auto" detects."""
_LABEL = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class SourceConfig:
    """One preference-data source of a mixture (data.mixture) or an extra eval set
    (data.eval_sets)."""

    path: str = MISSING
    """A file (.jsonl, .json, .parquet, .jsonl.xz), a directory with <split>.jsonl, or a hub id."""
    format: str = "auto"
    """Row layout (see data.format); "auto" detects it from the columns."""
    name: str | None = None
    """Hub config name (hub ids and hub-layout copies)."""
    revision: str | None = None
    """Hub revision (pin it)."""
    split: str = "train"
    """Split read from a directory or hub id (a single file is read whole)."""
    weight: float = 1.0
    """Mixture weight: this source contributes round(weight × its pairs) pairs to the train set
    (2.0 = every pair twice, 0.5 = a seeded half); drawn once per run from trainer.seed."""
    label: str | None = None
    """Name in logs, metrics (data/train/<label>/..., eval/<label>/...) and the model card;
    default: the file name without extension, or the last part of the hub id."""

    def display(self) -> str:
        if self.label:
            return self.label
        base = self.path.rstrip("/").rsplit("/", 1)[-1]
        for ext in (".jsonl.xz", ".jsonl", ".json", ".parquet"):
            base = base.removesuffix(ext)
        return base


@dataclass
class DataConfig:
    """Preference data: where it is, which response is chosen, how it becomes text."""

    path: str = "sample"
    """"sample" (data rmtrain generates itself, PKU-SafeRLHF v1 schema), a hub id such as
    PKU-Alignment/PKU-SafeRLHF, a local copy of that hub repo, or a local directory with
    train.jsonl / test.jsonl (or .parquet) in the PKU-SafeRLHF v0 or v1 schema."""
    name: str | None = None
    """Hub config (default / alpaca-7b / alpaca2-7b / alpaca3-8b); None = the dataset's default."""
    revision: str | None = None
    """Pin the dataset revision (the hub default has changed several times)."""
    preference: str = "better"
    """Which id marks the chosen response: "better" (better_response_id) or "safer"."""
    template: str = "safe_rlhf"
    """"safe_rlhf": BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{response}<eos>;
    "chat": the tokenizer's own chat template (Llama-3 style models)."""
    max_length: int = 512
    """Tokens per sequence, EOS included; longer sequences are cut from the right, keeping EOS."""
    train_split: str = "train"
    """Split trained on."""
    eval_split: str = "test"
    """Held-out split evaluated on."""
    max_train_rows: int | None = None
    """Use at most this many training rows (None = all)."""
    max_eval_rows: int | None = None
    """Use at most this many eval rows (None = all)."""
    sample_train_rows: int = 2048
    """Training rows the sample generator makes (path=sample)."""
    sample_eval_rows: int = 256
    """Eval rows the sample generator makes (path=sample)."""
    min_severity_gap: int = 0
    """Keep only pairs whose severity levels differ by at least this much (0 = keep all)."""
    inconsistent_labels: str = "error"
    """Cost model: rows whose safety labels contradict safer_response_id: "error" or "skip"."""
    margin_column: str | None = None
    """Data column holding a per-pair margin for loss=margin (None: use loss.margin)."""
    margin_from_scores: bool = False
    """UltraFeedback-style rows: per-pair margin = score_chosen - score_rejected (loss=margin)."""
    format: str = "auto"
    """Row layout of data.path: "auto" (detected from the columns), pku_saferlhf, standard,
    standard_implicit, conversational, conversational_implicit, hh_rlhf, ultrafeedback,
    ultrafeedback_completions, ranked, rewardbench, rmbench (README: "Data formats")."""
    eval_fraction: float = 0.0
    """Hold out this fraction of the training rows as the eval set (0: use eval_path or the
    eval_split). Deterministic from split_seed; the held-out rows are recorded."""
    split_seed: int = 0
    """Seed of the eval_fraction split (independent of trainer.seed, so seed sweeps share it)."""
    eval_path: str | None = None
    """An explicit eval file (or directory / hub id: its eval_split) instead of eval_split."""
    eval_sets: list[SourceConfig] = field(default_factory=list)
    """More eval sets, each evaluated during training and logged as eval/<label>/accuracy, ...
    e.g. [{path: rewardbench.jsonl, label: rb}]."""
    mixture: list[SourceConfig] = field(default_factory=list)
    """Train on a weighted mixture of sources instead of data.path, e.g.
    [{path: a.jsonl, weight: 2}, {path: b.parquet, format: standard}]; needs eval_fraction
    (carved per source, before weighting) or eval_path."""
    cache: bool = True
    """Tokenize once into the data cache (cache_dir) and map it; a later run with the same data
    and settings starts in seconds. false: tokenize into a temporary directory, removed once
    mapped (README: "The data cache")."""
    cache_dir: str | None = None
    """Where the data cache lives; None: $RMTRAIN_DATA_CACHE, else ~/.cache/rmtrain/pairs."""
    num_proc: int | None = None
    """Processes per rank that tokenize a cold cache (None: the rank's share of the CPU cores,
    one for less than 64 MiB of input)."""

    @property
    def per_pair_margin(self) -> bool:
        """Whether the data gives each pair its own margin (for loss.name=margin)."""
        return self.margin_column is not None or self.margin_from_scores

    def __post_init__(self) -> None:
        _choice("data.preference", self.preference, ("better", "safer"))
        _choice("data.format", self.format, FORMATS)
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction={self.eval_fraction} must be in [0, 1)")
        if self.mixture and not (self.eval_fraction or self.eval_path):
            raise ConfigError(
                "data.mixture needs an eval set: set data.eval_fraction (e.g. 0.05) or "
                "data.eval_path"
            )
        for key, sources in (("data.mixture", self.mixture), ("data.eval_sets", self.eval_sets)):
            labels: list[str] = []
            for i, src in enumerate(sources):
                _choice(f"{key}[{i}].format", src.format, FORMATS)
                if src.weight <= 0:
                    raise ConfigError(f"{key}[{i}].weight={src.weight} must be > 0")
                label = src.display()
                if not _LABEL.match(label):
                    raise ConfigError(
                        f"{key}[{i}].label={label!r}: use letters, digits, '_', '.', '-'"
                    )
                if label in labels:
                    raise ConfigError(f"{key}[{i}]: label {label!r} is used twice (set label)")
                labels.append(label)
        _choice("data.template", self.template, ("safe_rlhf", "chat"))
        _choice("data.inconsistent_labels", self.inconsistent_labels, ("error", "skip"))
        if self.max_length < 8:
            raise ConfigError(f"data.max_length={self.max_length} is too small (minimum 8)")
        if self.min_severity_gap < 0:
            raise ConfigError("data.min_severity_gap must be >= 0")
        if self.num_proc is not None and self.num_proc < 1:
            raise ConfigError(f"data.num_proc={self.num_proc} must be >= 1 (or null: automatic)")


K_WAY = ("pairs", "all_pairs", "chosen_vs_rest")


@dataclass
class LossConfig:
    """The training objective's terms (pure torch functions in rmtrain.losses)."""

    name: str = "bt"
    """"bt": sequence-wise Bradley-Terry on end scores; "bt_tokenwise": safe-rlhf's token-wise
    BT; "margin": BT with a margin, -log σ(r_c - r_r - m)."""
    margin: float = 0.0
    """Constant margin for name=margin (a data column given by data.margin_column wins)."""
    label_smoothing: float = 0.0
    """Conservative BT: -(1-ε) log σ(Δ) - ε log σ(-Δ), ε in [0, 0.5)."""
    score_reg: float = 0.0
    """safe-rlhf score regularisation λ: λ·(mean(r_c²) + mean(r_r²))."""
    center_reg: float = 0.0
    """TRL reward centering λ: λ·mean((r_c + r_r)²)."""
    k_way: str = "pairs"
    """Rows with K >= 2 responses to one prompt (ranked or rated; their pairs are a group):
    "pairs" trains each pair on its own; "all_pairs" trains every ordered pair (better, worse)
    of a row together in one micro-batch, each of the K responses computed once (and the prompt
    once with trainer.prefix_sharing), every pair weighing as a lone pair does, so a row of P
    pairs counts as much as its P pairs expanded; "chosen_vs_rest" the same with only the pairs
    whose better side is the row's best response (K - 1 pairs). With either, trainer.
    micro_batch_size counts rows, and the step's loss is the mean over its pairs."""

    def __post_init__(self) -> None:
        _choice("loss.name", self.name, ("bt", "bt_tokenwise", "margin"))
        _choice("loss.k_way", self.k_way, K_WAY)
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError("loss.label_smoothing must be in [0, 0.5)")
        if self.score_reg < 0 or self.center_reg < 0:
            raise ConfigError("loss.score_reg and loss.center_reg must be >= 0")


@dataclass
class DeepSpeedConfig:
    """ZeRO settings; the DeepSpeed JSON is derived from these and the trainer's batch sizes."""

    stage: int = 2
    """ZeRO stage 0-3."""
    offload_optimizer: bool = False
    """Keep optimizer state in CPU memory (stage >= 1)."""
    offload_params: bool = False
    """Keep parameters in CPU memory (stage 3 only)."""
    optimizer: str = "auto"
    """"auto": torch AdamW on CPU, DeepSpeed's fused AdamW on GPU; or "torch" / "deepspeed"."""
    stage3_param_persistence_threshold: int = 100_000
    """Parameters smaller than this stay unsharded under ZeRO-3 (0 shards every tensor)."""
    overlap_comm: bool = False
    """Overlap gradient reduction with the backward pass (stage >= 1)."""
    reduce_bucket_size: int = 50_000_000
    """Elements per gradient-reduction bucket (stage >= 1)."""
    timeout_s: int = 1800
    """Seconds a collective may wait before the run fails (a stalled rank)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed JSON merged last, for settings rmtrain does not model."""

    def __post_init__(self) -> None:
        _choice("deepspeed.stage", self.stage, (0, 1, 2, 3))
        _choice("deepspeed.optimizer", self.optimizer, ("auto", "torch", "deepspeed"))
        if self.offload_params and self.stage != 3:
            raise ConfigError("deepspeed.offload_params needs deepspeed.stage=3")
        if self.offload_optimizer and self.stage == 0:
            raise ConfigError("deepspeed.offload_optimizer needs deepspeed.stage >= 1")
        if self.timeout_s < 1:
            raise ConfigError("deepspeed.timeout_s must be >= 1")
        for key, owner in _DERIVED.items():
            if key in self.extra:
                raise ConfigError(f"deepspeed.extra.{key} would contradict {owner}; set that")
        zero = self.extra.get("zero_optimization") or {}
        for key, owner in _DERIVED_ZERO.items():
            if key in zero:
                raise ConfigError(
                    f"deepspeed.extra.zero_optimization.{key} would contradict {owner}; set that"
                )


# DeepSpeed settings rmtrain derives from its own keys: deepspeed.extra may not override them.
_DERIVED = {
    "train_batch_size": "trainer.micro_batch_size (x accumulation x ranks)",
    "train_micro_batch_size_per_gpu": "trainer.micro_batch_size",
    "gradient_accumulation_steps": "trainer.gradient_accumulation_steps",
    "gradient_clipping": "trainer.grad_clip",
    "bf16": "trainer.precision",
    "fp16": "trainer.precision",
    "optimizer": "trainer.lr / deepspeed.optimizer",
    "scheduler": "the trainer's schedule (trainer.warmup_ratio, trainer.min_lr_ratio)",
}
_DERIVED_ZERO = {
    "stage": "deepspeed.stage",
    "offload_optimizer": "deepspeed.offload_optimizer",
    "offload_param": "deepspeed.offload_params",
}


def parse_size(value: str | int) -> int:
    """Bytes of a size such as 5GB, 200KB, 1.5GiB or 1000000 (ValueError otherwise)."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(value), re.IGNORECASE)
    if not m:
        raise ValueError(value)
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0])
    return int(float(m.group(1)) * base**power)


@dataclass
class TrainerConfig:
    """The loop: schedule, batch sizes (written once here), evaluation, checkpoints, export."""

    max_steps: int | None = None
    """Stop after this many optimizer steps (None: train for `epochs`)."""
    epochs: int = 1
    """Passes over the training pairs (when max_steps is None)."""
    lr: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay, on weight matrices only (never biases or norm weights)."""
    weight_decay_embeddings: bool = False
    """Also decay the embedding matrix (transformers' Trainer and TRL do not)."""
    adam_beta1: float = 0.9
    """AdamW β1."""
    adam_beta2: float = 0.95
    """AdamW β2."""
    adam_eps: float = 1e-8
    """AdamW ε."""
    warmup_ratio: float = 0.03
    """Fraction of the steps spent warming the learning rate up linearly from 0."""
    min_lr_ratio: float = 0.0
    """Cosine decays to min_lr_ratio * lr."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this."""
    micro_batch_size: int = 8
    """Pairs per rank per micro step (each pair is two sequences in the forward pass)."""
    gradient_accumulation_steps: int = 1
    """Micro steps per optimizer step; global batch = micro × accumulation × ranks."""
    eval_batch_size: int = 16
    """Pairs per rank per eval forward."""
    eval_every: int = 50
    """Evaluate every N optimizer steps (0: only at the end)."""
    eval_at_start: bool = False
    """Also evaluate the untrained model (step 0), as a baseline."""
    log_every: int = 1
    """Log training metrics every N steps."""
    precision: str = "fp32"
    """"fp32" or "bf16" (DeepSpeed bf16: bf16 weights and activations, fp32 master weights)."""
    seed: int = 42
    """Seeds model init and the data order."""
    save_every: int = 0
    """Checkpoint every N steps into <output_dir>/checkpoints (0: never)."""
    save_every_minutes: float = 30.0
    """Also checkpoint when this many minutes passed since the last save (0: never), so a
    preempted or crashed run loses at most that much work."""
    keep_last: int = 2
    """Complete checkpoints kept (older ones are deleted)."""
    resume: str | None = None
    """Resume: None, "auto" (latest checkpoint in output_dir) or a checkpoint path."""
    export: bool = True
    """Write the transformers export at the end of training."""
    export_max_shard_size: str = "5GB"
    """Shard size of the exported safetensors ("5GB", "200KB", or bytes)."""
    packing: bool = False
    """Padding-free micro-batches: the chosen and rejected sequences of a micro-batch are
    concatenated into rows with position_ids restarting per sequence (attention stays inside each
    sequence: block-diagonal masks for sdpa/eager, flash-attention varlen with one row). Same
    scores and losses as the padded path, without computing on padding."""
    prefix_sharing: bool = False
    """With packing: each pair becomes one packed segment [shared prefix][chosen rest][rejected
    rest] (a row's K responses: [prefix][rest 1]...[rest K]), the prefix being the longest
    common prefix of the token ids (>= 16 tokens, else the pair is packed unshared); every rest
    attends to the prefix and itself, positions continuing from the prefix. The prefix (the
    conversation so far) is computed once; scores and losses equal unshared packing."""
    max_tokens_per_micro_batch: int | None = None
    """Token-budget micro-batches: group pairs (length-aware, deterministic from the seed, every
    pair once per epoch) so each micro-batch holds at most this many real tokens (chosen +
    rejected); the pairs per step then vary, the loss stays the exact mean over a step's pairs.
    None: micro_batch_size pairs per micro-batch."""
    peak_tflops: float | None = None
    """Peak TFLOP/s of one device for train/mfu; None: a table of known GPUs' dense bf16 peaks
    (no MFU on CPU or an unknown GPU)."""

    def __post_init__(self) -> None:
        _choice("trainer.precision", self.precision, ("fp32", "bf16"))
        for key in ("micro_batch_size", "gradient_accumulation_steps", "eval_batch_size", "epochs"):
            if getattr(self, key) < 1:
                raise ConfigError(f"trainer.{key} must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("trainer.max_steps must be >= 1 (or null to train for epochs)")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"trainer.lr={self.lr} must be a finite number > 0")
        for key in ("grad_clip", "save_every", "eval_every", "save_every_minutes"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"trainer.{key}={value} must be >= 0")
        if self.log_every < 1:
            raise ConfigError("trainer.log_every must be >= 1")
        try:
            parse_size(self.export_max_shard_size)
        except ValueError:
            raise ConfigError(
                f"trainer.export_max_shard_size={self.export_max_shard_size!r} is not a size "
                '(e.g. "5GB", "200KB" or a number of bytes)'
            ) from None
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError("trainer.warmup_ratio must be in [0, 1)")
        if self.keep_last < 1:
            raise ConfigError("trainer.keep_last must be >= 1")
        if self.max_tokens_per_micro_batch is not None and self.max_tokens_per_micro_batch < 16:
            raise ConfigError("trainer.max_tokens_per_micro_batch must be >= 16 (or null)")
        if self.prefix_sharing and not self.packing:
            raise ConfigError("trainer.prefix_sharing=true needs trainer.packing=true")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError("trainer.peak_tflops must be > 0 (or null)")


@dataclass
class WandbConfig:
    """wandb run settings (rank 0 only)."""

    enabled: bool = False
    """Log to wandb."""
    project: str = "rmtrain"
    """wandb project."""
    entity: str | None = None
    """wandb entity (team or user); None: your default."""
    name: str | None = None
    """wandb run name as is; None: run_name (or the experiment) plus the start time."""
    group: str | None = None
    """wandb group."""
    tags: list[str] = field(default_factory=list)
    """wandb tags."""
    mode: str | None = None
    """None: WANDB_MODE if set, else "online" with an API key and "offline" without one."""


@dataclass
class LoggerConfig:
    """Metric sinks; only rank 0 writes."""

    console: bool = True
    """Progress bar and eval summaries on rank 0's stdout."""
    jsonl: bool = True
    """Append metrics as JSON lines to <output_dir>/metrics.jsonl."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """wandb settings."""


@dataclass
class Config:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The backbone."""
    data: DataConfig = field(default_factory=DataConfig)
    """The preference data."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The objective's terms."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """ZeRO settings."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """The loop."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """Metric sinks."""
    objective: str = "reward"
    """"reward": higher score = preferred response; "cost": safe-rlhf cost model (cost > 0 =
    unsafe; needs data.preference=safer)."""
    output_dir: str = "outputs/run"
    """Where a run writes everything (config, metrics, checkpoints, export/)."""
    run_name: str | None = None
    """Name shown in the report and wandb, followed by the start time; None: the experiment
    preset's name (e.g. quickstart-20261122-231500)."""

    def __post_init__(self) -> None:
        _choice("objective", self.objective, ("reward", "cost"))
        if self.objective == "cost" and self.data.preference != "safer":
            raise ConfigError("objective=cost trains on safety pairs: set data.preference=safer")
        if self.trainer.prefix_sharing and "flash" in self.model.attn_implementation:
            raise ConfigError(
                f"trainer.prefix_sharing=true with model.attn_implementation="
                f"{self.model.attn_implementation}: flash-attention's varlen path cannot let a "
                "response see the shared prompt without the other response; use sdpa, eager or "
                "flex_attention"
            )


def register_schemas() -> None:
    """Register the root schema so that ``configs/config.yaml`` can start from it."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="rmtrain_schema", node=Config)


def to_config(cfg: DictConfig | dict[str, Any]) -> Config:
    """Turn a composed config into typed dataclasses, running every cross-field check."""
    unknown = _unknown_keys(cfg, Config)
    if unknown:
        raise ConfigError(
            f"unknown config key {unknown[0]} (`+key=` adds keys Hydra would not check; "
            "`rmtrain config` lists every key)"
        )
    cfg = OmegaConf.merge(OmegaConf.structured(Config), cfg)  # type: ignore[assignment]
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing value for {', '.join(missing)} (set it on the command line)")
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, Config)
    return obj


def _unknown_keys(cfg: Any, cls: type, prefix: str = "") -> list[str]:
    """Keys of `cfg` that no field of the dataclass `cls` declares (free-form dicts excepted)."""
    if not isinstance(cfg, (DictConfig, dict)):
        return []
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = []
    for key in cfg:
        name = str(key)
        f = fields.get(name)
        if f is None:
            out.append(f"{prefix}{name}")
        elif dataclasses.is_dataclass(f.default_factory):  # type: ignore[arg-type]
            out += _unknown_keys(cfg[key], f.default_factory, f"{prefix}{name}.")  # type: ignore[arg-type]
    return out


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (read from its source)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def field_help(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every leaf field, depth first: `rmtrain config`."""
    rows: list[tuple[str, str, str, str]] = []
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if dataclasses.is_dataclass(f.default_factory):  # type: ignore[arg-type]
            rows.extend(field_help(f.default_factory, f"{key}."))  # type: ignore[arg-type]
            continue
        if f.default is not dataclasses.MISSING:
            default = "???" if f.default == MISSING else repr(f.default)
        else:
            default = repr(f.default_factory())  # type: ignore[misc,operator]
        rows.append((key, str(kind), default, docs.get(f.name, "")))
        item = typing.get_args(typing.get_type_hints(cls).get(f.name))
        if len(item) == 1 and dataclasses.is_dataclass(item[0]):  # a list of sources
            rows.extend(field_help(item[0], f"{key}[]."))  # type: ignore[arg-type]
    return rows


def check_command_line(argv: list[str]) -> None:
    """Refuse, before Hydra runs anything: a sweep under a multi-rank launcher (each rank would
    run the jobs on its own), and code in a config: `_target_` keys or `hydra.callbacks` in a
    `--config-path` directory (a saved run's config.yaml is plain data) or on the command line.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and any(
        a in ("-m", "--multirun") or a.startswith("hydra.mode=") for a in argv
    ):
        raise ConfigError(
            "a Hydra multirun (-m) cannot run under a multi-rank launcher; start one launch "
            "per setting (e.g. a shell loop over launch/cpu.sh)"
        )
    for a in argv:
        if "_target_" in a or a.lstrip("+~").startswith("hydra.callbacks"):
            raise ConfigError(f"{a}: configs hold data, not code (_target_ / hydra.callbacks)")
    config_path = None
    for i, a in enumerate(argv):
        if a in ("--config-path", "-cp") and i + 1 < len(argv):
            config_path = argv[i + 1]
        elif a.startswith("--config-path="):
            config_path = a.split("=", 1)[1]
    if config_path is not None:
        for file in sorted(Path(config_path).rglob("*.yaml")):
            found = _code_keys(OmegaConf.to_container(OmegaConf.load(file)), "")
            if found:
                raise ConfigError(
                    f"{file}: refusing to run a config that holds code ({found}); rmtrain "
                    "writes plain data, so this was added by hand"
                )


def _code_keys(node: Any, prefix: str) -> str | None:
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}{key}"
            if key == "_target_" or path == "hydra.callbacks":
                return path
            found = _code_keys(value, f"{path}.")
            if found:
                return found
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found = _code_keys(value, f"{prefix}{i}.")
            if found:
                return found
    return None
