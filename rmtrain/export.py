"""`rmtrain export <run dir | checkpoints dir | checkpoint>`: the transformers export of a saved
checkpoint (ZeRO-3 included), without training and without a process group.

Everything it needs is in the checkpoint: the weights, the model config and tokenizer (`hf/`) and
the run record in the marker; the original model directory and the network are not needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from rmtrain import engine
from rmtrain.card import write_export
from rmtrain.checkpoint import HF_DIR, MARKER, Marker, resolve_checkpoint
from rmtrain.errors import UserError
from rmtrain.files import no_space


def export_checkpoint(
    path: Path, out: Path | None = None, max_shard_size: str | None = None
) -> Path:
    ckpt = resolve_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"{path}: no complete rmtrain checkpoint (looked for {MARKER})")
    record = Marker.read(ckpt).record()
    state_dict = engine.consolidate_checkpoint(ckpt)
    model_config = AutoConfig.from_pretrained(ckpt / HF_DIR)
    tokenizer = AutoTokenizer.from_pretrained(ckpt / HF_DIR)
    out = out or ckpt.parent.parent / f"export_{ckpt.name}"
    return write_export(record, state_dict, model_config, tokenizer, out, max_shard_size)


def main() -> None:
    parser = argparse.ArgumentParser(prog="rmtrain export", description=__doc__)
    parser.add_argument(
        "path", type=Path, help="run directory, checkpoints directory or checkpoint"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="export directory (default: <run dir>/export_<checkpoint>)",
    )
    parser.add_argument(
        "--max-shard-size", default=None, help='e.g. "5GB" (default: the run setting)'
    )
    args = parser.parse_args()
    try:
        export_checkpoint(args.path, args.out, args.max_shard_size)
    except (FileNotFoundError, ValueError, UserError) as err:
        print(f"rmtrain export: error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        full = no_space(err, args.out or args.path, None)
        if full is None:
            raise
        print(f"rmtrain export: error: {full}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
