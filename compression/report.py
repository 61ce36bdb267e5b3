"""One report that weighs every compression method on the same held-out data.

``python -m compression report --ckpt PATH --methods int8 nf4 wanda=0.5 ...`` makes each
variant from the original (or takes one already made, ``--variant NAME=PATH``: a recovered,
gradually pruned or distilled network), saves it, loads it back from disk, and measures:
parameters (and non-zero ones), bytes of the block linear weights, size on disk, peak memory
while running it, perplexity or accuracy on the config's validation (or test) split with
lmexp's own metrics, the change against the original, and inference throughput at batch 1
and at a larger batch. It writes ``report.md``, ``report.json`` and ``size_quality.png``,
and logs all of it to MLflow when tracking is on.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from compression.core import EXPERIMENT, CompressionError, common_arguments, load, save, write_json
from compression.data import ONE_PROCESS, batches, build_run, configs_for
from lmexp.checkpoints import LoadedModel, load_checkpoint
from lmexp.hardware import cpu_model
from lmexp.models import block_modules

log = logging.getLogger(__name__)

IN_MEMORY_ONLY = "dynamic-int8"  # torch's packed int8 weights: no safetensors form, measured in memory

Method = Callable[[LoadedModel, list[dict[str, Tensor]]], LoadedModel]


def _pruning(name: str) -> Callable[..., LoadedModel]:
    from compression import pruning

    return getattr(pruning, name)


def _quantize(loaded: LoadedModel, method: str, double_quant: bool = False) -> LoadedModel:
    from compression.quantize import quantize

    return quantize(loaded, method, double_quant=double_quant)


def _dynamic_int8(loaded: LoadedModel) -> LoadedModel:
    from compression.quantize import dynamic_int8

    return dynamic_int8(loaded)


def method_from_spec(spec: str) -> Method:
    """A report method from its spelling: ``int8``, ``nf4``, ``nf4-dq`` (double quantization),
    ``fp4``, ``dynamic-int8``, ``magnitude=S``, ``magnitude-layer=S``, ``wanda=S``, ``2:4``,
    ``wanda-2:4``, ``heads=F``, ``neurons=F`` (S: sparsity, F: fraction removed)."""
    name, _, value = spec.partition("=")
    fixed: dict[str, Method] = {
        "int8": lambda m, _: _quantize(m, "int8"),
        "nf4": lambda m, _: _quantize(m, "nf4"),
        "nf4-dq": lambda m, _: _quantize(m, "nf4", double_quant=True),
        "fp4": lambda m, _: _quantize(m, "fp4"),
        IN_MEMORY_ONLY: lambda m, _: _dynamic_int8(m),
        "2:4": lambda m, _: _pruning("semi_structured")(m),
        "wanda-2:4": lambda m, data: _pruning("semi_structured")(m, calibration=data),
    }
    if name in fixed:
        if value:
            raise CompressionError(f"method {spec!r} takes no value: write {name}")
        return fixed[name]
    valued: dict[str, Callable[[float], Method]] = {
        "magnitude": lambda s: lambda m, _: _pruning("magnitude")(m, s, scope="global"),
        "magnitude-layer": lambda s: lambda m, _: _pruning("magnitude")(m, s, scope="layer"),
        "wanda": lambda s: lambda m, data: _pruning("wanda")(m, s, data),
        "heads": lambda f: lambda m, data: _pruning("structured")(m, heads=f, calibration=data),
        "neurons": lambda f: lambda m, data: _pruning("structured")(m, neurons=f, calibration=data),
    }
    if name not in valued:
        raise CompressionError(
            f"unknown method {spec!r}: use {', '.join(fixed)}, or {', '.join(f'{k}=0.5' for k in valued)}"
        )
    try:
        amount = float(value)
    except ValueError:
        raise CompressionError(f"method {spec!r} needs a fraction: write e.g. {name}=0.5") from None
    if not 0.0 <= amount < 1.0:
        raise CompressionError(f"method {spec!r}: {amount} is outside [0, 1): use a fraction such as {name}=0.5")
    return valued[name](amount)


@dataclass
class Row:
    """One variant's measurements."""

    name: str
    parameters: int
    nonzero: int
    linear_bytes: int
    disk_bytes: int | None
    peak_memory_bytes: int | None
    metric: str
    value: float
    change: float  # relative change of the metric against the original
    small_batch_rate: float
    large_batch_rate: float
    transforms: list[dict[str, Any]]


# ------------------------------------------------------------------------ measurements
def weight_bytes(model: nn.Module) -> int:
    """Bytes of the transformer blocks' linear layers as stored (int8 codes, packed 4-bit with
    their scales, torch's packed int8, or float weights), biases included, from the state dict."""
    names = tuple(
        f"{name}." for name, module in block_modules(model).items()
        if isinstance(module, nn.Linear) or hasattr(module, "_packed_params")
    )
    total = 0
    for key, value in model.state_dict().items():
        if key.startswith(names):
            for tensor in value if isinstance(value, tuple) else (value,):  # torch's packed (weight, bias)
                if isinstance(tensor, Tensor):
                    total += tensor.numel() * tensor.element_size()
    return total


def _count(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters). A quantized network stores the same weights in fewer
    bits: its caller counts the original's."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(int((p != 0).sum()) for p in params)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def peak_memory(source: Path, method: str | None, batch_file: Path, task: str) -> int | None:
    """Peak resident memory of a fresh process while it loads a variant and runs one large batch,
    above what the process held after its imports (Linux's high-water mark, VmHWM). A fresh
    process, because a freed network's memory stays with this one's allocator. None where
    /proc is missing or the probe fails."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    code = "from compression.report import _memory_probe; _memory_probe()"
    result = subprocess.run([sys.executable, "-c", code, str(source), method or "", str(batch_file), task],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        log.warning(f"peak memory of {source} not measured: {last}")
        return None
    return int(result.stdout.strip().splitlines()[-1])


def _memory_probe() -> None:
    """The child process of ``peak_memory``: argv = source, in-memory method, batch file, task."""
    source, method, batch_file, task = sys.argv[1:5]
    import compression.quantize  # noqa: F401  (bitsandbytes' import is not the network's memory)

    batch = torch.load(batch_file, weights_only=True)
    gc.collect()
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # restart the high-water mark here
    loaded = load_checkpoint(source)
    if method == IN_MEMORY_ONLY:
        loaded = _dynamic_int8(loaded)
    with torch.inference_mode():
        _forward(loaded.model.eval(), task, batch)
    print((_status_kib("VmHWM") - before) * 1024)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _forward(model: nn.Module, task: str, batch: dict[str, Tensor]) -> Tensor:
    """What inference runs: next-token or masked-token logits, or label logits."""
    if task == "classification":
        kwargs = {k: batch[k] for k in ("attention_mask", "token_type_ids") if k in batch}
        return model.classify(batch["input_ids"], **kwargs)
    if task == "masked_lm":  # attention goes both ways: padding must be masked
        return model.logits(batch["input_ids"], batch.get("attention_mask"))
    # Causal: right padding never reaches a real token, and without a mask the fused kernel runs.
    return model.logits(batch["input_ids"])


@torch.inference_mode()
def throughput(model: nn.Module, task: str, batches_: Sequence[dict[str, Tensor]], seconds: float) -> float:
    """Tokens (language models) or examples (classifiers) per second of inference over at least
    `seconds` (and every batch once), after one warm-up pass, cycling through the batches."""
    model.eval()
    _forward(model, task, batches_[0])
    units = 0
    index = 0
    start = time.perf_counter()
    while True:
        batch = batches_[index % len(batches_)]
        _forward(model, task, batch)
        units += batch["input_ids"].shape[0] if task == "classification" else batch["input_ids"].numel()
        index += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and index >= len(batches_):
            return units / elapsed


def interleaved_throughput(
    networks: dict[str, nn.Module], task: str, batches_: Sequence[dict[str, Tensor]], seconds: float, rounds: int
) -> dict[str, float]:
    """Each network's best throughput over `rounds` rounds that visit every network in turn (the
    order rotating), so that a slower or busier stretch of time weighs on all of them alike."""
    names = list(networks)
    best = dict.fromkeys(names, 0.0)
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            best[name] = max(best[name], throughput(networks[name], task, batches_, seconds / rounds))
    return best


class UseNetwork(pl.Callback):
    """Evaluate this network in place of the one the objective built from the original checkpoint,
    so a variant is scored by exactly the objective, data and metrics of the original."""

    def __init__(self, network: nn.Module) -> None:
        self.network = network

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.model = self.network

    on_test_start = on_validation_start


def evaluate(original: str | Path, network: nn.Module, configs: Sequence[Path], split: str) -> dict[str, float]:
    """lmexp's own validation/test metrics of `network` on the config's `split`."""
    verb = {"val": "validate", "test": "test"}[split]
    with tempfile.TemporaryDirectory(prefix="lmexp-report-") as root:
        run = build_run(verb, original, configs, {"trainer.logger": False, "trainer.default_root_dir": root,
                                                  "trainer.enable_progress_bar": False, **ONE_PROCESS},
                        callbacks=[UseNetwork(network)], logger=False)
        run.execute()
        return {k: float(v) for k, v in run.trainer.callback_metrics.items()}


# ------------------------------------------------------------------------------ report
def build_report(
    checkpoint: str | Path,
    methods: Sequence[str],
    out: str | Path,
    configs: Sequence[str | Path] | None = None,
    variants: Sequence[str] = (),
    split: str = "val",
    large_batch: int = 32,
    calibration_batches: int = 8,
    timing_batches: int = 4,
    seconds: float = 3.0,
    rounds: int = 3,
    tracking_uri: str | None = None,
    track: bool = True,
    measure_memory: bool = True,
) -> list[Row]:
    """Make, save, reload and measure every variant; write report.md/json and size_quality.png.

    Args:
        checkpoint: The trained network (the report's first row).
        methods: Variants to make from it (``method_from_spec`` spellings).
        out: Folder for the report, its log and the variants (``out/variants/NAME``).
        configs: YAML whose data section gives the held-out and calibration data (default: the
            config.yaml of the checkpoint's run folder).
        variants: ``NAME=PATH`` of variants made elsewhere (recovered, distilled).
        split: ``val`` or ``test``.
        large_batch: The larger inference batch of the throughput columns (the other is 1).
        calibration_batches: Training batches for the activation-aware methods.
        timing_batches: Held-out batches cycled through while timing.
        seconds: Timing per network and batch size, split over `rounds` interleaved rounds.
        measure_memory: Start a fresh process per network for its peak memory (a few seconds
            each); off, the column stays empty.
    """
    if split not in ("val", "test"):
        raise CompressionError(f"--split {split!r} is not held out: use val or test")
    made = {spec: method_from_spec(spec) for spec in methods}  # bad input fails before any work
    given = _parse_variants(variants)
    for name in [*made, *given]:
        if [*made, *given].count(name) > 1 or name == "original":
            raise CompressionError(f"variant name {name!r} is used twice (or is 'original'): give each variant its own name")
    configs = configs_for(checkpoint, configs)
    original = load(checkpoint)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "report.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    package = logging.getLogger("compression")
    level = package.level
    package.addHandler(handler)
    package.setLevel(min(package.getEffectiveLevel(), logging.INFO))  # the log file gets the progress
    try:
        rows = _measure(checkpoint, original, made, given, out, configs, split, large_batch, calibration_batches,
                        timing_batches, seconds, rounds, measure_memory)
        _write(rows, out, checkpoint, split, large_batch)
        if track:
            _track(rows, out, checkpoint, tracking_uri)
        return rows
    finally:
        package.removeHandler(handler)
        package.setLevel(level)
        handler.close()


def _parse_variants(variants: Sequence[str]) -> dict[str, Path]:
    parsed = {}
    for item in variants:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise CompressionError(f"--variant {item!r} must be NAME=PATH, e.g. recovered=out/recovered")
        if not Path(path).exists():
            raise CompressionError(f"--variant {item!r}: {path!r} does not exist; pass a folder written by a compression command")
        parsed[name] = Path(path)
    return parsed


def task_of(config: Any) -> str:
    return "classification" if config.labels else ("masked_lm" if config.arch == "bert" else "causal_lm")


def _measure(checkpoint, original, made, given, out, configs, split, large_batch, calibration_batches,
             timing_batches, seconds, rounds, measure_memory) -> list[Row]:
    task = task_of(original.config)
    metric = "acc" if task == "classification" else "ppl"
    total = 1 + len(made) + len(given)
    log.info(f"report on {checkpoint}: {total} networks, {metric} on the {split} split of {', '.join(map(str, configs))}")
    calibration = batches(checkpoint, configs, "train", calibration_batches) if made else []
    timing = {1: batches(checkpoint, configs, split, timing_batches, batch_size=1),
              large_batch: batches(checkpoint, configs, split, timing_batches, batch_size=large_batch)}
    probe_batch = out / "variants" / "probe-batch.pt"
    probe_batch.parent.mkdir(parents=True, exist_ok=True)
    torch.save(timing[large_batch][0], probe_batch)

    # Every network is measured as it loads back from an lmexp export, the original included, so
    # sizes on disk compare like with like (a .ckpt also holds optimizer state).
    sources: dict[str, tuple[Path, str | None]] = {"original": (save(original, out / "variants" / "original", overwrite=True), None)}
    networks: dict[str, nn.Module] = {}
    rows: dict[str, Row] = {}
    for index, name in enumerate(["original", *made, *given], 1):
        where = f"[{index}/{total}] {name}"
        if name in made:
            log.info(f"{where}: making")
            variant = made[name](original, calibration)
            method = variant.transforms[-1]["method"] if variant.transforms else None
            if method == IN_MEMORY_ONLY:  # no safetensors form: measured in memory
                sources[name] = (sources["original"][0], method)
                loaded = variant
            else:
                sources[name] = (save(variant, out / "variants" / _folder(name), overwrite=True), None)
                loaded = load_checkpoint(sources[name][0])
            del variant
        else:
            sources.setdefault(name, (given.get(name, sources["original"][0]), None))
            loaded = load_checkpoint(sources[name][0])
        log.info(f"{where}: evaluating on the {split} split")
        value = evaluate(checkpoint, loaded.model, configs, split).get(f"{split}/{metric}")
        if value is None:
            raise CompressionError(f"evaluating {name} gave no {split}/{metric}: check the config's data section")
        quantized = any("rebuild" in t or t["method"] == IN_MEMORY_ONLY for t in loaded.transforms)
        params, nonzero = _count(original.model if quantized else loaded.model)
        source, in_memory = sources[name]
        disk = None if in_memory else (folder_bytes(source) if source.is_dir() else source.stat().st_size)
        baseline = rows["original"].value if rows else value
        rows[name] = Row(name, params, nonzero, weight_bytes(loaded.model), disk, None, metric, value,
                         value / baseline - 1.0, 0.0, 0.0, loaded.transforms)
        networks[name] = loaded.model.eval()
        log.info(f"{where}: {metric} {value:.4f} ({rows[name].change:+.2%}), block linear weights "
                 f"{rows[name].linear_bytes / 2**20:.2f} MiB")
    unit = "examples" if task == "classification" else "tokens"
    for size, data in timing.items():
        log.info(f"timing all {total} networks at batch {size}: {rounds} interleaved rounds of {seconds / rounds:.1f} s each")
        rates = interleaved_throughput(networks, task, data, seconds, rounds)
        for name, rate in rates.items():
            if size == 1:
                rows[name].small_batch_rate = rate
            else:
                rows[name].large_batch_rate = rate
    networks.clear()
    gc.collect()
    if measure_memory:
        log.info(f"peak memory: one fresh process per network, {os.cpu_count() or 1} at a time")
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # separate processes: no interference
            peaks = pool.map(lambda name: peak_memory(*sources[name], probe_batch, task), list(rows))
            for row, peak in zip(rows.values(), peaks):
                row.peak_memory_bytes = peak
    for name, row in rows.items():
        log.info(f"{name}: {row.small_batch_rate:,.0f} / {row.large_batch_rate:,.0f} {unit}/s at batch 1 / "
                 f"{large_batch}, peak memory {_mib(row.peak_memory_bytes)} MiB")
    probe_batch.unlink()
    return list(rows.values())


def _folder(spec: str) -> str:
    return spec.replace(":", "-").replace("=", "-")


def _write(rows: list[Row], out: Path, checkpoint: str | Path, split: str, large_batch: int) -> None:
    task = "classification" if rows[0].metric == "acc" else "language model"
    unit = "examples/s" if task == "classification" else "tokens/s"
    machine = f"{cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {platform.system()}"
    write_json(out / "report.json", {"checkpoint": str(checkpoint), "task": task, "split": split, "machine": machine,
                                     "large_batch": large_batch, "rows": [asdict(r) for r in rows]})
    text = f"# Compression report: {checkpoint}\n\n{machine}; {rows[0].metric} on the {split} split.\n\n" + table(
        rows, unit, large_batch) + "\n"
    (out / "report.md").write_text(text)
    print(text)
    plot(rows, out / "size_quality.png", str(checkpoint))


def table(rows: Sequence[Row], unit: str, large_batch: int) -> str:
    """The report as a markdown table."""
    base_small, base_large = rows[0].small_batch_rate, rows[0].large_batch_rate
    metric = rows[0].metric
    head = (f"| variant | parameters | non-zero | linear weights (MiB) | disk (MiB) | peak memory (MiB) | {metric} | "
            f"change | {unit} at batch 1 | at batch {large_batch} | speed vs original (1 / {large_batch}) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.parameters:,} | {r.nonzero:,} | {_mib(r.linear_bytes)} | {_mib(r.disk_bytes)} | "
            f"{_mib(r.peak_memory_bytes)} | {r.value:.4f} | {r.change:+.2%} | {r.small_batch_rate:,.0f} | "
            f"{r.large_batch_rate:,.0f} | {r.small_batch_rate / base_small:.2f}x / {r.large_batch_rate / base_large:.2f}x |"
        )
    return "\n".join(lines)


def _mib(size: int | None) -> str:
    return "-" if size is None else f"{size / 2**20:.2f}"


def plot(rows: Sequence[Row], path: Path, title: str) -> None:
    """Linear-weight size against quality, one labelled point per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        size = (r.linear_bytes if r.nonzero == r.parameters else r.linear_bytes * r.nonzero / r.parameters) / 2**20
        ax.scatter(size, r.value, color="black" if r.name == "original" else "tab:blue")
        ax.annotate(r.name, (size, r.value), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("block linear weights (MiB; pruned: non-zero share)")
    ax.set_ylabel(rows[0].metric + (" (lower is better)" if rows[0].metric == "ppl" else " (higher is better)"))
    ax.set_title(f"size against quality: {Path(title).name}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _track(rows: list[Row], out: Path, checkpoint: str | Path, tracking_uri: str | None) -> None:
    from lmexp.tracking import MLflowTracker

    tracker = MLflowTracker(tracking_uri, experiment_name=EXPERIMENT, run_name=f"report-{Path(checkpoint).stem}",
                            save_dir=str(out))
    tracker.log_hyperparams({"checkpoint": str(checkpoint), "variants": [r.name for r in rows]})
    for r in rows:
        prefix = r.name.replace(":", "-").replace("=", "-")
        tracker.log_metrics({f"{prefix}/{r.metric}": r.value, f"{prefix}/change": r.change,
                             f"{prefix}/linear_mib": r.linear_bytes / 2**20,
                             f"{prefix}/rate_batch1": r.small_batch_rate, f"{prefix}/rate_large": r.large_batch_rate})
    for name in ("report.md", "report.json", "size_quality.png", "report.log"):
        tracker.log_artifact(out / name)
    tracker.finalize("success")


def add_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="evaluate the original and each compressed variant on the same held-out data",
        description=__doc__.split("\n\n")[1],
    )
    common_arguments(parser, output=False, skip=False)
    parser.add_argument("--methods", nargs="*", default=["int8", "nf4", "magnitude=0.5", "wanda=0.5"],
                        help="variants to make: int8 nf4 nf4-dq fp4 dynamic-int8 magnitude=S magnitude-layer=S "
                        "wanda=S 2:4 wanda-2:4 heads=F neurons=F")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=PATH",
                        help="a variant already made (recovered, gradually pruned, distilled), repeatable")
    parser.add_argument("--out", default="compression-report", help="folder for the report and the variants")
    parser.add_argument("--split", default="val", choices=["val", "test"], help="held-out split to score on")
    parser.add_argument("--batch-size", type=int, default=32, help="the larger inference batch for throughput")
    parser.add_argument("--calibration-batches", type=int, default=8, help="training batches for Wanda / structured")
    parser.add_argument("--timing-batches", type=int, default=4, help="held-out batches cycled for throughput")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per network and batch size")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (the best one counts)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory column (a process per network)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    build_report(args.ckpt, args.methods, args.out, args.config, args.variant, args.split, args.batch_size,
                 args.calibration_batches, args.timing_batches, args.seconds, args.rounds, args.tracking_uri,
                 not args.no_tracking, not args.no_memory)


__all__ = ["Row", "build_report", "evaluate", "method_from_spec", "table", "throughput", "weight_bytes"]
