"""What the machine can do fast, so settings can be chosen (or questioned) by hardware."""

from __future__ import annotations

import os
import platform
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

__all__ = [
    "BF16_CPU_FLAGS",
    "CPUINFO",
    "check_device",
    "cpu_has_bf16_units",
    "cpu_model",
    "cpuinfo_flags",
    "has_bf16_units",
    "process_rank",
    "read_cpuinfo",
    "torch_cpu_flags",
]

CPUINFO = Path("/proc/cpuinfo")

BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
"""CPU flags (Linux's names) of native bf16 arithmetic. avx512_fp16 and amx_fp16 do not count:
they are IEEE half precision, and a CPU with them still emulates bf16 matrix products."""


def cpu_has_bf16_units() -> bool:
    """True where the CPU multiplies bf16 natively (AMX tiles or AVX512-BF16).

    Elsewhere (AVX2-only CPUs such as AMD Zen 3) bf16 matrix products are emulated and run
    two orders of magnitude slower than fp32. The flags come from ``/proc/cpuinfo``; torch's own
    CPU probes answer only where that file cannot (not Linux), since their names may change.
    """
    flags = cpuinfo_flags(read_cpuinfo() or "")
    if flags is None:
        flags = torch_cpu_flags()
    if flags is None:
        warnings.warn(
            "cannot tell whether this CPU has bf16 units (no /proc/cpuinfo flags and no CPU probe in "
            f"torch {torch.__version__}): treating bf16 as emulated; choose --trainer.precision explicitly",
            stacklevel=2,
        )
        return False
    return has_bf16_units(flags)


def has_bf16_units(flags: Iterable[str]) -> bool:
    """Whether a CPU with these feature flags multiplies bf16 natively."""
    return not BF16_CPU_FLAGS.isdisjoint(flags)


def read_cpuinfo() -> str | None:
    """The text of ``/proc/cpuinfo``; None where there is none (not Linux)."""
    try:
        return CPUINFO.read_text()
    except OSError:
        return None


def cpuinfo_flags(cpuinfo: str) -> frozenset[str] | None:
    """The first processor's feature flags in ``/proc/cpuinfo`` text (its ``flags`` line on x86,
    ``Features`` on ARM); None where the text has no such line."""
    for line in cpuinfo.splitlines():
        key, colon, value = line.partition(":")
        if colon and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


def torch_cpu_flags() -> frozenset[str] | None:
    """The bf16 flags torch's CPU probes report present, under Linux's names; None where this
    torch has no probe for them."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # public, in recent torch only
    if capabilities is not None:
        found = capabilities()
        return frozenset(flag for flag in BF16_CPU_FLAGS if found.get(flag, False))
    # Older torch: private probes. Every CPU with AMX tiles (Sapphire Rapids on) has AMX-BF16.
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    available = {flag: getattr(torch.cpu, name) for flag, name in probes.items() if hasattr(torch.cpu, name)}
    if not available:
        return None
    return frozenset(flag for flag, probe in available.items() if probe())


def process_rank() -> int:
    """This process's rank in a multi-process run (set by Lightning's launcher, torchrun or SLURM)."""
    for variable in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if os.environ.get(variable, "").isdigit():
            return int(os.environ[variable])
    return 0


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), for run records and benchmark tables."""
    for line in (read_cpuinfo() or "").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
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
