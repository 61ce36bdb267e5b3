"""``lmexp chaos --config X.yaml``: inject the faults long runs meet into short runs of your config.

Each scenario runs a short ``lmexp fit`` of the config in a process of its own with one fault armed
at an exact point (``lmexp.faults``: a kill while a checkpoint or the export is being written, a
SIGTERM, a full disk, a NaN loss, a kill while the token cache or the tracking store is being
created), then resumes it with ``--ckpt_path last`` and checks what a user relies on:

- the faulted run exits as it should (killed, 143 after SIGTERM, 2 with one ``error:`` line and no
  traceback for a full disk or a diverged loss);
- every checkpoint and export left on disk loads, and none holds non-finite weights;
- the resumed run ends with exactly the weights of an uninterrupted run of the same config;
- no temporary file is left in the run folder or ``$TMPDIR``, and no process is left.

The same scenarios make up the fault-injection suite (``pytest -m fault``, RELIABILITY.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from lmexp.arguments import OneLineArgumentParser
from lmexp.atomic import TEMPORARY_PREFIX, write_text

__all__ = [
    "RUN_NAME", "SCENARIOS", "TAG_VARIABLE", "Chaos", "Outcome", "Scenario", "exit_problems", "final_weights",
    "large_files", "processes_tagged", "run", "run_chaos", "saved_problems", "temporaries", "weight_problems",
]

RUN_NAME = "chaos"
TAG_VARIABLE = "LMEXP_CHAOS_TAG"  # marks every process a scenario starts, to find any left behind


@dataclass(frozen=True)
class Scenario:
    name: str
    what: str
    fault: str | None  # LMEXP_FAULT of the faulted run; {mid} is the middle step
    exit_code: int  # of the faulted run: -9 killed, 143 SIGTERM, 2 a one-line error
    resume: bool = True  # resume with --ckpt_path last and compare with the reference weights
    fresh_cache: bool = False  # build the token cache anew (the fault strikes while it is built)
    fresh_store: bool = False  # a tracking store that does not exist yet
    damage: Callable[[Path], None] | None = None  # done to the run folder between the two runs


def _truncate_last(run: Path) -> None:
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("kill-at-step", "SIGKILL between two checkpoints", "train.step@{mid}:kill", -9),
    Scenario("kill-in-checkpoint", "SIGKILL with half a checkpoint written", "checkpoint.write@2:kill", -9),
    Scenario("kill-before-rename", "SIGKILL with a checkpoint written, before its rename", "checkpoint.commit@2:kill", -9),
    Scenario("kill-in-export", "SIGKILL with half an export written", "export.write@2:kill", -9),
    Scenario("sigterm", "SIGTERM (a scheduler's pre-emption)", "train.step@{mid}:term", 143),
    Scenario("disk-full-checkpoint", "no space left while writing a checkpoint", "checkpoint.write@2:enospc", 2),
    Scenario("disk-full-export", "no space left while writing the export", "export.write@2:enospc", 2),
    Scenario("nan-loss", "the loss turns NaN", "train.loss@{mid}:diverge", 2, resume=False),
    Scenario("kill-in-cache", "SIGKILL while the token cache is written", "cache.write:kill", -9, fresh_cache=True),
    Scenario("kill-in-store", "SIGKILL while the tracking store is created", "store.create:kill", -9, fresh_store=True),
    Scenario("truncated-last", "last.ckpt cut short after a kill", "train.step@{mid}:kill", -9, damage=_truncate_last),
)


@dataclass
class Outcome:
    scenario: str
    ok: bool
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


class Chaos:
    """Runs scenarios of one fit config in ``out``; ``extra`` are further fit arguments (DDP, say)."""

    def __init__(self, config: Path, out: Path, steps: int = 12, extra: list[str] | None = None,
                 log: Callable[[str], None] = print) -> None:
        if steps < 6:
            raise ValueError(f"steps={steps} is too few: scenarios need at least 6 (checkpoints every steps/3)")
        self.config = Path(config).resolve()
        self.out = Path(out).resolve()
        self.steps = steps
        self.every = max(2, steps // 3)
        self.extra = list(extra or [])
        self.log = log
        self.cache = self.out / "cache"
        self._reference: dict | None = None

    # ------------------------------------------------------------------ running fits
    def fit_args(self, root: Path) -> list[str]:
        every = str(self.every)
        return [
            "fit", "--config", str(self.config), f"--trainer.max_steps={self.steps}",
            f"--trainer.val_check_interval={every}", "--trainer.check_val_every_n_epoch=null",
            "--trainer.limit_val_batches=2", f"--checkpoint.every_n_train_steps={every}",
            f"--trainer.default_root_dir={root}", f"--run_name={RUN_NAME}", *self.extra,
        ]

    def fit(self, root: Path, fault: str | None = None, resume: bool = False, cache: Path | None = None,
            store: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 900) -> subprocess.CompletedProcess:
        """``lmexp fit`` of the config in a process of its own, in ``root``, with ``fault`` armed
        (``{mid}``: the middle step); its output goes to ``root/run.log`` or ``root/resume.log``."""
        tag = uuid.uuid4().hex
        tmp = root / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "LMEXP_CACHE_DIR": str(cache or self.cache), "TMPDIR": str(tmp), TAG_VARIABLE: tag,
               "MLFLOW_TRACKING_URI": f"sqlite:///{store or self.out / 'mlflow.db'}", "PYTHONUNBUFFERED": "1",
               **(env or {})}
        env.pop("LMEXP_FAULT", None)
        env.pop("LMEXP_RUN_DIR", None)
        if fault:
            env["LMEXP_FAULT"] = fault.format(mid=self.steps // 2 + 1)
        args = self.fit_args(root) + (["--ckpt_path", "last"] if resume else [])
        done = subprocess.run([sys.executable, "-m", "lmexp", *args], check=False, env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        with contextlib.suppress(OSError):  # the run's own disk may be full: the result still counts
            (root / f"{'resume' if resume else 'run'}.log").write_text(
                f"$ LMEXP_FAULT={env.get('LMEXP_FAULT', '')} lmexp {' '.join(args)}\nexit {done.returncode}\n"
                f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}")
        left = processes_tagged(tag)
        if left:
            for pid in left:
                with contextlib.suppress(OSError):
                    os.kill(pid, 9)
            raise AssertionError(f"processes left behind: {left}")
        return done

    def reference(self) -> dict:
        """The weights of an uninterrupted run (built once)."""
        if self._reference is None:
            root = self.out / "reference"
            shutil.rmtree(root, ignore_errors=True)
            done = self.fit(root)
            if done.returncode != 0:
                raise RuntimeError(f"the uninterrupted run failed (exit {done.returncode}): see {root / 'run.log'}")
            self._reference = final_weights(root / RUN_NAME)
        return self._reference

    # ------------------------------------------------------------------ one scenario
    def run(self, scenario: Scenario) -> Outcome:
        started = time.perf_counter()
        try:
            problems = self._check(scenario)
        except Exception as err:  # noqa: BLE001  (the check itself broke, e.g. a file it needs is missing: a failed scenario)
            problems = [f"{type(err).__name__}: {err}"]
        outcome = Outcome(scenario.name, not problems, problems, time.perf_counter() - started)
        self.log(f"{scenario.name}: {'ok' if outcome.ok else 'FAILED: ' + '; '.join(problems)} "
                 f"({outcome.seconds:.0f} s; logs in {self.out / scenario.name})")
        return outcome

    def _check(self, scenario: Scenario) -> list[str]:
        problems: list[str] = []
        reference = self.reference() if scenario.resume else None
        root = self.out / scenario.name
        shutil.rmtree(root, ignore_errors=True)
        cache = root / "cache" if scenario.fresh_cache else None
        store = root / "mlflow.db" if scenario.fresh_store else None
        done = self.fit(root, scenario.fault, cache=cache, store=store)
        problems += exit_problems("faulted run", done, scenario.exit_code)
        run = root / RUN_NAME
        problems += [f"after the fault: {p}" for p in saved_problems(run)]
        if scenario.damage is not None and run.is_dir():
            scenario.damage(run)
        if scenario.resume:
            again = self.fit(root, resume=True, cache=cache, store=store)
            problems += exit_problems("resumed run", again, 0)
            if again.returncode == 0:
                problems += weight_problems(reference, final_weights(run))
                problems += saved_problems(run)
                problems += [f"temporary file left: {p}" for p in temporaries(root)]
        problems += [f"temporary file left in $TMPDIR: {p}" for p in large_files(root / "tmp", run)]
        return problems


# ---------------------------------------------------------------------- the checks
def exit_problems(what: str, done: subprocess.CompletedProcess, expected: int) -> list[str]:
    problems = []
    if done.returncode != expected:
        problems.append(f"{what} exited {done.returncode}, expected {expected}")
    if "Traceback (most recent call last)" in done.stderr:
        problems.append(f"{what} printed a traceback")
    if expected == 2:
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        if len(errors) != 1:
            problems.append(f"{what} printed {len(errors)} 'error:' lines, expected one")
    return problems


def saved_problems(run: Path) -> list[str]:
    """Checkpoints and exports in the run folder that do not load, or hold non-finite weights."""
    import torch

    from lmexp.checkpoints import load_checkpoint, read_checkpoint
    from lmexp.errors import CheckpointError

    problems = []
    folder = run / "checkpoints"
    for path in sorted(p for p in folder.glob("*.ckpt") if not p.name.startswith(TEMPORARY_PREFIX)) \
            if folder.is_dir() else ():
        try:
            state = read_checkpoint(path).get("state_dict", {})
        except CheckpointError as err:
            problems.append(f"{path.name} does not load ({err})")
            continue
        if any(t.is_floating_point() and not torch.isfinite(t).all() for t in state.values()):
            problems.append(f"{path.name} holds non-finite weights")
    for export in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(TEMPORARY_PREFIX)) \
            if folder.is_dir() else ():
        try:
            loaded = load_checkpoint(export)
        except CheckpointError as err:
            problems.append(f"export {export.name}/ does not load ({err})")
            continue
        if any(t.is_floating_point() and not torch.isfinite(t).all() for t in loaded.model.state_dict().values()):
            problems.append(f"export {export.name}/ holds non-finite weights")
    return problems


def final_weights(run: Path) -> dict:
    from lmexp.checkpoints import read_checkpoint

    checkpoint = read_checkpoint(run / "checkpoints" / "last.ckpt")
    return {"step": checkpoint.get("global_step"), "state": checkpoint.get("state_dict", {})}


def weight_problems(reference: dict | None, resumed: dict) -> list[str]:
    import torch

    if reference is None:
        return []
    if resumed["step"] != reference["step"]:
        return [f"resumed run ended at step {resumed['step']}, the uninterrupted one at {reference['step']}"]
    differ = [k for k, v in reference["state"].items()
              if k not in resumed["state"] or not torch.equal(v, resumed["state"][k])]
    return [f"resumed weights differ from the uninterrupted run's ({len(differ)} tensors, e.g. {differ[0]})"] \
        if differ else []


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob(f"{TEMPORARY_PREFIX}*")]


def large_files(folder: Path, run: Path) -> list[Path]:
    """Files in ``folder`` of at least half a checkpoint's size: a checkpoint written there and left."""
    last = run / "checkpoints" / "last.ckpt"
    floor = last.stat().st_size // 2 if last.is_file() else 1 << 20
    return [p for p in folder.rglob("*") if p.is_file() and p.stat().st_size >= floor] if folder.is_dir() else []


def processes_tagged(tag: str) -> list[int]:
    """Processes whose environment carries ``tag`` (Linux); they should all have ended."""
    found = []
    needle = f"{TAG_VARIABLE}={tag}".encode()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


# ---------------------------------------------------------------------- the command
def run_chaos(argv: list[str]) -> int:
    """``lmexp chaos --config X.yaml``: run the fault scenarios on a config; exit 1 if any fails."""
    parser = OneLineArgumentParser(prog="lmexp chaos", description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("--config", help="the fit config to test")
    parser.add_argument("--steps", type=int, default=12, help="training steps of each run (checkpoints every third)")
    parser.add_argument("--scenarios", default=None,
                        help=f"comma-separated subset of: {', '.join(s.name for s in SCENARIOS)}")
    parser.add_argument("--out", default=None, help="folder for the runs and the report (default: a temporary one)")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    options, extra = parser.parse_known_args(argv)
    if options.list:
        for scenario in SCENARIOS:
            print(f"{scenario.name:22} {scenario.what} (LMEXP_FAULT={scenario.fault})")
        return 0
    if options.config is None:
        parser.error("--config is required: the fit config whose runs are tested")
    if not Path(options.config).is_file():
        parser.error(f"--config {options.config!r} does not exist")
    chosen = list(SCENARIOS)
    if options.scenarios:
        names = [name.strip() for name in options.scenarios.split(",") if name.strip()]
        unknown = [n for n in names if n not in {s.name for s in SCENARIOS}]
        if unknown:
            parser.error(f"--scenarios: unknown {', '.join(unknown)} (choose from {', '.join(s.name for s in SCENARIOS)})")
        chosen = [s for s in SCENARIOS if s.name in names]
    out = Path(options.out) if options.out else Path(tempfile.mkdtemp(prefix="lmexp-chaos-"))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "chaos.log", "a", encoding="utf-8") as log_file:
        def log(line: str) -> None:
            print(line, flush=True)
            log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")
            log_file.flush()

        try:
            chaos = Chaos(Path(options.config), out, options.steps, extra, log)
        except ValueError as err:
            parser.error(str(err))
        log(f"chaos: {len(chosen)} scenarios of {options.config}, {options.steps} steps each, in {out}")
        try:
            chaos.reference()
        except RuntimeError as err:
            log(f"error: {err}")
            return 1
        outcomes = [chaos.run(scenario) for scenario in chosen]
        write_text(out / "chaos-report.json", json.dumps([vars(o) for o in outcomes], indent=2))
        failed = [o for o in outcomes if not o.ok]
        log(f"chaos: {len(outcomes) - len(failed)} of {len(outcomes)} scenarios passed; report: {out / 'chaos-report.json'}")
        return 1 if failed else 0


def run(argv: list[str]) -> NoReturn:
    """``lmexp chaos``: exits 0 when every scenario passed, 1 otherwise."""
    raise SystemExit(run_chaos(argv))
