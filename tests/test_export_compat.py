"""An export loads in the oldest transformers 4.x it promises (README, "Using a trained model"),
and the seed-002 snippet runs there verbatim and gives rmtrain's score.

RLHF stacks that consume reward models often still run transformers 4.x, where
``pipeline(...)(texts, return_all_scores=True, function_to_apply="none")[0][0]["score"]`` works
(transformers 5 ignores ``return_all_scores`` and that indexing fails). This test builds a
separate virtual environment with ``transformers==LEGACY_TRANSFORMERS`` (and torch 2.13, pinned
so nothing pulls another torch), cached under ``$RMTRAIN_CACHE/venv-transformers-<version>``
(default ``~/.cache/rmtrain``), built in a temporary sibling directory renamed into place at the
end. It writes exports with ``conftest.make_export`` (both templates; a non-default RoPE theta so
a config 4.x misreads would change the score), runs the snippet in that environment in fp32
(compared with :class:`rmtrain.score.Scorer` here, within 1e-4) and in bf16 (it runs).
Runtime: first build ~45 s (pip with an empty cache; torch is the local CPU wheel), then ~15 s.

Checked by hand the same way: 4.34.1, 4.35.2, 4.36.2, 4.38.2, 4.40.2, 4.46.3, 4.57.6 (fp32
scores equal). Before 4.34 there is no ``apply_chat_template``. In 4.40.x and 4.41.x the bf16 run
fails in transformers itself (the text-classification pipeline calls ``.numpy()`` on bf16 logits:
"Got unsupported ScalarType BFloat16"; 4.39 cast them to fp32 on CPU, 4.42 does again); fp32
works there. What 4.x needs from an export written by transformers 5: :func:`rmtrain.hf.
add_legacy_keys`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from typing import Any

import pytest
from conftest import make_export
from realmodel import LEGACY_TRANSFORMERS, RegistryUnreachable, legacy_venv

pytestmark = pytest.mark.slow

ROPE_THETA = 500000.0  # Llama-3's; 4.x's default is 10000
CHAT = [
    {"role": "user", "content": "How do I bake bread?"},
    {"role": "assistant", "content": "Mix flour, water and yeast, then bake."},
]

# The seed-002 snippet, verbatim (`path`, `tok`, `chat` set before it; the dtype is substituted).
SNIPPET = """\
rm_pipe = pipeline("sentiment-analysis", model=path, tokenizer=tok, device="cpu", model_kwargs={"torch_dtype": torch.bfloat16})
text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=False).replace(tok.bos_token, "")
score = rm_pipe([text], return_all_scores=True, function_to_apply="none", batch_size=1)[0][0]["score"]
"""  # noqa: E501


def _script(cases: list[tuple[str, str, str]]) -> str:
    """One process runs the snippet for every (name, export path, dtype)."""
    lines = [
        "import json, torch, transformers",
        "from transformers import AutoTokenizer, pipeline",
        f"chat = {CHAT!r}",
        "results = {}",
    ]
    for name, path, dtype in cases:
        lines += [
            f"path = {path!r}",
            "tok = AutoTokenizer.from_pretrained(path)",
            SNIPPET.replace("torch.bfloat16", f"torch.{dtype}"),
            f"results[{name!r}] = dict(text=text, score=score, "
            "dtype=str(rm_pipe.model.dtype), rope_theta=rm_pipe.model.config.rope_theta)",
        ]
    lines.append("print('RESULTS ' + json.dumps({'version': transformers.__version__, **results}))")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def legacy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    try:
        venv = legacy_venv()
    except RegistryUnreachable as exc:
        pytest.skip(f"cannot build the transformers {LEGACY_TRANSFORMERS} environment: {exc}")
    root = tmp_path_factory.mktemp("export_compat")
    exports = {t: make_export(root / t, t, rope_theta=ROPE_THETA) for t in ("safe_rlhf", "chat")}
    cases = [
        (f"{t}/{dtype}", str(path), dtype)
        for t, path in exports.items()
        for dtype in ("float32", "bfloat16")
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-c", _script(cases)],
        capture_output=True, text=True, timeout=600, env=env, cwd=root,
    )  # fmt: skip
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert proc.returncode == 0 and line, (
        f"the snippet failed in transformers {LEGACY_TRANSFORMERS} (exit {proc.returncode}):\n"
        f"{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"
    )
    return {"exports": exports, **json.loads(line.removeprefix("RESULTS "))}


@pytest.mark.parametrize("template", ["safe_rlhf", "chat"])
def test_seed002_snippet_in_legacy_transformers(legacy: dict[str, Any], template: str) -> None:
    from rmtrain.scoring import Scorer

    assert legacy["version"] == LEGACY_TRANSFORMERS
    scorer = Scorer(legacy["exports"][template])
    fp32, bf16 = legacy[f"{template}/float32"], legacy[f"{template}/bfloat16"]
    # The snippet's text is the text rmtrain trains on and scores ...
    assert fp32["text"] == scorer.messages_text(CHAT)
    # ... the config is read as written (RoPE theta: 4.x defaults to 10000) ...
    assert fp32["rope_theta"] == ROPE_THETA
    assert (fp32["dtype"], bf16["dtype"]) == ("torch.float32", "torch.bfloat16")
    # ... and the score is rmtrain's.
    expected = scorer.score_texts([fp32["text"]])[0]
    assert abs(fp32["score"] - expected) <= 1e-4, (fp32["score"], expected)
    assert math.isfinite(bf16["score"]) and abs(bf16["score"] - expected) <= 0.05, bf16
