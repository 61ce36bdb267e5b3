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
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from compression.core import CompressionError, common_arguments, compressible_linears, load, save, write_json
from compression.data import batches, build_run, configs_for
from lmexp.checkpoints import LoadedModel, load_checkpoint
from lmexp.hardware import cpu_model

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
    their scales, or float weights), from the state dict."""
    names = tuple(f"{name}." for name in compressible_linears(model))
    total = 0
    for key, value in model.state_dict().items():
        if isinstance(value, Tensor) and key.startswith(names):
            total += value.numel() * value.element_size()
        elif key.startswith(names) and hasattr(value, "_packed_params"):  # torch dynamic-int8
            weight, bias = value._packed_params._weight_bias()
            total += weight.numel() * weight.element_size() + (bias.numel() * bias.element_size() if bias is not None else 0)
    return total


def _count(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters). A quantized network stores the same weights in fewer
    bits: its caller counts the original's."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(int((p != 0).sum()) for p in params)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


class PeakMemory:
    """Peak resident memory of this process while a block runs, above what it used before:
    Linux's high-water mark (VmHWM), reset through /proc/self/clear_refs. None elsewhere."""

    def __enter__(self) -> PeakMemory:
        self.start = None
        self.peak: int | None = None
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.start = _status_kib("VmRSS")
        except OSError:
            pass
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.start is not None:
            self.peak = max(_status_kib("VmHWM") - self.start, 0) * 1024


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
    if hasattr(model, "mlm_logits"):
        return model.mlm_logits(model(batch["input_ids"], batch.get("attention_mask")))
    return model(batch["input_ids"])


@torch.inference_mode()
def throughput(model: nn.Module, task: str, batches_: Sequence[dict[str, Tensor]], min_seconds: float) -> float:
    """Tokens (language models) or examples (classifiers) per second of inference, over at
    least `min_seconds` after one warm-up pass, cycling through the batches."""
    model.eval()
    _forward(model, task, batches_[0])
    units = 0
    start = time.perf_counter()
    index = 0
    while True:
        batch = batches_[index % len(batches_)]
        _forward(model, task, batch)
        ids = batch["input_ids"]
        units += ids.shape[0] if task == "classification" else ids.numel()
        index += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and index >= len(batches_[:3]):
            return units / elapsed


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
                                                  "trainer.enable_progress_bar": False},
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
    min_seconds: float = 2.0,
    tracking_uri: str | None = None,
    track: bool = True,
) -> list[Row]:
    """Make, save, reload and measure every variant; write report.md/json and size_quality.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "report.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    package = logging.getLogger("compression")
    level = package.level
    package.addHandler(handler)
    package.setLevel(min(package.getEffectiveLevel(), logging.INFO))  # the log file gets the progress
    try:
        return _build_report(checkpoint, methods, out, configs, variants, split, large_batch,
                             calibration_batches, timing_batches, min_seconds, tracking_uri, track)
    finally:
        package.removeHandler(handler)
        package.setLevel(level)
        handler.close()


def _parse_variants(variants: Sequence[str]) -> list[tuple[str, Path]]:
    parsed = []
    for item in variants:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise CompressionError(f"--variant {item!r} must be NAME=PATH, e.g. recovered=out/recovered")
        parsed.append((name, Path(path)))
    return parsed


def _build_report(checkpoint, methods, out, configs, variants, split, large_batch, calibration_batches,
                  timing_batches, min_seconds, tracking_uri, track) -> list[Row]:
    if split not in ("val", "test"):
        raise CompressionError(f"--split {split!r} is not held out: use val or test")
    made = {spec: method_from_spec(spec) for spec in methods}  # bad spellings fail before any work
    given = _parse_variants(variants)
    configs = configs_for(checkpoint, configs)
    original = load(checkpoint)
    task = "classification" if original.config.labels else ("masked_lm" if original.config.arch == "bert" else "causal_lm")
    metric = "acc" if task == "classification" else "ppl"
    log.info(f"report on {checkpoint}: {len(made) + len(given) + 1} networks, {metric} on the {split} split of "
             f"{', '.join(map(str, configs))}")
    calibration = batches(checkpoint, configs, "train", calibration_batches) if made else []
    small = batches(checkpoint, configs, split, timing_batches, batch_size=1)
    large = batches(checkpoint, configs, split, timing_batches, batch_size=large_batch)

    # Every network is measured as it loads back from an lmexp export, the original included, so
    # sizes on disk compare like with like (a .ckpt also holds optimizer state).
    variants_dir = out / "variants"
    save(original, variants_dir / "original", overwrite=True)
    candidates: list[tuple[str, Callable[[], LoadedModel]]] = [("original", lambda: original)]
    candidates += [(spec, lambda method=method: method(original, calibration)) for spec, method in made.items()]
    rows: list[Row] = []
    for index, (name, make) in enumerate(candidates + [(name, None) for name, _ in given], 1):
        where = f"[{index}/{len(candidates) + len(given)}] {name}"
        log.info(f"{where}: making")
        folder = dict(given).get(name) if make is None else variants_dir / _folder(name)
        in_memory = None
        if make is not None and name != "original":
            variant = make()
            if variant.transforms and variant.transforms[-1]["method"] == IN_MEMORY_ONLY:
                in_memory = variant  # packed int8 weights have no safetensors form: measured in memory
            else:
                save(variant, folder, overwrite=True)
            del variant
        gc.collect()
        with PeakMemory() as memory:
            loaded = in_memory if in_memory is not None else load_checkpoint(folder)
            network = loaded.model.eval()
            rate_large = throughput(network, task, large, min_seconds)
        rate_small = throughput(network, task, small, min_seconds)
        log.info(f"{where}: evaluating on the {split} split")
        metrics = evaluate(checkpoint, network, configs, split)
        key = f"{split}/{metric}"
        if key not in metrics:
            raise CompressionError(f"evaluation gave no {key} (got {', '.join(sorted(metrics))})")
        value = metrics[key]
        quantized = any("rebuild" in t or t["method"] == IN_MEMORY_ONLY for t in loaded.transforms)
        params, nonzero = _count(original.model if quantized else network)
        disk = None if in_memory is not None else (folder_bytes(folder) if folder.is_dir() else folder.stat().st_size)
        baseline = rows[0].value if rows else value
        row = Row(name, params, nonzero, weight_bytes(network), disk, memory.peak, metric, value,
                  value / baseline - 1.0, rate_small, rate_large, loaded.transforms)
        rows.append(row)
        log.info(f"{where}: {metric} {value:.4f} ({row.change:+.2%}), linear weights "
                 f"{row.linear_bytes / 2**20:.2f} MiB, {rate_small:,.0f} / {rate_large:,.0f} "
                 f"{'examples' if task == 'classification' else 'tokens'}/s at batch 1 / {large_batch}")
        del network, loaded, in_memory
        gc.collect()
    _write(rows, out, checkpoint, task, split, large_batch)
    if track:
        _track(rows, out, checkpoint, tracking_uri)
    return rows


def _folder(spec: str) -> str:
    return spec.replace(":", "-").replace("=", "-")


def _write(rows: list[Row], out: Path, checkpoint: str | Path, task: str, split: str, large_batch: int) -> None:
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

    tracker = MLflowTracker(tracking_uri, experiment_name="compression", run_name=f"report-{Path(checkpoint).stem}",
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
    common_arguments(parser, output=False)
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
    parser.add_argument("--seconds", type=float, default=2.0, help="time each throughput measurement at least this long")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> None:
    if args.skip:
        raise CompressionError("--skip applies to prune and quantize; the report uses each method's defaults")
    build_report(args.ckpt, args.methods, args.out, args.config, args.variant, args.split, args.batch_size,
                 args.calibration_batches, args.timing_batches, args.seconds, args.tracking_uri, not args.no_tracking)


__all__ = ["Row", "build_report", "evaluate", "method_from_spec", "table", "throughput", "weight_bytes"]
