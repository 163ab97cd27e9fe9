"""Device, precision and DDP, decided once: the loop asks `Env` and never branches on hardware itself.

bf16 autocast on CUDA, fp32 on the CPU (bf16 autocast is 1.2x slower on one CPU measured and 1.7-1.9x faster,
and then better per minute, on the other: docs/results.md; `train.precision=bf16` asks for it);
channels_last; torch.compile on CUDA only (slower on CPU). DDP follows torchrun: its RANK/WORLD_SIZE/LOCAL_RANK
variables are the one environment read here (library code otherwise never reads the environment); gloo on CPU, NCCL
on GPU. Any torchrun launch joins a process group, one process included, so `torchrun --nproc_per_node 1` runs the
same collectives as a multi-GPU job. Gradients are all-reduced by hand after each backward (as stylegan2-ada does), so
D can be frozen during the G step without DDP's unused-parameter bookkeeping.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from medgan.config import TrainConfig


@dataclass
class Env:
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None = fp32
    compile: bool
    channels_last: bool
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False  # in a process group (any torchrun launch): collectives run, even on one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def precision(self) -> str:
        return "fp32" if self.dtype is None else "bf16"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def describe(self) -> str:
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        ddp = f", DDP {self.world_size} x {backend}" if self.distributed else ""
        return f"{self.device} {self.precision}{', compiled' if self.compile else ''}{ddp}"


def setup(cfg: TrainConfig) -> Env:
    """Pick device, precision and compile once; join the torchrun process group when launched by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    distributed = world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ  # torchrun sets it, also for one process
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    elif cfg.device == "cuda" and distributed:
        device = torch.device(f"cuda:{local_rank}")
    else:
        device = torch.device(cfg.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"train.device={cfg.device!r} but CUDA is not available; use train.device=cpu or auto")
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if distributed and not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        tdist.init_process_group(backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(minutes=30))
    if cfg.precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"train.precision={cfg.precision!r}; use auto, bf16 or fp32")
    if cfg.precision == "fp32":
        dtype = None
    elif cfg.precision == "bf16" or device.type == "cuda":
        dtype = torch.bfloat16
    else:
        dtype = None
    if cfg.compile not in ("auto", "true", "false"):
        raise ValueError(f"train.compile={cfg.compile!r}; use auto, true or false")
    compile_ = cfg.compile == "true" or (cfg.compile == "auto" and device.type == "cuda")
    return Env(device, dtype, compile_, cfg.channels_last, rank, world_size, local_rank, distributed)


def all_reduce_grads(env: Env, params: list[torch.nn.Parameter]) -> None:
    """Average gradients over ranks with one flat all-reduce (a no-op outside a process group)."""
    if not env.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    tdist.all_reduce(flat)
    flat /= env.world_size
    for g, f in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(f.view_as(g))


def all_reduce_mean(env: Env, t: torch.Tensor) -> torch.Tensor:
    if not env.distributed:
        return t
    t = t.clone()
    tdist.all_reduce(t)
    return t / env.world_size


def broadcast_module(env: Env, module: torch.nn.Module) -> None:
    """Make every rank start from rank 0's parameters and buffers."""
    if not env.distributed:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        tdist.broadcast(t.data, src=0)


def broadcast_object(env: Env, obj):
    if not env.distributed:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: Env) -> None:
    if env.distributed:
        tdist.barrier()


def cleanup(env: Env) -> None:
    if env.distributed and tdist.is_initialized():
        tdist.destroy_process_group()
