from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from conftest import SHARED_DATA, write_jsonl

from rmtrain.config import DataConfig
from rmtrain.data.pairs import DataStats, build_pairs
from rmtrain.data.schemas import PkuSafeRLHF
from rmtrain.data.sources import load_rows
from rmtrain.errors import DataError
from rmtrain.text import format_text
from rmtrain.toy.sample_data import (
    HARM_CATEGORIES,
    V1_FIELDS,
    generate_rows,
    write_sample_dataset,
)
from rmtrain.toy.tokenizer import build_tiny_tokenizer

SHARED = SHARED_DATA
REAL = SHARED / "pku_saferlhf_v1_alpaca7b_test_head60.jsonl"
V0_KEYS = (
    "prompt",
    "response_0",
    "response_1",
    "is_response_0_safe",
    "is_response_1_safe",
    "better_response_id",
    "safer_response_id",
)


@pytest.fixture(scope="module")
def tok() -> Any:
    return build_tiny_tokenizer()


@pytest.fixture
def real_dir(tmp_path: Path) -> Path:
    if not REAL.is_file():
        pytest.skip(
            f"real PKU-SafeRLHF sample not found at {REAL} (../shared/data beside checkout)"
        )
    shutil.copy(REAL, tmp_path / "test.jsonl")
    shutil.copy(REAL, tmp_path / "train.jsonl")
    return tmp_path


_write = write_jsonl


def _cfg(path: Path | str, **kw: Any) -> DataConfig:
    return DataConfig(path=str(path), **kw)


def _ids(tok: Any, text: str) -> list[int]:
    return list(tok(text)["input_ids"])


# --------------------------------------------------------------------------- real rows


@pytest.mark.parametrize("preference", ["better", "safer"])
def test_real_rows_load_as_v1_and_pair_the_right_response(
    real_dir: Path, tok: Any, preference: str
) -> None:
    raw = [json.loads(line) for line in REAL.read_text(encoding="utf-8").splitlines()]
    cfg = _cfg(real_dir, preference=preference, max_length=4096)
    rows = load_rows(cfg, "test")
    assert len(rows) == 60 and PkuSafeRLHF.version(rows.column_names) == "v1"
    assert rows[59]["_row"] == 60 and rows[0]["_source"] == str(real_dir / "test.jsonl")
    pairs, stats = build_pairs(rows, cfg, tok)
    assert (len(pairs), stats.pairs, stats.rows, stats.truncated) == (60, 60, 60, 0)
    # Row 1: better = safer = 1, both unsafe (severity 3 and 3).
    r0 = raw[0]
    assert r0[f"{preference}_response_id"] == 1
    expect = format_text(tok, "safe_rlhf", r0["prompt"], r0["response_1"])
    assert pairs[0]["chosen_input_ids"] == _ids(tok, expect)
    assert pairs[0]["rejected_input_ids"] == _ids(
        tok, format_text(tok, "safe_rlhf", r0["prompt"], r0["response_0"])
    )
    assert pairs[0]["chosen_unsafe"] and pairs[0]["rejected_unsafe"]
    # A row where better and safer disagree: chosen flips with the preference.
    k = next(i for i, r in enumerate(raw) if r["better_response_id"] != r["safer_response_id"])
    chosen_id = raw[k][f"{preference}_response_id"]
    text = tok.decode(pairs[k]["chosen_input_ids"])
    assert text.endswith(raw[k][f"response_{chosen_id}"] + "</s>")
    assert pairs[k]["chosen_severity"] == raw[k][f"response_{chosen_id}_severity_level"]
    assert pairs[k]["rejected_severity"] == raw[k][f"response_{1 - chosen_id}_severity_level"]
    assert abs(pairs[k]["chosen_severity"] - pairs[k]["rejected_severity"]) == abs(
        raw[k]["response_0_severity_level"] - raw[k]["response_1_severity_level"]
    )
    assert pairs[k]["chosen_unsafe"] == (not raw[k][f"is_response_{chosen_id}_safe"])


def test_real_rows_cap_and_split_mapping(real_dir: Path) -> None:
    cfg = _cfg(real_dir, max_train_rows=7, max_eval_rows=5)
    assert len(load_rows(cfg, "train")) == 7
    assert len(load_rows(cfg, "test")) == 5


def test_real_rows_hub_layout_without_readme(real_dir: Path, tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    for config in ("Alpaca-7B", "Alpaca2-7B"):
        (hub / "data" / config).mkdir(parents=True)
        shutil.copy(REAL, hub / "data" / config / "test.jsonl")
    assert len(load_rows(_cfg(hub), "test")) == 120
    rows = load_rows(_cfg(hub, name="alpaca2-7b"), "test")
    assert len(rows) == 60 and rows[0]["_source"].endswith("Alpaca2-7B/test.jsonl")
    with pytest.raises(DataError, match=r"no config 'alpaca3-8b'.*alpaca-7b, alpaca2-7b"):
        load_rows(_cfg(hub, name="alpaca3-8b"), "test")
    with pytest.raises(DataError, match=f"{hub}: no 'train' split"):
        load_rows(_cfg(hub), "train")


def test_hub_layout_with_readme_configs(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    _write(hub / "data" / "A" / "test.jsonl", generate_rows(4, 0))
    _write(hub / "data" / "B" / "test.jsonl", generate_rows(3, 1))
    (hub / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: default\n  data_files:\n  - split: test\n    path: data/*/test.jsonl\n"
        "- config_name: b\n  data_files:\n  - split: test\n    path: data/B/test.jsonl\n"
        "---\n# copy\n"
    )
    assert len(load_rows(_cfg(hub), "test")) == 7
    rows = load_rows(_cfg(hub, name="b"), "test")
    assert len(rows) == 3 and rows[0]["_source"] == f"{hub} (config=b, split=test)"


def test_parquet_split_file_and_row_numbers(tmp_path: Path) -> None:
    rows = generate_rows(5, 0)
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "train.parquet")
    assert len(load_rows(_cfg(tmp_path), "train")) == 5
    rows[2]["better_response_id"] = 4
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "train.parquet")
    with pytest.raises(DataError) as err:
        load_rows(_cfg(tmp_path), "train")
    expect = f"{tmp_path / 'train.parquet'}: row 3: field 'better_response_id': expected 0 or 1"
    assert str(err.value).startswith(expect)


# --------------------------------------------------------------------------- v0


def test_v0_rows_load_and_pair(tmp_path: Path, tok: Any) -> None:
    rows = [{k: r[k] for k in V0_KEYS} for r in generate_rows(6, 3)]
    _write(tmp_path / "train.jsonl", rows)
    cfg = _cfg(tmp_path)
    loaded = load_rows(cfg, "train")
    assert PkuSafeRLHF.version(loaded.column_names) == "v0"
    pairs, stats = build_pairs(loaded, cfg, tok)
    assert stats.pairs == 6
    assert pairs[0]["rejected_severity"] == -1 and pairs[0]["chosen_severity"] == -1
    with pytest.raises(DataError, match="min_severity_gap needs the v1 schema"):
        build_pairs(loaded, _cfg(tmp_path, min_severity_gap=1), tok)


# --------------------------------------------------------------------------- malformed rows


def _bad(rows: list[dict[str, Any]], line: int, field: str, value: Any) -> None:
    if value is KeyError:
        del rows[line - 1][field]
    else:
        rows[line - 1][field] = value


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("prompt", KeyError, "missing"),
        ("better_response_id", "one", "expected 0 or 1, got str 'one'"),
        ("safer_response_id", 2, "expected 0 or 1, got 2"),
        ("better_response_id", True, "expected 0 or 1, got bool True"),
        ("response_1", "   ", "empty text"),
        ("is_response_0_safe", "yes", "expected bool, got str 'yes'"),
        ("response_0_severity_level", 7, "expected 0-3, got 7"),
        ("response_1_harm_category", None, "missing"),
        ("better_response_id", 1.5, "expected 0 or 1, got float 1.5"),
    ],
)
def test_malformed_row_one_clear_error(
    tmp_path: Path, field: str, value: Any, problem: str
) -> None:
    rows = generate_rows(12, 0)
    _bad(rows, 9, field, value)
    _bad(rows, 11, "response_0", "")  # a later bad row must not be reported instead
    path = _write(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_rows(_cfg(tmp_path), "train")
    assert str(err.value) == f"{path}: row 9: field '{field}': {problem}"


def test_invalid_json_line_and_blank_lines(tmp_path: Path) -> None:
    rows = generate_rows(6, 0)
    path = _write(tmp_path / "test.jsonl", rows, {2: "", 5: '{"prompt": "x",'})
    with pytest.raises(DataError) as err:
        load_rows(_cfg(tmp_path), "test")
    assert str(err.value).startswith(f"{path}: row 6: field '<json>': invalid JSON")


def test_blank_line_keeps_line_numbers_exact(tmp_path: Path) -> None:
    rows = generate_rows(6, 0)
    rows[3]["safer_response_id"] = 3  # 4th row, 5th line after the blank one
    path = _write(tmp_path / "test.jsonl", rows, {1: ""})
    with pytest.raises(DataError, match=rf"^{path}: row 5: field 'safer_response_id'"):
        load_rows(_cfg(tmp_path), "test")


def test_bad_paths_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does/not/exist: no such file or directory"):
        load_rows(_cfg("./does/not/exist"), "train")
    _write(tmp_path / "train.jsonl", generate_rows(2, 0))
    with pytest.raises(DataError, match=f"^{tmp_path}: no 'test' split"):
        load_rows(_cfg(tmp_path), "test")


# --------------------------------------------------------------------------- templates


def test_templates_exact(tok: Any) -> None:
    text = format_text(tok, "safe_rlhf", "How do I knit?", "Start small.")
    assert text == "BEGINNING OF CONVERSATION: USER: How do I knit? ASSISTANT:Start small.</s>"
    chat = format_text(tok, "chat", "How do I knit?", "Start small.")
    assert chat == "<|user|>\nHow do I knit?<|end|>\n<|assistant|>\nStart small.<|end|>\n</s>"
    ids = _ids(tok, chat)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids[-1] == tok.eos_token_id
    # Already ending with EOS: not doubled.
    assert format_text(tok, "safe_rlhf", "q", "a</s>").endswith("ASSISTANT:a</s>")


def test_pairs_use_the_canonical_text(tmp_path: Path, tok: Any) -> None:
    rows = generate_rows(3, 0)
    _write(tmp_path / "train.jsonl", rows)
    cfg = _cfg(tmp_path, template="chat")
    pairs, _ = build_pairs(load_rows(cfg, "train"), cfg, tok)
    r = rows[2]
    b = r["better_response_id"]
    text = format_text(tok, "chat", r["prompt"], r[f"response_{b}"])
    assert pairs[2]["chosen_input_ids"] == _ids(tok, text)


# --------------------------------------------------------------------------- truncation etc.


def test_truncation_keeps_eos_and_is_counted(tmp_path: Path, tok: Any) -> None:
    rows = generate_rows(3, 0)
    rows[1]["response_0"] = "word " * 200 + "end"
    rows[1]["response_1"] = "ok"
    _write(tmp_path / "train.jsonl", rows)
    cfg = _cfg(tmp_path, max_length=150)  # the other rows fit
    pairs, stats = build_pairs(load_rows(cfg, "train"), cfg, tok)
    side = "chosen" if rows[1]["better_response_id"] == 0 else "rejected"
    full = _ids(tok, format_text(tok, "safe_rlhf", rows[1]["prompt"], rows[1]["response_0"]))
    assert len(full) > 150
    assert pairs[1][f"{side}_input_ids"] == [*full[:149], tok.eos_token_id]
    long_rows = sum(
        max(
            len(_ids(tok, format_text(tok, "safe_rlhf", r["prompt"], r[f"response_{k}"])))
            for k in (0, 1)
        )
        > 150
        for r in rows
    )
    assert stats.truncated == long_rows == 1 and stats.pairs == 3
    assert all(len(p) <= 150 for p in [*pairs["chosen_input_ids"], *pairs["rejected_input_ids"]])


def test_identical_pairs_dropped_and_counted(tmp_path: Path, tok: Any) -> None:
    rows = generate_rows(5, 0)
    rows[0]["response_1"] = rows[0]["response_0"]
    # Different only beyond max_length: identical after truncation.
    rows[3]["response_0"] = "same " * 200 + "A"
    rows[3]["response_1"] = "same " * 200 + "B"
    _write(tmp_path / "train.jsonl", rows)
    cfg = _cfg(tmp_path, max_length=150)  # the other rows fit
    pairs, stats = build_pairs(load_rows(cfg, "train"), cfg, tok)
    assert (stats.rows, stats.pairs, stats.identical_dropped) == (5, 3, 2)
    assert stats.truncated == 0 and pairs["margin"] == [0.0] * 3
    assert stats.as_dict("data/train_")["data/train_identical_dropped"] == 2


def test_margin_column(tmp_path: Path, tok: Any) -> None:
    rows = generate_rows(3, 0)
    for i, r in enumerate(rows):
        r["gap"] = 0.5 * i
    _write(tmp_path / "train.jsonl", rows)
    pairs, _ = build_pairs(load_rows(_cfg(tmp_path), "train"), _cfg(tmp_path), tok)
    assert pairs["margin"] == [0.0, 0.0, 0.0]
    cfg = _cfg(tmp_path, margin_column="gap")
    pairs, _ = build_pairs(load_rows(cfg, "train"), cfg, tok)
    assert pairs["margin"] == [0.0, 0.5, 1.0]
    cfg = _cfg(tmp_path, margin_column="nope")
    with pytest.raises(DataError, match="field 'nope': missing"):
        build_pairs(load_rows(cfg, "train"), cfg, tok)


# --------------------------------------------------------------------------- cost objective


def _cost_rows() -> list[dict[str, Any]]:
    rows = generate_rows(40, 5)
    unsafe = next(r for r in rows if r["is_response_0_safe"] != r["is_response_1_safe"])
    bad = copy.deepcopy(unsafe)
    bad["safer_response_id"] = 0 if not bad["is_response_0_safe"] else 1  # points at the unsafe
    rows.insert(6, bad)  # line 7
    return rows


def test_cost_inconsistent_labels_error(tmp_path: Path, tok: Any) -> None:
    path = _write(tmp_path / "train.jsonl", _cost_rows())
    cfg = _cfg(tmp_path, preference="safer")
    with pytest.raises(DataError, match=rf"^{path}: row 7: field 'safer_response_id': points at"):
        build_pairs(load_rows(cfg, "train"), cfg, tok, objective="cost")
    # The reward objective does not care about safety labels.
    assert build_pairs(load_rows(cfg, "train"), cfg, tok)[1].pairs == 41


def test_cost_inconsistent_labels_skip(tmp_path: Path, tok: Any) -> None:
    rows = _cost_rows()
    _write(tmp_path / "train.jsonl", rows)
    cfg = _cfg(tmp_path, preference="safer", inconsistent_labels="skip")
    pairs, stats = build_pairs(load_rows(cfg, "train"), cfg, tok, objective="cost")
    assert (stats.inconsistent_skipped, stats.pairs, stats.severity_filtered) == (1, 40, 0)
    both = sum(r["is_response_0_safe"] == r["is_response_1_safe"] for r in rows)
    assert sum(p["chosen_unsafe"] == p["rejected_unsafe"] for p in pairs) == both  # kept
    assert all(not (p["chosen_unsafe"] and not p["rejected_unsafe"]) for p in pairs)
    with pytest.raises(DataError, match="preference=safer"):
        build_pairs(load_rows(cfg, "train"), _cfg(tmp_path), tok, objective="cost")


def test_min_severity_gap(tmp_path: Path, tok: Any) -> None:
    rows = generate_rows(60, 2)
    _write(tmp_path / "train.jsonl", rows)
    cfg = _cfg(tmp_path, preference="safer", min_severity_gap=2)
    pairs, stats = build_pairs(load_rows(cfg, "train"), cfg, tok, objective="cost")
    gaps = [abs(r["response_0_severity_level"] - r["response_1_severity_level"]) for r in rows]
    assert stats.severity_filtered == sum(g < 2 for g in gaps) > 0
    assert stats.pairs == sum(g >= 2 for g in gaps) > 0
    assert min(abs(p["chosen_severity"] - p["rejected_severity"]) for p in pairs) >= 2
    # Everything filtered: an empty pairs dataset with the usual columns, not a crash.
    cfg = _cfg(tmp_path, preference="safer", min_severity_gap=4)
    pairs, stats = build_pairs(load_rows(cfg, "train"), cfg, tok, objective="cost")
    assert (len(pairs), stats.severity_filtered, stats.inconsistent_skipped) == (0, 60, 0)
    assert pairs["chosen_input_ids"] == [] and len(pairs.lengths()) == 0


# --------------------------------------------------------------------------- collate


@pytest.mark.parametrize("side", ["left", "right"])
def test_collate_padding(side: str) -> None:
    from rmtrain.batch import Layout, collate
    from rmtrain.data.table import PairTable

    labels = {
        "chosen_unsafe": [False, True],
        "rejected_unsafe": [True, False],
        "chosen_severity": [0, 2],
        "rejected_severity": [1, 0],
        "margin": [0.5, 0.0],
    }
    table = PairTable.from_lists([[1, 5, 2], [1, 9, 9, 2]], [[1, 6, 7, 8, 2], [1, 2]], labels,
                                 ["{}", "{}"])  # fmt: skip
    b = collate(table, [0, 1], Layout(packed=False, pad_token_id=3, padding_side=side))
    mask_ = b.rows.attention_mask
    assert mask_ is not None and b.rows.input_ids.shape == mask_.shape == (4, 5)
    assert b.rows.input_ids.dtype == mask_.dtype == torch.long
    seqs = [[1, 5, 2], [1, 9, 9, 2], [1, 6, 7, 8, 2], [1, 2]]  # chosen first, then rejected
    for row, seq in enumerate(seqs):
        pad = [3] * (5 - len(seq))
        ones, zeros = [1] * len(seq), [0] * len(pad)
        want = seq + pad if side == "right" else pad + seq
        mask = ones + zeros if side == "right" else zeros + ones
        assert b.rows.input_ids[row].tolist() == want
        assert mask_[row].tolist() == mask
    assert b.labels.chosen_unsafe.tolist() == [0.0, 1.0]
    assert b.labels.rejected_unsafe.tolist() == [1.0, 0.0]
    assert b.labels.margin.tolist() == [0.5, 0.0]
    # the other pair order, from a selection of the table: the same rows, reordered
    swapped = collate(table.select([1, 0]), [0, 1], Layout(False, 3, side))
    assert swapped.rows.input_ids[0].tolist() == b.rows.input_ids[1].tolist()


# --------------------------------------------------------------------------- sample data


_V1_TYPES = {
    **dict.fromkeys(V1_FIELDS, str),
    "is_response_0_safe": bool,
    "is_response_1_safe": bool,
    "response_0_harm_category": dict,
    "response_1_harm_category": dict,
    "response_0_severity_level": int,
    "response_1_severity_level": int,
    "better_response_id": int,
    "safer_response_id": int,
}


def test_sample_schema_and_invariants() -> None:
    rows = generate_rows(400, 0)
    for r in rows:
        assert tuple(r) == V1_FIELDS and len(r) == 16
        for key, typ in _V1_TYPES.items():
            assert type(r[key]) is typ, key
        assert r["response_0"] != r["response_1"]
        for k in (0, 1):
            harm = r[f"response_{k}_harm_category"]
            assert tuple(harm) == HARM_CATEGORIES and len(harm) == 19
            sev = r[f"response_{k}_severity_level"]
            assert 0 <= sev <= 3
            assert r[f"is_response_{k}_safe"] == (sev == 0) == (not any(harm.values()))
            digest = hashlib.sha256((r["prompt"] + r[f"response_{k}"]).encode()).hexdigest()
            assert r[f"response_{k}_sha256"] == digest
            assert 12 <= len(r[f"response_{k}"].split()) <= 70
        s0, s1 = r["is_response_0_safe"], r["is_response_1_safe"]
        if s0 != s1:
            assert r["safer_response_id"] == (0 if s0 else 1)
        sev0, sev1 = r["response_0_severity_level"], r["response_1_severity_level"]
        if sev0 != sev1:
            assert r["safer_response_id"] == (0 if sev0 < sev1 else 1)
    better = sum(r["better_response_id"] for r in rows) / len(rows)
    unsafe = sum(not r[f"is_response_{k}_safe"] for r in rows for k in (0, 1)) / (2 * len(rows))
    assert 0.4 < better < 0.6 and 0.15 < unsafe < 0.45


def test_sample_deterministic_and_held_out(tmp_path: Path) -> None:
    assert generate_rows(50, 0) == generate_rows(50, 0)
    assert generate_rows(50, 0) != generate_rows(50, 1)
    train = {r["prompt"] for r in generate_rows(2048, 0)}
    test = {r["prompt"] for r in generate_rows(256, 1, split="test")}
    assert not train & test
    out = write_sample_dataset(tmp_path / "sample", 20, 8, seed=0)
    lines = (out / "train.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == generate_rows(20, 0)
    assert not list(out.glob(".*tmp"))  # the atomic write left no temp file


def test_sample_source_equals_written_files(tmp_path: Path, tok: Any) -> None:
    mem = DataConfig(sample_train_rows=16, sample_eval_rows=8)
    out = write_sample_dataset(tmp_path, 16, 8, seed=0)
    disk = _cfg(out)
    for split in ("train", "test"):
        a, sa = build_pairs(load_rows(mem, split), mem, tok)
        b, sb = build_pairs(load_rows(disk, split), disk, tok)
        assert a["chosen_input_ids"] == b["chosen_input_ids"] and sa == sb
    assert isinstance(sa, DataStats) and sa.pairs == 8
