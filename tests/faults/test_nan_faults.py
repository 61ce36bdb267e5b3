"""Diverging runs end to end: ``lmexp fit`` in a subprocess stops (or skips) and never saves NaN weights."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lmexp.checkpoints import load_checkpoint
from tests.conftest import make_corpus

pytestmark = pytest.mark.fault
ROOT = Path(__file__).resolve().parents[2]


def tiny_config(folder: Path, steps: int = 8) -> Path:
    corpus = folder / "corpus.txt"
    corpus.write_text(make_corpus())
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "seed_everything": 3,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": steps, "limit_val_batches": 1,
            "val_check_interval": 1, "check_val_every_n_epoch": None, "enable_model_summary": False,
            "gradient_clip_val": 1.0, "log_every_n_steps": 1, "default_root_dir": str(folder / "runs"),
            "callbacks": [{"class_path": "lmexp.callbacks.SampleText",
                           "init_args": {"every_n_steps": 0, "max_new_tokens": 10}}],
        },
        "model": {"class_path": "lmexp.CausalLM", "init_args": {"network": "gpt-tiny", "warmup_steps": 0}},
        "data": {"class_path": "lmexp.TextDataModule",
                 "init_args": {"source": str(corpus), "tokenizer": "char", "batch_size": 2}},
    }))
    return path


def lmexp_fit(folder: Path, *args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
           "LMEXP_CACHE_DIR": str(folder / "cache")}
    env.pop("LMEXP_FAULT", None)
    if fault:
        env["LMEXP_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "lmexp", "fit", "--config", str(tiny_config(folder)), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


def assert_finite(path: Path) -> None:
    model = load_checkpoint(path).model
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), f"{path}: {name} is not finite"


def test_a_diverging_learning_rate_stops_in_one_line_and_saves_no_nan(tmp_path: Path):
    result = lmexp_fit(tmp_path, "--model.init_args.lr", "1e6")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    checkpoints = tmp_path / "runs" / "latest" / "checkpoints"
    assert error.startswith("error: training diverged at step "), result.stderr[-3000:]
    assert re.search(r"\(learning rate \d[.\d]*e\+0[56]\)", error)  # 1e6 on a cosine schedule
    named = re.search(r"last good checkpoint: (\S+) \(resume from it", error)
    assert named and Path(named[1]).resolve() == (checkpoints / "last.ckpt").resolve(), error
    for saved in ("last.ckpt", "best.ckpt", "interrupted.ckpt", "best"):
        assert_finite(checkpoints / saved)


def test_skip_mode_leaves_out_one_poisoned_step_and_trains_to_the_end(tmp_path: Path):
    result = lmexp_fit(tmp_path, "--guard.mode", "skip", fault="train.loss@3:nan")
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert output.count("skipped: non-finite loss or gradient") == 1 and "step 3 skipped" in output
    assert "1 training step(s) skipped" in output
    checkpoints = tmp_path / "runs" / "latest" / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 8
    for saved in ("last.ckpt", "best.ckpt", "best"):
        assert_finite(checkpoints / saved)
    assert not (checkpoints / "interrupted.ckpt").exists()


def test_skip_mode_stops_after_max_skips_in_a_row(tmp_path: Path):
    result = lmexp_fit(tmp_path, "--guard.mode", "skip", "--guard.max_skips", "3", fault="train.loss@2:diverge")
    assert result.returncode == 2, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: training diverged at step 4: 3 non-finite steps in a row"), error
    checkpoints = tmp_path / "runs" / "latest" / "checkpoints"
    for saved in ("last.ckpt", "best.ckpt", "interrupted.ckpt", "best"):
        assert_finite(checkpoints / saved)
