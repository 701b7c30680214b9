"""Which device a run computes on: the one choice that both training and the workers' process group need."""

from __future__ import annotations

import ctypes
import sys

from zoo.errors import TrainingError

# glibc's mallopt parameters (malloc.h) and the values a training process runs with.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MIB = 1 << 20
_ALLOCATOR = (
    (_M_MMAP_THRESHOLD, 32 * _MIB),  # glibc's largest: blocks up to it come from the heap
    (_M_TRIM_THRESHOLD, 1024 * _MIB),  # free memory at the heap's top stays with the process
    (_M_TOP_PAD, 64 * _MIB),  # the heap grows in steps of at least this
)


def resolve_device(requested: str = "auto") -> str:
    """'auto' picks CUDA when torch can use it, else the CPU."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise TrainingError(
            "--device cuda was asked for, but torch sees no CUDA device; use --device cpu"
        )
    if requested not in ("cpu", "cuda"):
        raise TrainingError(f"unknown device {requested!r}; use auto, cpu or cuda")
    return requested


def hold_freed_memory() -> bool:
    """Keep memory that training frees for its next step, instead of returning it to the kernel.

    Every training step allocates and frees the same activation buffers. By default glibc's
    malloc gives large freed blocks back to the kernel, which must then fault in and zero every
    page again on the next step; the longer a run, the more its heap fragments and the more
    pages each step faults. `finetune --unfreeze 4`, one epoch over 6,000 cached prefixes, took
    1.12x the time per image of one over 1,500 with 3.5x the page faults of the whole run; with
    these settings the faults stay flat and the time is linear (bench/RECIPE_NOTES.md, "Memory
    returned to the kernel"). True when the allocator took them (glibc on Linux).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a C library without mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in _ALLOCATOR)
