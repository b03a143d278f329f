"""The `rmtrain` console command: `rmtrain <command> [args]`.

`train` hands the rest of the command line to Hydra (`rmtrain train trainer.lr=1e-5 ...`); the
other commands parse their own arguments (`rmtrain <command> --help`).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("rmtrain.train", "train and export a reward model (args: Hydra overrides)"),
    "prepare": (
        "rmtrain.prepare",
        "tokenize a run's data into the data cache ahead of time (args: train's overrides)",
    ),
    "export": ("rmtrain.export", "write the transformers export of a saved run or checkpoint"),
    "score": ("rmtrain.score", "score a JSONL file with an exported model"),
    "eval": (
        "rmtrain.eval.run",
        "evaluate a model on preference files (RewardBench 1 and 2, RM-Bench, PKU)",
    ),
    "serve": (
        "rmtrain.serve",
        "serve a model over HTTP for RL loops (OpenRLHF, vLLM/verl protocols)",
    ),
    "config": ("rmtrain.cli", "list every config key with its type, default and help"),
    "sample-data": ("rmtrain.toy.sample_data", "write rmtrain's generated sample dataset"),
}

USAGE = (
    "usage: rmtrain <command> [args]\n\ncommands:\n"
    + "\n".join(f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items())
    + "\n\nexample: rmtrain train experiment=quickstart trainer.max_steps=50\n"
)


def show_config(argv: list[str]) -> None:
    """`rmtrain config [prefix]`: the keys (optionally only those under `prefix`) and their help."""
    from rmtrain.config import field_help

    prefix = argv[0] if argv else ""
    rows = [r for r in field_help() if r[0].startswith(prefix)]
    if not rows:
        print(f"rmtrain config: error: no key starts with {prefix!r}", file=sys.stderr)
        sys.exit(2)
    for key, kind, default, help_ in rows:
        print(f"{key} ({kind}, default {default})\n    {help_}")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    command, rest = sys.argv[1], sys.argv[2:]
    if command not in COMMANDS:
        print(f"rmtrain: error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    if command == "config":
        show_config(rest)
        return
    module = importlib.import_module(COMMANDS[command][0])
    sys.argv = [f"rmtrain {command}", *rest]
    module.main()


if __name__ == "__main__":
    main()
