"""`rmtrain serve`: an exported reward model behind HTTP, for RL loops.

- :mod:`rmtrain.serve.protocol`: the request bodies (OpenRLHF's ``/get_reward``, vLLM's
  ``/classify``, rmtrain's ``/score``) and the error shape;
- :mod:`rmtrain.serve.batcher`: dynamic, batch-invariant batching over one or more replicas;
- :mod:`rmtrain.serve.server`: the FastAPI application and the command line.

The server needs the ``serve`` extra (FastAPI, uvicorn); :func:`main` says so when it is
missing instead of failing on an import.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        print(
            f"rmtrain serve: error: {' and '.join(missing)} missing; install the serve extra: "
            "pip install 'rmtrain[serve]'",
            file=sys.stderr,
        )
        sys.exit(2)
    from rmtrain.serve.server import main as serve

    serve(argv)
