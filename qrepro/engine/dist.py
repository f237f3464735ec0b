"""Multi-process training with PyTorch DDP: process-group setup from the launcher's environment and the few
collectives the rest of qrepro needs. Every function is the identity / a no-op in a single process.

Launchers: ``torchrun --nproc_per_node=N -m qrepro.train ...``, or Hydra's submitit launcher with
``tasks_per_node > 1`` (the torch variables derived with ``submitit.helpers.TorchDistributedEnvironment``).
What stays identical across ranks and why (parameters, buffers, per-rank scalars): docs/scaling.md.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from qrepro.errors import QreproError
from qrepro.hooks import Context, Hook


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return _initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if _initialized() else 1


def rank() -> int:
    return dist.get_rank() if _initialized() else 0


def is_main() -> bool:
    """Rank 0 (or a single process): the only rank that prints, logs, checkpoints and writes records."""
    return rank() == 0


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_from_submitit() -> None:
    """Under submitit with several tasks, export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* for ``env://``."""
    if "WORLD_SIZE" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return
    try:
        from submitit import JobEnvironment  # optional: only present with the slurm extra
        from submitit.helpers import TorchDistributedEnvironment

        if JobEnvironment().num_tasks <= 1:
            return
    except (ImportError, RuntimeError):  # no slurm extra, or not inside a submitit job
        return
    # keep every GPU visible: the device is picked from LOCAL_RANK below, whatever SLURM's binding
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def select_device(name: str | None) -> torch.device:
    """``trainer.device`` (auto | cpu | cuda | cuda:k) for a single process; a missing GPU is one line."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QreproError(f"trainer.device={name} but no CUDA GPU is available; use trainer.device=cpu")
    return dev


def setup(device: str | None) -> DistEnv:
    """Initialise the process group from the launcher's environment (no-op for a single process). ``device`` is
    ``trainer.device``; under several processes each rank takes ``cuda:<local_rank mod #GPUs>`` with NCCL, or the
    CPU with gloo (``trainer.device=cpu``)."""
    _env_from_submitit()
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if _initialized():  # a caller (tests, a notebook) made the group already
        r, ws = dist.get_rank(), dist.get_world_size()
        lr = int(os.environ.get("LOCAL_RANK", r))
        backend = dist.get_backend()
        dev = _rank_device(device, lr) if backend == "nccl" else torch.device("cpu")
        return DistEnv(r, lr, ws, dev, backend)
    if ws <= 1:
        return DistEnv(device=select_device(device))
    if not dist.is_available():
        raise QreproError("WORLD_SIZE>1 but this torch build has no torch.distributed; run a single process")
    r, lr = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = _rank_device(device, lr)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
    # one group for the life of the process: a Hydra multirun under torchrun runs its jobs one after the other
    # in the same processes and reuses it (re-creating a group under torchrun's store hangs)
    atexit.register(_destroy)
    return DistEnv(r, lr, ws, dev, backend)


def _rank_device(device: str | None, local_rank: int) -> torch.device:
    dev = select_device(device)  # one GPU per rank, whatever index was asked for
    return torch.device("cuda", local_rank % torch.cuda.device_count()) if dev.type == "cuda" else dev


def _destroy() -> None:
    if _initialized():
        dist.destroy_process_group()


def per_rank_batch(global_batch: int, world: int, accumulate: int = 1) -> int:
    """``trainer.batch_size`` is the global batch; each rank takes an equal share of it, which
    ``trainer.accumulate`` = N splits into N equal micro-batches."""
    if global_batch % world:
        raise QreproError(
            f"trainer.batch_size={global_batch} is not divisible by the {world} processes; "
            f"use a multiple of {world} (it is the global batch, split evenly across ranks)"
        )
    if (global_batch // world) % accumulate:
        raise QreproError(
            f"trainer.batch_size={global_batch} over {world} processes is {global_batch // world} per process, "
            f"not divisible by trainer.accumulate={accumulate}; use a batch size that is a multiple of "
            f"{world * accumulate} or another trainer.accumulate"
        )
    return global_batch // world


def use_sync_bn(requested: bool, env: DistEnv) -> bool:
    """Whether to convert BatchNorm layers to SyncBatchNorm (``trainer.sync_bn``): only with several ranks on GPUs."""
    if not requested or env.world_size <= 1:
        return False
    if env.device.type == "cpu":
        raise QreproError(
            "trainer.sync_bn=true needs GPUs (torch's SyncBatchNorm has no CPU kernel); drop it with trainer.device=cpu"
        )
    return True


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks, returned as a new tensor (``t`` itself in a single process)."""
    if not is_distributed():
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Element-wise mean over ranks (floating ``t``); a new tensor, ``t`` itself in a single process."""
    return all_reduce_sum(t) / dist.get_world_size() if is_distributed() else t


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``t`` in place with rank ``src``'s value (CPU tensors too under NCCL, e.g. Adam's ``step``)."""
    if not is_distributed():
        return t
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        tmp = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.broadcast(tmp, src)
        t.copy_(tmp)
    else:
        dist.broadcast(t, src)
    return t


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def sync_module_state(module: nn.Module, params: bool = True, buffers: bool = True, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and/or buffers into every rank's module (in place, no autograd)."""
    if not is_distributed():
        return
    tensors = ([p.data for p in module.parameters()] if params else []) + (list(module.buffers()) if buffers else [])
    with torch.no_grad():
        for t in tensors:
            broadcast_(t, src)


def sync_optimizer_state(optimizer: torch.optim.Optimizer, src: int = 0) -> None:
    """Copy rank ``src``'s optimizer state tensors (momentum, Adam moments, ...) into every rank's optimizer."""
    if not is_distributed() or optimizer is None:
        return
    with torch.no_grad():
        for st in (optimizer.state.get(p, {}) for g in optimizer.param_groups for p in g["params"]):
            for k in sorted(st):
                if isinstance(st[k], torch.Tensor):
                    broadcast_(st[k], src)


def sync_buffers(module: nn.Module) -> None:
    """Rank 0's buffers everywhere (BN/quantizer running statistics), e.g. before an all-reduced evaluation."""
    sync_module_state(module, params=False, buffers=True)


def _fingerprint(t: torch.Tensor) -> torch.Tensor:
    x = t.detach().reshape(-1).to(torch.float64)
    ramp = torch.arange(1, x.numel() + 1, device=x.device, dtype=torch.float64) % 97 + 1
    return torch.stack([x.sum(), (x * x).sum(), (x * ramp).sum()])


def out_of_sync(module: nn.Module, buffers: bool = False) -> list[str]:
    """Names of parameters (and buffers) whose values differ between ranks (all ranks get the same list)."""
    if not is_distributed():
        return []
    named = list(module.named_parameters()) + (list(module.named_buffers()) if buffers else [])
    if not named:
        return []
    with torch.no_grad():
        fp = torch.stack([_fingerprint(t) for _, t in named])
        hi, lo = fp.clone(), fp.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        differ = (hi != lo).any(dim=1).cpu().tolist()
    return [name for (name, _), d in zip(named, differ) if d]


class DistributedSync(Hook):
    """Keeps the replicas identical where DDP alone would not (docs/scaling.md, "Quantizer state across ranks"):
    rank 0's parameters and buffers broadcast after the method's ``on_train_start`` hooks (calibration on each
    rank's own first batch), again with the optimizer state after the first step (lazy initialisation in the first
    forward; coupled weight decay in the momentum), and a fingerprint of every parameter compared at each epoch end.
    """

    def __init__(self) -> None:
        self.first_step: int | None = None

    def on_train_start(self, ctx: Context) -> None:
        sync_module_state(ctx.model)
        self.first_step = ctx.step + 1

    def on_step_end(self, ctx: Context, step: int) -> None:
        if step == self.first_step:
            sync_module_state(ctx.model)
            sync_optimizer_state(ctx.optimizer)

    def on_epoch_end(self, ctx: Context, epoch: int) -> dict[str, float]:
        bad = out_of_sync(ctx.model)
        if bad:
            raise QreproError(
                f"parameters differ across DDP ranks after epoch {epoch + 1}: {bad[:5]}; something updates them in "
                "place from per-rank data — reduce that statistic with qrepro.engine.dist.all_reduce_mean"
            )
        return {}


def wrap_ddp(model: nn.Module, env: DistEnv, find_unused_parameters: bool = False) -> nn.Module:
    """``DistributedDataParallel(model)`` under several processes (the model itself otherwise): DDP's default
    ``broadcast_buffers`` copies rank 0's BN and quantizer buffers to every rank at each training forward, and the
    gradients of all parameters (weights and quantizer clips/scales) are averaged over ranks."""
    if env.world_size <= 1:
        return model
    ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)
