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
import datetime
import importlib
import os
import pickle
import re
import socket
import sys
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

from rmtrain.config import DeepSpeedConfig, TrainerConfig
from rmtrain.errors import CheckpointError
from rmtrain.optim import cosine_schedule, param_groups


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


def build_ds_config(t: TrainerConfig, z: DeepSpeedConfig) -> dict[str, Any]:
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
    if use_deepspeed_optimizer(z):
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


def use_deepspeed_optimizer(z: DeepSpeedConfig) -> bool:
    choice = z.optimizer
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


class Engine:
    """A DeepSpeed engine plus the collectives the trainer needs."""

    def __init__(
        self,
        model: torch.nn.Module,
        t: TrainerConfig,
        z: DeepSpeedConfig,
        env: DistEnv,
        total_steps: int,
    ) -> None:
        """The DeepSpeed engine of `model` for `total_steps` optimizer steps: the JSON from
        `build_ds_config(t, z)`, AdamW (torch's fused one, or DeepSpeed's per `z.optimizer`)
        over `param_groups`, and the warmup-cosine schedule."""
        ds_config = build_ds_config(t, z)
        self.env = env
        self.stage = ds_config["zero_optimization"]["stage"]
        optimizer: torch.optim.Optimizer | None = None
        groups = param_groups(model, t.weight_decay, t.weight_decay_embeddings)
        if not use_deepspeed_optimizer(z):
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
