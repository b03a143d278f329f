"""`rmtrain prepare [hydra overrides]`: tokenize a run's data into the data cache ahead of time.

Takes the overrides `rmtrain train` takes and builds (or finds) the data cache entry that
`rmtrain train` with the same overrides maps, with a progress bar and the data-health summary
train prints (pairs, truncated, identical dropped, duplicates, train/eval overlap per split), so
a GPU job later starts in seconds. Needs no GPU and loads no model weights (only the tokenizer
and the model's config). Under a launcher (`torchrun --nproc_per_node N -m rmtrain.prepare`),
the ranks share the work; `data.num_proc` sets the processes per rank.

Exit codes: 0 done, 2 a user error (a bad config value, a bad row: file, row and field).
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Sequence
from typing import Any

from rmtrain.config import CONFIG_DIR, check_command_line, register_schemas, to_config
from rmtrain.errors import ConfigError, UserError


def compose(overrides: Sequence[str]) -> Any:
    """The run config `rmtrain train <overrides>` composes (Hydra's compose API: no run
    directory is made)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        cause = str(err.__cause__).strip().splitlines()[:1] if err.__cause__ else []
        lines = [line.strip() for line in [*str(err).splitlines(), *cause] if line.strip()]
        raise ConfigError(" ".join(lines)) from None


def peak_rss_gib() -> tuple[float, float]:
    """(this process, its largest child process) peak resident memory in GiB (Linux: KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return own, children


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children so far."""
    return sum(
        r.ru_utime + r.ru_stime
        for r in (resource.getrusage(resource.RUSAGE_SELF),
                  resource.getrusage(resource.RUSAGE_CHILDREN))
    )  # fmt: skip


def prepare(overrides: Sequence[str]) -> dict[str, Any]:
    """Build or find the data cache entry of `rmtrain train <overrides>`; returns what it
    printed as numbers (for benchmarks)."""
    from rmtrain import hf
    from rmtrain.data.assemble import cache_summary, load_run_data, summary
    from rmtrain.data.cache import Ranks

    started = time.monotonic()
    check_command_line(list(overrides))
    register_schemas()
    cfg = to_config(compose(overrides))
    ranks = Ranks()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from rmtrain import engine

        env = engine.init_distributed(cfg.deepspeed.timeout_s)
        ranks = Ranks(env.rank, env.world_size, engine.all_gather_object)
    main = ranks.rank == 0
    tokenizer, _ = hf.load_text_format(cfg)
    cpu = cpu_seconds()
    data = load_run_data(cfg.data, tokenizer, cfg.objective, cfg.trainer.seed, ranks,
                         progress=main and sys.stderr.isatty())  # fmt: skip
    assert data.prepared is not None
    store = data.prepared.store
    rss = ranks.all_gather((*peak_rss_gib(), cpu_seconds() - cpu))
    result = {
        "seconds": time.monotonic() - started,
        "data_seconds": data.prepared.seconds,
        "built": data.prepared.built,
        "pairs": len(store["hashes"]),
        "tokens": len(store["tokens"]),
        "cache_bytes": store.nbytes(),
        "entry": str(store.path),
        "peak_rss_gib": [own for own, _, _ in rss],
        "worker_peak_rss_gib": [child for _, child, _ in rss],
        "data_cpu_seconds": [cpu for _, _, cpu in rss],
    }
    if main:
        for line in summary(data.counts):
            print(line, flush=True)
        for warning in data.warnings:
            print(f"rmtrain: warning: {warning}", file=sys.stderr, flush=True)
        print(cache_summary(data.prepared), flush=True)
        peaks = ", ".join(f"rank {r}: {own:.2f} GiB" for r, (own, _, _) in enumerate(rss))
        print(f"peak RSS {peaks}", flush=True)
    return result


def shutdown() -> None:
    """Leave the process group of a multi-rank launch (exits the process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from rmtrain import engine

        engine.shutdown()


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return
    try:
        prepare(args)
    except UserError as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"rmtrain prepare: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    shutdown()


if __name__ == "__main__":
    main()
