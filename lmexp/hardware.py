"""What the machine can do fast, so settings can be chosen (or questioned) by hardware."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_has_bf16_units() -> bool:
    """True where the CPU multiplies bf16 natively (AMX tiles or AVX512-BF16).

    Elsewhere (AVX2-only CPUs such as AMD Zen 3) bf16 matrix products are emulated and run
    two orders of magnitude slower than fp32.
    """
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def process_rank() -> int:
    """This process's rank in a multi-process run (set by Lightning's launcher, torchrun or SLURM)."""
    for variable in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if os.environ.get(variable, "").isdigit():
            return int(os.environ[variable])
    return 0


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), for run records and benchmark tables."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def check_device(device: str) -> torch.device:
    """The torch device a ``--device`` flag names, refused in one line when it is not usable here."""
    from lmexp.errors import ConfigError

    try:
        torch_device = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device={device!r} is not a device name: use cpu or cuda") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but this machine has no usable CUDA GPU: use --device cpu")
    return torch_device
