"""The data cache: pairs tokenized once, in parts, by processes and ranks, into one memory-mapped
store; the same pairs as the in-memory path, exact errors, no stale or half-written entry."""

from __future__ import annotations

import dataclasses
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest
from conftest import SMALL, check_ok, cli_env, run_train, train_in_process, write_jsonl

from rmtrain.config import DataConfig
from rmtrain.data import cache
from rmtrain.data.assemble import load_pairs, load_run_data
from rmtrain.data.pairs import build_pairs
from rmtrain.data.sources import load_rows
from rmtrain.data.store import Store
from rmtrain.data.table import LABELS, PairTable
from rmtrain.errors import DataError
from rmtrain.prepare import main as prepare_main
from rmtrain.toy.sample_data import generate_rows
from rmtrain.toy.tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok() -> Any:
    return build_tiny_tokenizer()


def _formats(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The same exchanges in several row layouts."""
    out: dict[str, list[dict[str, Any]]] = {"pku_saferlhf": rows}
    out["standard"] = [
        {"prompt": r["prompt"], "chosen": r["response_0"], "rejected": r["response_1"]}
        for r in rows
    ]
    out["conversational"] = [
        {"prompt": [{"role": "user", "content": r["prompt"]}],
         "chosen": [{"role": "assistant", "content": r["response_0"]}],
         "rejected": [{"role": "assistant", "content": r["response_1"]}]}
        for r in rows
    ]  # fmt: skip
    out["hh_rlhf"] = [
        {"chosen": f"\n\nHuman: {r['prompt']}\n\nAssistant: {r['response_0']}",
         "rejected": f"\n\nHuman: {r['prompt']}\n\nAssistant: {r['response_1']}"}
        for r in rows
    ]  # fmt: skip
    out["rmbench"] = [
        {"prompt": r["prompt"], "chosen": [r["response_0"], r["response_0"] + " More."],
         "rejected": [r["response_1"], r["response_0"]]}  # one identical pair per row
        for r in rows
    ]  # fmt: skip
    return out


def assert_same_pairs(a: PairTable, b: PairTable) -> None:
    assert len(a) == len(b)
    every = list(range(len(a)))
    assert [s.tolist() for s in a.sequences(every)] == [s.tolist() for s in b.sequences(every)]
    for k in LABELS:
        assert a.label(k).tolist() == b.label(k).tolist(), k
    assert [a.meta_of(i) for i in every] == [b.meta_of(i) for i in every]
    assert a.pair_hashes().tolist() == b.pair_hashes().tolist()
    # a row's pairs form one group (loss.k_way, prefix sharing), its responses stored once
    assert a.group_members() == b.group_members()
    for t in (a, b):
        if any(len(g) > 1 for g in t.group_members()):
            assert t.pair_seqs is not None and len(t.offsets) - 1 < 2 * len(t)


@pytest.fixture
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts of a few hundred bytes / rows, so that small files are cut into many."""
    monkeypatch.setattr(cache, "_PART_BYTES", (300, 600))
    monkeypatch.setattr(cache, "_PART_ROWS", (3, 7))


@pytest.mark.parametrize("drop_identical", [True, False])
def test_cached_pairs_equal_the_in_memory_path_in_every_layout(
    tmp_path: Path, tok: Any, small_parts: None, drop_identical: bool
) -> None:
    """Cut into many parts (JSONL byte ranges, parquet row ranges, a whole .xz), merged, mapped:
    the same pairs, labels, meta (file and line) and counts as `build_pairs` of all rows."""
    rows = generate_rows(40, 3)
    for name, layout in _formats(rows).items():
        files = [write_jsonl(tmp_path / f"{name}.jsonl", layout, {5: "", 17: "   "})]
        datasets.Dataset.from_list(layout).to_parquet(tmp_path / f"{name}.parquet")
        (tmp_path / f"{name}.jsonl.xz").write_bytes(lzma.compress(files[0].read_bytes()))
        files += [tmp_path / f"{name}.parquet", tmp_path / f"{name}.jsonl.xz"]
        for path in files:
            cfg = DataConfig(path=str(path), max_length=48)  # some pairs cut
            want, want_stats = build_pairs(load_rows(cfg, "train"), cfg, tok,
                                           drop_identical=drop_identical)  # fmt: skip
            got, stats = load_pairs(cfg, "train", tok, drop_identical=drop_identical)
            assert_same_pairs(got, want)
            assert stats == want_stats, path
            assert stats.truncated > 0 and len(got) >= 40
            # a JSONL row keeps its line across the blank lines and the cuts
            last = got.meta_of(len(got) - 1)
            assert last == {
                **last,
                "source": str(path),
                "row": 40 if path.suffix == ".parquet" else 42,
            }


def test_several_processes_build_the_same_entry(
    tmp_path: Path, tok: Any, small_parts: None
) -> None:
    """data.num_proc=2 (real processes, parts in any order) gives the entry one process gives:
    the same content digest and the same arrays."""
    path = write_jsonl(tmp_path / "d.jsonl", _formats(generate_rows(60, 1))["standard"])
    one = DataConfig(path=str(path), eval_fraction=0.1, num_proc=1, cache_dir=str(tmp_path / "a"))
    two = dataclasses.replace(one, num_proc=2, cache_dir=str(tmp_path / "b"))
    a, b = (load_run_data(d, tok, "reward", seed=0).prepared for d in (one, two))
    assert a is not None and b is not None and a.built and b.built
    assert b.store.manifest["built"]["processes"] == 2
    assert a.fingerprint == b.fingerprint
    for name, values in a.store.arrays.items():
        assert np.array_equal(values, b.store.arrays[name]), name


def test_warm_start_reuses_the_entry_and_any_change_to_the_ids_misses(
    tmp_path: Path, tok: Any
) -> None:
    rows = _formats(generate_rows(30, 2))["standard"]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    d = DataConfig(path=str(path), eval_fraction=0.2)
    cold = load_run_data(d, tok, "reward", seed=0)
    warm = load_run_data(d, tok, "reward", seed=0)
    assert cold.prepared and warm.prepared and cold.prepared.built and not warm.prepared.built
    assert_same_pairs(warm.train, cold.train)
    assert warm.counts == cold.counts and warm.held_out == cold.held_out
    # choosing other pairs from the same rows: the same entry
    other = load_run_data(dataclasses.replace(d, eval_fraction=0.5), tok, "reward", seed=0)
    assert other.prepared and not other.prepared.built and len(other.eval) == 15
    assert other.fingerprint == cold.fingerprint
    # what changes the ids: a new entry each
    entries = {cold.fingerprint["key"]}
    for changed in (dataclasses.replace(d, max_length=40), dataclasses.replace(d, template="chat")):
        data = load_run_data(changed, tok, "reward", seed=0)
        assert data.prepared and data.prepared.built
        entries.add(data.fingerprint["key"])
    rows[7]["chosen"] = "A different answer."
    write_jsonl(path, rows)  # the same file, rewritten
    edited = load_run_data(d, tok, "reward", seed=0)
    assert edited.prepared and edited.prepared.built
    assert edited.fingerprint["digest"] != cold.fingerprint["digest"]
    entries.add(edited.fingerprint["key"])
    assert len(entries) == 4
    root = cache.cache_root(d)
    assert entries <= {p.name for p in root.iterdir()}
    assert not list(root.glob(".build-*"))


def test_bad_row_near_the_end_of_a_large_file_is_exact_and_leaves_no_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """20,000 rows, the bad cell at row 19,990: `rmtrain prepare` names file, row and field,
    exits 2, and leaves neither an entry nor a build directory (a bad override: exit 2 too)."""
    with pytest.raises(SystemExit) as exit_:
        prepare_main(["data.nope=1"])
    assert exit_.value.code == 2
    assert "Key 'nope' not in 'DataConfig'" in capsys.readouterr().err
    rows = [{"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(20_000)]
    rows[19_989]["rejected"] = 7
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    root = tmp_path / "cache"
    with pytest.raises(SystemExit) as exit_:
        prepare_main([f"data.path={path}", "data.eval_fraction=0.01", f"data.cache_dir={root}",
                      "logger=none"])  # fmt: skip
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"rmtrain prepare: error: {path}: row 19990: field 'rejected': expected str, got int 7"
    )
    assert list(root.iterdir()) == []


def test_cache_off_builds_in_a_temporary_directory_and_keeps_nothing(
    tmp_path: Path, tok: Any
) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", _formats(generate_rows(12, 4))["conversational"])
    d = DataConfig(path=str(path), eval_fraction=0.25, cache=False, cache_dir=str(tmp_path / "c"))
    data = load_run_data(d, tok, "reward", seed=0)
    assert data.prepared and data.prepared.built
    assert list((tmp_path / "c").iterdir()) == []  # removed once mapped
    on = load_run_data(dataclasses.replace(d, cache=True), tok, "reward", seed=0)
    assert_same_pairs(data.train, on.train)  # still readable: mapped files outlive their names
    assert data.fingerprint == on.fingerprint


def test_prepare_then_train_finds_the_entry_and_resume_checks_the_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = generate_rows(64, 5)
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    original = path.read_bytes()
    run_dir = tmp_path / "run"
    args = [*SMALL, f"data.path={path}", "data.eval_fraction=0.125", "trainer.max_steps=4",
            "trainer.save_every=2", f"output_dir={run_dir}"]  # fmt: skip
    prepare_main(args)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("data train: 56 pairs from 56 rows (")
    assert printed[1].startswith("data eval: 8 pairs from 8 rows (")
    assert printed[2].startswith("data cache: 64 pairs, ") and "(tokenized in " in printed[2]
    proc = run_train(args)
    check_ok(proc)
    assert all(line in proc.stdout for line in printed[:2])
    assert "(found in the cache in " in proc.stdout
    marker = json.loads(next(run_dir.glob("checkpoints/*/rmtrain_complete.json")).read_text())
    assert marker["run"]["fingerprint"]["digest"]

    # The same number of rows, one response changed: refused, naming what changed.
    rows[9]["response_0"] = "Something else entirely."
    write_jsonl(path, rows)
    resume = [*args[:-3], "trainer.max_steps=6", "trainer.save_every=2", f"output_dir={run_dir}",
              "trainer.resume=auto"]  # fmt: skip
    code, err = train_in_process(resume, capsys, monkeypatch)
    assert code == 2
    assert "the data it was trained on has changed (reads.0.pieces.0.ctime_ns: " in err
    # Back to the original bytes (a new file to the cache, the same pairs): resumes.
    path.write_bytes(original)
    check_ok(run_train(resume))


@pytest.mark.slow
def test_two_ranks_share_the_work_and_two_launches_share_the_entry(tmp_path: Path) -> None:
    """`rmtrain prepare` on 2 ranks (torchrun) builds the entry 1 rank builds; two launches
    building it at once (enough rows that both are still tokenizing when the other looks for
    the entry) both succeed and leave one entry."""
    path = write_jsonl(tmp_path / "d.jsonl", _formats(generate_rows(4000, 6))["hh_rlhf"])
    args = [f"data.path={path}", "data.eval_fraction=0.1", "data.num_proc=1"]
    env = cli_env()
    prepare = [sys.executable, "-m", "rmtrain.prepare"]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
         "rmtrain.prepare", *args, f"data.cache_dir={tmp_path / 'two'}"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    check_ok(two)
    both = [
        subprocess.Popen([*prepare, *args, f"data.cache_dir={tmp_path / 'one'}"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in both]
    assert [p.returncode for p in both] == [0, 0], outs
    (entry,) = (tmp_path / "one").iterdir()  # one entry, no build directory left
    (other,) = (tmp_path / "two").iterdir()
    assert entry.name == other.name
    a, b = Store.open(entry), Store.open(other)
    assert a is not None and b is not None
    assert a.manifest["digest"] == b.manifest["digest"]
    assert b.manifest["built"]["processes"] == 2
    assert all(f"at {entry} (tokenized in " in out for out, _ in outs)  # both built it


def test_files_and_stale_builds(tmp_path: Path, tok: Any) -> None:
    """A build directory whose builder died is removed by the next build; an entry whose file
    was cut short is rebuilt, not read."""
    path = write_jsonl(tmp_path / "d.jsonl", _formats(generate_rows(10, 7))["standard"])
    d = DataConfig(path=str(path), eval_fraction=0.2, cache_dir=str(tmp_path / "c"))
    first = load_run_data(d, tok, "reward", seed=0)
    assert first.prepared is not None
    pairs = [s.tolist() for s in first.train.sequences(range(len(first.train)))]
    stale = tmp_path / "c" / ".build-0123-dead"
    stale.mkdir()
    (stale / ".lock").write_text("")
    tokens = first.prepared.store.path / "tokens.bin"
    tokens.with_name("cut").write_bytes(tokens.read_bytes()[:-4])
    tokens.with_name("cut").replace(tokens)  # (the first store keeps mapping the whole file)
    again = load_run_data(d, tok, "reward", seed=0)
    assert again.prepared and again.prepared.built and not stale.exists()
    assert [s.tolist() for s in again.train.sequences(range(len(again.train)))] == pairs
    with pytest.raises(DataError, match="row 3: field 'chosen': empty text"):
        rows = _formats(generate_rows(10, 7))["standard"]
        rows[2]["chosen"] = " "
        load_run_data(dataclasses.replace(d, path=str(write_jsonl(tmp_path / "e.jsonl", rows))),
                      tok, "reward", seed=0)  # fmt: skip
    assert os.listdir(tmp_path / "c") == [first.fingerprint["key"]]


@pytest.mark.slow
def test_a_full_disk_fails_the_build_in_one_line_and_leaves_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small = tmp_path / "small"
    small.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        path = write_jsonl(tmp_path / "d.jsonl", _formats(generate_rows(400, 8))["standard"])
        with pytest.raises(SystemExit) as exit_:
            prepare_main([f"data.path={path}", "data.eval_fraction=0.1",
                          f"data.cache_dir={small}"])  # fmt: skip
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"rmtrain prepare: error: {small}: cannot write the data cache (")
        assert "No space left on device" in err
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=False)
