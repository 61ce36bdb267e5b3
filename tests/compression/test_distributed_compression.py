"""Compression commands that train (recovery fine-tuning, distillation) under 2-process DDP:
every rank runs the command, rank 0 alone writes the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from compression.core import sparsity_table
from lmexp.checkpoints import load_checkpoint
from lmexp.runs import build
from tests.conftest import make_corpus

ROOT = Path(__file__).resolve().parents[2]
EXPORT_FILES = ["config.json", "model.safetensors", "tokenizer.json"]


@pytest.mark.distributed
def test_distillation_and_recovery_fine_tuning_run_on_two_ddp_processes(tmp_path: Path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus(300))
    config = tmp_path / "gpt.yaml"
    config.write_text(yaml.safe_dump({
        "seed_everything": 1,
        "trainer": {"max_steps": 6, "val_check_interval": 3, "check_val_every_n_epoch": None, "limit_val_batches": 2,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path / "runs")},
        "model": {"class_path": "lmexp.CausalLM", "init_args": {"network": "gpt-tiny", "warmup_steps": 1}},
        "data": {"class_path": "lmexp.TextDataModule", "init_args": {"source": str(corpus), "batch_size": 8}},
    }))
    run = build("fit", configs=[config], logger=False, run_name="teacher")
    run.execute()
    teacher = run.run_dir / "checkpoints" / "best.ckpt"

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    commands = {  # output folder: the command, and the files it writes there
        "student": (["distill", "--layers", "1", "--steps", "4"], EXPORT_FILES),
        "pruned": (["prune", "--method", "magnitude", "--sparsity", "0.5", "--fine-tune-steps", "4"],
                   sorted([*EXPORT_FILES, "sparsity.json"])),
    }
    for out, (arguments, files) in commands.items():
        # Each process records its rank and every write it makes to the output (or to a
        # temporary sibling of it), whatever writes it, until the process exits.
        probe = {"class_path": "tests.distributed_probe.WriteWatch",
                 "init_args": {"out_dir": str(tmp_path / "ranks" / out), "watch": [str(tmp_path / out)]}}
        ddp = tmp_path / f"ddp-{out}.yaml"
        ddp.write_text(yaml.safe_dump({"trainer": {"accelerator": "cpu", "devices": 2, "strategy": "ddp",
                                                   "callbacks": [probe]}}))
        command = [*arguments, "--ckpt", str(teacher), "--config", str(config), "--config", str(ddp), "--no-tracking",
                   "--out", str(tmp_path / out)]
        result = subprocess.run([sys.executable, "-m", "compression", *command], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=240, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        seen = [json.loads((tmp_path / "ranks" / out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
        # Two processes trained all 4 steps together ...
        assert [(r["rank"], r["world_size"], r["global_step"]) for r in seen] == [(0, 2, 4), (1, 2, 4)], seen
        assert seen[0]["pid"] != seen[1]["pid"]
        # ... and rank 0 alone wrote the output, once, completely.
        assert seen[1]["writes"] == [], f"rank 1 wrote to {out}: {seen[1]['writes']}"
        assert seen[0]["writes"], f"rank 0 wrote nothing to {out}"
        assert sorted(p.name for p in (tmp_path / out).iterdir()) == files, out
    assert not list(tmp_path.glob(".lmexp-tmp-*"))  # no write left half done
    student = load_checkpoint(tmp_path / "student")
    assert student.config.n_layer == 1 and student.transforms[-1]["method"] == "distill"
    pruned = load_checkpoint(tmp_path / "pruned")
    assert sparsity_table(pruned.model)[-1]["sparsity"] == pytest.approx(0.5, abs=0.005)  # zeros kept through DDP
    assert [t["method"] for t in pruned.transforms][:1] == ["magnitude"]
