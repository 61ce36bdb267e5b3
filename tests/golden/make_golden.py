"""Write a golden set: a checkpoint, an export and a tracking journal in the formats of this version.

Each set lives in its own folder (``v0.1.0/``) and is never rewritten: ``tests/faults/test_golden.py``
checks that every set still loads, so a format change keeps reading what earlier versions wrote or
refuses it in one line. Run it (``python tests/golden/make_golden.py v0.2.0``) only to add the set of
a new format.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CORPUS = "\n\n".join(f"Part {i}. The cat sees the moon. A dog finds a red ball." for i in range(60)) + "\n"


def main(name: str) -> None:
    from lmexp.cli import main as lmexp

    out = HERE / name
    if out.exists():
        raise SystemExit(f"{out} exists: golden sets are never rewritten")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        (scratch / "corpus.txt").write_text(CORPUS)
        (scratch / "golden.yaml").write_text(yaml.safe_dump(golden_config(scratch)))
        lmexp(["fit", "--config", str(scratch / "golden.yaml"), "--run_name", "golden"])
        run = scratch / "runs" / "golden"
        out.mkdir(parents=True)
        shutil.copy(run / "checkpoints" / "last.ckpt", out / "last.ckpt")
        shutil.copytree(run / "checkpoints" / "best", out / "export")
        shutil.copy(run / "tracking-journal.jsonl", out / "tracking-journal.jsonl")
        shutil.copy(scratch / "corpus.txt", out / "corpus.txt")
    print(f"wrote {out}")


def golden_config(scratch: Path, tracking_uri: str = "http://127.0.0.1:9") -> dict:
    """The fit config of the golden run (its corpus in ``scratch/corpus.txt``): an unreachable
    tracking store, so the run leaves its journal."""
    return {
        "seed_everything": 3,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 4, "limit_val_batches": 1,
                    "val_check_interval": 2, "check_val_every_n_epoch": None, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(scratch / "runs"),
                    "logger": {"class_path": "lmexp.MLflowTracker",
                               "init_args": {"tracking_uri": tracking_uri, "retry_seconds": 3600}}},
        "model": {"class_path": "lmexp.CausalLM", "init_args": {
            "network": "gpt-tiny", "warmup_steps": 0,
            "network_overrides": {"n_layer": 1, "n_embd": 16, "n_head": 2, "block_size": 16}}},
        "data": {"class_path": "lmexp.TextDataModule",
                 "init_args": {"source": str(scratch / "corpus.txt"), "tokenizer": "char", "batch_size": 2}},
    }


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "v0.1.0")
