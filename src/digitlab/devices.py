"""Where the work runs: device choice, numeric precision, threads, and torch.distributed ranks."""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from digitlab.errors import DigitlabError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# The tensor type of each resolved precision.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
T = TypeVar("T")


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then the CPU; `cuda`, `cuda:N`, `mps`, `cpu` are explicit."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank() if is_distributed() else 0)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DigitlabError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DigitlabError(f"device {name!r} asked for, but CUDA is not available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DigitlabError(
            f"device {name!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DigitlabError(f"device {name!r} asked for, but Apple MPS is not available; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise DigitlabError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether the device runs bfloat16 matrix work natively (AVX-512 BF16/AMX, or a recent GPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn `auto` into the faster precision for the device (see `choose_precision`); check explicit choices."""
    return choose_precision(precision, device)[0]


def choose_precision(precision: str, device: torch.device, graphed: bool = False) -> tuple[str, str]:
    """The precision to run in, and why, as `digitlab train` reports it.

    `auto` means bf16 where the hardware runs it natively and the work is bound
    by arithmetic: a CPU with AVX-512 BF16 or AMX, or a GPU whose training step
    is one CUDA graph (`graphed`). A CPU without native bf16 emulates it several
    times slower, and a GPU launching the step's kernels one by one is bound by
    the launches, so bf16's extra casts only add work there: fp32.
    """
    if precision not in PRECISIONS:
        raise DigitlabError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise DigitlabError("fp16 autocast is for CUDA devices; use --precision bf16 or fp32 here")
    if precision != "auto":
        return precision, "chosen with --precision"
    if device.type == "cuda" and graphed and native_bf16(device):
        return "bf16", "this GPU runs bf16 natively, and the step is one CUDA graph, so arithmetic is what costs"
    if device.type != "cpu":
        return "fp32", f"on {device.type.upper()} step by step this small network is launch-bound, and bf16 casts only add work"
    if native_bf16(device):
        return "bf16", "this CPU runs bf16 natively"
    return "fp32", "this CPU has no native bf16, and emulating it is several times slower"


def autocast(precision: str, device: torch.device, cache: bool = True) -> AbstractContextManager:
    """The autocast context for a resolved precision (`fp32` means none); `cache=False` inside a CUDA graph."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision], cache_enabled=cache)


def set_threads(threads: int | None) -> None:
    """Use `threads` intra-op threads (default: PyTorch's choice, one per physical core)."""
    if threads is None:
        return
    if threads < 1:
        raise DigitlabError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)


@contextmanager
def fewer_threads(threads: int) -> Iterator[None]:
    """Use at most `threads` intra-op threads inside the block (worker processes need the other cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, before)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache  # a process-wide setting: once is enough
def keep_freed_memory() -> None:
    """Let the process reuse the memory a training step frees instead of handing it back to the OS.

    A step allocates and frees activations of up to a few MB. By default glibc
    serves such blocks with fresh mmaps and returns them when freed, so every
    step faults its activations in anew, a page at a time, which is costly on
    virtual machines. Raising the mmap and trim thresholds keeps them in the
    heap for the next step. Only glibc has these settings; elsewhere this does nothing.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)  # glibc's largest allowed value
    libc.mallopt(_M_TRIM_THRESHOLD, 1024 * 1024 * 1024)


# torch.distributed, as launched by torchrun (which sets RANK, WORLD_SIZE and LOCAL_RANK).


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(device: torch.device) -> Ranks:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA); single process otherwise."""
    if not is_distributed():
        return Ranks()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return Ranks(dist.get_rank(), dist.get_world_size())


def _several_ranks() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (a no-op in a single process)."""
    if _several_ranks():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(value: T) -> T:
    """Rank 0's value on every rank (the value itself in a single process)."""
    if not _several_ranks():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics), as DDP does before each forward."""
    if _several_ranks():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown_distributed() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()
