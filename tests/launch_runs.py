"""A test harness: several `rmtrain train` runs in ONE multi-rank launch.

For a tiny model the launcher, the imports and the process group are most of a 2-rank run's
cost, so tests that need several 2-rank runs of different configurations (the equivalence
matrix, checkpoint exports) start one launch for all of them:

    torchrun --nproc_per_node 2 tests/launch_runs.py runs.json

`runs.json` holds a list of override lists. Each rank composes every run's config with Hydra's
compose API from rmtrain's own config tree and runs it with `rmtrain.train.run` -- what
`rmtrain.train`'s entry point does for one run -- one after the other, in the same order on
every rank; the process group is made once and shut down after the last run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from rmtrain import engine, train
from rmtrain.config import register_schemas


def main() -> None:
    runs = json.loads(Path(sys.argv[1]).read_text())
    register_schemas()
    with initialize_config_dir(config_dir=str(train.CONFIG_DIR), version_base="1.3"):
        for overrides in runs:
            train.run(compose(config_name="config", overrides=overrides))
    engine.shutdown()


if __name__ == "__main__":
    main()
