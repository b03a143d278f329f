"""Bring your own data (issue 9): every accepted format, single files, eval_fraction, weighted
mixtures, extra eval sets, data health, and one clear error per bad file.

All formats are written from the same generated PKU-SafeRLHF rows (rmtrain/toy/sample_data.py:
the better response follows a hidden, learnable rule), converted here by the test's own code,
so the same rows in two formats must give the same token ids, and a model trained on any of
them must rank the held-out rows of every format.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from conftest import (
    SHARED_DATA,
    check_ok,
    read_metrics,
    run_train,
    train_in_process,
    write_jsonl,
)

from rmtrain.config import FORMATS, DataConfig, SourceConfig
from rmtrain.data.assemble import carve, load_run_data, mix
from rmtrain.data.formats import implicit_split, resolve
from rmtrain.data.pairs import build_pairs
from rmtrain.data.sources import load_rows
from rmtrain.errors import DataError
from rmtrain.toy.sample_data import generate_rows
from rmtrain.toy.tokenizer import build_tiny_tokenizer

Row = dict[str, Any]


def _sides(r: Row) -> tuple[str, str, str]:
    b = r["better_response_id"]
    return r["prompt"], r[f"response_{b}"], r[f"response_{1 - b}"]


def _conv(prompt: str, response: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _variants(text: str) -> list[str]:
    """RM-Bench style variants: concise, detailed, markdown (all keep the hidden rule)."""
    return [text, f"{text} I hope this helps.", f"- {text}"]


def to_standard(r: Row) -> Row:
    p, c, j = _sides(r)
    return {"prompt": p, "chosen": c, "rejected": j}


def to_standard_implicit(r: Row) -> Row:
    p, c, j = _sides(r)
    return {"chosen": f"{p}\n\n{c}", "rejected": f"{p}\n\n{j}"}


def to_conversational(r: Row) -> Row:
    p, c, j = _sides(r)
    return {
        "prompt": [{"role": "user", "content": p}],
        "chosen": [{"role": "assistant", "content": c}],
        "rejected": [{"role": "assistant", "content": j}],
    }


def to_conversational_implicit(r: Row) -> Row:
    p, c, j = _sides(r)
    return {"chosen": _conv(p, c), "rejected": _conv(p, j)}


def to_ultrafeedback(r: Row) -> Row:
    p, c, j = _sides(r)
    return {
        "prompt": p, "prompt_id": str(abs(hash(p))), "chosen": _conv(p, c),
        "rejected": _conv(p, j), "messages": _conv(p, c), "score_chosen": 8.0,
        "score_rejected": 3.5,
    }  # fmt: skip


def to_hh_rlhf(r: Row) -> Row:
    p, c, j = _sides(r)
    return {"chosen": f"\n\nHuman: {p}\n\nAssistant: {c}",
            "rejected": f"\n\nHuman: {p}\n\nAssistant: {j}"}  # fmt: skip


def to_rewardbench(r: Row) -> Row:
    return {"id": r["response_0_sha256"][:8], "subset": "toy", **to_standard(r)}


def to_rewardbench2(r: Row) -> Row:
    p, c, j = _sides(r)
    counts = {"num_correct": 1, "num_incorrect": 1, "total_completions": 2}
    return {"id": r["response_0_sha256"][:8], "prompt": p, "chosen": [c], "rejected": [j],
            **counts, "subset": "Focus"}  # fmt: skip


def to_rmbench(r: Row) -> Row:
    p, c, j = _sides(r)
    return {"id": 1, "subset": "toy", "prompt": p, "chosen": _variants(c), "rejected": _variants(j)}


def to_ultrafeedback_completions(r: Row) -> Row:
    p, c, j = _sides(r)
    completions = [{"response": j, "fine-grained_score": 2.25},
                   {"response": c, "fine-grained_score": 4.5}]  # fmt: skip
    return {"instruction": p, "completions": completions}


def to_ranked(r: Row) -> Row:
    p, c, j = _sides(r)
    return {"prompt": p, "responses": [j, c], "ranking": [1, 0]}


CONVERT: dict[str, Callable[[Row], Row]] = {
    "pku_saferlhf": dict,
    "ultrafeedback_completions": to_ultrafeedback_completions,
    "ranked": to_ranked,
    "ultrafeedback": to_ultrafeedback,
    "conversational": to_conversational,
    "conversational_implicit": to_conversational_implicit,
    "rewardbench2": to_rewardbench2,
    "rmbench": to_rmbench,
    "rewardbench": to_rewardbench,
    "hh_rlhf": to_hh_rlhf,
    "standard": to_standard,
    "standard_implicit": to_standard_implicit,
}
assert tuple(CONVERT) == FORMATS[1:]


def write_format(path: Path, fmt: str, rows: list[Row]) -> Path:
    return write_jsonl(path, [CONVERT[fmt](r) for r in rows])


@pytest.fixture(scope="module")
def tok() -> Any:
    return build_tiny_tokenizer()


def _pairs(path: Path, tok: Any, **kw: Any) -> datasets.Dataset:
    cfg = DataConfig(path=str(path), max_length=4096, **kw)
    return build_pairs(load_rows(cfg, "train"), cfg, tok)[0]


# --------------------------------------------------------------------------- same ids


def test_every_format_is_detected_and_gives_the_pku_token_ids(tmp_path: Path, tok: Any) -> None:
    rows = generate_rows(24, 7)
    reference = _pairs(write_format(tmp_path / "pku.jsonl", "pku_saferlhf", rows), tok)
    ref = list(zip(reference["chosen_input_ids"], reference["rejected_input_ids"], strict=True))
    for fmt in FORMATS[1:]:
        path = write_format(tmp_path / f"{fmt}.jsonl", fmt, rows)
        first = json.loads(path.read_text().splitlines()[0])
        assert resolve("auto", str(path), first, first).name == fmt
        pairs = _pairs(path, tok)
        got = list(zip(pairs["chosen_input_ids"], pairs["rejected_input_ids"], strict=True))
        if fmt == "rmbench":  # 3 x 3 variants per row; variant (0, 0) is the plain pair
            assert len(got) == 9 * len(ref)
            got = got[::9]
        if fmt == "standard_implicit":
            # The prompt is the common prefix up to a word boundary: exact where the two
            # responses differ in their first word.
            exact = [
                i for i, r in enumerate(rows)
                if _sides(r)[1].split()[0] != _sides(r)[2].split()[0]
            ]  # fmt: skip
            assert len(exact) >= 8
            got, want = [got[i] for i in exact], [ref[i] for i in exact]
        else:
            want = ref
        assert got == want, fmt


def test_implicit_split_rules() -> None:
    assert implicit_split("Q? Yes do it.", "Q? No.") == ("Q?", "Yes do it.", "No.")
    # a shared first word belongs to the prompt (nothing tells it apart)
    assert implicit_split("Q? Sure, yes.", "Q? Sure not.") == ("Q?", "Sure, yes.", "Sure not.")
    assert implicit_split("Q?\n\nSure thing.", "Q?\n\nSure not.") == (
        "Q?\n\nSure", "thing.", "not."
    )  # fmt: skip


def test_hh_multi_turn_transcript_and_ultrafeedback_margin(tmp_path: Path, tok: Any) -> None:
    hh = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bread?\n\nAssistant: Knead it.",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bread?\n\nAssistant: No.",
    }
    pairs = _pairs(write_jsonl(tmp_path / "hh.jsonl", [hh, hh]), tok)
    text = tok.decode(pairs[0]["chosen_input_ids"], skip_special_tokens=False)
    assert "USER: Hi ASSISTANT:Hello!</s>USER: Bread? ASSISTANT:Knead it.</s>" in text
    assert len(pairs) == 2
    uf = write_format(tmp_path / "uf.jsonl", "ultrafeedback", generate_rows(3, 0))
    assert _pairs(uf, tok)["margin"] == [0.0] * 3
    assert _pairs(uf, tok, margin_from_scores=True)["margin"] == [4.5] * 3


def test_pku_safety_labels_needed_only_for_safer(tmp_path: Path, tok: Any) -> None:
    keep = ("prompt", "response_0", "response_1", "better_response_id")
    rows = [{k: r[k] for k in keep} for r in generate_rows(6, 0)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    assert len(_pairs(path, tok)) == 6
    with pytest.raises(DataError, match=r"row 1: field 'is_response_0_safe': missing"):
        _pairs(path, tok, preference="safer")


def test_score_and_eval_read_every_training_format_as_training_does(tmp_path: Path) -> None:
    """The same pairs written in every format: `rmtrain eval` gives identical per-pair scores
    and accuracies, `rmtrain score` identical chosen/rejected scores, and both score the token
    ids training makes of the rows."""
    from conftest import make_export

    from rmtrain.eval.run import evaluate_file
    from rmtrain.score import main as score_main
    from rmtrain.scoring import Scorer

    export = make_export(tmp_path / "export", "safe_rlhf", seed=3)
    scorer = Scorer(export, batch_size=5)
    rows = generate_rows(12, 5)
    results: dict[str, tuple[dict[str, Any], list[float], list[list[float]]]] = {}
    for fmt in FORMATS[1:]:
        path = write_format(tmp_path / f"{fmt}.jsonl", fmt, rows)
        summary, records = evaluate_file(scorer, path)
        # (RM-Bench's accuracies are over its 3 same-style pairs per row)
        assert summary["format"] == fmt and summary["n_pairs"] == 12 * (
            3 if fmt == "rmbench" else 1
        )
        if fmt in ("rmbench", "rewardbench2"):  # rows of several responses: the first ones
            flat = [s for r in records for s in (r["chosen_scores"][0], r["rejected_scores"][0])]
        else:
            flat = [s for r in records for s in (r["chosen_score"], r["rejected_score"])]
        out = tmp_path / f"{fmt}.scored.jsonl"
        with pytest.raises(SystemExit) as exit_code:
            score_main(["--model", str(export), "--input", str(path), "--output", str(out),
                        "--no-progress"])  # fmt: skip
            raise SystemExit(0)
        assert exit_code.value.code == 0
        scored = [json.loads(line) for line in out.read_text().splitlines()]
        per_row = [
            [r["chosen_scores"][0], r["rejected_scores"][0]]
            if fmt in ("rmbench", "rewardbench2")
            else [r["scores"][1], r["scores"][0]]  # K responses: a score each, [worse, better]
            if fmt in ("ranked", "ultrafeedback_completions")
            else [r["chosen_score"], r["rejected_score"]]
            for r in scored
        ]
        results[fmt] = (summary["overall"], flat, per_row)
    # training's own pairs of the same rows, scored by the same model: the reference
    train_cfg = DataConfig(path=str(tmp_path / "pku_saferlhf.jsonl"), max_length=512)
    pairs, _ = build_pairs(load_rows(train_cfg, "train"), train_cfg, scorer.tokenizer)
    reference = scorer.score_sequences(pairs.sequences(range(len(pairs))))
    reference = [x for c, r in zip(reference[: len(pairs)], reference[len(pairs) :],
                                   strict=True) for x in (c, r)]  # fmt: skip
    # standard_implicit's prompt is the common prefix cut at a word boundary: the same text
    # where the two responses differ in their first word
    exact = [i for i, r in enumerate(rows) if _sides(r)[1].split()[0] != _sides(r)[2].split()[0]]
    assert len(exact) >= 4
    for fmt, (overall, flat, per_row) in results.items():
        keep = exact if fmt == "standard_implicit" else range(len(rows))
        want = [reference[2 * i + k] for i in keep for k in (0, 1)]
        assert [flat[2 * i + k] for i in keep for k in (0, 1)] == pytest.approx(want, abs=1e-6)
        assert [per_row[i][k] for i in keep for k in (0, 1)] == pytest.approx(want, abs=1e-6)
        if fmt not in ("rmbench", "standard_implicit"):
            assert overall == results["pku_saferlhf"][0], fmt


# --------------------------------------------------------------------------- errors


def _bad_cells() -> list[tuple[str, str, Any, str, list[str]]]:
    """(format, field, value at row 3, problem, extra overrides)."""
    return [
        ("pku_saferlhf", "better_response_id", "0", "expected 0 or 1, got str '0'", []),
        ("pku_saferlhf", "is_response_1_safe", "true", "expected bool, got str 'true'",
         ["data.preference=safer"]),
        ("ultrafeedback", "score_chosen", "8", "expected a finite number, got '8'", []),
        ("conversational", "prompt", [{"role": "user"}], "item 0: content must be a string, "
         "got None", []),
        ("conversational_implicit", "chosen", [{"role": "bot", "content": "x"}],
         "item 0: role must be one of system, user, assistant, got 'bot'", []),
        ("rmbench", "chosen", "one answer", "expected a non-empty list of response texts, got "
         "str 'one answer'", []),
        ("rewardbench", "subset", 3, "expected str, got int 3", []),
        ("hh_rlhf", "rejected", "\n\nHuman: Hi", "the transcript must end with an 'Assistant:' "
         "turn (the response being scored)", []),
        ("standard", "chosen", 5, "expected str, got int 5", []),
        ("standard_implicit", "rejected", ["x"], "expected str, got list ['x']", []),
    ]  # fmt: skip


def _train_args(tmp_path: Path, data: Path, *extra: str) -> list[str]:
    return [f"data.path={data}", "data.eval_fraction=0.25", "data.max_length=96",
            "trainer.max_steps=1", "logger=none", f"output_dir={tmp_path / 'run'}",
            *extra]  # fmt: skip


def _fails(tmp_path: Path, capsys: Any, monkeypatch: Any, args: list[str]) -> str:
    code, err = train_in_process(args, capsys, monkeypatch)
    assert code == 2, err
    assert not (tmp_path / "run").exists()
    lines = [line for line in err.splitlines() if line.startswith("rmtrain: error:")]
    assert len(lines) == 1, err
    return lines[0].removeprefix("rmtrain: error: ")


@pytest.mark.parametrize(("fmt", "field", "value", "problem", "extra"), _bad_cells())
def test_wrongly_typed_cell_one_clear_error(
    tmp_path: Path, capsys: Any, monkeypatch: Any, fmt: str, field: str, value: Any,
    problem: str, extra: list[str],
) -> None:  # fmt: skip
    rows = [CONVERT[fmt](r) for r in generate_rows(8, 0)]
    rows[2][field] = value
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    message = _fails(tmp_path, capsys, monkeypatch, _train_args(tmp_path, path, *extra))
    assert message == f"{path}: row 3: field '{field}': {problem}"


@pytest.mark.parametrize("fmt", FORMATS[1:])
def test_missing_column_one_clear_error(
    tmp_path: Path, capsys: Any, monkeypatch: Any, fmt: str
) -> None:
    from rmtrain.data.formats import BY_NAME

    missing = BY_NAME[fmt].required[-1]
    rows = [CONVERT[fmt](r) for r in generate_rows(8, 0)]
    for r in rows:
        del r[missing]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    args = _train_args(tmp_path, path, f"data.format={fmt}")
    message = _fails(tmp_path, capsys, monkeypatch, args)
    assert message == f"{path}: row 1: field '{missing}': missing"


def test_unknown_layout_lists_columns_and_formats(
    tmp_path: Path, capsys: Any, monkeypatch: Any
) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a", "label": 1}] * 4)
    message = _fails(tmp_path, capsys, monkeypatch, _train_args(tmp_path, path))
    assert message.startswith(f"{path}: unrecognised layout (columns: answer, label, question)")
    for fmt in FORMATS[1:]:
        assert f"{fmt}: " in message
    assert "standard: prompt, chosen, rejected;" in message
    assert "ultrafeedback: prompt, chosen, rejected, score_chosen, score_rejected" in message


def test_single_file_without_eval_set_and_bad_config(
    tmp_path: Path, capsys: Any, monkeypatch: Any
) -> None:
    path = write_format(tmp_path / "d.jsonl", "standard", generate_rows(8, 0))
    args = [a for a in _train_args(tmp_path, path) if "eval_fraction" not in a]
    message = _fails(tmp_path, capsys, monkeypatch, args)
    assert "a single file holds no eval split: set data.eval_fraction=0.1" in message
    message = _fails(tmp_path, capsys, monkeypatch, [*args, "data.mixture=[{path: x.jsonl}]"])
    assert message.startswith("data.mixture needs an eval set")
    message = _fails(tmp_path, capsys, monkeypatch, [*args, "data.format=trl"])
    assert message.startswith("data.format='trl' is not one of auto, pku_saferlhf")


# --------------------------------------------------------------------------- splits, mixtures


def test_eval_fraction_and_mixture_weights_are_seeded() -> None:
    rows = datasets.Dataset.from_dict({"x": list(range(100))})
    a_train, a_eval = carve(rows, 0.1, 0)
    _, b_eval = carve(rows, 0.1, 0)
    assert a_eval["x"] == b_eval["x"] and len(a_eval) == 10 and len(a_train) == 90
    assert not set(a_eval["x"]) & set(a_train["x"])
    assert carve(rows, 0.1, 1)[1]["x"] != a_eval["x"]
    pairs = datasets.Dataset.from_dict({"x": list(range(10))})
    assert mix(pairs, 2.0, 0, "a")["x"] == list(range(10)) * 2
    half = mix(pairs, 0.5, 0, "a")["x"]
    assert len(half) == 5 and half == mix(pairs, 0.5, 0, "a")["x"] == sorted(set(half))
    assert len(mix(pairs, 1.25, 0, "a")) == 12  # round(12.5) with banker's rounding


def test_health_counts_duplicates_and_overlap(tmp_path: Path, tok: Any) -> None:
    rows = generate_rows(20, 0)
    rows = rows + rows[:3]  # 3 duplicate rows
    path = write_format(tmp_path / "d.jsonl", "standard", rows)
    d = DataConfig(path=str(path), eval_fraction=0.3, max_length=4096)
    data = load_run_data(d, tok, "reward", seed=0)
    train, ev = data.counts["train"], data.counts["eval"]
    assert train["pairs"] + ev["pairs"] == 23
    assert train["duplicates"] + ev["duplicates"] + ev["in_train"] == 3
    assert data.held_out["method"] == "eval_fraction"
    assert sum(len(v) for v in data.held_out["rows"].values()) == ev["rows"] == 7


# --------------------------------------------------------------------------- training runs

N_TRAIN, N_EVAL = 24, 12
WEIGHTS = {"pku_saferlhf": 1.5, "standard": 0.5}


def _eval_texts(fmt: str, row: Row) -> list[tuple[list[dict[str, str]], list[dict[str, str]]]]:
    """The test's own reading of a row: (chosen, rejected) conversations."""
    if fmt == "pku_saferlhf":
        p, c, j = _sides(row)
        return [(_conv(p, c), _conv(p, j))]
    if fmt in ("standard", "rewardbench"):
        return [(_conv(row["prompt"], row["chosen"]), _conv(row["prompt"], row["rejected"]))]
    if fmt == "standard_implicit":
        p, c = row["chosen"].split("\n\n", 1)
        return [(_conv(p, c), _conv(p, row["rejected"].split("\n\n", 1)[1]))]
    if fmt == "conversational":
        return [(row["prompt"] + row["chosen"], row["prompt"] + row["rejected"])]
    if fmt in ("conversational_implicit", "ultrafeedback"):
        return [(row["chosen"], row["rejected"])]
    if fmt == "hh_rlhf":

        def turns(t: str) -> list[dict[str, str]]:
            h, a = t.removeprefix("\n\nHuman: ").split("\n\nAssistant: ")
            return _conv(h, a)

        return [(turns(row["chosen"]), turns(row["rejected"]))]
    if fmt == "ranked":  # the converter's rows: response 1 ranked above response 0
        p, (worse, better) = row["prompt"], row["responses"]
        return [(_conv(p, better), _conv(p, worse))]
    if fmt == "ultrafeedback_completions":
        best, worst = sorted(row["completions"], key=lambda c: -c["fine-grained_score"])
        return [(_conv(row["instruction"], best["response"]),
                 _conv(row["instruction"], worst["response"]))]  # fmt: skip
    assert fmt in ("rmbench", "rewardbench2")  # every (chosen, rejected) combination
    p = row["prompt"]
    return [(_conv(p, c), _conv(p, j)) for c in row["chosen"] for j in row["rejected"]]


def _accuracy(export: Path, fmt: str, eval_file: Path) -> float:
    """Held-out accuracy through plain transformers (the chat template the export carries)."""
    tok, model = _load_export(export)

    def ids(conv: list[dict[str, str]]) -> list[int]:
        text = tok.apply_chat_template(conv, tokenize=False).removeprefix(tok.bos_token)
        seq = tok(text)["input_ids"]
        # the documented truncation: cut from the right, keep EOS last
        return seq if len(seq) <= 96 else [*seq[:95], tok.eos_token_id]

    lines = eval_file.read_text().splitlines()
    pairs = [p for line in lines for p in _eval_texts(fmt, json.loads(line))]
    batch = tok.pad({"input_ids": [ids(c) for c, _ in pairs] + [ids(j) for _, j in pairs]},
                    return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        scores = model(**batch).logits[:, 0]
    chosen, rejected = scores[: len(pairs)], scores[len(pairs) :]
    return float((chosen > rejected).float().mean())


@functools.cache
def _load_export(export: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export)
    return tok, AutoModelForSequenceClassification.from_pretrained(export).eval()


@pytest.fixture(scope="module")
def all_formats_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One run on a weighted mixture of every format; every format's held-out rows are an eval
    set (eval/<format>/...). Test-pool rows: topics never seen in training."""
    root = tmp_path_factory.mktemp("formats")
    mixture, eval_sets = [], []
    for k, fmt in enumerate(FORMATS[1:]):
        train = write_format(root / "train" / f"{fmt}.jsonl", fmt, generate_rows(N_TRAIN, 10 + k))
        held = generate_rows(N_EVAL, 30 + k, split="test")
        write_format(root / "eval" / f"{fmt}.jsonl", fmt, held)
        weight = f",weight:{WEIGHTS[fmt]}" if fmt in WEIGHTS else ""
        mixture.append(f"{{path:'{train}'{weight}}}")
        if fmt != "pku_saferlhf":
            eval_sets.append(f"{{path:'{root / 'eval' / fmt}.jsonl',label:{fmt}}}")
    run_dir = root / "run"
    proc = run_train([
        f"data.mixture=[{','.join(mixture)}]", f"data.eval_sets=[{','.join(eval_sets)}]",
        f"data.eval_path={root / 'eval' / 'pku_saferlhf.jsonl'}", "data.max_length=96",
        "trainer.micro_batch_size=16", "trainer.max_steps=14", "trainer.lr=3e-3",
        "trainer.eval_every=0", "trainer.eval_batch_size=64", "logger=none",
        f"output_dir={run_dir}",
    ])  # fmt: skip
    check_ok(proc)
    return run_dir, root


def test_mixture_of_all_formats_trains_and_every_format_is_held_out_accurate(
    all_formats_run: tuple[Path, Path],
) -> None:
    run_dir, root = all_formats_run
    metrics = read_metrics(run_dir)
    counts, last = metrics[0], metrics[-1]
    for fmt in FORMATS[1:]:
        rows_per = N_TRAIN * (9 if fmt == "rmbench" else 1)
        assert counts[f"data/train/{fmt}/pairs"] == rows_per, fmt
        mixed = round(WEIGHTS.get(fmt, 1.0) * rows_per)
        assert counts[f"data/train/{fmt}/mixed"] == mixed, fmt
        key = "eval/accuracy" if fmt == "pku_saferlhf" else f"eval/{fmt}/accuracy"
        assert last[key] >= 0.75, (fmt, last[key])
        accuracy = _accuracy(run_dir / "export", fmt, root / "eval" / f"{fmt}.jsonl")
        assert accuracy >= 0.75, (fmt, accuracy)
    assert counts["data/train/mixed"] == sum(
        counts[f"data/train/{f}/mixed"] for f in FORMATS[1:]
    )  # fmt: skip
    card = (run_dir / "export" / "README.md").read_text()
    assert "### Training mixture" in card and "| pku_saferlhf | `" in card
    assert "| standard | `" in card and "| 0.5 | 24 | 24 |" in card
    assert "| rmbench | `" in card and "eval/rmbench/accuracy" in card
    meta = json.loads((run_dir / "export" / "config.json").read_text())["rmtrain"]["data"]
    assert [m["weight"] for m in meta["mixture"]][:2] == [1.5, 1.0]
    assert meta["held_out"]["method"] == "eval_path"


@pytest.fixture(scope="module")
def single_file_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("single")
    data = write_format(root / "prefs.jsonl", "standard", generate_rows(140, 3))
    run_dir = root / "run"
    proc = run_train([
        f"data.path={data}", "data.eval_fraction=0.1", "data.max_length=96",
        "trainer.micro_batch_size=16", "trainer.max_steps=10", "trainer.lr=3e-3",
        "trainer.eval_every=5", "trainer.save_every=10", "logger=none", f"output_dir={run_dir}",
    ])  # fmt: skip
    check_ok(proc)
    assert "data train: 126 pairs from 126 rows (" in proc.stdout
    assert "data eval: 14 pairs from 14 rows (" in proc.stdout
    return run_dir, data


def test_single_file_with_eval_fraction_trains_evaluates_exports(
    single_file_run: tuple[Path, Path],
) -> None:
    run_dir, data = single_file_run
    metrics = read_metrics(run_dir)
    assert metrics[0]["data/train/rows"] == 126 and metrics[0]["data/eval/rows"] == 14
    assert metrics[-1]["eval/accuracy"] >= 0.75 and metrics[-1]["eval/pairs"] == 14
    # The held-out rows: recorded, the same as the seeded carve, and named in the model card.
    lines = data.read_text().splitlines()
    numbers = list(range(1, len(lines) + 1))
    rows = datasets.Dataset.from_dict({"_source": [str(data)] * len(lines), "_row": numbers})
    expect = sorted(carve(rows, 0.1, 0)[1]["_row"])
    meta = json.loads((run_dir / "export" / "config.json").read_text())["rmtrain"]["data"]
    assert meta["held_out"]["rows"] == {str(data): expect}
    card = (run_dir / "export" / "README.md").read_text()
    assert "10% of the training rows held out with split_seed 0" in card
    assert f"`{data}`: 14 rows (" in card
    marker = json.loads(next((run_dir / "checkpoints").glob("*/rmtrain_complete.json")).read_text())
    assert marker["run"]["held_out"]["rows"] == {str(data): expect}


def test_resume_refuses_another_held_out_split(
    single_file_run: tuple[Path, Path], capsys: Any, monkeypatch: Any
) -> None:
    run_dir, data = single_file_run
    code, err = train_in_process([
        f"data.path={data}", "data.eval_fraction=0.1", "data.split_seed=1", "data.max_length=96",
        "trainer.micro_batch_size=16", "trainer.max_steps=12", "logger=none",
        f"output_dir={run_dir}", "trainer.resume=auto",
    ], capsys, monkeypatch)  # fmt: skip
    assert code == 2
    # refused as a changed setting, naming the key, before any data is read
    assert "cannot resume with data.split_seed=1: the checkpoint was trained with 0" in err


# --------------------------------------------------------------------------- real rows


def _real(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"real data sample not found at {path} (../shared/data beside the checkout)")
    return path


def test_real_pku_rows_without_safety_labels_and_as_single_file(tmp_path: Path, tok: Any) -> None:
    real = _real("pku_saferlhf_v1_alpaca7b_test_head60.jsonl")
    full = _pairs(real, tok)
    assert len(full) == 60
    keep = ("prompt", "response_0", "response_1", "better_response_id")
    slim = [{k: json.loads(line)[k] for k in keep} for line in real.read_text().splitlines()]
    slim_pairs = _pairs(write_jsonl(tmp_path / "slim.jsonl", slim), tok)
    assert slim_pairs["chosen_input_ids"] == full["chosen_input_ids"]
    std = [to_standard(json.loads(line)) for line in real.read_text().splitlines()]
    same = _pairs(write_jsonl(tmp_path / "std.jsonl", std), tok)
    assert same["rejected_input_ids"] == full["rejected_input_ids"]


def test_real_judgebench_rewardbench_format(tok: Any) -> None:
    real = _real("judgebench_rewardbench_format_620.jsonl")
    cfg = DataConfig(path=str(real), max_length=8192)
    rows = load_rows(cfg, "train")
    assert resolve("auto", "x", rows.column_names, rows[0]).name == "rewardbench"
    _, stats = build_pairs(rows, cfg, tok)
    assert (stats.rows, stats.identical_dropped, stats.pairs) == (620, 1, 619)


def test_real_rmbench_expands_style_variants(tok: Any) -> None:
    real = _real("rmbench_safety_441.jsonl")
    cfg = DataConfig(path=str(real), max_length=8192)
    rows = load_rows(cfg, "train")
    assert resolve("auto", "x", rows.column_names, rows[0]).name == "rmbench"
    pairs, stats = build_pairs(rows, cfg, tok)
    assert stats.rows == 441 and stats.pairs + stats.identical_dropped == 441 * 9
    first = json.loads(real.read_text().splitlines()[0])
    text = tok.decode(pairs[1]["rejected_input_ids"], skip_special_tokens=False)
    assert first["rejected"][1].strip()[:40] in text


def test_real_files_as_eval_sets(tok: Any) -> None:
    jb = _real("judgebench_rewardbench_format_620.jsonl")
    rb = _real("rmbench_safety_441.jsonl")
    d = DataConfig(sample_train_rows=16, sample_eval_rows=8, max_length=64,
                   eval_sets=[SourceConfig(path=str(rb))])  # fmt: skip
    data = load_run_data(d, tok, "reward", seed=0)
    assert set(data.eval_sets) == {"rmbench_safety_441"}
    assert data.counts["eval/rmbench_safety_441"]["rows"] == 441
    assert len(data.eval_sets["rmbench_safety_441"]) > 0
    # JudgeBench's long prompts fill 64 tokens: every pair is identical after the cut, and the
    # set is refused naming its file and rows, not evaluated as empty
    d.eval_sets = [SourceConfig(path=str(jb), label="judgebench")]
    with pytest.raises(DataError, match=f"^{jb}: no usable pairs left in eval/judgebench "
                                        r"\(620 rows; 620 pairs identical"):  # fmt: skip
        load_run_data(d, tok, "reward", seed=0)


def test_readme_format_table_rows_are_detected_as_their_format() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    found = {}
    for line in readme.splitlines():
        if line.startswith("| `") and line.endswith("}` |") and " | `{" in line:
            name = line.split("`")[1]
            example = json.loads(line.rsplit(" | `", 1)[1].removesuffix("` |"))
            found[name] = resolve("auto", "README", example, example).name
    assert found == {f: f for f in FORMATS[1:]}


def test_single_files_json_parquet_xz_read_alike(tmp_path: Path, tok: Any) -> None:
    import lzma

    rows = [to_conversational_implicit(r) for r in generate_rows(10, 4)]
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.jsonl.xz").write_bytes(lzma.compress(jsonl.read_bytes()))
    want = _pairs(jsonl, tok)["chosen_input_ids"]
    for name in ("d.json", "d.parquet", "d.jsonl.xz"):
        assert _pairs(tmp_path / name, tok)["chosen_input_ids"] == want, name
    (tmp_path / "d.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(DataError, match=r"d.csv: unsupported file type \(data files: .jsonl"):
        _pairs(tmp_path / "d.csv", tok)
    rows[4]["rejected"] = "plain text"
    write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad.jsonl: row 5: field 'rejected': expected a non-"):
        _pairs(tmp_path / "bad.jsonl", tok)
