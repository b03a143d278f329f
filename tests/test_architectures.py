"""Every verified architecture (issue 18): Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 and Phi-3 next
to LLaMA, on tiny random-init models (`model.toy.model_type`) with their distinctive features on:
sliding windows narrower than the sequences, Gemma 2's attention-logit soft-capping under eager
attention, head_dim wider than hidden/heads (Qwen3, Gemma), Phi-3's fused projections.

- forward: packed rows (sequences longer than the window, several per row) score exactly what
  padded batches and single sequences score, and the window and the soft-capping really act;
- training through `rmtrain train` on the learnable sample data: a padded ZeRO-0 run and a packed
  ZeRO-3 run (parameters really sharded) give the same per-step losses, eval and final weights
  (the tolerances of tests/test_equivalence.py), the model learns, and the export is the
  architecture's own `*ForSequenceClassification`, scoring in plain transformers, `pipeline` and
  `rmtrain score` what the trained model scored;
- what rmtrain refuses: MoE backbones, model types transformers cannot load as a sequence
  classifier, sdpa for Gemma 2, packing for an unverified decoder (which trains padded).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (
    SMALL,
    assert_close_steps,
    check_ok,
    export_weights,
    read_jsonl,
    read_metrics,
    run_train,
    train_in_process,
    weights_close,
)
from conventions import save_tokenizer
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, pipeline

from rmtrain import arch, hf
from rmtrain.config import TOY_MODEL_TYPES, ModelConfig, ToyConfig
from rmtrain.errors import ConfigError
from rmtrain.model import AutoModelForScore, score_model_class
from rmtrain.packing import pack_sequences, padded_scores
from rmtrain.scoring import Scorer

NEW = [t for t in TOY_MODEL_TYPES if t != "llama"]  # LLaMA: tests/test_equivalence.py
LR, STEPS = 1e-3, 8
# The tolerances of tests/test_equivalence.py (same lr, fp32; its note says why both weight
# bounds), met here with margins of 50x (losses) and 20x (weights).
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-6


def assert_weights_close(got: dict[str, Any], want: dict[str, Any], what: str) -> None:
    weights_close(got, want, what, rtol_fro=1e-5, atol_max=LR / 10)


def load_export(run_dir: Path) -> dict[str, Any]:
    return export_weights(run_dir / "export")


def test_toy_types_are_the_verified_architectures() -> None:
    assert set(TOY_MODEL_TYPES) == set(arch.VERIFIED)


def _model(model_type: str, impl: str = "auto", seed: int = 1, **shape: Any) -> Any:
    cfg = ModelConfig(
        name_or_path="tiny",
        toy=ToyConfig(model_type=model_type, **shape),
        attn_implementation=impl,
    )
    tok = hf.load_tokenizer(cfg)
    torch.manual_seed(seed)
    return hf.build_score_model(cfg, tok, torch.float32).eval()


SEQS = [torch.randint(4, 200, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        for n in (40, 7, 33, 25, 50, 3)]  # fmt: skip


@pytest.mark.parametrize(
    ("model_type", "impl"),
    [(t, i) for t in TOY_MODEL_TYPES for i in ("sdpa", "eager") if (t, i) != ("gemma2", "sdpa")],
)
@torch.no_grad()
def test_packed_rows_score_like_padded_and_single_sequences(model_type: str, impl: str) -> None:
    model = _model(model_type, impl)
    assert model.config._attn_implementation == impl
    packed = pack_sequences(SEQS, max_row_tokens=80)
    assert packed.input_ids.size(0) > 1 and int(packed.seq_row.bincount().min()) > 1
    out = model(**packed.model_inputs())
    padded = padded_scores(model, SEQS).end_scores
    alone = torch.cat([model(input_ids=torch.tensor([s])).end_scores for s in SEQS])
    torch.testing.assert_close(out.end_scores, padded, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", [t for t in TOY_MODEL_TYPES if t != "llama"])
@torch.no_grad()
def test_the_sliding_window_acts(model_type: str) -> None:
    """The same weights with a window as wide as the context score a 40-token sequence
    differently, and a 7-token one (inside the window) the same: the equality above covers
    windowed attention, not attention that ignores the window."""
    narrow, wide = _model(model_type), _model(model_type, sliding_window=1024)
    for seq, differs in ((SEQS[0], True), (SEQS[1], False)):
        a = narrow(input_ids=torch.tensor([seq])).end_scores
        b = wide(input_ids=torch.tensor([seq])).end_scores
        assert (not torch.allclose(a, b, rtol=1e-4, atol=1e-5)) == differs


@torch.no_grad()
def test_gemma2_soft_capping_in_packed_rows() -> None:
    """Strong soft-capping (1.0 on logits of order 10, where tanh bends every one): still packed
    == padded, and the capping changes the scores (eager applies it; sdpa, which cannot, is
    refused)."""
    model = _model("gemma2")
    assert model.config._attn_implementation == "eager"
    for layer in model.model.layers:  # attention logits of order 10, not the init's ~0.01
        layer.self_attn.q_proj.weight.mul_(100.0)
    before = padded_scores(model, SEQS).end_scores
    model.config.attn_logit_softcapping = 1.0
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = 1.0
    out = model(**pack_sequences(SEQS, max_row_tokens=80).model_inputs())
    capped = padded_scores(model, SEQS).end_scores
    torch.testing.assert_close(out.end_scores, capped, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(before, capped, atol=1e-3)
    with pytest.raises(ConfigError, match="gemma2 does not support it"):
        _model("gemma2", "sdpa")


@torch.no_grad()
def test_longrope_sees_the_same_positions_packed() -> None:
    """Phi-3's LongRoPE (and "dynamic" RoPE) pick their frequencies from the batch's largest
    position. A packed row's padding run is cut into segments no longer than the longest
    sequence, so packed rows never show a larger position than the padded batch: the same
    scores. Numbered 0..59 as one run, the tail of a 90-wide row switches LongRoPE to its long
    factors and every score moves."""
    head_dim = 16
    config = AutoConfig.for_model(
        "phi3", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        original_max_position_embeddings=32, pad_token_id=0, num_labels=1,
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * (head_dim // 2),
                      "long_factor": [4.0] * (head_dim // 2)},
    )  # fmt: skip
    torch.manual_seed(0)
    model = score_model_class("phi3")(config).eval()
    seqs = [torch.randint(4, 200, (n,)).tolist() for n in (30, 29, 28, 27)]
    packed = pack_sequences(seqs, max_row_tokens=100)
    assert packed.position_ids is not None
    assert packed.input_ids.shape == (2, 87) and int(packed.position_ids.max()) == 29
    padded = padded_scores(model, seqs).end_scores

    def score(position_ids: torch.Tensor) -> torch.Tensor:
        inputs = packed.model_inputs() | {"position_ids": position_ids}
        return model(**inputs).end_scores

    torch.testing.assert_close(score(packed.position_ids), padded, rtol=1e-5, atol=1e-6)
    one_run = packed.position_ids.clone()
    tail = int(packed.seq_len[packed.seq_row == 1].sum())
    one_run[1, tail:] = torch.arange(87 - tail)  # 0..59 > original_max_position_embeddings
    assert not torch.allclose(score(one_run), padded, atol=1e-4)


# -- training through the CLI ---------------------------------------------------------------

COMMON = [
    *SMALL,
    "model=tiny",
    "data.sample_train_rows=32",
    "data.sample_eval_rows=16",
    "trainer.seed=7",
    f"trainer.lr={LR}",
    "trainer.warmup_ratio=0",
    "trainer.weight_decay=0",
    "trainer.grad_clip=2.0",
    "trainer.precision=fp32",
    f"trainer.max_steps={STEPS}",
    "trainer.eval_every=0",
    "trainer.eval_at_start=true",
    "trainer.export_max_shard_size=5GB",
    "deepspeed.optimizer=torch",
    # Adam's update lr * m / (sqrt(v) + eps) has slope lr / eps in g where |g| ~ eps: with the
    # default eps 1e-8 an element whose gradient nearly cancels turns round-off of 1e-10 (another
    # grouping of the same sums: packed rows, ZeRO-3 partitions) into 1e-4 in the weight
    # (tests/test_equivalence.py). eps 1e-6 keeps that slope 100x smaller, so the weights can be
    # compared element-wise at the same bounds.
    "trainer.adam_eps=1e-6",
]
PADDED = ["deepspeed=zero0", f"trainer.save_every={STEPS // 2}"]  # resumed from step 4 below
Z3 = "deepspeed.stage3_param_persistence_threshold=0"  # really shard the tiny model
PACKED = ["trainer.packing=true", "deepspeed=zero3", Z3]
SHARED = [*PACKED, "trainer.prefix_sharing=true"]  # each pair's prompt computed once


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`runs(model_type, "padded" | "packed" | "shared")`: the finished run directory (in this
    process)."""
    root = tmp_path_factory.mktemp("architectures")
    done: dict[tuple[str, str], Path] = {}

    def get(model_type: str, kind: str, capsys: Any, monkeypatch: Any) -> Path:
        if (model_type, kind) not in done:
            run_dir = root / f"{model_type}-{kind}"
            variant = {"packed": PACKED, "shared": SHARED, "padded": PADDED}[kind]
            overrides = [*COMMON, f"model.toy.model_type={model_type}", *variant,
                         f"output_dir={run_dir}"]  # fmt: skip
            code, err = train_in_process(overrides, capsys, monkeypatch)
            assert code == 0, err[-3000:]
            done[model_type, kind] = run_dir
        return done[model_type, kind]

    return get


def _train_rows(run_dir: Path) -> list[dict[str, Any]]:
    rows = [r for r in read_metrics(run_dir) if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return rows


def _evals(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(run_dir) if "eval/accuracy" in r]


@pytest.mark.slow  # 12 short DeepSpeed runs in this process: ~60 s in all
@pytest.mark.parametrize("model_type", NEW)
def test_packed_zero3_training_equals_padded_and_exports_its_own_class(
    runs: Any, model_type: str, capsys, monkeypatch
) -> None:
    padded = runs(model_type, "padded", capsys, monkeypatch)
    packed = runs(model_type, "packed", capsys, monkeypatch)
    # the same training
    for key, rtol, atol in (("train/loss", LOSS_RTOL, LOSS_ATOL), ("train/accuracy", 0.0, 1e-12)):
        assert_close_steps([r[key] for r in _train_rows(packed)],
                           [r[key] for r in _train_rows(padded)], f"{model_type} {key}", rtol,
                           atol)  # fmt: skip
    got, want = _evals(packed)[-1], _evals(padded)[-1]
    assert got["eval/loss"] == pytest.approx(want["eval/loss"], rel=LOSS_RTOL, abs=LOSS_ATOL)
    assert got["eval/accuracy"] == want["eval/accuracy"]
    assert_weights_close(load_export(packed), load_export(padded), f"{model_type} packed")
    # it learns the sample task
    first = _evals(padded)[0]
    assert first["step"] == 0 and got["eval/accuracy"] >= 0.9
    assert got["eval/accuracy"] > first["eval/accuracy"] and got["eval/loss"] < first["eval/loss"]
    pad = [sum(r["train/padded_fraction"] for r in _train_rows(d)) for d in (packed, padded)]
    assert pad[0] < pad[1]  # packing feeds fewer padding tokens
    _check_export(packed, model_type)


def _check_export(run_dir: Path, model_type: str) -> None:
    """The export is the architecture's own sequence classifier, ready for serving, and scores
    in plain transformers, `pipeline` and `rmtrain score` what the trained model scored."""
    export = run_dir / "export"
    config = json.loads((export / "config.json").read_text())
    name = arch.sequence_classifier_name(model_type)
    assert config["architectures"] == [name] and config["model_type"] == model_type
    assert config["num_labels"] == 1 if "num_labels" in config else len(config["id2label"]) == 1
    assert config["problem_type"] == "regression"  # raw scores from pipelines and vLLM
    tok = AutoTokenizer.from_pretrained(export)
    assert config["pad_token_id"] == tok.pad_token_id != tok.eos_token_id
    assert "score_stats" in config["rmtrain"]
    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    assert type(model).__name__ == name
    assert model.config._attn_implementation == arch.VERIFIED[model_type].attention
    samples = read_jsonl(run_dir / "eval_scores.jsonl")
    texts = [s["text"] for s in samples]
    ours = Scorer(export, batch_size=3).score_texts(texts)
    # no function_to_apply: problem_type regression makes the pipeline's default the raw score
    piped = pipeline("text-classification", model=str(export), tokenizer=tok)(texts, top_k=None)
    with torch.no_grad():
        for s, mine, p in zip(samples, ours, piped, strict=True):
            assert tok(s["text"])["input_ids"] == s["input_ids"]
            plain = model(input_ids=torch.tensor([s["input_ids"]])).logits[0, 0].item()
            assert plain == pytest.approx(s["score"], abs=1e-5)
            assert mine == pytest.approx(s["score"], abs=1e-5)
            assert p[0]["score"] == pytest.approx(s["score"], abs=1e-5)
    assert len({round(s["score"], 3) for s in samples}) > 1  # real scores, not a constant


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["mistral", "gemma2", "gemma3_text"])
def test_prefix_sharing_trains_as_padded_with_windows_and_soft_capping(
    runs: Any, model_type: str, capsys, monkeypatch
) -> None:
    """Shared prompts (each pair one segment: prefix, chosen rest, rejected rest) under ZeRO-3
    train exactly as padded pairs on backbones whose attention is not plain causal: a 16-token
    sliding window in every layer (Mistral), in alternate layers with soft-capped logits under
    eager (Gemma 2), in 5 of 6 layers (Gemma 3). The sample prompts are longer than the window,
    so suffix tokens' windows end inside the shared prefix."""
    padded = runs(model_type, "padded", capsys, monkeypatch)
    shared = runs(model_type, "shared", capsys, monkeypatch)
    assert_close_steps([r["train/loss"] for r in _train_rows(shared)],
                       [r["train/loss"] for r in _train_rows(padded)], f"{model_type} shared",
                       LOSS_RTOL, LOSS_ATOL)  # fmt: skip
    assert all(r["train/shared_fraction"] > 0.1 for r in _train_rows(shared))
    assert_weights_close(load_export(shared), load_export(padded), f"{model_type} shared")


@pytest.mark.slow
def test_gemma2_two_ranks_zero3_packed_equals_padded(runs: Any, tmp_path: Path, capsys,
                                                     monkeypatch) -> None:  # fmt: skip
    """Two ranks (each packs its half of every micro-batch) under ZeRO-3 train exactly as one
    padded rank: the architecture with the most of its own (soft-capping under eager, sliding
    and global layers, four norms per layer, head_dim 2 x hidden/heads)."""
    padded = runs("gemma2", "padded", capsys, monkeypatch)
    run_dir = tmp_path / "w2"
    check_ok(run_train([*COMMON, "model.toy.model_type=gemma2", *PACKED,
                        "trainer.micro_batch_size=4", f"output_dir={run_dir}"],
                       nproc=2))  # fmt: skip
    assert_close_steps([r["train/loss"] for r in _train_rows(run_dir)],
                       [r["train/loss"] for r in _train_rows(padded)], "gemma2 2 ranks",
                       LOSS_RTOL, LOSS_ATOL)  # fmt: skip
    assert_weights_close(load_export(run_dir), load_export(padded), "gemma2 2 ranks")


@pytest.mark.slow  # needs the padded qwen3 run
def test_qwen3_resumes_exactly(runs: Any, tmp_path: Path, capsys, monkeypatch) -> None:
    """Resumed from the padded run's step-4 checkpoint, the run ends at the same weights, and
    the checkpoint records the architecture (head_dim included: it sets weight shapes)."""
    padded = runs("qwen3", "padded", capsys, monkeypatch)
    checkpoint = sorted(padded.glob("checkpoints/step_*"))[0]
    marker = json.loads((checkpoint / "rmtrain_complete.json").read_text())
    assert marker["step"] == STEPS // 2
    assert marker["architecture"]["model_type"] == "qwen3"
    assert marker["architecture"]["head_dim"] == 32  # 2 x 64 / 4
    run_dir = tmp_path / "resumed"
    code, err = train_in_process([*COMMON, "model.toy.model_type=qwen3", *PADDED,
                                  f"trainer.resume={checkpoint}", f"output_dir={run_dir}"],
                                 capsys, monkeypatch)  # fmt: skip
    assert code == 0, err[-2000:]
    assert_weights_close(load_export(run_dir), load_export(padded), "qwen3 resumed")


# -- what is refused --------------------------------------------------------------------------


def _save_config(path: Path, model_type: str, **kwargs: Any) -> Path:
    AutoConfig.for_model(model_type, **kwargs).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("model_type", "kwargs", "needle"),
    [
        ("mixtral", {"num_local_experts": 4}, "is a mixture of experts (num_local_experts=4)"),
        ("qwen3_moe", {"num_experts": 8}, "is a mixture of experts (num_local_experts=8)"),
        ("cohere", {}, "transformers has no sequence-classification class for it"),
    ],
)
def test_refused_backbones_fail_before_training(
    tmp_path: Path, model_type: str, kwargs: dict[str, Any], needle: str, capsys, monkeypatch
) -> None:
    model_dir = _save_config(tmp_path / "model", model_type, **kwargs)
    save_tokenizer("chatml", model_dir)
    run_dir = tmp_path / "run"
    code, err = train_in_process(["model=llama", f"model.name_or_path={model_dir}",
                                  f"output_dir={run_dir}"], capsys, monkeypatch)  # fmt: skip
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"rmtrain: error: model.name_or_path={model_dir}: model_type "
                           f"{model_type!r}")  # fmt: skip
    assert needle in last and "Verified architectures: llama, mistral, qwen2, qwen3" in last
    assert not run_dir.exists()
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        AutoModelForScore.from_pretrained(model_dir)  # the same rule when loading to score


def test_unverified_decoder_trains_padded_not_packed(tmp_path: Path, capsys, monkeypatch) -> None:
    """OLMo-2 (a decoder transformers loads as a sequence classifier, not verified by rmtrain):
    packing is refused with one error; padded training exports Olmo2ForSequenceClassification."""
    from transformers import Olmo2Config, Olmo2ForCausalLM

    model_dir = save_tokenizer("chatml", tmp_path / "olmo2")
    tok = AutoTokenizer.from_pretrained(model_dir)
    config = Olmo2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id)  # fmt: skip
    torch.manual_seed(0)
    Olmo2ForCausalLM(config).save_pretrained(model_dir)
    base = [*SMALL, "model=llama", f"model.name_or_path={model_dir}", "data.template=chat",
            "data.sample_train_rows=16", "data.sample_eval_rows=8", "trainer.max_steps=2",
            "trainer.eval_every=0"]  # fmt: skip
    code, err = train_in_process([*base, "trainer.packing=true", f"output_dir={tmp_path / 'p'}"],
                                 capsys, monkeypatch)  # fmt: skip
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        "rmtrain: error: trainer.packing=true: padding-free rows are verified only for llama, "
        "mistral, qwen2, qwen3, gemma2, gemma3_text, phi3; olmo2 trains padded "
        "(trainer.packing=false)"
    )
    run_dir = tmp_path / "run"
    code, err = train_in_process([*base, f"output_dir={run_dir}"], capsys, monkeypatch)
    assert code == 0, err[-2000:]
    export = run_dir / "export"
    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    assert type(model).__name__ == "Olmo2ForSequenceClassification"
    samples = read_jsonl(run_dir / "eval_scores.jsonl")
    ours = Scorer(export).score_texts([s["text"] for s in samples])
    with torch.no_grad():
        for s, mine in zip(samples, ours, strict=True):
            plain = model(input_ids=torch.tensor([s["input_ids"]])).logits[0, 0].item()
            assert plain == pytest.approx(s["score"], abs=1e-5) and mine == pytest.approx(
                s["score"], abs=1e-5
            )
