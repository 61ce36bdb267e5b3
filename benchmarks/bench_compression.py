"""The compression toolkit on Tiny Shakespeare (a character GPT) and SST-2 (a BERT classifier),
through the commands a user types.

    python benchmarks/bench_compression.py --data ../shared/data

1. ``lmexp fit --config configs/shakespeare_char.yaml`` trains the GPT (nanoGPT's CPU model)
   for ``--gpt-steps`` (5000: converged, so that a variant's change is the method's and not
   more training), unless ``--gpt CKPT`` gives one.
2. ``python -m compression prune`` makes the variants that need training: 50% magnitude and
   Wanda pruning each with a short recovery fine-tune (zeros kept), gradual pruning to 50%
   during fine-tuning, and the control: the same fine-tuning of the unpruned network.
   ``python -m compression distill`` trains a student with half the layers from the teacher,
   the same student without the teacher (hard labels only) from the same initialization
   (the teacher's blocks 0 and 2) for the same steps, and one from scratch.
3. ``python -m compression report`` makes the one-shot variants (int8, NF4, FP4, torch's
   dynamic int8, magnitude and Wanda pruning, 2:4, structured heads and neurons), loads every
   variant back from disk and scores all of them on the same validation split.
4. A second report times structured pruning alone (the original, 25% of heads, 25% of MLP
   neurons) in many interleaved rounds.
5. The same report on an SST-2 classifier (``configs/sst2_bert.yaml`` from random
   initialization, unless ``--classifier CKPT``), scored on dev.tsv (the test split).

The reports and the checks of the targets are printed and appended to BENCHMARKS.md; every
command's output goes to ``bench_compression.log`` in the work folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import command_line, markdown_table, publish  # noqa: E402

log = logging.getLogger("bench_compression")

GPT_METHODS = ["int8", "nf4", "nf4-dq", "fp4", "dynamic-int8", "magnitude=0.5", "magnitude-layer=0.5", "wanda=0.5",
               "2:4", "wanda-2:4", "heads=0.25", "neurons=0.25"]
SPEED_ROUNDS = 10
CLASSIFIER_METHODS = ["int8", "nf4", "dynamic-int8", "magnitude=0.5", "wanda=0.5", "neurons=0.25"]


def run(command: list[str], work: Path) -> None:
    """Run one command, its output appended to the log file; stop the benchmark if it fails."""
    shown = " ".join(command).replace(sys.executable, "python")
    log.info(f"$ {shown}")
    start = time.perf_counter()
    with open(work / "bench_compression.log", "a", encoding="utf-8") as output:
        output.write(f"\n$ {shown}\n")
        output.flush()
        result = subprocess.run(command, cwd=work, stdout=output, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=False)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {shown}; see {work / 'bench_compression.log'}")
    log.info(f"  done in {time.perf_counter() - start:.0f} s")


def lmexp(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmexp", *args]


def compression(*args: str) -> list[str]:
    return [sys.executable, "-m", "compression", *args]


def train(work: Path, name: str, config: Path, *overrides: str) -> Path:
    run(lmexp("fit", "--config", str(config), "--trainer.default_root_dir", str(work / "runs"), "--run_name", name,
              "--trainer.enable_progress_bar", "false", *overrides), work)
    return work / "runs" / name / "checkpoints" / "best.ckpt"


def report_rows(folder: Path) -> list[dict]:
    return json.loads((folder / "report.json").read_text())["rows"]


def shakespeare(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    config = ROOT / "configs" / "shakespeare_char.yaml"  # data.source: tinyshakespeare, found in $LMEXP_DATA_DIR
    # Trained to convergence, so that what a variant loses or gains is the method's, not more training.
    teacher = args.gpt or train(work, "gpt", config, "--trainer.max_steps", str(args.gpt_steps),
                                "--trainer.val_check_interval", "250")
    made = work / "shakespeare"
    made.mkdir(exist_ok=True)
    common = ["--ckpt", str(teacher), "--config", str(config), "--overwrite"]
    variants: dict[str, Path] = {}
    recovery = ["--lr", str(args.recovery_lr)]
    for name, extra in (
        # The control: the same fine-tuning of the unpruned network.
        ("dense+fine-tune", ["--method", "magnitude", "--sparsity", "0", "--fine-tune-steps", str(args.recovery_steps)]),
        ("magnitude-0.5+recovery", ["--method", "magnitude", "--sparsity", "0.5", "--fine-tune-steps", str(args.recovery_steps)]),
        ("wanda-0.5+recovery", ["--method", "wanda", "--sparsity", "0.5", "--fine-tune-steps", str(args.recovery_steps)]),
        ("gradual-0.5", ["--method", "magnitude", "--sparsity", "0.5", "--gradual", "--fine-tune-steps",
                         str(args.gradual_steps)]),
    ):
        folder = made / name.replace("+", "-")
        run(compression("prune", *common, "--out", str(folder), *extra, *recovery), work)
        variants[name] = folder
    half = "2"  # the teacher has 4 blocks
    for name, extra in (
        ("student+teacher", ["--alpha", str(args.alpha), "--temperature", str(args.temperature)]),
        ("student-no-teacher", ["--alpha", "0"]),
        ("student-scratch-no-teacher", ["--alpha", "0", "--init", "scratch"]),
    ):
        folder = made / name
        run(compression("distill", *common, "--out", str(folder), "--layers", half, "--steps", str(args.distill_steps),
                        *extra), work)
        variants[name] = folder
    report = work / "report-shakespeare"
    run(compression("report", "--ckpt", str(teacher), "--config", str(config), "--out", str(report),
                    "--methods", *GPT_METHODS, *[f"--variant={n}={p}" for n, p in variants.items()],
                    "--seconds", str(args.seconds), "--no-tracking"), work)
    return teacher, report


def structured_speed(args: argparse.Namespace, work: Path, teacher: Path) -> Path:
    """Structured pruning's speed-up alone: three networks timed in many interleaved rounds, as
    the differences are a few percent on this model and a shared machine drifts by as much."""
    report = work / "report-structured-speed"
    run(compression("report", "--ckpt", str(teacher), "--config", str(ROOT / "configs" / "shakespeare_char.yaml"),
                    "--out", str(report), "--methods", "neurons=0.25", "heads=0.25", "--seconds", str(args.speed_seconds),
                    "--rounds", str(args.speed_rounds), "--batch-size", "64", "--no-tracking"), work)
    return report


def sst2(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    # The shipped config with the data folder's paths and from random initialization (its
    # pretrained checkpoint comes from another benchmark), written beside the runs.
    settings = yaml.safe_load((ROOT / "configs" / "sst2_bert.yaml").read_text())
    settings["data"]["init_args"].update(train=str(args.data / "sst2" / "train.tsv"), test=str(args.data / "sst2" / "dev.tsv"))
    settings["model"]["init_args"].update(pretrained=None, network="bert-mini")
    config = work / "sst2_bert.yaml"
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    classifier = args.classifier or train(work, "sst2", config)
    made = work / "sst2"
    folder = made / "magnitude-0.5-recovery"
    run(compression("prune", "--ckpt", str(classifier), "--config", str(config), "--out", str(folder), "--overwrite",
                    "--method", "magnitude", "--sparsity", "0.5", "--fine-tune-steps", str(args.recovery_steps),
                    "--lr", str(args.classifier_recovery_lr)), work)
    report = work / "report-sst2"
    run(compression("report", "--ckpt", str(classifier), "--config", str(config), "--out", str(report), "--split", "test",
                    "--methods", *CLASSIFIER_METHODS, f"--variant=magnitude-0.5+recovery={folder}",
                    "--seconds", str(args.seconds), "--no-tracking"), work)
    return classifier, report


def checks(gpt: list[dict], speed: list[dict], classifier: list[dict]) -> list[list[str]]:
    """The targets, each with the measured figure and whether it is met."""
    rows = {r["name"]: r for r in gpt}
    timed = {r["name"]: r for r in speed}
    original = rows["original"]

    def size_ratio(name: str) -> float:
        return original["linear_bytes"] / rows[name]["linear_bytes"]

    def change(name: str) -> str:
        return f"{rows[name]['change']:+.2%}"

    teacher, kd = original["value"], rows["student+teacher"]["value"]
    no_teacher = rows["student-no-teacher"]["value"]
    kept = (no_teacher - kd) / (no_teacher - teacher) if no_teacher != teacher else float("nan")
    speed = timed["neurons=0.25"]["large_batch_rate"] / timed["original"]["large_batch_rate"]
    speed1 = timed["neurons=0.25"]["small_batch_rate"] / timed["original"]["small_batch_rate"]
    table = [
        ["int8: val perplexity up by under 1%, linear weights about 4x smaller",
         f"{change('int8')}, {size_ratio('int8'):.2f}x smaller", _yes(rows["int8"]["change"] < 0.01)],
        ["NF4: up by under 5%, about 7x smaller", f"{change('nf4')}, {size_ratio('nf4'):.2f}x smaller",
         _yes(rows["nf4"]["change"] < 0.05)],
        ["50% unstructured pruning plus a short recovery fine-tune: under 3%", change("magnitude-0.5+recovery"),
         _yes(rows["magnitude-0.5+recovery"]["change"] < 0.03)],
        ["Wanda at 50% beats magnitude at 50% before recovery",
         f"{change('wanda=0.5')} against {change('magnitude=0.5')}",
         _yes(rows["wanda=0.5"]["value"] < rows["magnitude=0.5"]["value"])],
        ["25% of MLP neurons removed: measurably faster inference",
         f"{speed:.2f}x the original's tokens/s at batch 64, {speed1:.2f}x at batch 1 (best of "
         f"{SPEED_ROUNDS} interleaved rounds)", _yes(speed > 1.03)],
        ["a student with half the layers keeps most of the teacher's gain over the same student without the teacher",
         f"perplexity {kd:.3f} with the teacher, {no_teacher:.3f} without, teacher {teacher:.3f}: {kept:.0%} of the gap closed",
         _yes(kept > 0.5)],
    ]
    by_name = {r["name"]: r for r in classifier}
    table.append(["SST-2 classifier: accuracy of int8 / NF4 / 50% magnitude + recovery against the original",
                  " / ".join(f"{by_name[n]['value']:.4f}" for n in ("int8", "nf4", "magnitude-0.5+recovery"))
                  + f" against {by_name['original']['value']:.4f}", "-"])
    return table


def _yes(met: bool) -> str:
    return "yes" if met else "no"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with tinyshakespeare.txt and sst2/")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a new temporary folder)")
    parser.add_argument("--gpt", type=Path, default=None, help="a trained Shakespeare GPT checkpoint to use")
    parser.add_argument("--classifier", type=Path, default=None, help="a trained SST-2 classifier checkpoint to use")
    parser.add_argument("--gpt-steps", type=int, default=5000, help="training steps of the Shakespeare GPT")
    parser.add_argument("--recovery-steps", type=int, default=200)
    parser.add_argument("--recovery-lr", type=float, default=5e-4, help="a tenth of the GPT config's peak")
    parser.add_argument("--classifier-recovery-lr", type=float, default=3e-5, help="a tenth of the SST-2 config's")
    parser.add_argument("--gradual-steps", type=int, default=400)
    parser.add_argument("--distill-steps", type=int, default=2000)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--seconds", type=float, default=6.0, help="time each throughput measurement this long")
    parser.add_argument("--speed-seconds", type=float, default=40.0, help="timing per network in the speed report")
    parser.add_argument("--speed-rounds", type=int, default=SPEED_ROUNDS)
    parser.add_argument("--no-write", action="store_true", help="print, do not append to BENCHMARKS.md")
    args = parser.parse_args()
    args.data = args.data.resolve()
    os.environ["LMEXP_DATA_DIR"] = str(args.data)  # where data.source: tinyshakespeare is found
    work = (args.work or Path(tempfile.mkdtemp(prefix="bench-compression-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        handlers=[logging.StreamHandler(), logging.FileHandler(work / "bench_compression.log")])
    log.info(f"work folder {work}")
    teacher, gpt_report = shakespeare(args, work)
    speed_report = structured_speed(args, work, teacher)
    _, sst2_report = sst2(args, work)
    command = command_line("benchmarks/bench_compression.py", parser, args, always="--data ../shared/data")
    for title, folder in (("Compression: a character GPT on Tiny Shakespeare", gpt_report),
                          ("Compression: structured pruning's speed-up on that GPT", speed_report),
                          ("Compression: a BERT-mini classifier on SST-2", sst2_report)):
        table = (folder / "report.md").read_text().split("\n\n", 2)[2].strip()
        publish(title, command, table, not args.no_write)
    publish("Compression: the targets", command,
            markdown_table(["target", "measured", "met"], checks(report_rows(gpt_report), report_rows(speed_report), report_rows(sst2_report))),
            not args.no_write)


if __name__ == "__main__":
    main()
