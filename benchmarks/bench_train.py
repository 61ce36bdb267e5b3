"""Training throughput: lmexp's full Lightning path against a plain PyTorch loop (and Hugging Face).

    python benchmarks/bench_train.py --source ../shared/data/tinyshakespeare.txt

For every (size, precision, compile) it trains the same GPT on the same batches three ways,
each in a fresh process inside a pseudo-terminal (so progress bars draw as they do for users):

- ``plain``: a minimal hand-written loop: forward, loss, backward, clip, fused AdamW, schedule;
- ``lmexp``: ``lmexp fit`` as ``lmexp.runs.build`` makes it, with its defaults (Rich progress
  bar, MLflow tracking, LR monitor, checkpointing, a run folder), the way users run it; the
  tracking store is a fresh SQLite file in the job's temporary folder (never ``./mlflow.db``),
  so MLflow's one-time start (import, creating the store) falls in the first steps, as in a
  user's first run, and shows in "first step s"; ``--lmexp-args=--trainer.logger=false`` turns
  tracking off (``bench_tracking.py`` measures what it costs per step);
- ``hf``: Hugging Face ``Trainer`` with ``GPT2LMHeadModel`` of the same shape (SDPA, exact GELU,
  fused AdamW), when ``transformers`` is installed.

Steps after a warm-up are timed (host clock; the device is synchronized at both ends), and the
table gives ms/step, tokens/s, the ratio to the plain loop, model FLOP/s as a fraction of the
matrix-product peak of the same dtype measured in the same run (MFU), peak memory and, with
``--compile on``, the compile time. Results are printed and appended to BENCHMARKS.md.

Sizes: ``recipe`` (nanoGPT's CPU recipe: 4 layers, 4 heads, 128 dims, block 64, batch 12,
dropout 0), ``medium`` (6 layers, 6 heads, 384 dims, block 256, batch 16, dropout 0.2) and
``gpt2-small`` (124M: 12 layers, 12 heads, 768 dims, vocab padded to 50304, block 256, batch 8)
for memory. On a CPU without bf16 units bf16 runs are emulated at ~1% of the fp32 matmul rate,
so they are measured on ``--slow-steps`` steps only, and skipped for sizes above ``recipe``
unless ``--force-slow``.
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES: dict[str, dict] = {
    "recipe": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0.0),
    "medium": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=16, dropout=0.2),
    "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768, block_size=256, batch_size=8, dropout=0.0, vocab_size=50304),
}
LR, BETAS, WEIGHT_DECAY, CLIP = 1e-3, (0.9, 0.99), 0.1, 1.0


@dataclass
class Job:
    mode: str  # plain | lmexp | hf
    size: str
    precision: str  # 32-true | bf16-mixed
    compile: bool
    steps: int
    warmup: int
    source: str
    device: str  # cpu | cuda
    optimizer: str = "adamw"  # adamw | adamw8bit
    activation_checkpointing: bool = False
    lmexp_args: tuple[str, ...] = ()  # extra CLI overrides for the lmexp mode


# ----------------------------------------------------------------------------- worker side
def _threads() -> None:
    import torch

    if hasattr(os, "sched_getaffinity"):  # honour taskset: one thread per CPU we may use
        torch.set_num_threads(len(os.sched_getaffinity(0)))


def _data(job: Job):
    """The train batches every mode uses: lmexp's char tokenizer and memmap cache."""
    from lmexp.data import TextDataModule

    shape = SIZES[job.size]
    data = TextDataModule(
        job.source, tokenizer="char", batch_size=shape["batch_size"], block_size=shape["block_size"],
        task="causal_lm", dedupe="none",
    )
    data.prepare_data()
    data.setup("fit")
    return data


def _network_overrides(job: Job, vocab_size: int) -> dict:
    shape = SIZES[job.size]
    overrides = {k: shape[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "dropout")}
    overrides["vocab_size"] = shape.get("vocab_size", vocab_size)
    overrides["activation_checkpointing"] = job.activation_checkpointing
    return overrides


def _flops_per_token(job: Job, n_params: int) -> float:
    """6N for the matmuls of forward and backward, plus attention scores and values (PaLM's)."""
    shape = SIZES[job.size]
    return 6 * n_params + 12 * shape["n_layer"] * shape["n_embd"] * shape["block_size"]


class StepTimer:
    """Marks the host time when optimizer step ``warmup`` and ``warmup + steps`` end."""

    def __init__(self, warmup: int, steps: int, device: str) -> None:
        self.warmup, self.steps, self.device = warmup, steps, device
        self.started = time.perf_counter()
        self.first_step_s: float | None = None
        self.marks: dict[int, float] = {}

    def _sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def step_done(self, step: int) -> bool:
        """Call after optimizer step ``step`` (1-based); True once the timed steps are done."""
        if step == 1:
            self._sync()
            self.first_step_s = time.perf_counter() - self.started
        if step in (self.warmup, self.warmup + self.steps):
            self._sync()
            self.marks[step] = time.perf_counter()
        return step >= self.warmup + self.steps

    def result(self) -> dict:
        seconds = self.marks[self.warmup + self.steps] - self.marks[self.warmup]
        return {"ms_per_step": 1000 * seconds / self.steps, "first_step_s": self.first_step_s}


def _run_plain(job: Job, data, timer: StepTimer) -> int:
    import torch

    from benchmarks.plain_loop import endless_batches, plain_optimizer, plain_step
    from lmexp.models import ModelConfig, build_model, count_parameters

    device = torch.device(job.device)
    config = ModelConfig(arch="gpt", **_network_overrides(job, data.vocab_size))
    model = build_model(config).to(device)
    forward = torch.compile(model) if job.compile else model
    total = job.warmup + job.steps
    optimizer, scheduler = plain_optimizer(
        model, LR, BETAS, WEIGHT_DECAY, min(100, total // 10), total + 1, 0.1, eight_bit=job.optimizer == "adamw8bit"
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=job.precision.startswith("bf16"))
    model.train()
    timer.started = time.perf_counter()  # as in the other modes: from the start of training
    for step, batch in enumerate(endless_batches(data), start=1):
        plain_step(forward, model, batch, optimizer, scheduler, CLIP, device, autocast)
        if timer.step_done(step):
            return count_parameters(model)
    raise AssertionError("unreachable")


def _run_lmexp(job: Job, data, timer: StepTimer, workdir: Path) -> int:
    import lightning.pytorch as pl

    from lmexp.models import count_parameters
    from lmexp.runs import build

    class TimerCallback(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if timer.step_done(trainer.global_step):
                trainer.should_stop = True

    shape = SIZES[job.size]
    network = _network_overrides(job, data.vocab_size)
    if shape.get("vocab_size") is None:
        del network["vocab_size"]  # it comes from the tokenizer
    overrides = json.dumps(network)
    args = [
        "--model=lmexp.CausalLM", "--model.network=gpt-nano", f"--model.network_overrides={overrides}",
        f"--model.lr={LR}", f"--model.betas=[{BETAS[0]}, {BETAS[1]}]", f"--model.weight_decay={WEIGHT_DECAY}",
        f"--model.warmup_steps={min(100, (job.warmup + job.steps) // 10)}", f"--model.compile={job.compile}",
        *([f"--model.optimizer={job.optimizer}"] if job.optimizer != "adamw" else []),
        "--data=lmexp.TextDataModule", f"--data.source={job.source}", "--data.tokenizer=char",
        f"--data.batch_size={shape['batch_size']}", "--data.dedupe=none",
        f"--trainer.precision={job.precision}", f"--trainer.max_steps={job.warmup + job.steps + 1}",
        f"--trainer.accelerator={job.device}", "--trainer.devices=1",
        f"--trainer.gradient_clip_val={CLIP}", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
        f"--trainer.default_root_dir={workdir}", "--seed_everything=1337", *job.lmexp_args,
    ]
    # Tracked as a user's run is, into a fresh store in this job's temporary folder.
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir.resolve() / 'mlflow.db'}"
    run = build("fit", args=args, callbacks=[TimerCallback()])
    timer.started = time.perf_counter()
    run.execute()
    return count_parameters(run.model.model)


def _run_hf(job: Job, data, timer: StepTimer, workdir: Path) -> int:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    from lmexp.models import count_parameters

    shape = SIZES[job.size]

    class Windows(torch.utils.data.Dataset):
        """The same windows as the other modes; GPT2LMHeadModel shifts labels itself."""

        def __init__(self) -> None:
            self.batches = [b for b in data.train_dataloader()]

        def __len__(self) -> int:
            return len(self.batches) * shape["batch_size"]

        def __getitem__(self, i: int) -> dict:
            batch = self.batches[i // shape["batch_size"]]
            row = i % shape["batch_size"]
            ids = batch["input_ids"][row]
            return {"input_ids": ids, "labels": ids}

    class TimerCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if timer.step_done(state.global_step):
                control.should_training_stop = True

    config = GPT2Config(
        vocab_size=shape.get("vocab_size", data.vocab_size), n_positions=shape["block_size"], n_embd=shape["n_embd"],
        n_layer=shape["n_layer"], n_head=shape["n_head"], resid_pdrop=shape["dropout"], embd_pdrop=shape["dropout"],
        attn_pdrop=shape["dropout"], activation_function="gelu", attn_implementation="sdpa",
    )
    model = GPT2LMHeadModel(config)
    arguments = TrainingArguments(
        output_dir=str(workdir), max_steps=job.warmup + job.steps + 1, per_device_train_batch_size=shape["batch_size"],
        learning_rate=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1], weight_decay=WEIGHT_DECAY, max_grad_norm=CLIP,
        warmup_steps=min(100, (job.warmup + job.steps) // 10), lr_scheduler_type="cosine", optim="adamw_torch_fused",
        bf16=job.precision.startswith("bf16"), use_cpu=job.device == "cpu", torch_compile=job.compile,
        logging_steps=50, report_to="none", save_strategy="no", dataloader_num_workers=0, seed=1337,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=Windows(), callbacks=[TimerCallback()])
    timer.started = time.perf_counter()
    trainer.train()
    return count_parameters(model)


def worker(job: Job) -> dict:
    _threads()
    import torch

    data = _data(job)
    timer = StepTimer(job.warmup, job.steps, job.device)
    with tempfile.TemporaryDirectory() as workdir:
        if job.mode == "plain":
            n_params = _run_plain(job, data, timer)
        elif job.mode == "lmexp":
            n_params = _run_lmexp(job, data, timer, Path(workdir))
        else:
            n_params = _run_hf(job, data, timer, Path(workdir))
    shape = SIZES[job.size]
    result = timer.result()
    tokens_per_step = shape["batch_size"] * shape["block_size"]
    # Position embeddings are a lookup, not a matmul: leave them out of N (nanoGPT does too).
    n_matmul = n_params - shape["block_size"] * shape["n_embd"]
    result.update(
        tokens_per_s=1000 * tokens_per_step / result["ms_per_step"],
        flops_per_token=_flops_per_token(job, n_matmul),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        peak_gpu_mb=torch.cuda.max_memory_allocated() / 2**20 if job.device == "cuda" else None,
        n_params=n_params, threads=torch.get_num_threads(),
    )
    return result


# ----------------------------------------------------------------------------- driver side
def matmul_peak(dtype_name: str, device: str) -> float:
    """The ceiling MFU is measured against: a large square product of the same dtype."""
    import torch

    from benchmarks.bench_matmul import gflops
    from lmexp.hardware import cpu_has_bf16_units

    dtype = {"32-true": torch.float32, "bf16-mixed": torch.bfloat16}[dtype_name]
    if device == "cuda":
        return gflops(8192, dtype, 20, device)
    emulated = dtype == torch.bfloat16 and not cpu_has_bf16_units()
    return gflops(512 if emulated else 2048, dtype, 5)


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The child side of ``run_in_terminal``: ``--worker JOB_JSON --result FILE``."""
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)


def answer_worker(args: argparse.Namespace, worker, job_type) -> bool:
    """In a child started by ``run_in_terminal``: run the job, write its result; True if it was one."""
    if not args.worker:
        return False
    Path(args.result).write_text(json.dumps(worker(job_type(**json.loads(args.worker)))))
    return True


def run_in_terminal(job, timeout: float, script: str | Path = __file__) -> dict:
    """Run one job in a fresh process attached to a pseudo-terminal; return its result.

    The process runs ``script --worker JOB_JSON --result FILE`` (``job`` is a dataclass) and
    writes its result to FILE as JSON.
    """
    controller, terminal = pty.openpty()
    with tempfile.NamedTemporaryFile(suffix=".json") as result_file:
        env = {**os.environ, "COLUMNS": "120", "LINES": "40", "PYTHONWARNINGS": "ignore"}
        process = subprocess.Popen(
            [sys.executable, str(script), "--worker", json.dumps(asdict(job)), "--result", result_file.name],
            stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal, env=env, cwd=ROOT,
        )
        os.close(terminal)
        output = bytearray()

        def drain() -> None:  # a terminal that is not read blocks the writer
            while True:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:
                    return
                if not chunk:
                    return
                output.extend(chunk[-65536:])
                del output[:-200_000]

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            code = "timeout"
        reader.join(timeout=5)
        os.close(controller)
        text = Path(result_file.name).read_text()
    if code != 0 or not text:
        tail = output.decode(errors="replace")[-3000:]
        return {"error": f"exit {code}: {tail.strip().splitlines()[-1] if tail.strip() else ''}", "log": tail}
    return json.loads(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="text file (Tiny Shakespeare); default: the built-in python-docs corpus")
    parser.add_argument("--sizes", nargs="+", default=["recipe", "medium"], choices=list(SIZES))
    parser.add_argument("--modes", nargs="+", default=["plain", "lmexp", "hf"], choices=["plain", "lmexp", "hf"],
                        help="hf needs pip install -e .[bench]")
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"], choices=["32-true", "bf16-mixed"])
    parser.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--optimizers", nargs="+", default=["adamw"], choices=["adamw", "adamw8bit"])
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--lmexp-args", nargs="*", default=[], help="extra CLI overrides for the lmexp mode")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 60 recipe, 10 larger)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 10 recipe, 2 larger)")
    parser.add_argument("--slow-steps", type=int, default=6, help="timed steps for emulated bf16")
    parser.add_argument("--force-slow", action="store_true", help="run emulated bf16 at every size")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--timeout", type=float, default=900, help="seconds per job")
    parser.add_argument("--title", default="Training throughput")
    parser.add_argument("--output", default=None, help="markdown file to append to (default BENCHMARKS.md)")
    parser.add_argument("--json", default=None, help="also write all results here")
    add_worker_arguments(parser)
    args = parser.parse_args()
    if answer_worker(args, worker, Job):
        return

    import torch

    from benchmarks.report import BENCHMARKS_FILE, append_entry, markdown_table
    from lmexp.hardware import cpu_has_bf16_units

    _threads()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    os.environ.setdefault("LMEXP_CACHE_DIR", tempfile.mkdtemp(prefix="lmexp-bench-cache-"))
    source = args.source or "python-docs"
    fast_bf16 = device == "cuda" or cpu_has_bf16_units()
    modes = [m for m in args.modes if m != "hf" or _has_transformers()]
    peaks = {p: matmul_peak(p, device) for p in args.precisions}
    print("matmul peak GFLOP/s:", {p: round(v, 1) for p, v in peaks.items()}, flush=True)

    rows, results = [], []
    for size in args.sizes:
        big = size != "recipe"
        for precision in args.precisions:
            slow = precision.startswith("bf16") and not fast_bf16
            for compile_flag in args.compile:
                for optimizer in args.optimizers:
                    baseline = None
                    for mode in modes:
                        steps = args.steps or (10 if big else 60)
                        warmup = args.warmup if args.warmup is not None else (2 if big else 10)
                        if slow:
                            steps, warmup = min(steps, args.slow_steps), min(warmup, 2)
                        job = Job(mode, size, precision, compile_flag == "on", steps, warmup, source, device,
                                  optimizer, args.activation_checkpointing, tuple(args.lmexp_args))
                        label = f"{size} {precision} compile={compile_flag} {optimizer} {mode}"
                        if slow and big and not args.force_slow:
                            row = {"job": asdict(job), "skipped": "bf16 emulated on this CPU (no bf16 units)"}
                        else:
                            print(f"running {label} ...", flush=True)
                            row = {"job": asdict(job), **run_in_terminal(job, args.timeout)}
                        print(label, {k: v for k, v in row.items() if k not in ("job", "log")}, flush=True)
                        results.append(row)
                        if mode == "plain" and "ms_per_step" in row:
                            baseline = row["ms_per_step"]
                        rows.append(_table_row(row, baseline, peaks[precision], device, slow))
    if args.json:
        Path(args.json).write_text(json.dumps({"peaks_gflops": peaks, "results": results}, indent=1))
    header = ["size", "precision", "compile", "optimizer", "mode", "steps", "ms/step", "tokens/s", "vs plain",
              "MFU", "peak RSS MB" if device == "cpu" else "peak GPU MB", "first step s"]
    peak_text = ", ".join(f"{p} {v:,.0f} GFLOP/s" for p, v in peaks.items())
    table = markdown_table(header, rows) + f"\n\nMatrix-product peak on this {device} (MFU denominator): {peak_text}."
    command = "python benchmarks/bench_train.py " + " ".join(a for a in sys.argv[1:])
    append_entry(f"{args.title} ({device})", command, table, Path(args.output or BENCHMARKS_FILE))


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("transformers is not installed: skipping the hf mode (pip install -e \".[bench]\")")
        return False
    return True


def _table_row(row: dict, baseline: float | None, peak_gflops: float, device: str, slow: bool) -> list[str]:
    job = row["job"]
    head = [job["size"], job["precision"], "on" if job["compile"] else "off", job["optimizer"], job["mode"]]
    if "ms_per_step" not in row:
        reason = row.get("skipped") or row.get("error", "failed")
        return head + [reason[:60]] + [""] * 6
    mfu = row["tokens_per_s"] * row["flops_per_token"] / (peak_gflops * 1e9)
    # An emulated bf16 product's speed depends on its shape: no peak to compare against.
    mfu_text = "n/a (emulated)" if slow else f"{100 * mfu:.1f}%"
    memory = row["peak_rss_mb"] if device == "cpu" else row["peak_gpu_mb"]
    ratio = f"{baseline / row['ms_per_step']:.3f}x" if baseline else ""
    steps = f"{job['steps']}" + (" (emulated bf16)" if slow else "")
    return head + [
        steps, f"{row['ms_per_step']:.1f}", f"{row['tokens_per_s']:,.0f}", ratio, mfu_text,
        f"{memory:,.0f}", f"{row['first_step_s']:.1f}",
    ]


if __name__ == "__main__":
    main()
