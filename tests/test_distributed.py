"""Two CPU processes under DDP, with the configs' callbacks (samples, early stopping, checkpoints):
each rank sees different data, both end with the same weights, and nothing on one rank waits for
the other."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import make_corpus

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.distributed
def test_ddp_two_cpu_processes(tmp_path: Path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus(400))
    record = tmp_path / "record"
    # The README's second form: the quickstart config (with its sample, early-stopping and
    # checkpoint callbacks) on two processes; samples fall on a validation step and at the end.
    command = [
        sys.executable, "-m", "lmexp", "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
        "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.accelerator=cpu",
        f"--data.source={corpus}", "--data.batch_size=8", "--trainer.max_steps=8", "--trainer.val_check_interval=4",
        "--trainer.limit_val_batches=2", "--model.warmup_steps=2", "--model.network_overrides={block_size: 32}",
        "--trainer.log_every_n_steps=2", "--trainer.callbacks.every_n_steps=4", "--trainer.callbacks.max_new_tokens=20",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--trainer.callbacks+=tests.helpers.RankRecorder", f"--trainer.callbacks.out_dir={record}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    samples = (next((tmp_path / "run").rglob("samples.txt"))).read_text()
    assert samples.count("--- sample at step 4 ---") == 1 and samples.count("--- sample at step 8 ---") == 1
    assert "sample after 8 steps" not in samples  # the step-8 sample is the final one: not twice
    assert (tmp_path / "run" / "latest" / "checkpoints" / "best" / "model.safetensors").is_file()
    # One MLflow run for the job, not one per rank, in the run folder rank 0 chose.
    from tests.test_tracking import history, runs_in

    (run,) = runs_in(tmp_path / "run")
    assert run.info.status == "FINISHED" and history(run, "val/loss") == [3, 7]
    assert [p.name for p in (tmp_path / "run").iterdir() if not p.is_symlink()] == [Path(run.data.tags["run_dir"]).name]
    # Not a terminal: progress comes as plain lines, from rank 0 only.
    assert result.stdout.count("step 2/8 | loss ") == 1 and re.search(r"validation at step 8: val/acc [0-9.]+, val/bpb", result.stdout)

    seen = [json.loads((record / f"batches-{rank}.json").read_text()) for rank in (0, 1)]
    assert all(s["world_size"] == 2 and len(s["batches"]) == 8 for s in seen)
    assert set(seen[0]["batches"]).isdisjoint(seen[1]["batches"])  # each rank saw different data

    weights = [torch.load(record / f"weights-{rank}.pt", weights_only=True) for rank in (0, 1)]
    initial = torch.load(record / "initial-0.pt", weights_only=True)
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(initial[name], weights[0][name]) for name in initial)  # it did train


@pytest.mark.distributed
def test_sigterm_stops_both_ddp_ranks_at_the_same_batch_with_a_checkpoint(tmp_path: Path):
    """Lightning's own SIGTERM handling under DDP could deadlock (a collective called from the
    signal handler); every rank must stop together, save, and exit 143. The signal reaches rank 1
    alone, in the middle of a batch: rank 0 learns of it only from the ranks' shared decision."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus(400))
    ranks = tmp_path / "ranks"
    command = [
        sys.executable, "-m", "lmexp", "fit", "--config", str(ROOT / "configs" / "ddp_cpu.yaml"),
        f"--data.source={corpus}", "--trainer.max_steps=200", "--trainer.val_check_interval=100",
        "--trainer.limit_val_batches=2", "--model.warmup_steps=2", "--model.network_overrides={block_size: 32}",
        f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.callbacks+=tests.distributed_probe.SignalOnRank",
        "--trainer.callbacks.step=5", "--trainer.callbacks.rank=1", "--trainer.callbacks.during=backward",
        "--trainer.callbacks+=tests.distributed_probe.LastBatch", f"--trainer.callbacks.out_dir={ranks}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # Its own process group: a rank that never stops is killed with the job, not left behind.
    job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        _, stderr = job.communicate(timeout=120)  # the stop takes seconds; a rank left running never ends
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.communicate()
        stopped = {p.name: json.loads(p.read_text()) for p in sorted(ranks.glob("rank*.json"))}
        pytest.fail(f"the job did not stop; the ranks that did: {stopped}")
    assert job.returncode == 143, stderr[-3000:]
    # Each rank stops after the batch the signal came in (batch 5, after 5 steps), and the
    # checkpoint holds that batch's step.
    seen = [json.loads((ranks / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [(r["rank"], r["world_size"], r["stopped_by"]) for r in seen] == [(0, 2, "SIGTERMException"),
                                                                             (1, 2, "SIGTERMException")], seen
    assert [(r["batch_idx"], r["global_step"]) for r in seen] == [(5, 6), (5, 6)], seen
    interrupted = tmp_path / "run" / "latest" / "checkpoints" / "interrupted.ckpt"
    assert torch.load(interrupted, weights_only=True)["global_step"] == 6

    from tests.test_tracking import runs_in

    (run,) = runs_in(tmp_path / "run")
    assert run.info.status == "KILLED"
