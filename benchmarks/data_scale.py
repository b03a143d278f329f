"""Data preparation at scale: rmtrain's data cache vs the in-process path it replaced vs TRL.

    python benchmarks/data_scale.py [--sizes 10000 100000 1000000] [--ranks 1 2]
                                    [--runs rmtrain baseline trl] [--num-proc 1] [--to-step]
                                    [--model smollm2|DIR] [--workdir DIR] [--baseline-rev REV]

For every size, one generated file of TRL-conversational rows of realistic lengths (prompts of
30-300 words, responses of median ~180 words with a long tail up to 1,500: ~1,050 SmolLM2 tokens
per pair; generated in seeded blocks of 10,000 rows, so a smaller size is a prefix of a larger
one) is prepared with
`model.name_or_path=<SmolLM2-135M-Instruct> data.template=chat data.max_length=2048
trainer.packing=true data.eval_fraction=0.01`:

* rmtrain   -- `rmtrain prepare` (the data step `rmtrain train` runs: the data cache), on each of
               `--ranks` ranks (torchrun) with `data.num_proc=--num-proc` processes each: cold
               (an empty cache directory), then warm (the same again: the entry is found).
* baseline  -- the in-process path rmtrain had before the cache (`load_run_data` of git revision
               `--baseline-rev`, default 06bbdf7, extracted to the work directory): one process,
               every row pulled into Python, rendered and tokenized in one call, every start
               (here a first start: `datasets` converts the file to Arrow too). It holds
               ~0.13 GiB per 1,000 pairs, so it is skipped above `--baseline-max-pairs`
               (100,000).
* trl       -- TRL's RewardTrainer data preparation (`datasets.load_dataset("json")` and
               `RewardTrainer._prepare_dataset`, its own code: tokenize with `Dataset.map`, drop
               pairs over max_length), cold (empty `datasets` cache) and warm. Needs the `bench`
               extra (`pip install -e '.[bench]'`).
* --to-step -- also `rmtrain train` with the same settings, cold and warm on each of `--ranks`
               ranks: launch to the first optimizer step (`time/launch_to_first_step_s`, which
               includes imports, the tokenizer, the data, the model and DeepSpeed), stopped once
               step 1 is logged.

Every run is its own process (or `torchrun` launch) with one core per process:
`TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1`. "data s" is the data step measured inside the
process (for rmtrain: fingerprint, tokenize, merge, map and the split selection), "wall s" launch
to exit, tokens/s the stored tokens (both sides of every pair) over "data s", tokens per CPU s
the same over the CPU time the data step used (every rank and process: the work, whatever else
runs on the machine), peak RSS the
largest resident memory of each rank's process (ru_maxrss; pages of the mapped cache it touched
count), cache GiB the entry's size on disk. Timings mean something only on an otherwise idle
machine. The rows and files stay in `--workdir` (default /tmp/rmtrain-data-scale) between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ["data.template=chat", "data.max_length=2048", "trainer.packing=true",
            "data.eval_fraction=0.01"]  # fmt: skip
MAX_LENGTH = 2048

# A plain English word list; a fifth of the words get a suffix, so SmolLM2 sees ~1.4 tokens a word.
WORDS = (  # noqa: SIM905 (a list literal would be one word a line)
    "the of and to a in is it you that he was for on are with as I his they be at one have "
    "this from or had by word but what some we can out other were all there when up use your "
    "how said an each she which do their time if will way about many then them write would "
    "like so these her long make thing see him two has look more day could go come did "
    "number sound no most people my over know water than call first who may down side been "
    "now find any new work part take get place made live where after back little only round "
    "man year came show every good me give our under name very through just form sentence "
    "great think say help low line differ turn cause much mean before move right boy old too "
    "same tell does set three want air well also play small end put home read hand port "
    "large spell add even land here must big high such follow act why ask men change went "
    "light kind off need house picture try us again animal point mother world near build "
    "self earth father head stand own page should country found answer school grow study "
    "still learn plant cover food sun four between state keep eye never last let thought "
    "city tree cross farm hard start might story saw far sea draw left late run don't while "
    "press close night real life few north open seem together next white children begin got "
    "walk example ease paper group always music those both mark often letter until mile "
    "river car feet care second book carry took science eat room friend began idea fish "
    "mountain stop once base hear horse cut sure watch color face wood main enough plain "
    "girl usual young ready above ever red list though feel talk bird soon body dog family "
    "direct pose leave song measure door product black short numeral class wind question "
    "happen complete ship area half rock order fire south problem piece told knew pass since "
    "top whole king space heard best hour better true during hundred five remember step "
    "early hold west ground interest reach fast verb sing listen six table travel less "
    "morning ten simple several vowel toward war lay against pattern slow center love person "
    "money serve appear road map rain rule govern pull cold notice voice unit power town "
    "fine certain fly fall lead cry dark machine note wait plan figure star box noun field "
    "rest correct able pound done beauty drive stood contain front teach week final gave "
    "green oh quick develop ocean warm free minute strong special mind behind clear tail "
    "produce fact street inch multiply nothing course stay wheel full force blue object "
    "decide surface deep moon island foot system busy test record boat common gold possible "
    "plane stead dry wonder laugh thousand ago ran check game shape equate hot miss brought "
    "heat snow tire bring yes distant fill east paint language among"
).split()
SUFFIXES = ("ing", "ed", "ly", "ness", "ation", "able", "ful", "ment", "s", "ist")


def _text(rng: random.Random, n: int) -> str:
    out: list[str] = []
    for i in range(n):
        w = rng.choice(WORDS)
        if rng.random() < 0.2:
            w += rng.choice(SUFFIXES)
        out.append(w.capitalize() if i == 0 or out[-1].endswith(".") else w)
        if rng.random() < 0.07:
            out[-1] += "."
        elif rng.random() < 0.05:
            out[-1] += ","
    return " ".join(out) + "."


def _response_words(rng: random.Random) -> int:
    return min(max(int(rng.lognormvariate(5.19, 0.6)), 1), 1500)  # median e^5.19 ~ 180


BLOCK = 10_000  # rows are generated in seeded blocks (in parallel): size n is the first n rows


def _block(args: tuple[int, int]) -> str:
    index, rows = args
    rng = random.Random(f"data-scale:{index}")
    out = []
    for _ in range(rows):
        prompt = _text(rng, rng.randint(30, 300))
        chosen, rejected = _text(rng, _response_words(rng)), _text(rng, _response_words(rng))
        out.append(json.dumps({
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }) + "\n")  # fmt: skip
    return "".join(out)


def data_file(workdir: Path, n: int) -> Path:
    """`n` TRL-conversational rows (the first n of one seeded stream), written once."""
    from multiprocessing import Pool

    path = workdir / f"prefs-{n}.jsonl"
    if path.exists():
        return path
    tmp = path.with_suffix(".tmp")
    print(f"writing {n:,} rows to {path} ...", flush=True)
    blocks = [(i, min(BLOCK, n - i * BLOCK)) for i in range(-(-n // BLOCK))]
    with open(tmp, "w") as f, Pool() as pool:
        for text in pool.imap(_block, blocks):
            f.write(text)
    tmp.rename(path)
    return path


def model_dir(name: str) -> Path:
    if name == "smollm2":
        sys.path.insert(0, str(REPO / "tests"))
        from realmodel import smollm2_dir

        return smollm2_dir()
    path = Path(name)
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model {name}: not smollm2 or a model directory")
    return path


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
               WANDB_MODE="disabled", PYTHONUNBUFFERED="1", **extra)  # fmt: skip
    return env


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _child(args: list[str], ranks: int = 1, env: dict[str, str] | None = None) -> dict[str, Any]:
    """This script in `--child` mode (on `ranks` ranks under torchrun); its RESULT line."""
    me = [str(Path(__file__).resolve()), "--child", *args]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master_port", _free_port(), *me]  # fmt: skip
    else:
        cmd = [sys.executable, *me]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, cwd=REPO)
    wall = time.monotonic() - start
    found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not found:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(found[-1].removeprefix("RESULT "))
    result["wall_s"] = wall
    return result


# -- the children ---------------------------------------------------------------------------------
def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _cpu() -> float:
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(r.ru_utime + r.ru_stime for r in usage)


def child_rmtrain(overrides: list[str]) -> None:
    from rmtrain.prepare import prepare, shutdown

    result = prepare(overrides)
    if os.environ.get("RANK", "0") == "0":
        print("RESULT " + json.dumps(result), flush=True)
    shutdown()


def child_baseline(path: str, model: str) -> None:
    """The in-process path of rmtrain before the cache (PYTHONPATH points at that revision)."""
    from rmtrain import hf, text
    from rmtrain.config import DataConfig, ModelConfig
    from rmtrain.data.assemble import load_run_data

    tok = hf.load_tokenizer(ModelConfig(name_or_path=model))
    text.use_template(tok, "chat")
    d = DataConfig(path=path, template="chat", max_length=MAX_LENGTH, eval_fraction=0.01)
    start, cpu = time.monotonic(), _cpu()
    data = load_run_data(d, tok, "reward", 0)
    seconds, cpu = time.monotonic() - start, _cpu() - cpu
    tokens = int(data.train.lengths().sum() + data.eval.lengths().sum())
    pairs = len(data.train) + len(data.eval)
    print("RESULT " + json.dumps({"data_seconds": seconds, "tokens": tokens, "pairs": pairs,
                                  "peak_rss_gib": [_peak_rss_gib()],
                                  "data_cpu_seconds": [cpu]}), flush=True)  # fmt: skip


def child_trl(path: str, model: str) -> None:
    """TRL 1.16's RewardTrainer data preparation, its own code (`_prepare_dataset` uses nothing
    of the trainer instance)."""
    import pyarrow.compute as pc
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tok = AutoTokenizer.from_pretrained(model)
    with tempfile.TemporaryDirectory() as out:
        args = RewardConfig(output_dir=out, max_length=MAX_LENGTH, report_to="none",
                            use_cpu=True, bf16=False)  # fmt: skip
        start, cpu = time.monotonic(), _cpu()
        ds = load_dataset("json", data_files=path, split="train")
        ds = RewardTrainer._prepare_dataset(None, ds, tok, args, "train")  # type: ignore[arg-type]
        seconds, cpu = time.monotonic() - start, _cpu() - cpu
    tokens = sum(int(pc.sum(pc.list_value_length(ds.data.column(c))).as_py())
                 for c in ("chosen_ids", "rejected_ids"))  # fmt: skip
    print("RESULT " + json.dumps({"data_seconds": seconds, "tokens": tokens, "pairs": len(ds),
                                  "peak_rss_gib": [_peak_rss_gib()],
                                  "data_cpu_seconds": [cpu]}), flush=True)  # fmt: skip


# -- the runs -------------------------------------------------------------------------------------
def baseline_tree(workdir: Path, rev: str) -> Path:
    """`rmtrain/` and `configs/` of git revision `rev`, extracted once."""
    dest = workdir / f"baseline-{rev}"
    if not (dest / "rmtrain").is_dir():
        archive = subprocess.run(["git", "archive", rev, "rmtrain", "configs"], cwd=REPO,
                                 capture_output=True, check=True).stdout  # fmt: skip
        tmp = Path(tempfile.mkdtemp(dir=workdir))
        with tarfile.open(fileobj=__import__("io").BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        tmp.rename(dest)
    return dest


def to_step(overrides: list[str], ranks: int, out: Path) -> float:
    """`rmtrain train` until step 1 is logged: its launch-to-first-step seconds."""
    args = [*overrides, f"output_dir={out}", "trainer.max_steps=1000", "trainer.log_every=1",
            "trainer.eval_every=0", "trainer.eval_at_start=false", "trainer.save_every=0",
            "trainer.save_every_minutes=0",
            "trainer.micro_batch_size=1", "trainer.export=false", "logger=none"]  # fmt: skip
    env = _env(RMTRAIN_LAUNCH_TIME=str(time.time()), NPROC=str(ranks), LAUNCHER="torchrun")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = ["bash", str(REPO / "launch" / "cpu.sh"), *args] if ranks > 1 else [
        sys.executable, "-m", "rmtrain.train", *args]  # fmt: skip
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True)  # fmt: skip
        metrics = out / "metrics.jsonl"
        try:
            while proc.poll() is None:
                time.sleep(1)
                for line in metrics.read_text().splitlines() if metrics.exists() else []:
                    row = json.loads(line)
                    if "time/launch_to_first_step_s" in row:
                        return float(row["time/launch_to_first_step_s"])
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    raise SystemExit(f"rmtrain train ended before step 1 (exit {proc.returncode}): see {log}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--runs", nargs="+", default=["rmtrain", "baseline", "trl"],
                   choices=["rmtrain", "baseline", "trl"])  # fmt: skip
    p.add_argument("--num-proc", type=int, default=1, help="data.num_proc of the rmtrain runs")
    p.add_argument("--to-step", action="store_true", help="also time rmtrain train to step 1")
    p.add_argument("--model", default="smollm2", help="smollm2 (default) or a model directory")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/rmtrain-data-scale"))
    p.add_argument("--baseline-rev", default="06bbdf7", help="rmtrain before the data cache")
    p.add_argument("--keep", action="store_true", help="keep the cache entries afterwards")
    p.add_argument("--baseline-max-pairs", type=int, default=100_000,
                   help="skip the baseline above this size (it holds every pair in memory: "
                        "~0.13 GiB per 1,000 pairs)")  # fmt: skip
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = model_dir(args.model)
    rows: list[dict[str, Any]] = []

    def add(n: int, run: str, ranks: int, r: dict[str, Any]) -> None:
        r.update(pairs_in=n, run=run, ranks=ranks)
        rows.append(r)
        rss = "/".join(f"{x:.2f}" for x in r.get("peak_rss_gib", []))
        print(f"{n:>9,} {run:<22} {ranks} rank(s): data {r.get('data_seconds', 0):8.1f} s, "
              f"wall {r.get('wall_s', 0):8.1f} s, peak RSS {rss} GiB", flush=True)  # fmt: skip

    for n in args.sizes:
        path = data_file(args.workdir, n)
        overrides = [f"data.path={path}", f"model.name_or_path={model}", *SETTINGS,
                     f"data.num_proc={args.num_proc}"]  # fmt: skip
        if "rmtrain" in args.runs:
            for ranks in args.ranks:
                cache = args.workdir / f"cache-{n}-{ranks}"
                shutil.rmtree(cache, ignore_errors=True)
                over = [*overrides, f"data.cache_dir={cache}"]
                for state in ("cold", "warm"):
                    add(n, f"rmtrain {state}", ranks, _child(["rmtrain", *over], ranks))
                if args.to_step:
                    for state in ("cold", "warm"):
                        if state == "cold":
                            shutil.rmtree(cache, ignore_errors=True)
                        out = args.workdir / f"run-{n}-{ranks}-{state}"
                        shutil.rmtree(out, ignore_errors=True)
                        seconds = to_step(over, ranks, out)
                        add(n, f"rmtrain train {state}", ranks, {"to_step_s": seconds})
                if not args.keep:
                    shutil.rmtree(cache, ignore_errors=True)
        if "baseline" in args.runs and n <= args.baseline_max_pairs:
            tree = baseline_tree(args.workdir, args.baseline_rev)
            hf_cache = args.workdir / f"hf-cache-baseline-{n}"  # a first start: JSON -> Arrow too
            shutil.rmtree(hf_cache, ignore_errors=True)
            env = _env(PYTHONPATH=str(tree), HF_DATASETS_CACHE=str(hf_cache))
            add(n, f"baseline {args.baseline_rev}", 1,
                _child(["baseline", str(path), str(model)], env=env))  # fmt: skip
            shutil.rmtree(hf_cache, ignore_errors=True)
        if "trl" in args.runs:
            hf_cache = args.workdir / f"hf-cache-{n}"
            shutil.rmtree(hf_cache, ignore_errors=True)
            env = _env(HF_DATASETS_CACHE=str(hf_cache))
            for state in ("cold", "warm"):
                add(n, f"trl {state}", 1, _child(["trl", str(path), str(model)], env=env))
            if not args.keep:
                shutil.rmtree(hf_cache, ignore_errors=True)

    print("\n| pairs | run | ranks | data s | wall s | to step 1 s | tokens/s | tokens per CPU s "
          "| peak RSS per rank GiB | cache GiB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        secs, cpu = r.get("data_seconds"), sum(r.get("data_cpu_seconds", []))
        tps = f"{r['tokens'] / secs:,.0f}" if secs and r.get("tokens") else ""
        tpc = f"{r['tokens'] / cpu:,.0f}" if cpu and r.get("tokens") and r.get("built", 1) else ""
        rss = " / ".join(f"{x:.2f}" for x in r.get("peak_rss_gib", []))
        cache = f"{r['cache_bytes'] / 2**30:.2f}" if "cache_bytes" in r else ""

        def f(key: str, r: dict[str, Any] = r) -> str:
            return f"{r[key]:.1f}" if key in r else ""

        print(f"| {r['pairs_in']:,} | {r['run']} | {r['ranks']} | {f('data_seconds')} | "
              f"{f('wall_s')} | {f('to_step_s')} | {tps} | {tpc} | {rss} | {cache} |")  # fmt: skip
    (args.workdir / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"\n(all rows: {args.workdir / 'results.json'})")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "rmtrain":
            child_rmtrain(rest)
        elif kind == "baseline":
            child_baseline(*rest)
        else:
            child_trl(*rest)
    else:
        main()
