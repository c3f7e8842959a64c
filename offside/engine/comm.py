"""Every torch.distributed collective of the code base goes through here (a test checks the source).

gloo reduces tensors on the CPU; NCCL only on the rank's GPU ("No backend type associated with
device type cpu"), and its object collectives pickle into a tensor on `torch.cuda.current_device()`,
so a rank that has not set its device first sends from cuda:0 (a duplicate-GPU error or a hang).
So a tensor collective here moves its tensor to the device the group's backend serves and the result
back to where the caller had it, and an object collective sets the rank's GPU first under NCCL.

Outside a process group (or in a world of one) every function is the identity: one code path."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def active() -> bool:
    """In a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def rank_cuda_device() -> torch.device:
    """This rank's GPU: cuda:$LOCAL_RANK (a launcher's or Ray Train's local rank), as `model.device: auto`."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def backend_device() -> torch.device:
    """The device the process group's backend communicates from: the rank's GPU for NCCL (made the
    current CUDA device), the CPU for gloo (and any other backend)."""
    if dist.get_backend() == "nccl":
        device = rank_cuda_device()
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over ranks, on the caller's device (a new tensor; `tensor` is unchanged)."""
    if not active():
        return tensor.clone()
    moved = tensor.detach().to(backend_device(), copy=True)
    dist.all_reduce(moved)
    return moved.to(tensor.device)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(tensor) / world_size()


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank `src`'s `value` on every rank."""
    if not active():
        return value
    backend_device()
    shared = [value]
    dist.broadcast_object_list(shared, src=src)
    return shared[0]


def all_gather_objects(value: Any) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    if not active():
        return [value]
    backend_device()
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    if active():
        backend_device()
        dist.barrier()
