"""Device, precision, threads and allocator choices for running networks fast on what the machine has."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from functools import lru_cache

import torch

from .errors import TlfxError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_ALLOC_BYTES = 1 << 30


@lru_cache
def cpu_flags() -> frozenset:
    """The CPU feature flags of this machine (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def cpu_has_fast_bf16() -> bool:
    """AMX-BF16 or AVX512-BF16: bf16 convolutions run several times faster than fp32 on this CPU."""
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def cpu_count() -> int:
    """Cores this process may run on (affinity / container aware where the OS says so)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def pick_device(device: str | None = None) -> torch.device:
    """``None``/"auto": the CUDA GPU when one is visible, else the CPU; refuses a GPU that is not there."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise TlfxError(f"unknown device {device!r}; valid choices: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TlfxError(f"device {device!r} asked for but no CUDA GPU is visible; use --device cpu")
    return dev


def resolve_precision(precision: str, device: torch.device, bf16_cpu: bool | None = None) -> str:
    """The compute precision actually used.

    ``auto``: bf16 on a CPU with AMX-BF16 or AVX512-BF16, fp32 on other CPUs (bf16 emulation there is slower than
    fp32); on CUDA, bf16 where the GPU supports it (Ampere and later), fp16 otherwise. An explicit choice is kept
    as given (fp16 on a CPU runs, but slower than fp32). ``bf16_cpu`` overrides the CPU flag check (tests).
    """
    if precision not in PRECISIONS:
        raise TlfxError(f"unknown precision {precision!r}; valid choices: {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    fast = cpu_has_fast_bf16() if bf16_cpu is None else bf16_cpu
    return "bf16" if fast else "fp32"


def autocast(device: torch.device, precision: str):
    """The autocast context for ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def default_workers() -> int:
    """Decoding worker processes for the DataLoader.

    0 on machines with 2 cores or fewer: there, decoding runs on threads of the main process *between* batches, with
    every core, so it never pre-empts the network's OpenMP threads mid-layer (a pre-empted thread stalls the others
    at the next barrier). With more cores, about one decoding process per four cores, at most 8; the network keeps
    the rest (see :func:`worker_init`).
    """
    n = cpu_count()
    return 0 if n <= 2 else max(1, min(8, n // 4))


def decode_threads() -> int:
    """Threads that decode a batch in the main process when there are no worker processes."""
    return max(1, min(8, cpu_count()))


def worker_init(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: one torch thread per worker, so workers never fight the network for cores."""
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


@lru_cache
def tune_allocator() -> bool:
    """Keep big activation buffers in the malloc heap instead of fresh ``mmap`` pages for every batch.

    glibc hands allocations above its mmap threshold (at most 32 MiB by default) straight back to the kernel when
    freed; a CNN frees and re-allocates tensors of 10-200 MB every batch, so each batch faults in (and zeroes) them
    again: on 2 cores that cost a quarter of the CPU as system time. Raising the thresholds to 1 GiB keeps the pages.
    Peak memory does not grow (the same buffers are reused), but it is not given back until the process ends.
    Set ``TLFX_MALLOC_TUNE=0`` to leave the allocator alone. Returns whether the settings were applied.
    """
    if os.environ.get("TLFX_MALLOC_TUNE", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _ALLOC_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, _ALLOC_BYTES))
