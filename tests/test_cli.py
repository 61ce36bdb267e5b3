"""The command line end to end: the quickstart (shortened), generate, resume, shipped configs."""

from pathlib import Path

import pytest
import torch

from lmexp.checkpoints import load_checkpoint
from lmexp.cli import LmexpCLI, main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def quickstart_args(root: Path, steps: int = 20) -> list[str]:
    return [
        "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
        f"--trainer.max_steps={steps}", "--trainer.val_check_interval=10", "--trainer.limit_val_batches=2",
        "--model.warmup_steps=2", f"--trainer.default_root_dir={root}",
    ]


def test_quickstart_trains_saves_exports_generates_and_resumes(tmp_path: Path, capsys, caplog):
    caplog.set_level("INFO")
    main(quickstart_args(tmp_path))
    capsys.readouterr()
    assert "parameters" in caplog.text and "sample after 20 steps" in caplog.text
    checkpoints = tmp_path / "checkpoints"
    best, last = checkpoints / "best.ckpt", checkpoints / "last.ckpt"
    assert best.is_file() and last.is_file()
    raw = torch.load(last, weights_only=True)  # loadable without trusting pickles
    assert raw["global_step"] == 20 and raw["hyper_parameters"]["network"]["vocab_size"] > 50
    export = checkpoints / "best"
    assert {p.name for p in export.iterdir()} == {"model.safetensors", "config.json", "tokenizer.json"}

    # The export and the checkpoint load to the same network, without Lightning or the CLI.
    from_ckpt, from_export = load_checkpoint(best), load_checkpoint(export)
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(from_ckpt.model(ids), from_export.model(ids))

    main(["generate", "--ckpt", str(best), "--prompt", "The ", "--max_new_tokens", "30", "--seed", "1"])
    first = capsys.readouterr().out
    main(["generate", "--ckpt", str(export), "--prompt", "The ", "--max_new_tokens", "30", "--seed", "1", "--kv_cache", "false"])
    assert first.startswith("The ") and len(first) > 30
    assert capsys.readouterr().out == first  # same seed, with and without the KV cache, ckpt or export

    main(quickstart_args(tmp_path, steps=30) + ["--ckpt_path", "last"])
    assert torch.load(last, weights_only=True)["global_step"] == 30


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_shipped_config_parses_and_builds(config: Path, tmp_path: Path):
    first_line = config.read_text().splitlines()[0]
    assert first_line.startswith("# "), f"{config.name} must start with a comment saying what it is for"
    cli = LmexpCLI(args=["--config", str(config), f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert cli.model.block_size > 0 and cli.datamodule is not None


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(verb in out for verb in ("fit", "validate", "test"))
