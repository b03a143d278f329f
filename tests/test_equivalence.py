"""Distributed correctness: the same seed, data order and global batch give the same training.

In fp32, per-step losses, the final eval metrics and the final weights must agree across ZeRO
stages 0-3 (and ZeRO-3 with offload), world size 1 vs 2 and gradient accumulation 1 vs k at the
same global batch, and with `reference_loop.py`, a plain PyTorch + transformers loop that shares
nothing with rmtrain but the tokenized data.

The data set is chosen so that the run crosses an epoch boundary AFTER a short last batch:
27 pairs / global batch 8 -> steps 1-3 have 8 pairs, step 4 has 3 (split unevenly in 2 parts, and
with an empty, zero-weight micro-batch in 4 parts), step 5 starts epoch 2. Sequence lengths vary
(52-96 tokens), so every split pads differently. `grad_clip=2` clips steps 3-5, not 1-2.

Every configuration runs once per module (`runs` fixture) through the real CLI and launcher.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import reference_loop as ref
import torch
from conftest import (
    assert_close_steps,
    check_ok,
    export_weights,
    read_metrics,
    run_train,
    run_train_many,
    weights_close,
)

SEED, LR, STEPS, GLOBAL, CLIP = 42, 1e-3, 5, 8, 2.0
TRAIN_ROWS, EVAL_ROWS, MAX_LEN, EVAL_BATCH = 27, 17, 96, 4

# Everything that affects the numbers is pinned, so a changed default cannot make the reference
# loop (which has its own explicit values) disagree for the wrong reason.
COMMON = [
    "model=tiny",
    "logger=none",
    "data=sample",
    f"data.sample_train_rows={TRAIN_ROWS}",
    f"data.sample_eval_rows={EVAL_ROWS}",
    f"data.max_length={MAX_LEN}",
    "loss=bt",
    "objective=reward",
    f"trainer.seed={SEED}",
    f"trainer.lr={LR}",
    "trainer.warmup_ratio=0",
    "trainer.min_lr_ratio=0",
    "trainer.weight_decay=0",
    "trainer.adam_beta1=0.9",
    "trainer.adam_beta2=0.95",
    "trainer.adam_eps=1e-8",
    f"trainer.grad_clip={CLIP}",
    "trainer.precision=fp32",
    f"trainer.max_steps={STEPS}",
    "trainer.eval_every=0",
    "trainer.eval_at_start=false",
    f"trainer.eval_batch_size={EVAL_BATCH}",
    "trainer.export_max_shard_size=5GB",
    "deepspeed.optimizer=torch",
]
Z3 = ["deepspeed.stage3_param_persistence_threshold=0"]  # really shard the tiny model

# name -> (overrides, ranks); micro x accum x ranks == GLOBAL for all of them.
VARIANTS: dict[str, tuple[list[str], int]] = {
    "z0": (["deepspeed=zero0", "trainer.micro_batch_size=8"], 1),  # the baseline
    "z1": (["deepspeed=zero1", "trainer.micro_batch_size=8"], 1),
    "z2": (["deepspeed=zero2", "trainer.micro_batch_size=8"], 1),
    "z3": (["deepspeed=zero3", *Z3, "trainer.micro_batch_size=8"], 1),
    # optimizer AND parameter offload (the shipped config); still the client torch AdamW
    "z3_offload": (["deepspeed=zero3_offload", *Z3, "trainer.micro_batch_size=8"], 1),
    "z2_m2_a4": (
        ["deepspeed=zero2", "trainer.micro_batch_size=2", "trainer.gradient_accumulation_steps=4"],
        1,
    ),
    "w2_z2_m4": (["deepspeed=zero2", "trainer.micro_batch_size=4"], 2),
    "w2_z3_m4": (["deepspeed=zero3", *Z3, "trainer.micro_batch_size=4"], 2),
    "w2_z3_m2_a2": (
        [
            "deepspeed=zero3",
            *Z3,
            "trainer.micro_batch_size=2",
            "trainer.gradient_accumulation_steps=2",
        ],
        2,
    ),
}
BASELINE = "z0"

# Padding-free (packed) runs: the same batches as their padded counterparts, so they must match
# the padded baseline at the same tolerances (trainer.peak_tflops makes the CPU run log MFU).
PACKED = ["trainer.packing=true"]
VARIANTS |= {
    "p_z0": (
        [*PACKED, "deepspeed=zero0", "trainer.micro_batch_size=8", "trainer.peak_tflops=1"],
        1,
    ),
    "p_z1_m2_a4": (
        [
            *PACKED,
            "deepspeed=zero1",
            "trainer.micro_batch_size=2",
            "trainer.gradient_accumulation_steps=4",
        ],
        1,
    ),
    "p_w2_z2_m4": ([*PACKED, "deepspeed=zero2", "trainer.micro_batch_size=4"], 2),
    "p_w2_z3_m2_a2": (
        [
            *PACKED,
            "deepspeed=zero3",
            *Z3,
            "trainer.micro_batch_size=2",
            "trainer.gradient_accumulation_steps=2",
        ],
        2,
    ),
}

# Token-budget micro-batches: pairs of 104-192 tokens, at most TOKEN_BUDGET per micro-batch,
# world x accumulation = 4 micro-batches per step (~10 pairs, varying). Every split of the same
# 4 micro-batches (padded or packed, 1 or 2 ranks, ZeRO 0-3) must give the same training, and the
# padded one must equal the reference loop trained on the same pairs per step.
TOKEN_BUDGET = 400
TB = [f"trainer.max_tokens_per_micro_batch={TOKEN_BUDGET}"]
TB_BASELINE = "tb_z0_a4"
VARIANTS |= {
    TB_BASELINE: ([*TB, "deepspeed=zero0", "trainer.gradient_accumulation_steps=4"], 1),
    "tb_p_w2_z3_a2": (
        [*TB, *PACKED, "deepspeed=zero3", *Z3, "trainer.gradient_accumulation_steps=2"],
        2,
    ),
}

# Prefix sharing (issue 20): each pair one packed segment, its prompt computed once. The same
# batches again, so the same training (every pair shares its safe_rlhf prompt, >= 16 tokens).
SHARED = [*PACKED, "trainer.prefix_sharing=true"]
VARIANTS |= {
    "s_z0": ([*SHARED, "deepspeed=zero0", "trainer.micro_batch_size=8"], 1),
    "s_z3_m2_a4": (
        [
            *SHARED,
            "deepspeed=zero3",
            *Z3,
            "trainer.micro_batch_size=2",
            "trainer.gradient_accumulation_steps=4",
        ],
        1,
    ),
    "s_w2_z2_m2_a2": (
        [
            *SHARED,
            "deepspeed=zero2",
            "trainer.micro_batch_size=2",
            "trainer.gradient_accumulation_steps=2",
        ],
        2,
    ),
    "tb_s_z1_a4": ([*TB, *SHARED, "deepspeed=zero1", "trainer.gradient_accumulation_steps=4"], 1),
}
# LoRA (peft adapters, merged into the export): prefix sharing trains them as padding does.
LORA = ["model.lora.enabled=true", "model.lora.r=8", "model.lora.alpha=16"]
LORA_VARIANTS: dict[str, tuple[list[str], int]] = {
    "lora_z2": ([*LORA, "deepspeed=zero2", "trainer.micro_batch_size=8"], 1),
    "lora_s_z2_m4_a2": (
        [
            *LORA,
            *SHARED,
            "deepspeed=zero2",
            "trainer.micro_batch_size=4",
            "trainer.gradient_accumulation_steps=2",
        ],
        1,
    ),
}
ALL_VARIANTS = {**VARIANTS, **LORA_VARIANTS}

# Tolerances (fp32). Every configuration computes the same sums, only grouped differently
# (per-micro-batch vs whole-batch padding, the order of gradient reductions over micro-batches and
# ranks, DeepSpeed's divide-vs-torch's multiply in clipping): a few ulps per step. Measured (max
# over the 5 steps, all variants, ZeRO-3 with random init built outside zero.Init, see below):
# train/loss rel <= 3.3e-7 (vs the reference loop: 1.1e-7), eval/loss rel <= 3.7e-7,
# train/grad_norm rel <= 2.7e-7.
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-6
NORM_RTOL = 1e-5  # the logged pre-clip gradient norm
# Weights: an element-wise 1e-5 bound is NOT a sound criterion for Adam. Its update is
# lr * m / (sqrt(v) + eps), whose slope in g near |g| ~ eps = 1e-8 is ~lr / eps = 1e5: an element
# whose gradient is a near-exact cancellation (seen: 1.9e-9 in layer 0's mlp.up_proj, where the
# typical gradient is 4e-4) turns round-off of ~1e-10 in g into ~1e-5 in the weight, and another
# grouping of the same sums changes exactly that round-off. Measured max |dw| vs the baseline:
# ZeRO-1/2 7.5e-9, reference loop 3.7e-9, 2 ranks ZeRO-2 3.3e-6, ZeRO-3 (1 or 2 ranks, offload)
# 6.4e-6, accumulation 4 1.2e-5, 2 ranks x accumulation 2 1.7e-5 -- each time ONE element of
# layer 0's mlp.up_proj (139,648 weights). So the weights are compared as a whole (relative
# Frobenius norm of the difference, measured <= 9.1e-7) plus a per-element bound of a tenth of
# one Adam step (lr / 10), which a real error (a wrong batch, pair weight or lr moves most
# elements by ~lr) far exceeds.
WEIGHT_RTOL_FRO = 1e-5
WEIGHT_ATOL_MAX = LR / 10


@dataclass
class Run:
    name: str
    dir: Path
    metrics: list[dict[str, Any]]
    weights: dict[str, torch.Tensor]
    seconds: float

    def train(self, key: str) -> list[float]:
        rows = [r for r in self.metrics if "train/loss" in r]
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), self.name
        return [float(r[key]) for r in rows]

    @property
    def final_eval(self) -> dict[str, float]:
        return next(r for r in reversed(self.metrics) if "eval/loss" in r)


def load_export(run_dir: Path) -> dict[str, torch.Tensor]:
    return export_weights(run_dir / "export")


def assert_weights_close(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str
) -> None:
    weights_close(got, want, what, WEIGHT_RTOL_FRO, WEIGHT_ATOL_MAX)


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`runs(name)`: the finished run of VARIANTS[name], trained once per module: a one-rank
    variant in this process, every two-rank variant in ONE 2-rank launch (tests/launch_runs.py)
    the first time any of them is asked for."""
    root = tmp_path_factory.mktemp("equivalence")
    cache: dict[str, Run] = {}

    def finish(name: str, seconds: float) -> Run:
        run_dir = root / name
        metrics = read_metrics(run_dir)
        data = metrics[0]
        assert data["step"] == 0 and data["data/train/pairs"] == TRAIN_ROWS, data
        print(f"{name}: trained in {seconds:.1f}s")
        return Run(name, run_dir, metrics, load_export(run_dir), seconds)

    def get(name: str) -> Run:
        if name not in cache:
            overrides, nproc = ALL_VARIANTS[name]
            start = time.perf_counter()
            if nproc == 1:
                check_ok(run_train([*COMMON, *overrides, f"output_dir={root / name}"]))
                cache[name] = finish(name, time.perf_counter() - start)
            else:
                batch = [n for n, (_, procs) in ALL_VARIANTS.items() if procs == nproc]
                check_ok(run_train_many(
                    [[*COMMON, *ALL_VARIANTS[n][0], f"output_dir={root / n}"] for n in batch], nproc
                ))  # fmt: skip
                seconds = (time.perf_counter() - start) / len(batch)
                cache.update({n: finish(n, seconds) for n in batch})
        return cache[name]

    return get


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    """The tokenized pairs and the LlamaConfig the reference loop uses (data is not under test)."""
    import datasets

    from rmtrain.config import DataConfig, ModelConfig
    from rmtrain.data.pairs import build_pairs
    from rmtrain.data.sources import load_rows
    from rmtrain.hf import load_tokenizer

    datasets.disable_progress_bars()
    tok = load_tokenizer(ModelConfig(name_or_path="tiny"))
    cfg = DataConfig(sample_train_rows=TRAIN_ROWS, sample_eval_rows=EVAL_ROWS, max_length=MAX_LEN)
    train, _ = build_pairs(load_rows(cfg, cfg.train_split), cfg, tok)
    evals, _ = build_pairs(load_rows(cfg, cfg.eval_split), cfg, tok)
    assert len(train) == TRAIN_ROWS and len(evals) == EVAL_ROWS
    config = ref.llama_config(len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    return {"train": train, "eval": evals, "config": config, "tokenizer": tok}


@pytest.fixture(scope="module")
def reference(data: dict[str, Any]) -> ref.RefResult:
    hyper = ref.RefHyper(seed=SEED, lr=LR, grad_clip=CLIP, global_batch=GLOBAL, max_steps=STEPS)
    result = ref.train(data["train"], data["config"], hyper)
    # the run really has a short last batch and crosses into epoch 2
    assert result.batch_sizes == [8, 8, 8, 3, 8]
    # and clipping is active on some steps but not all
    assert 0 < sum(n > CLIP for n in result.grad_norms) < STEPS
    return result


@pytest.fixture(scope="module")
def tb_reference(data: dict[str, Any]) -> ref.RefResult:
    """The reference loop on the token-budget run's pairs per step (the step's M micro-batches)."""
    from rmtrain.batching import token_budget_batches

    lengths = [len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in data["train"]]
    steps: list[list[int]] = []
    epoch = 0
    while len(steps) < STEPS:
        bins = token_budget_batches(lengths, TOKEN_BUDGET, SEED, epoch)
        steps += [[p for b in bins[i : i + 4] for p in b] for i in range(0, len(bins), 4)]
        epoch += 1
    hyper = ref.RefHyper(seed=SEED, lr=LR, grad_clip=CLIP, global_batch=GLOBAL, max_steps=STEPS)
    result = ref.train(data["train"], data["config"], hyper, batches=steps[:STEPS])
    assert len(set(result.batch_sizes)) > 1, result.batch_sizes  # pairs per step really vary
    return result


# -- the independent reference ---------------------------------------------------------------


def test_reference_init_equals_rmtrain_init(data: dict[str, Any]) -> None:
    """Seeded construction: plain LlamaForSequenceClassification == rmtrain's score model."""
    from transformers import set_seed

    from rmtrain.config import ModelConfig
    from rmtrain.hf import build_score_model

    mine = ref.build_model(data["config"], SEED).state_dict()
    set_seed(SEED)  # what rmtrain.train does right before building the model
    theirs = build_score_model(
        ModelConfig(name_or_path="tiny"), data["tokenizer"], torch.float32
    ).state_dict()
    assert sorted(mine) == sorted(theirs)
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k


def test_baseline_matches_reference_loop(
    runs: Any, reference: ref.RefResult, data: dict[str, Any]
) -> None:
    base = runs(BASELINE)
    assert_close_steps(
        base.train("train/loss"), reference.losses, "train/loss vs reference", LOSS_RTOL, LOSS_ATOL
    )
    assert base.train("train/epoch")[-1] == 1.0  # the last step is the first of epoch 2
    # the logged lr is the one the NEXT step uses
    assert_close_steps(base.train("train/lr")[:-1], reference.lrs[1:], "train/lr", 1e-12)
    assert_weights_close(base.weights, reference.state_dict, f"{BASELINE} vs reference")
    # the final evaluation: each eval pair once, scored like plain transformers does
    want = ref.evaluate(reference.state_dict, data["config"], data["eval"])
    got = base.final_eval
    assert got["eval/pairs"] == EVAL_ROWS
    assert math.isclose(got["eval/loss"], want["loss"], rel_tol=LOSS_RTOL, abs_tol=LOSS_ATOL)
    assert got["eval/accuracy"] == pytest.approx(want["accuracy"], abs=1e-12)


# -- every split of the same global batch -----------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [n for n in VARIANTS if n not in (BASELINE, TB_BASELINE)],
)
def test_variant_matches_baseline(
    runs: Any, reference: ref.RefResult, tb_reference: ref.RefResult, name: str
) -> None:
    token_budget = name.startswith("tb_")
    base, run = runs(TB_BASELINE if token_budget else BASELINE), runs(name)
    if token_budget:
        reference = tb_reference
    base_name = base.name
    first, want_first = run.train("train/loss")[0], base.train("train/loss")[0]
    assert math.isclose(first, want_first, rel_tol=LOSS_RTOL, abs_tol=LOSS_ATOL), (
        f"{name}: step-1 loss {first!r} vs {want_first!r}: the same first batch on the same seed, "
        f"so the INITIAL weights differ"
    )
    assert_close_steps(
        run.train("train/loss"),
        base.train("train/loss"),
        f"{name}: train/loss vs {base_name}",
        LOSS_RTOL,
        LOSS_ATOL,
    )
    assert_close_steps(
        run.train("train/accuracy"),
        base.train("train/accuracy"),
        f"{name}: train/accuracy",
        0.0,
        1e-12,
    )
    if "train/grad_norm" in run.metrics[1]:  # ZeRO-0 reports none; ZeRO >= 1 the pre-clip norm
        assert_close_steps(
            run.train("train/grad_norm"),
            reference.grad_norms,
            f"{name}: train/grad_norm vs reference",
            NORM_RTOL,
        )
    got, want = run.final_eval, base.final_eval
    assert got["eval/pairs"] == EVAL_ROWS  # 2 ranks: each eval pair counted once
    assert math.isclose(got["eval/loss"], want["eval/loss"], rel_tol=LOSS_RTOL, abs_tol=LOSS_ATOL)
    assert got["eval/accuracy"] == want["eval/accuracy"]
    assert_weights_close(run.weights, base.weights, f"{name} vs {base_name}")


@pytest.mark.slow
def test_two_ranks_count_each_eval_pair_once(runs: Any) -> None:
    """17 eval pairs, batch 4, 2 ranks: rank 0 scores 4+4+1, rank 1 4+4 plus a zero-weight
    padding batch (it must still run it: ZeRO-3 gathers parameters collectively)."""
    run = runs("w2_z3_m4")
    assert [r["eval/pairs"] for r in run.metrics if "eval/pairs" in r] == [EVAL_ROWS]


@pytest.mark.slow
def test_token_budget_baseline_matches_reference_loop(
    runs: Any, tb_reference: ref.RefResult
) -> None:
    """Token-budget micro-batches with exact per-pair weights: the loss of every step is the
    plain mean over that step's pairs, and training equals the reference loop's."""
    base = runs(TB_BASELINE)
    assert_close_steps(
        base.train("train/loss"), tb_reference.losses, "token budget vs reference", LOSS_RTOL,
        LOSS_ATOL,
    )  # fmt: skip
    assert base.train("train/pairs") == [float(n) for n in tb_reference.batch_sizes]
    assert_weights_close(base.weights, tb_reference.state_dict, f"{TB_BASELINE} vs reference")


@pytest.mark.slow
def test_packed_run_logs_throughput(runs: Any) -> None:
    """Telemetry per logged step; MFU on CPU only with trainer.peak_tflops; padding-free runs
    feed (almost) only real tokens, padded runs of the same batches do not."""
    packed, padded = runs("p_z0"), runs(BASELINE)
    first = next(r for r in packed.metrics if "train/loss" in r)
    assert first["time/launch_to_first_step_s"] > 0
    for row in (r for r in packed.metrics if "train/loss" in r):
        for key in ("tokens_per_s", "step_time_s", "flops_per_token", "mfu"):
            assert row[f"train/{key}"] > 0, key
    assert "train/mfu" not in padded.metrics[1]  # CPU, no peak_tflops
    # the same pairs: the same FLOPs per real token, padded or not
    assert packed.train("train/flops_per_token") == padded.train("train/flops_per_token")
    # (52-96-token sequences: narrow lengths leave packing less to win than long-tailed ones)
    pf_packed, pf_padded = (
        packed.train("train/padded_fraction"),
        padded.train("train/padded_fraction"),
    )
    assert all(0 <= x < 1 for x in pf_packed + pf_padded)
    assert sum(pf_packed) < sum(pf_padded)


@pytest.mark.slow
def test_prefix_sharing_computes_each_prompt_once(runs: Any) -> None:
    """The shared run really shares (every pair's safe_rlhf prompt is one prefix): a part of the
    trained tokens is not recomputed, the same tokens count as trained as in the padded run,
    and the one-row segments layout feeds no padding at all."""
    shared, padded = runs("s_z0"), runs(BASELINE)
    fractions = shared.train("train/shared_fraction")
    assert all(0.1 < x < 0.5 for x in fractions), fractions
    assert "train/shared_fraction" not in padded.metrics[1]
    assert shared.train("train/padded_fraction") == [0.0] * STEPS

    def trained(run: Run) -> list[float]:
        speed, seconds = run.train("train/tokens_per_s"), run.train("train/step_time_s")
        return [round(a * b) for a, b in zip(speed, seconds, strict=True)]

    assert trained(shared) == trained(padded)


@pytest.mark.slow
def test_lora_with_prefix_sharing_matches_lora_padded(runs: Any) -> None:
    base, run = runs("lora_z2"), runs("lora_s_z2_m4_a2")
    assert all(x > 0.1 for x in run.train("train/shared_fraction"))
    for key in ("train/loss", "train/grad_norm"):
        assert_close_steps(run.train(key), base.train(key), f"LoRA shared: {key}", LOSS_RTOL,
                           LOSS_ATOL)  # fmt: skip
    assert_weights_close(run.weights, base.weights, "LoRA shared vs LoRA padded")
