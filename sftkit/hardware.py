"""What this machine has to train on: accelerators, bf16, GPU memory, the CPUs this process may use."""

from __future__ import annotations

import os


def has_accelerator() -> bool:
    import torch

    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def bf16_supported() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def gpu_count() -> int:
    """CUDA GPUs this process can see."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_memory() -> int | None:
    """Bytes on one of this machine's CUDA GPUs (a node's GPUs are alike); None without one."""
    import torch

    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def usable_cpus() -> int:
    """CPUs this process may run on (a container's or a job scheduler's share), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
