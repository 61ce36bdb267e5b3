"""The command line end to end: the quickstart (shortened), generate, resume, shipped configs."""

from pathlib import Path

import pytest
import yaml
import torch

from lmexp import CausalLM
from lmexp.checkpoints import load_checkpoint
from lmexp.cli import main
from lmexp.runs import build

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
    checkpoints = tmp_path / "latest" / "checkpoints"
    best, last = checkpoints / "best.ckpt", checkpoints / "last.ckpt"
    assert best.is_file() and last.is_file()
    raw = torch.load(last, weights_only=True)  # loadable without trusting pickles
    assert raw["global_step"] == 20 and raw["hyper_parameters"]["network"]["vocab_size"] > 50
    export = checkpoints / "best"
    assert {p.name for p in export.iterdir()} == {"model.safetensors", "config.json", "tokenizer.json"}

    # The README's Python example runs as written against this run's export.
    readme = (ROOT / "README.md").read_text()
    blocks = [block.split("```", 1)[0] for block in readme.split("```python\n")[1:]]
    example = next(block for block in blocks if "runs/quickstart/latest/checkpoints/best" in block)
    exec(compile(example.replace("runs/quickstart/latest/checkpoints/best", str(export)), "README.md", "exec"), {})
    assert capsys.readouterr().out.startswith("The ")

    # The export and the checkpoint load to the same network, without Lightning or the CLI.
    from_ckpt, from_export = load_checkpoint(best), load_checkpoint(export)
    lightning_loaded = CausalLM.load_from_checkpoint(best, weights_only=True)  # no data or config needed
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(from_ckpt.model(ids), from_export.model(ids))
    torch.testing.assert_close(lightning_loaded.model.eval()(ids), from_ckpt.model(ids))

    main(["generate", "--ckpt", str(best), "--prompt", "The ", "--max_new_tokens", "30", "--seed", "1"])
    first = capsys.readouterr().out
    main(["generate", "--ckpt", str(export), "--prompt", "The ", "--max_new_tokens", "30", "--seed", "1", "--kv_cache", "false"])
    assert first.startswith("The ") and len(first) > 30
    assert capsys.readouterr().out == first  # same seed, with and without the KV cache, ckpt or export

    main(quickstart_args(tmp_path, steps=30) + ["--ckpt_path", "last"])
    assert torch.load(last, weights_only=True)["global_step"] == 30

    for verb in ("validate", "test"):
        evaluate = [verb, "--config", str(ROOT / "configs" / "quickstart.yaml"), f"--trainer.default_root_dir={tmp_path}",
                    "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2", "--ckpt_path", str(best)]
        main(evaluate)
        assert f"{'val' if verb == 'validate' else 'test'}/ppl" in capsys.readouterr().out

USER_GIVEN_FOLDER = "path/to/transformers-folder"  # configs/finetune_encoder.yaml: the user's encoder


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_shipped_config_parses_and_builds(config: Path, tmp_path: Path):
    first_line = config.read_text().splitlines()[0]
    assert first_line.startswith("# "), f"{config.name} must start with a comment saying what it is for"
    overrides = {"trainer.default_root_dir": str(tmp_path)}
    pretrained = yaml.safe_load(config.read_text())["model"]["init_args"].get("pretrained")
    if pretrained is not None:
        # A fine-tuning config starts from what another shipped config trains (and writes there),
        # or from a folder the user names (a recipe for encoders pre-trained elsewhere).
        if pretrained != USER_GIVEN_FOLDER:
            made_by = Path(pretrained).parts[1]
            assert Path(pretrained) == Path("runs", made_by, "latest", "checkpoints", "best.ckpt")
            assert (ROOT / "configs" / f"{made_by}.yaml").is_file(), f"{config.name}: no config trains {pretrained}"
        overrides["model.init_args.pretrained"] = None
    if yaml.safe_load(config.read_text())["trainer"].get("precision") == "auto":
        # auto times steps on the data while building: tests/test_precision_probe.py covers it.
        overrides["trainer.precision"] = "32-true"
    run = build("fit", configs=[config], overrides=overrides)
    assert run.model.block_size > 0 and run.datamodule is not None
    assert run.run_dir.parent == tmp_path and run.experiment == config.stem


def test_help_lists_every_verb_under_its_own_name():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "lmexp", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: lmexp ") and "__main__" not in result.stdout
    assert "{fit,validate,test}" in result.stdout and "generate" in result.stdout
    words = " ".join(result.stdout.split())  # the help text is wrapped to the terminal's width
    assert "predict: label a table of texts" in words and "prompt: classify by prompting" in words


def test_a_crash_between_validations_loses_nothing(tmp_path: Path):
    def args(root: Path) -> list[str]:
        return quickstart_args(root, steps=20) + ["--trainer.enable_progress_bar=false"]

    main(args(tmp_path / "straight"))
    crashed = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash at step 7"):
        main(args(crashed) + ["--trainer.callbacks+=tests.helpers.FailAtStep", "--trainer.callbacks.step=7"])
    interrupted = crashed / "latest" / "checkpoints" / "interrupted.ckpt"
    assert torch.load(interrupted, weights_only=True)["global_step"] == 7  # the 7 finished steps are kept
    main(args(crashed) + ["--ckpt_path", str(interrupted)])

    straight = torch.load(tmp_path / "straight" / "latest" / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(crashed / "latest" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == straight["global_step"] == 20
    for name, value in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], value, rtol=0, atol=1e-6, msg=name)


def test_without_validation_the_latest_checkpoint_is_the_best_and_is_exported(tmp_path: Path):
    main(quickstart_args(tmp_path, steps=6) + ["--data.val_fraction=0", "--trainer.enable_progress_bar=false"])
    checkpoints = tmp_path / "latest" / "checkpoints"
    assert (checkpoints / "best.ckpt").is_file() and (checkpoints / "best" / "model.safetensors").is_file()


@pytest.mark.parametrize(("signal_name", "status"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_saves_exits_non_zero_and_last_resumes_from_it(
    tmp_path: Path, restore_signal_handlers, caplog, signal_name: str, status: int
):
    caplog.set_level("INFO")
    args = quickstart_args(tmp_path, steps=20) + ["--trainer.enable_progress_bar=false"]
    checkpoints = tmp_path / "latest" / "checkpoints"
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--trainer.callbacks+=tests.helpers.SignalAtStep", "--trainer.callbacks.step=13",
                     f"--trainer.callbacks.signal_name={signal_name}"])
    assert exit_info.value.code == status  # 128 + the signal's number: a scheduler sees a stopped run
    interrupted = checkpoints / "interrupted.ckpt"
    assert torch.load(interrupted, weights_only=True)["global_step"] == 13
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 10  # the validation's
    assert "weights_only` was not set" not in caplog.text

    caplog.clear()
    main(args + ["--ckpt_path", "last"])  # the newest checkpoint, not last.ckpt
    assert f"Restoring states from the checkpoint path at {interrupted.resolve()}" in caplog.text
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 20
    assert not interrupted.exists()  # spent: a later "last" must not go back to it


def test_ckpt_path_last_skips_truncated_checkpoints_and_starts_fresh_without_one(tmp_path: Path, caplog):
    from lmexp.run_folders import run_folders

    caplog.set_level("INFO")
    quiet = ["--trainer.val_check_interval=4", "--trainer.enable_progress_bar=false", "--trainer.logger=false"]
    main(quickstart_args(tmp_path, steps=4) + quiet + ["--ckpt_path", "last"])  # nothing saved yet: from the start
    assert "no checkpoint under" in caplog.text and "training from the start" in caplog.text
    (run,) = run_folders(tmp_path)
    checkpoints = run / "checkpoints"
    last, best, interrupted = (checkpoints / f"{name}.ckpt" for name in ("last", "best", "interrupted"))
    assert torch.load(best, weights_only=True)["global_step"] == 4
    last.write_bytes(last.read_bytes()[:1000])  # writes cut short; interrupted.ckpt is the newest file
    interrupted.write_bytes(last.read_bytes())

    caplog.clear()
    with pytest.warns(UserWarning) as warned:
        main(quickstart_args(tmp_path, steps=6) + quiet + ["--ckpt_path", "last"])
    said = [str(w.message) for w in warned if "is unreadable" in str(w.message)]
    assert sorted(said) == [f"{path} is unreadable (cut short or not a checkpoint): resuming from {best} at step 4"
                            for path in (interrupted, last)]
    assert f"Restoring states from the checkpoint path at {best.resolve()}" in caplog.text
    assert run_folders(tmp_path) == [run]  # the same run goes on
    assert torch.load(last, weights_only=True)["global_step"] == 6
