"""``--trainer.precision auto``: choose 32-true or bf16-mixed by timing the run's own training steps.

Before the trainer is made, a throwaway copy of the run's objective and data is built as the run
would build them, and a few optimizer steps (forward, backward, clipping, ``optimizer.step``) of
the same initial weights on the same training batches are timed on the run's device, once in
fp32 and once under bf16 autocast (what Lightning's ``bf16-mixed`` does). ``bf16-mixed`` is
chosen only when it is faster by ``SPEEDUP_MARGIN`` and its loss after those steps is within
``LOSS_TOLERANCE`` of fp32's; otherwise ``32-true``. Where bf16 has no hardware support (a CPU
without AMX or AVX512-BF16, a GPU before Ampere) it is not timed at all.

The probe leaves the run as it found it: the run's objective and data module are not touched
(copies are trained), and every global random generator is restored. Under DDP the launching
process probes and passes its choice to the ranks Lightning starts in ``PRECISION_VARIABLE``.
``lmexp probe --config X.yaml`` (lmexp.verbs.probe) runs the probe alone and prints its line.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import random
import statistics
import time
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch

from lmexp.errors import ConfigError, check_positive
from lmexp.hardware import cpu_has_bf16_units, process_rank
from lmexp.objectives import clip_gradients

AUTO = "auto"
FP32, BF16 = "32-true", "bf16-mixed"
PRECISION_VARIABLE = "LMEXP_PRECISION"  # rank 0's choice, read by the DDP ranks Lightning launches
SPEEDUP_MARGIN = 0.05  # bf16-mixed must take at least 5% less time per step
LOSS_TOLERANCE = 0.02  # and its loss after the probe steps must be within 2% of fp32's
WARMUP_STEPS, TIMED_STEPS = 3, 10

# What --trainer.precision accepts: Lightning's values, and "auto".
_LIGHTNING_PRECISION = typing.get_type_hints(pl.Trainer.__init__)["precision"]  # its values, and None
PRECISION_TYPE = Literal["auto"] | _LIGHTNING_PRECISION
PRECISION_HELP = (
    "32-true (full precision, the default), bf16-mixed (bfloat16 autocast), 16-mixed, 64-true, ... as "
    "Lightning's Trainer takes them, or auto: time a few training steps of this run in 32-true and "
    "bf16-mixed and take bf16-mixed when it is at least 5% faster with a loss within 2% of fp32's "
    "(lmexp probe shows the measurement)"
)

StepTimer = Callable[[str, Callable[[], None]], float]


@dataclass(frozen=True)
class PrecisionChoice:
    """What the probe measured and chose. Times are median milliseconds per optimizer step;
    losses are each precision's loss on a held-out batch after the probe steps. None: not
    measured (bf16 where the hardware lacks it, or every value on a rank that was told)."""

    precision: str
    reason: str
    device: str = "cpu"
    fp32_ms: float | None = None
    bf16_ms: float | None = None
    fp32_loss: float | None = None
    bf16_loss: float | None = None
    steps: int = 0

    def line(self) -> str:
        """``precision auto on cpu: 32-true 35.1 ms/step, bf16-mixed 29.8 ms/step (loss 4.112 vs
        4.118) -> bf16-mixed (15% faster, loss within 2%)``"""
        if self.fp32_ms is None:
            return f"precision auto: {self.precision} ({self.reason})"
        measured = f"{FP32} {self.fp32_ms:.1f} ms/step"
        if self.bf16_ms is not None:
            measured += f", {BF16} {self.bf16_ms:.1f} ms/step (loss {self.fp32_loss:.3f} vs {self.bf16_loss:.3f})"
            return f"precision auto on {self.device}: {measured} -> {self.precision} ({self.reason})"
        return f"precision auto on {self.device}: {measured} (loss {self.fp32_loss:.3f}); {self.reason} -> {self.precision}"

    def params(self) -> dict[str, str]:
        """The choice and its measurements as MLflow params (``precision_auto.*``)."""
        values: dict[str, Any] = {
            "choice": self.precision,
            "reason": self.reason,
            "device": self.device,
            "steps": self.steps,
            "fp32_ms_per_step": self.fp32_ms,
            "bf16_ms_per_step": self.bf16_ms,
            "fp32_loss": self.fp32_loss,
            "bf16_loss": self.bf16_loss,
        }
        return {f"precision_auto.{key}": _param(value) for key, value in values.items() if value is not None}


def _param(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def choose_precision(
    fp32_ms: float,
    bf16_ms: float | None,
    fp32_loss: float,
    bf16_loss: float | None,
    margin: float = SPEEDUP_MARGIN,
    loss_tolerance: float = LOSS_TOLERANCE,
) -> tuple[str, str]:
    """The precision to train in, and why: ``bf16-mixed`` only when it takes at least ``margin``
    less time per step than fp32 and its loss differs from fp32's by less than ``loss_tolerance``
    (relative); otherwise ``32-true``. ``bf16_ms=None``: bf16 was not measured."""
    if bf16_ms is None or bf16_loss is None:
        return FP32, "bf16-mixed not measured"
    if not (math.isfinite(fp32_loss) and math.isfinite(bf16_loss)):
        return FP32, f"a loss is not finite (fp32 {fp32_loss}, bf16 {bf16_loss})"
    gain = 1.0 - bf16_ms / fp32_ms if fp32_ms > 0 else 0.0
    difference = abs(bf16_loss - fp32_loss) / max(abs(fp32_loss), 1e-12)
    if difference >= loss_tolerance:
        return FP32, f"bf16 loss differs by {difference:.1%}, not under {loss_tolerance:.0%}"
    if gain < margin:
        speed = f"{gain:.0%} faster" if gain >= 0 else f"{-gain:.0%} slower"
        return FP32, f"bf16-mixed {speed}, not at least {margin:.0%}"
    return BF16, f"{gain:.0%} faster, loss within {loss_tolerance:.0%}"


def bf16_unsupported(device: torch.device) -> str | None:
    """Why bf16 is not worth timing on ``device`` (None: it is)."""
    if device.type == "cpu":
        if not cpu_has_bf16_units():
            return (
                "bf16-mixed not tried: this CPU has no bf16 units (AMX or AVX512-BF16), so bf16 "
                "matrix products would be emulated, far slower than fp32"
            )
        return None
    if device.type == "cuda":
        return None if torch.cuda.is_bf16_supported() else "bf16-mixed not tried: this GPU has no bf16 support"
    return f"bf16-mixed not tried: the probe times bf16 on CPU and CUDA only, not {device.type}"


def probe_device(accelerator: Any = "auto", devices: Any = "auto") -> torch.device:
    """The device the trainer's ``accelerator``/``devices`` settings put rank 0 on."""
    name = (
        accelerator if isinstance(accelerator, str) else type(accelerator).__name__.lower().replace("accelerator", "")
    )
    name = (name or "auto").lower()
    if name in ("gpu", "cuda") or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.accelerator={accelerator!r} but this machine has no usable CUDA GPU: "
                "use --trainer.accelerator cpu"
            )
        return torch.device("cuda", _first_device_index(devices))
    if name == "mps" or (name == "auto" and torch.backends.mps.is_available()):
        return torch.device("mps")
    return torch.device("cpu")


def _first_device_index(devices: Any) -> int:
    if isinstance(devices, (list, tuple)) and devices:
        return int(devices[0])
    if isinstance(devices, str) and "," in devices:
        return int(next(part for part in devices.split(",") if part.strip()))
    return 0


# --------------------------------------------------------------------------- the probe
@contextlib.contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Every global generator (python, numpy, torch CPU and the device's) as it was on entry."""
    python, numpy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if device.type == "cuda" else []  # manual_seed seeds them all
    try:
        with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
            yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)


@contextlib.contextmanager
def _quiet_info() -> Iterator[None]:
    """Keep the throwaway copy's build messages (network size, ...) out of the run's log."""
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _wall_clock_timer(device: torch.device) -> StepTimer:
    def timer(precision: str, step: Callable[[], None]) -> float:
        _synchronize(device)
        start = time.perf_counter()
        step()
        _synchronize(device)
        return time.perf_counter() - start

    return timer


def _materialize(objective: pl.LightningModule, datamodule: pl.LightningDataModule | None):
    """Copies of the objective and data, set up as a fit sets them up: the data takes the
    objective's contract and prepares its training split, the network is built from its vocabulary."""
    model = copy.deepcopy(objective)
    data = copy.deepcopy(datamodule)
    if data is None:
        raise ConfigError(
            "trainer.precision=auto needs the run's data module to time training steps: "
            "set data, or choose trainer.precision (32-true or bf16-mixed)"
        )
    if hasattr(data, "accept") and hasattr(model, "data_contract"):
        data.accept(model.data_contract())
    data.prepare_data()
    data.setup("fit")
    model.read_data(data)  # the vocabulary (and labels) the network is built for
    with _quiet_info():
        model.configure_model()
    return model, data


def _take_batches(data: pl.LightningDataModule, count: int) -> list[Any]:
    batches: list[Any] = []
    for _ in range(count):  # passes over a small training split, until `count` batches
        before = len(batches)
        for batch in data.train_dataloader():
            batches.append(batch)
            if len(batches) == count:
                return batches
        if len(batches) == before:
            break
    if not batches:
        raise ConfigError("trainer.precision=auto: the training data gave no batch to time")
    return [batches[i % len(batches)] for i in range(count)]


class _Arm:
    """One precision's copy of the network, its optimizer, and the step the probe times."""

    def __init__(
        self,
        precision: str,
        initial: pl.LightningModule,
        device: torch.device,
        clip_val: float | None,
        clip_algorithm: str | None,
    ) -> None:
        self.precision = precision
        self.device = device
        self.model = copy.deepcopy(initial).to(device)
        self.model.train()
        self.optimizer = self.model.build_optimizer()
        self.clip_val, self.clip_algorithm = clip_val, clip_algorithm
        self.loss = torch.tensor(float("nan"))

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == BF16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, batch: Any) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.model.compute_loss(batch, "train")
        loss.backward()
        clip_gradients([p for p in self.model.parameters() if p.grad is not None], self.clip_val, self.clip_algorithm)
        self.optimizer.step()
        self.loss = loss.detach()

    def held_out_loss(self, batch: Any) -> float:
        self.model.eval()
        with torch.no_grad(), self.autocast():
            loss = self.model.compute_loss(batch, "train")
        self.model.train()
        return float(loss.float())


def probe_precision(
    objective: pl.LightningModule,
    datamodule: pl.LightningDataModule | None,
    device: torch.device | str = "cpu",
    warmup_steps: int | None = None,
    steps: int | None = None,
    gradient_clip_val: float | None = None,
    gradient_clip_algorithm: str | None = None,
    seed: int = 0,
    timer: StepTimer | None = None,
) -> PrecisionChoice:
    """Time ``steps`` optimizer steps (after ``warmup_steps`` untimed ones) of the run's network on
    its training batches in fp32 and bf16 autocast, from the same initial weights, and choose.

    Args:
        objective: The run's objective as built (its network may not exist yet); not modified.
        datamodule: The run's data module as built; not modified.
        device: Where the run trains (its rank 0).
        warmup_steps: Untimed steps first (allocation, kernel selection, compilation); default ``WARMUP_STEPS``.
        steps: Timed steps, ``TIMED_STEPS`` by default; the time per step is their median.
        gradient_clip_val: The trainer's clipping, applied as the run would.
        gradient_clip_algorithm: ``norm`` (default) or ``value``.
        seed: Seeds the copies' initial weights and each step's dropout (the run's own random
            state is restored afterwards).
        timer: ``timer(precision, step)`` runs ``step`` and returns its seconds (default: wall
            clock, with the device synchronized on both sides).

    Raises:
        ConfigError, DataError: the data or network cannot be built, as the run would report.
    """
    warmup_steps = WARMUP_STEPS if warmup_steps is None else warmup_steps
    steps = TIMED_STEPS if steps is None else steps
    check_positive("probe steps", steps)
    if warmup_steps < 0:
        raise ConfigError(f"probe warmup_steps={warmup_steps} is negative: use 0 or more")
    device = torch.device(device)
    skip_bf16 = bf16_unsupported(device)
    timer = timer or _wall_clock_timer(device)
    with preserved_rng(device):
        torch.manual_seed(seed)
        model, data = _materialize(objective, datamodule)
        batches = _take_batches(data, warmup_steps + steps + 1)
        del data
        batches = [pl.utilities.move_data_to_device(batch, device) for batch in batches]
        held_out, batches = batches[-1], batches[:-1]
        measured: dict[str, tuple[float, float]] = {}
        for precision in (FP32,) if skip_bf16 else (FP32, BF16):
            # One copy on the device at a time: the probe needs no more memory than the run.
            arm = _Arm(precision, model, device, gradient_clip_val, gradient_clip_algorithm)
            times = []
            for i, batch in enumerate(batches):
                torch.manual_seed(seed + i)  # the same dropout masks in both precisions
                seconds = timer(precision, lambda arm=arm, batch=batch: arm.step(batch))
                if i >= warmup_steps:
                    times.append(seconds)
            measured[precision] = (statistics.median(times) * 1000, arm.held_out_loss(held_out))
            del arm
            if device.type == "cuda":
                torch.cuda.empty_cache()
    fp32_ms, fp32_loss = measured[FP32]
    bf16_ms, bf16_loss = measured.get(BF16, (None, None))
    if skip_bf16:
        precision, reason = FP32, skip_bf16
    else:
        precision, reason = choose_precision(fp32_ms, bf16_ms, fp32_loss, bf16_loss)
    return PrecisionChoice(precision, reason, str(device), fp32_ms, bf16_ms, fp32_loss, bf16_loss, steps)


def probe_run(
    objective: pl.LightningModule,
    datamodule: pl.LightningDataModule | None,
    trainer_config: Mapping[str, Any],
    seed: Any = None,
    **options: Any,
) -> PrecisionChoice:
    """``probe_precision`` on the device, clipping and seed a run's settings give."""
    device = probe_device(trainer_config.get("accelerator", "auto"), trainer_config.get("devices", "auto"))
    return probe_precision(
        objective,
        datamodule,
        device,
        gradient_clip_val=trainer_config.get("gradient_clip_val"),
        gradient_clip_algorithm=trainer_config.get("gradient_clip_algorithm"),
        seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else 0,
        **options,
    )


def resolve_auto_precision(
    objective: pl.LightningModule,
    datamodule: pl.LightningDataModule | None,
    trainer_config: Mapping[str, Any],
    seed: Any = None,
) -> PrecisionChoice:
    """The precision a run set to ``auto`` trains in: probed by the launching process (which
    says so in one line and leaves the choice in ``PRECISION_VARIABLE`` for the ranks it starts),
    read from there by those ranks."""
    told = os.environ.get(PRECISION_VARIABLE)
    started_elsewhere = _started_by_external_launcher()
    if told and (process_rank() != 0 or started_elsewhere):
        return PrecisionChoice(told, f"set by {PRECISION_VARIABLE}")
    if started_elsewhere:
        raise ConfigError(
            "trainer.precision=auto cannot be agreed on by ranks started by torchrun or SLURM: run lmexp probe "
            f"once and set trainer.precision to its choice (or set {PRECISION_VARIABLE} for every rank)"
        )
    choice = probe_run(objective, datamodule, trainer_config, seed)
    os.environ[PRECISION_VARIABLE] = choice.precision
    from lightning.pytorch.utilities import rank_zero_info

    rank_zero_info(choice.line())
    return choice


def _started_by_external_launcher() -> bool:
    """Whether every rank was started from outside (torchrun, srun with several tasks), so no
    process launches the others and can tell them its choice. (Lightning's own launcher sets
    WORLD_SIZE in the launching process too, so that cannot tell.)"""
    slurm_tasks = os.environ.get("SLURM_NTASKS", "")
    return "TORCHELASTIC_RUN_ID" in os.environ or (slurm_tasks.isdigit() and int(slurm_tasks) > 1)
