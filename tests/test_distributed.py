"""Two CPU processes under DDP: each rank sees different data, both end with the same weights."""

import json
import os
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
    command = [
        sys.executable, "-m", "lmexp", "fit", "--config", str(ROOT / "configs" / "ddp_cpu.yaml"),
        f"--data.source={corpus}", "--trainer.max_steps=8", "--trainer.val_check_interval=4",
        "--trainer.limit_val_batches=2", "--model.warmup_steps=2", "--model.network_overrides={block_size: 32}",
        f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.enable_progress_bar=false",
        "--trainer.callbacks+=tests.helpers.RankRecorder", f"--trainer.callbacks.out_dir={record}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    seen = [json.loads((record / f"batches-{rank}.json").read_text()) for rank in (0, 1)]
    assert all(s["world_size"] == 2 and len(s["batches"]) == 8 for s in seen)
    assert set(seen[0]["batches"]).isdisjoint(seen[1]["batches"])  # each rank saw different data

    weights = [torch.load(record / f"weights-{rank}.pt", weights_only=True) for rank in (0, 1)]
    initial = torch.load(record / "initial-0.pt", weights_only=True)
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(initial[name], weights[0][name]) for name in initial)  # it did train
