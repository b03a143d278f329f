"""`rmtrain score`: the three input formats, batch-size and padding-side invariance, pairwise
accuracy, and a clear error (no output file) for a bad row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_export, read_jsonl, write_jsonl

from rmtrain.score import Scorer, main
from rmtrain.text import format_text

LONG = " ".join(["Rinse the rice, then simmer it covered for fifteen minutes."] * 12)
ROWS = [
    {"prompt": "Hi", "response": "Hello!"},
    {"prompt": "How do I cook rice?", "response": LONG},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]},
    {
        "prompt": "Tell me a joke",
        "chosen": "Why did the chicken cross the road?",
        "rejected": "No.",
    },
    {"prompt": "How do I cook rice?", "chosen": LONG, "rejected": "Boil it."},
    {"prompt": "Is it safe?", "chosen": "Yes", "rejected": "I cannot say, " + LONG},
    {
        "messages": [
            {"role": "user", "content": "How do I cook rice?"},
            {"role": "assistant", "content": "Boil it."},
            {"role": "user", "content": "Longer?"},
            {"role": "assistant", "content": LONG},
        ]
    },
]


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_export(tmp_path_factory.mktemp("export") / "export", "safe_rlhf")


@pytest.fixture(scope="module")
def input_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("in") / "rows.jsonl", ROWS)


def flat_scores(rows: list[dict]) -> list[float]:
    keys = ("score", "chosen_score", "rejected_score")
    return [r[k] for r in rows for k in keys if k in r]


def test_formats_batch_sizes_and_padding_sides_agree(export, input_file, tmp_path, capsys) -> None:
    results = {}
    for side in ("right", "left"):
        for bs in (1, 2, 3):
            out = tmp_path / f"{side}{bs}.jsonl"
            main(["--model", str(export), "--input", str(input_file), "--output", str(out),
                  "--batch-size", str(bs), "--padding-side", side, "--no-progress",
                  "--summary", str(tmp_path / f"{side}{bs}.json")])  # fmt: skip
            results[side, bs] = read_jsonl(out)
    reference = results["right", 1]
    # output order and content: the input row plus its score fields
    assert len(reference) == len(ROWS)
    for row, scored in zip(ROWS, reference, strict=True):
        assert {k: scored[k] for k in row} == row
        expected = {"chosen_score", "rejected_score"} if "chosen" in row else {"score"}
        assert set(scored) - set(row) == expected
    ref = torch.tensor(flat_scores(reference))
    assert ref.std() > 0  # distinct texts, distinct scores
    for key, rows in results.items():
        torch.testing.assert_close(
            torch.tensor(flat_scores(rows)), ref, atol=1e-5, rtol=0, msg=str(key)
        )
    # the same text gets the same score whatever row form it came in
    assert reference[1]["score"] == pytest.approx(reference[4]["chosen_score"], abs=1e-5)
    # pairwise accuracy = a hand count from the written scores
    pairs = [r for r in reference if "chosen_score" in r]
    correct = sum(r["chosen_score"] > r["rejected_score"] for r in pairs)
    summary = json.loads((tmp_path / "right1.json").read_text())
    assert summary["pairs"] == 3 and summary["correct_pairs"] == correct
    assert summary["pairwise_accuracy"] == pytest.approx(correct / 3)
    assert summary["normalized"] is None and summary["template"] == "safe_rlhf"
    assert f"pairwise accuracy {correct / 3:.4f} ({correct}/3 pairs" in capsys.readouterr().out


def test_messages_use_the_training_text(export) -> None:
    scorer = Scorer(export)
    one = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]
    assert scorer.messages_text(one) == "BEGINNING OF CONVERSATION: USER: Hi ASSISTANT:Hey</s>"
    assert scorer.text("Hi", "Hey") == scorer.messages_text(one)
    two = [*one, {"role": "user", "content": "More"}, {"role": "assistant", "content": "Ok"}]
    assert scorer.messages_text(two) == (
        "BEGINNING OF CONVERSATION: USER: Hi ASSISTANT:Hey</s>USER: More ASSISTANT:Ok</s>"
    )
    with pytest.raises(ValueError, match="alternating user/assistant"):
        scorer.messages_text([{"role": "system", "content": "x"}, *one])


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "rmtrain", "score", *args],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip


def test_cli_scores_a_file(export, input_file, tmp_path) -> None:
    out = tmp_path / "out.jsonl"
    proc = run_cli("--model", str(export), "--input", str(input_file), "--output", str(out),
                   "--batch-size", "3")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "pairwise accuracy" in proc.stdout
    assert "scoring" in proc.stderr  # the progress bar
    assert len(read_jsonl(out)) == len(ROWS)


def test_bad_row_is_one_clear_error_and_leaves_no_output(export, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    rows = [ROWS[0], ROWS[3], {"prompt": "only a prompt"}, ROWS[1]]
    write_jsonl(bad, rows)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(export), "--input", str(bad), "--output", str(out_dir / "o.jsonl")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"rmtrain score: error: {bad}: row 3: field 'response': missing "
        "(a row needs prompt+response, messages, or a preference pair)"
    ]
    assert list(out_dir.iterdir()) == []  # nothing half-written


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"prompt": "p", "chosen": "c"}, "rejected"),
        ({"prompt": 3, "response": "r"}, "prompt"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages"),
    ],
)
def test_bad_rows_name_the_field(export, tmp_path, capsys, row, field) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(row) + "\n")
    with pytest.raises(SystemExit) as exc:
        main(["--model", str(export), "--input", str(bad), "--output", str(tmp_path / "o.jsonl")])
    assert exc.value.code == 2
    assert f"{bad}: row 3: field '{field}'" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_max_length_cuts_from_the_right_keeping_eos(export) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export)
    text = format_text(tok, "safe_rlhf", "Tell me a long story " * 5, "Once upon a time " * 5)
    ids = tok(text)["input_ids"]
    assert len(ids) > 12
    scorer = Scorer(export, max_length=12)
    [score] = scorer.score_texts([text])
    assert scorer.truncated == 1
    cut = [*ids[:11], tok.eos_token_id]  # the training rule, written out by hand
    plain = AutoModelForSequenceClassification.from_pretrained(export).eval()
    with torch.no_grad():
        want = plain(input_ids=torch.tensor([cut])).logits[0, 0].item()
    assert score == pytest.approx(want, abs=1e-5)
    assert Scorer(export).score_texts([text])[0] != pytest.approx(want, abs=1e-5)


# --------------------------------------------------------------------------- issue 12 fixes


def _main(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_chosen_rejected_rows_are_always_pairs(export, tmp_path) -> None:
    user = {"role": "user", "content": "How do I cook rice?"}
    good = {"role": "assistant", "content": "Rinse it, then simmer it covered."}
    bad = {"role": "assistant", "content": "No."}
    rows = [
        # UltraFeedback-binarized: whole conversations, plus `messages` (= chosen)
        {"prompt": user["content"], "chosen": [user, good], "rejected": [user, bad],
         "messages": [user, good], "score_chosen": 8.0, "score_rejected": 2.0},
        # TRL conversational, explicit prompt
        {"prompt": [user], "chosen": [good], "rejected": [bad]},
        {"prompt": user["content"], "chosen": good["content"], "rejected": bad["content"]},
    ]  # fmt: skip
    src, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    assert _main(["--model", str(export), "--input", str(src), "--output", str(out)]) == 0
    scored = read_jsonl(out)
    assert all("chosen_score" in r and "rejected_score" in r and "score" not in r for r in scored)
    # the three layouts are the same pair
    for r in scored[1:]:
        assert r["chosen_score"] == pytest.approx(scored[0]["chosen_score"], abs=1e-6)
        assert r["rejected_score"] == pytest.approx(scored[0]["rejected_score"], abs=1e-6)


def test_output_mode_follows_the_umask(export, input_file, tmp_path) -> None:
    out = tmp_path / "out.jsonl"
    old = os.umask(0o027)
    try:
        assert _main(["--model", str(export), "--input", str(input_file), "--output", str(out),
                      "--no-progress"]) == 0  # fmt: skip
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o640


def test_trained_max_length_is_the_default_and_long_texts_warn(tmp_path, capsys) -> None:
    export = make_export(tmp_path / "short", meta={"max_length": 12}, max_position_embeddings=16)
    src = write_jsonl(tmp_path / "in.jsonl", ROWS[:2])
    out = tmp_path / "out.jsonl"
    summary = tmp_path / "summary.json"
    assert _main(["--model", str(export), "--input", str(src), "--output", str(out),
                  "--summary", str(summary), "--no-progress"]) == 0  # fmt: skip
    got = json.loads(summary.read_text())
    assert got["max_length"] == 12 and got["truncated"] == 2 and got["over_context"] == 0
    err = capsys.readouterr().err
    assert "2 text(s) longer than max_length=12 were cut" in err
    # without the cut, both are longer than the model's 16 positions: counted and warned
    args = ["--model", str(export), "--input", str(src), "--output", str(out)]
    assert _main([*args, "--summary", str(summary), "--max-length", "0", "--no-progress"]) == 0
    got = json.loads(summary.read_text())
    assert got["max_length"] is None and got["truncated"] == 0 and got["over_context"] == 2
    assert "longer than the model's context" in capsys.readouterr().err


def test_non_finite_scores_are_an_error_not_invalid_json(tmp_path, capsys) -> None:
    from safetensors.torch import load_file, save_file

    export = make_export(tmp_path / "nan")
    for shard in export.glob("*.safetensors"):
        weights = load_file(shard)
        save_file({k: v.fill_(float("nan")) if k == "score.weight" else v
                   for k, v in weights.items()}, shard, metadata={"format": "pt"})  # fmt: skip
    src, out = write_jsonl(tmp_path / "in.jsonl", ROWS[:1]), tmp_path / "out.jsonl"
    assert _main(["--model", str(export), "--input", str(src), "--output", str(out),
                  "--no-progress"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "non-finite score(s), the first at line 1" in err and "nothing was written" in err
    assert not out.exists()
