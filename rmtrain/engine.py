"""Everything that touches DeepSpeed or torch.distributed lives here, and only here.

- `init_distributed` starts the process group (gloo on CPU, nccl on GPU) under any launcher,
  or as a world of one when started without one.
- `build_ds_config` derives the DeepSpeed JSON from the typed config: the batch sizes are written
  once in `trainer.*`; DeepSpeed derives the global batch from them and the world size, as
  `batching.BatchPlan` does.
- `Engine` wraps the DeepSpeed engine: forward/backward/step, gathering full weights (ZeRO-3
  too), checkpoints, and the few collectives the trainer needs.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import importlib
import math
import os
import pickle
import re
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from transformers.integrations.deepspeed import HfDeepSpeedConfig

from rmtrain.config import Config


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read safely; the message names the file."""


# The only globals (besides tensors and plain containers) DeepSpeed's checkpoint files hold,
# found by saving ZeRO 0-3, fp32 and bf16: anything else is refused, so a planted pickle payload
# never runs.
def _deepspeed_safe_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # numpy arrays (RNG state of checkpoints written before the state became plain lists): an
    # array is rebuilt from its dtype and bytes, nothing is called.
    from numpy._core.multiarray import _reconstruct  # type: ignore[attr-defined]

    numpy_array = [_reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, *numpy_array]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Make every `torch.load` inside (DeepSpeed's own loaders too, which pass
    weights_only=False) a `weights_only=True` load that accepts only DeepSpeed's few globals.

    A file that needs anything else raises CheckpointError naming the file."""
    real_load = torch.load

    def safe_load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return real_load(f, *args, **kwargs)
        except pickle.UnpicklingError as err:
            found = re.search(r"[Uu]nsupported (GLOBAL|global|operand)[^\n]*", str(err))
            what = found.group(0).strip().rstrip(".") if found else type(err).__name__
            raise CheckpointError(
                f"{f}: refused to load: it holds something a checkpoint never holds and that "
                f"could run code ({what})"
            ) from None
        except (RuntimeError, EOFError, OSError) as err:
            raise CheckpointError(f"{f}: unreadable checkpoint file ({err})") from None

    torch.load = safe_load  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = real_load


def no_space(err: BaseException, path: Path, last_good: Path | None) -> CheckpointError | None:
    """The one-line error for a write that failed because the disk is full (None otherwise).

    torch.save reports a full disk as a RuntimeError about file positions, safetensors as its own
    error: besides ENOSPC, a failed write on a disk left with almost no free space counts."""
    full = getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err)
    if not full:
        where = Path(path)
        while not where.exists() and where != where.parent:
            where = where.parent
        with contextlib.suppress(OSError):
            full = shutil.disk_usage(where).free < 16 * 2**20
    if not full:
        return None
    good = f"the last good checkpoint is {last_good}" if last_good else "there is no checkpoint"
    return CheckpointError(f"no space left on device at {path}; {good}")


PREEMPTED_EXIT = 75
"""Exit code of every rank that saved a checkpoint and stopped on SIGTERM / SIGUSR1 (EX_TEMPFAIL:
try again; launch/slurm.sbatch requeues the job on it)."""


class Stopped(Exception):
    """A stop was requested (a signal, or the launcher exited); a checkpoint was saved."""

    def __init__(self, reason: str, step: int, path: Path) -> None:
        super().__init__(
            f"stopped at step {step} ({reason}); checkpoint {path}; continue with "
            "trainer.resume=auto"
        )
        self.step, self.path = step, path


class StopRequest:
    """SIGTERM / SIGUSR1 (what SLURM sends before preemption), or this rank's launcher exiting,
    become a request the checkpointer acts on at the next step boundary: every rank saves, then
    raises Stopped. A rank whose launcher is gone also ends itself after `grace_s` regardless,
    so ranks never outlive their launcher."""

    def __init__(self, grace_s: float = 120.0) -> None:
        self.reason: str | None = None
        self.grace_s = grace_s
        self._previous: dict[int, Any] = {}

    def install(self) -> StopRequest:
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                self._previous[sig] = signal.signal(sig, self._on_signal)
        launcher = _launcher_pid()
        if launcher is not None:
            _die_with_parent()
            threading.Thread(target=self._watch, args=(launcher,), daemon=True).start()
        return self

    def uninstall(self) -> None:
        """Give the signals back (a run inside a longer-lived process: a multirun, tests)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.reason = signal.Signals(signum).name

    def _watch(self, pid: int) -> None:
        while _alive(pid):
            time.sleep(1.0)
        self.reason = self.reason or f"the launcher (pid {pid}) exited"
        time.sleep(self.grace_s)
        print(f"rmtrain: error: {self.reason}; ending this rank", file=sys.stderr, flush=True)
        os._exit(1)

    def stopped(self, step: int, path: Path) -> None:
        raise Stopped(self.reason or "stop requested on another rank", step, path)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _launcher_pid() -> int | None:
    """The outermost launcher process above this rank (deepspeed runner, torchrun), if any."""
    found, pid = None, os.getppid()
    for _ in range(4):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        if not any(k in cmd for k in ("deepspeed", "torchrun", "torch.distributed.run")):
            break
        found, pid = pid, int(stat.rsplit(")", 1)[1].split()[1])
    return found


def _die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the parent process dies (Linux PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def on_cpu() -> bool:
    return bool(get_accelerator().device_name() == "cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(timeout_s: int) -> DistEnv:
    """Create the process group. Without a launcher, become rank 0 of a world of one."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    world = int(os.environ["WORLD_SIZE"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if on_cpu():
        # DeepSpeed JIT-builds a shared-memory comm op inside init_distributed (~30 s on a fresh
        # machine) that gloo never uses; skip it. The deepspeed launcher also leaves
        # OMP_NUM_THREADS unset, which oversubscribes the cores with several ranks.
        ds_comm = importlib.import_module("deepspeed.comm.torch")
        ds_comm.build_shm_op = lambda: None  # type: ignore[attr-defined]
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    backend = "gloo" if on_cpu() else None
    timeout = datetime.timedelta(seconds=timeout_s)
    # Process groups DeepSpeed creates later (new_group without a timeout) take torch's default
    # (30 min), not the world's: make deepspeed.timeout_s the default for every group.
    c10d = importlib.import_module("torch.distributed.distributed_c10d")
    c10d.default_pg_timeout = timeout  # type: ignore[attr-defined]
    if not on_cpu():
        c10d.default_pg_nccl_timeout = timeout  # type: ignore[attr-defined]
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if on_cpu():
        device = torch.device("cpu")
    else:
        get_accelerator().set_device(local_rank)
        device = torch.device(get_accelerator().device_name(), local_rank)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown(exit_code: int = 0) -> None:
    """Leave the process group and exit (multi-rank runs only).

    Multi-rank gloo runs sometimes abort during interpreter shutdown (a gloo thread freeing a
    tensor after Python finalised), turning a finished run into exit code 1. A barrier,
    destroy_process_group and a hard exit after flushing avoid it. A world of one keeps its
    group: DeepSpeed caches process groups, and the next job of a Hydra multirun reuses them.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    with contextlib.suppress(Exception):
        dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def build_ds_config(cfg: Config) -> dict[str, Any]:
    t, z = cfg.trainer, cfg.deepspeed
    zero: dict[str, Any] = {"stage": z.stage}
    if z.stage >= 1:
        zero.update(overlap_comm=z.overlap_comm, reduce_bucket_size=z.reduce_bucket_size)
    if z.stage == 3:
        zero.update(
            stage3_param_persistence_threshold=z.stage3_param_persistence_threshold,
            stage3_gather_16bit_weights_on_model_save=True,
        )
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if z.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # A client torch.optim.AdamW is allowed with offload (no JIT-built CPUAdam needed on CPU).
        "zero_force_ds_cpu_optimizer": False,
    }
    if use_deepspeed_optimizer(cfg):
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": [t.adam_beta1, t.adam_beta2],
                "eps": t.adam_eps,
                "weight_decay": t.weight_decay,
            },
        }
    _deep_update(ds, z.extra)
    return ds


def use_deepspeed_optimizer(cfg: Config) -> bool:
    choice = cfg.deepspeed.optimizer
    return choice == "deepspeed" or (choice == "auto" and not on_cpu())


def _deep_update(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value


@contextlib.contextmanager
def model_init_context(ds_config: dict[str, Any]) -> Iterator[None]:
    """Build the model inside this so ZeRO-3 shards the weights while they are created/loaded.

    transformers consults a live `HfDeepSpeedConfig` in `from_pretrained` / `_from_config`.
    """
    hf_ds = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"]["stage"] == 3 else None
    try:
        yield
    finally:
        del hf_ds  # transformers keeps only a weak reference


def cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0, then a half cosine down to `min_lr_ratio` x the peak: the lr factor
    of transformers' `get_cosine_with_min_lr_schedule_with_warmup` (num_cycles=0.5), step for
    step (a test compares the two). Not imported from there: `transformers.optimization`
    imports `trainer_utils`, which imports peft, about 3 s of every launch that uses no LoRA."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, cosine * (1 - min_lr_ratio) + min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def param_groups(
    model: torch.nn.Module, weight_decay: float, decay_embeddings: bool
) -> list[dict[str, Any]]:
    """AdamW groups as transformers' Trainer and TRL make them: weight decay on matrices only;
    biases and norm weights (1-D) never decay, embeddings only when asked for. Shapes come from
    `ds_shape` when ZeRO-3 has already partitioned a parameter."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        matrix = len(getattr(p, "ds_shape", p.shape)) >= 2
        if matrix and (decay_embeddings or id(p) not in embeddings):
            decay.append(p)
        else:
            no_decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class Engine:
    """A DeepSpeed engine plus the collectives the trainer needs."""

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: Config,
        ds_config: dict[str, Any],
        env: DistEnv,
        total_steps: int,
    ) -> None:
        t = cfg.trainer
        self.env = env
        self.stage = ds_config["zero_optimization"]["stage"]
        optimizer: torch.optim.Optimizer | None = None
        groups = param_groups(model, t.weight_decay, t.weight_decay_embeddings)
        if not use_deepspeed_optimizer(cfg):
            # fused: one multi-tensor kernel per step instead of a loop over tensors (the CPU
            # kernel too; it is what TRL's default `adamw_torch_fused` uses).
            optimizer = torch.optim.AdamW(
                groups,
                lr=t.lr,
                betas=(t.adam_beta1, t.adam_beta2),
                eps=t.adam_eps,
                weight_decay=t.weight_decay,
                fused=True,
            )

        def schedule(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
            warmup = int(t.warmup_ratio * total_steps)
            return cosine_schedule(opt, warmup, total_steps, t.min_lr_ratio)

        self.ds, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=groups if optimizer is None else None,
            optimizer=optimizer,
            lr_scheduler=schedule,
            config=ds_config,
            dist_init_required=False,
        )

    # -- training -------------------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module  # type: ignore[no-any-return]

    def forward(self, **batch: torch.Tensor) -> Any:
        return self.ds(**{k: v.to(self.env.device) for k, v in batch.items()})

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        self.ds.step()

    def train(self, mode: bool = True) -> None:
        self.ds.train(mode)

    @property
    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    @property
    def grad_norm(self) -> float | None:
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    # -- weights ----------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full weights on rank 0 (None elsewhere). Every rank must call this.

        Under ZeRO-3 `module.state_dict()` holds empty shards, so the parameters are gathered.
        """
        if self.stage == 3:
            sd = self.ds._zero3_consolidated_16bit_state_dict()
        else:
            sd = self.module.state_dict() if self.env.is_main else None
        if sd is None or not self.env.is_main:
            return None
        return {k: v.detach().to("cpu").clone().contiguous() for k, v in sd.items()}

    # -- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self, directory: Path, tag: str, client_state: dict[str, Any]) -> None:
        self.ds.save_checkpoint(str(directory), tag=tag, client_state=client_state)

    def load_checkpoint(self, directory: Path, tag: str) -> dict[str, Any]:
        with weights_only_loads():
            path, client_state = self.ds.load_checkpoint(
                str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        if path is None:
            raise CheckpointError(f"no DeepSpeed checkpoint {tag!r} in {directory}")
        return dict(client_state or {})

    def set_peak_lr(self, lr: float) -> None:
        """Use `lr` as the schedule's peak from now on (a resume with a changed trainer.lr: the
        loaded scheduler state would otherwise keep the old one)."""
        sched = self.ds.lr_scheduler
        sched.base_lrs = [lr for _ in sched.base_lrs]
        for group, fn in zip(sched.optimizer.param_groups, sched.lr_lambdas, strict=True):
            group["initial_lr"] = lr
            group["lr"] = lr * fn(sched.last_epoch)

    def weights_finite(self) -> bool:
        """Whether every rank's (local shard of the) weights is finite. Every rank must call."""
        bad = 0.0
        for p in self.module.parameters():
            local = getattr(p, "ds_tensor", p.data)
            if local.numel() and not bool(torch.isfinite(local).all()):
                bad = 1.0
                break
        return float(all_reduce_sum(torch.tensor([bad]))[0]) == 0.0

    def close(self) -> None:
        if self.stage == 3:
            self.ds.destroy()


def consolidate_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a checkpoint of any ZeRO stage, precision and world size, in one
    process and without an engine: DeepSpeed's own zero_to_fp32 merges the ZeRO 1-3 partitions
    (`zero_pp_rank_*` files, `bf16_zero_pp_rank_*` under bf16); a ZeRO-0 checkpoint holds the
    whole module in its model-states file."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loads():
        if any(path.glob("*zero_pp_rank_*_optim_states.pt")):
            sd = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
        else:
            sd = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu")["module"]
    return {k: v.detach().float().clone().contiguous() for k, v in sd.items()}


# -- collectives ------------------------------------------------------------------------------
def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a float tensor over ranks (float64 on CPU so counts stay exact)."""
    out = values.detach().to("cpu", torch.float64)
    if dist.get_world_size() > 1:
        dev = out if on_cpu() else out.to(get_accelerator().current_device_name())
        dist.all_reduce(dev)
        out = dev.cpu()
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value of `obj` on every rank."""
    holder = [obj]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_object(obj: Any) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0 (None on the other ranks)."""
    if dist.get_world_size() == 1:
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.get_world_size() > 1:
        dist.barrier()
