"""System metrics of a tracked run: CPU, memory, disk and GPU, sampled at a low rate.

MLflow's own monitor (``mlflow.start_run(log_system_metrics=True)``) is reachable only through its
fluent run API and writes to the store directly: a run tracked from a background thread with a
journal for outages (``lmexp.tracking``) cannot use it. This sampler reads the same values
(psutil; NVML when ``nvidia-ml-py`` is installed, else torch's view of the GPUs in use) and hands
them to the tracker as ordinary metric records under MLflow's names (``system/cpu_utilization_percentage``,
...), so they are journaled like any record and the MLflow UI shows them on the run's
**System metrics** tab.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

__all__ = ["DEFAULT_INTERVAL", "PREFIX", "SystemSampler", "sample_system"]

PREFIX = "system/"
# Seconds between samples: MLflow's own default. One sample costs about a millisecond of one core
# (psutil reads /proc), so at this rate the cost is below 0.01% of a core; a minute of training
# gets 6 points, an hour 360 per metric.
DEFAULT_INTERVAL = 10.0

log = logging.getLogger(__name__)


class _Gpus:
    """GPU readings: every GPU of the node through NVML (utilization, memory, power), else the
    memory of the CUDA devices this process has set up, through torch. Nothing without a GPU."""

    def __init__(self) -> None:
        self.nvml = None
        self.handles: list = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self.nvml = pynvml
        except Exception:  # noqa: BLE001  (no nvidia-ml-py, or no driver: torch's view, if any)
            self.handles = []

    def read(self) -> dict[str, float]:
        values: dict[str, float] = {}
        if self.nvml is not None:
            nvml = self.nvml
            for i, handle in enumerate(self.handles):
                try:
                    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                    values[f"gpu_{i}_memory_usage_megabytes"] = memory.used / 1e6
                    values[f"gpu_{i}_memory_usage_percentage"] = 100.0 * memory.used / memory.total
                    values[f"gpu_{i}_utilization_percentage"] = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                    power = nvml.nvmlDeviceGetPowerUsage(handle)
                    values[f"gpu_{i}_power_usage_watts"] = power / 1000
                    values[f"gpu_{i}_power_usage_percentage"] = 100.0 * power / nvml.nvmlDeviceGetEnforcedPowerLimit(handle)
                except Exception:  # noqa: BLE001, S112  (a reading the device does not offer)
                    continue
            return values
        import torch

        # Only devices whose context exists: asking another would create one (hundreds of MB).
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return values
        for i in range(torch.cuda.device_count()):
            try:
                free, total = torch.cuda.mem_get_info(i)
            except Exception:  # noqa: BLE001, S112  (a device torch cannot read: left out)
                continue
            values[f"gpu_{i}_memory_usage_megabytes"] = (total - free) / 1e6
            values[f"gpu_{i}_memory_usage_percentage"] = 100.0 * (total - free) / total
        return values


def sample_system(gpus: _Gpus | None = None, disk: str = os.sep) -> dict[str, float]:
    """One reading of the machine, keyed by MLflow's system-metric names without the prefix."""
    import psutil

    memory = psutil.virtual_memory()
    where = next((p for p in (Path(disk), *Path(disk).parents) if p.exists()), Path(os.sep))
    usage = psutil.disk_usage(str(where))
    values = {
        "cpu_utilization_percentage": psutil.cpu_percent(),  # since the previous call
        "system_memory_usage_megabytes": memory.used / 1e6,
        "system_memory_usage_percentage": 100.0 * memory.used / memory.total,
        "disk_usage_percentage": usage.percent,
        "disk_usage_megabytes": usage.used / 1e6,
        "disk_available_megabytes": usage.free / 1e6,
    }
    if gpus is not None:
        values.update(gpus.read())
    return {name: round(value, 1) for name, value in values.items()}


class SystemSampler:
    """A daemon thread that calls ``emit({"system/...": value})`` every ``interval`` seconds.

    The first reading comes one interval after ``start`` (CPU use is measured between two
    readings), one more at ``stop``. A reading that fails (psutil missing) ends the sampler with one
    log line; training never notices.
    """

    def __init__(self, emit: Callable[[dict[str, float]], None], interval: float = DEFAULT_INTERVAL,
                 disk: str = os.sep) -> None:
        if interval <= 0:
            raise ValueError(f"system metrics interval {interval} must be positive, e.g. {DEFAULT_INTERVAL}")
        self.emit = emit
        self.interval = interval
        self.disk = disk
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._gpus: _Gpus | None = None
        self._failed = False
        self.samples = 0

    def start(self) -> None:
        if self._thread is not None:
            return
        try:
            import psutil

            psutil.cpu_percent()  # the reference point of the first reading
        except ImportError:
            log.warning("system metrics are not recorded: psutil is not installed (pip install psutil)")
            return
        self._thread = threading.Thread(target=self._run, name="lmexp-system-metrics", daemon=True)
        self._thread.start()

    def _sample(self) -> bool:
        try:
            if self._gpus is None:
                self._gpus = _Gpus()
            values = sample_system(self._gpus, self.disk)
        except Exception as err:  # noqa: BLE001  (a sampler never stops training)
            self._failed = True
            log.warning(f"system metrics stopped: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
            return False
        self.samples += 1
        self.emit({PREFIX + name: value for name, value in values.items()})
        return True

    def _run(self) -> None:
        with _lowest_priority():
            while not self._stop.wait(self.interval):
                if not self._sample():
                    return

    def stop(self) -> None:
        """Take a last reading and end the thread (a run shorter than one interval still gets one)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        thread.join(timeout=5)
        if not thread.is_alive() and not self._failed:
            self._sample()


class _lowest_priority:
    """Run the sampling thread at the lowest CPU priority (Linux sets it per thread)."""

    def __enter__(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass

    def __exit__(self, *exc: object) -> None:
        return None
