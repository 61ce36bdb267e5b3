"""Pruning: magnitude, Wanda, 2:4 and structured pruning of trained lmexp networks, recovery
and gradual pruning while fine-tuning, and the ``prune`` command."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from compression import core, pruning
from compression.__main__ import main
from compression.core import CompressionError
from compression.pruning import (
    SparseTraining,
    activation_norms,
    cubic_sparsity,
    fine_tune,
    has_n_m_pattern,
    magnitude,
    n_m_mask,
    semi_structured,
    structured,
    wanda,
)
from lmexp.checkpoints import LoadedModel, export_safetensors, load_checkpoint
from lmexp.models import build_model, count_parameters, from_name
from tests.compression.conftest import train_tiny_gpt

VOCAB = 50


def tiny(preset: str = "gpt-tiny", seed: int = 0, **fields) -> LoadedModel:
    torch.manual_seed(seed)
    config = from_name(preset, vocab_size=VOCAB, **fields)
    return LoadedModel(build_model(config).eval(), config, None)


def calibration(n: int = 2, padded: bool = False) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    made = []
    for _ in range(n):
        batch = {"input_ids": torch.randint(0, VOCAB, (4, 16), generator=generator)}
        if padded:
            mask = torch.ones(4, 16, dtype=torch.long)
            mask[1:, 10:] = 0  # right padding
            batch["attention_mask"] = mask
        made.append(batch)
    return made


def layer_sparsities(loaded: LoadedModel) -> dict[str, float]:
    return {row["layer"]: row["sparsity"] for row in core.sparsity_table(loaded.model)}


def logits(loaded: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(ids)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A gpt-tiny trained for a few steps on a tiny corpus; its run folder holds config.yaml."""
    return train_tiny_gpt(tmp_path_factory.mktemp("pruning"), 60, "--trainer.max_steps=10",
                          "--trainer.val_check_interval=10", "--trainer.limit_val_batches=2")


def config_of(checkpoint: Path) -> list[Path]:
    return [checkpoint.parent.parent / "config.yaml"]


# --- unstructured -------------------------------------------------------------------------------


def test_magnitude_reaches_the_sparsity_globally_or_in_every_layer():
    original = tiny()
    loud = "trunk.blocks.0.mlp.fc_in"
    with torch.no_grad():
        core.compressible_linears(original.model)[loud].weight.mul_(10)
    by_layer = layer_sparsities(magnitude(original, 0.5, scope="layer"))
    by_rank = layer_sparsities(magnitude(original, 0.5, scope="global"))
    assert by_layer.pop("total") == by_rank.pop("total") == pytest.approx(0.5, abs=1e-4)
    assert all(s == pytest.approx(0.5, abs=1e-3) for s in by_layer.values())
    # ranked together, the layer with 10x larger weights keeps nearly all of them
    assert by_rank[loud] < 0.05 and max(by_rank.values()) > 0.55
    assert layer_sparsities(original)["total"] == 0  # the original is left as it was


@pytest.mark.parametrize("prune", [
    lambda m: magnitude(m, 0.7),
    lambda m: wanda(m, 0.7, calibration()),
    lambda m: semi_structured(m, calibration()),
], ids=["magnitude", "wanda", "2:4"])
def test_embeddings_tied_head_and_biases_are_never_pruned(prune):
    original = tiny()
    pruned = prune(original)
    assert pruned.model.lm_head.weight is pruned.model.trunk.tok_emb.weight  # still tied
    before, after = original.model.state_dict(), pruned.model.state_dict()
    for key, value in after.items():
        if not (key.startswith(core.BLOCKS) and key.endswith(".weight") and value.ndim == 2):
            torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    assert layer_sparsities(pruned)["total"] >= 0.5
    assert not any(name.endswith(("_orig", "_mask")) for name in after)  # masks made permanent
    assert pruned.transforms[-1]["method"] in ("magnitude", "wanda", "2:4")


def test_skipped_layers_stay_dense():
    pruned = wanda(tiny(), 0.5, calibration(), skip=["trunk.blocks.1.*"])
    sparsities = layer_sparsities(pruned)
    assert all(s == 0 for name, s in sparsities.items() if name.startswith("trunk.blocks.1."))
    assert all(s == 0.5 for name, s in sparsities.items() if name.startswith("trunk.blocks.0."))
    assert pruned.transforms[-1] == {"method": "wanda", "sparsity": 0.5, "calibration_batches": 2,
                                     "skip": ["trunk.blocks.1.*"]}


def test_wanda_keeps_small_weights_that_see_large_activations_and_magnitude_does_not():
    original = tiny()
    mlp = original.model.trunk.blocks[0].mlp
    loud = 5  # one hidden neuron fires at 50 on every token; its output weights are tiny
    with torch.no_grad():
        mlp.fc_in.weight[loud] = 0.0
        mlp.fc_in.bias[loud] = 50.0
        mlp.out_proj.weight[:, loud] = 0.001
    name = "trunk.blocks.0.mlp.out_proj"
    by_magnitude = core.compressible_linears(magnitude(original, 0.5, scope="layer").model)[name].weight
    by_wanda = core.compressible_linears(wanda(original, 0.5, calibration()).model)[name].weight
    assert (by_magnitude[:, loud] == 0).all()
    assert (by_wanda[:, loud] != 0).all()
    assert ((by_wanda == 0).sum(dim=1) == by_wanda.shape[1] // 2).all()  # half of every output row


def test_activation_norms_count_real_tokens_only():
    loaded = tiny()
    linears = core.compressible_linears(loaded.model)
    padded = calibration(1, padded=True)
    real = [{"input_ids": padded[0]["input_ids"][1:, :10]}, {"input_ids": padded[0]["input_ids"][:1]}]
    with_mask, _ = activation_norms(loaded.model, linears, padded)
    alone, seen = activation_norms(loaded.model, linears, real)
    assert seen == 2
    for name in linears:
        torch.testing.assert_close(with_mask[name], alone[name], rtol=1e-4, atol=1e-5)
    unmasked, _ = activation_norms(loaded.model, linears, [{"input_ids": padded[0]["input_ids"]}])
    assert (unmasked["trunk.blocks.0.attn.qkv"] > with_mask["trunk.blocks.0.attn.qkv"] + 1e-3).all()


def test_2_4_keeps_two_of_every_four_weights_in_each_row():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 9.0, 8.0, 7.0]])
    assert n_m_mask(scores).tolist() == [[1, 0, 1, 0, 0, 1, 1, 0]]
    original = tiny()
    for pruned in (semi_structured(original), semi_structured(original, calibration())):
        for linear in core.compressible_linears(pruned.model).values():
            assert has_n_m_pattern(linear.weight)
        assert layer_sparsities(pruned)["total"] == 0.5
    assert pruned.transforms[-1]["scored_by"] == "wanda"
    assert not has_n_m_pattern(core.compressible_linears(original.model)["trunk.blocks.0.attn.qkv"].weight)


def test_2_4_refuses_a_width_not_divisible_by_4():
    with pytest.raises(CompressionError, match=r"trunk.blocks.0.attn.qkv has 30 inputs, not a multiple of 4.*--skip"):
        semi_structured(tiny(n_embd=30))


@pytest.mark.parametrize(("call", "message"), [
    (lambda m: magnitude(m, 1.0), r"sparsity=1.0 is outside \[0, 1\)"),
    (lambda m: wanda(m, -0.1, calibration()), r"sparsity=-0.1 is outside \[0, 1\)"),
    (lambda m: structured(m, heads=1.0), r"heads=1.0 is outside \[0, 1\)"),
    (lambda m: structured(m, neurons=2), r"neurons=2 is outside \[0, 1\)"),
    (lambda m: magnitude(m, 0.5, scope="row"), r"scope='row' is unknown"),
    (lambda m: wanda(m, 0.5, None), r"wanda .* needs calibration batches"),
    (lambda m: wanda(m, 0.5, []), r"no calibration batches"),
    (lambda m: magnitude(m, 0.5, skip=["*"]), r"leaves no block linear layer to prune"),
], ids=["sparsity-1", "negative", "heads-1", "neurons-2", "scope", "no-data", "empty-data", "skip-all"])
def test_bad_requests_are_one_line_errors(call, message):
    with pytest.raises(CompressionError, match=message) as error:
        call(tiny())
    assert "\n" not in str(error.value)


# --- structured -------------------------------------------------------------------------------


def test_structured_pruning_makes_a_smaller_network_that_saves_and_loads_as_itself(tmp_path):
    original = tiny()
    smaller = structured(original, heads=0.5, neurons=0.25, calibration=calibration(padded=True))
    assert smaller.config.layer_heads == [1, 1] and smaller.config.layer_mlp_hidden == [96, 96]
    block = smaller.model.trunk.blocks[0]
    assert block.attn.qkv.weight.shape == (48, 32) and block.attn.out_proj.weight.shape == (32, 16)
    assert block.mlp.fc_in.weight.shape == (96, 32) and block.mlp.out_proj.weight.shape == (32, 96)
    assert count_parameters(smaller.model) < count_parameters(original.model) - 2 * (2048 + 2 * 32 * 32)
    assert smaller.transforms[-1]["scored_by"] == "activations"
    loaded = load_checkpoint(core.save(smaller, tmp_path / "smaller"))
    assert loaded.config.layer_heads == [1, 1] and loaded.config.layer_mlp_hidden == [96, 96]
    assert loaded.transforms == smaller.transforms
    ids = torch.randint(0, VOCAB, (2, 12))
    torch.testing.assert_close(logits(loaded, ids), logits(smaller, ids))


@pytest.mark.parametrize("preset", ["gpt-tiny", "bert-tiny"])
def test_structured_pruning_of_nothing_changes_nothing(preset):
    original = tiny(preset)
    same = structured(original, calibration=calibration())
    assert same.config.layer_heads is None and same.config.layer_mlp_hidden is None
    assert count_parameters(same.model) == count_parameters(original.model)
    ids = torch.randint(0, VOCAB, (2, 12))
    torch.testing.assert_close(logits(same, ids), logits(original, ids), rtol=0, atol=0)


@pytest.mark.parametrize("data", [None, calibration()], ids=["weights", "activations"])
@pytest.mark.parametrize("preset", ["gpt-tiny", "bert-tiny"])
def test_removing_a_head_whose_weights_are_zero_changes_nothing(preset, data):
    """The head removed is a different one in each block, in the middle of q, k and v: any
    misaligned slice of the fused qkv projection would change the outputs."""
    original = tiny(preset, n_head=4)
    silent = {0: 2, 1: 1}  # block -> head whose weights are zeroed
    for index, head in silent.items():
        attn = original.model.trunk.blocks[index].attn
        inner, width = attn.n_head * attn.head_dim, attn.head_dim
        rows = torch.cat([part * inner + head * width + torch.arange(width) for part in range(3)])
        with torch.no_grad():
            attn.qkv.weight[rows] = 0.0
            attn.qkv.bias[rows] = 0.0
            attn.out_proj.weight[:, head * width:(head + 1) * width] = 0.0
    smaller = structured(original, heads=0.25, calibration=data)
    assert smaller.config.layer_heads == [3, 3]
    ids = torch.randint(0, VOCAB, (2, 12))
    torch.testing.assert_close(logits(smaller, ids), logits(original, ids), rtol=0, atol=1e-5)


def test_structured_pruning_leaves_skipped_blocks_whole():
    smaller = structured(tiny(n_head=4), heads=0.5, neurons=0.5, skip=["trunk.blocks.1.*"])
    assert smaller.config.layer_heads == [2, 4] and smaller.config.layer_mlp_hidden == [64, 128]


# --- while training ---------------------------------------------------------------------------


def test_cubic_schedule_runs_from_the_start_to_the_final_sparsity():
    assert cubic_sparsity(0, 100, 0.1, 0.6) == pytest.approx(0.1)
    assert cubic_sparsity(50, 100, 0.1, 0.6) == pytest.approx(0.6 - 0.5 * 0.125)
    assert cubic_sparsity(100, 100, 0.1, 0.6) == cubic_sparsity(150, 100, 0.1, 0.6) == pytest.approx(0.6)


def test_gradual_pruning_follows_the_schedule_step_by_step_and_ends_with_plain_weights():
    objective = torch.nn.Module()  # what SparseTraining reads of a LightningModule: its network
    objective.model = tiny().model
    callback = SparseTraining(steps=20, final_sparsity=0.5)  # pruned until step 15, every step
    callback.setup(SimpleNamespace(), objective, "fit")
    reached = []
    for step in range(1, 21):
        callback.on_train_batch_end(SimpleNamespace(global_step=step), objective, None, None, step - 1)
        reached.append(callback.zeros())
    expected = [round(cubic_sparsity(step, 15, 0.0, 0.5) * callback.prunable) for step in range(1, 21)]
    assert reached == expected and 0 < reached[0] < reached[7] < reached[14] == reached[19]
    callback.make_pruning_permanent(objective)
    weights = {name for name, _ in objective.model.named_parameters()}
    assert not any(name.endswith("_orig") for name in weights)
    assert core.sparsity_table(objective.model)[-1]["zeros"] == reached[-1]


def test_recovery_fine_tuning_keeps_the_pruned_weights_at_zero(pretrained, tmp_path):
    pruned = magnitude(core.load(pretrained), 0.5)
    export = core.save(pruned, tmp_path / "pruned")
    tuned = fine_tune(export, config_of(pretrained), steps=6, run_root=tmp_path / "runs", logger=False)
    before, after = core.compressible_linears(pruned.model), core.compressible_linears(tuned.model)
    for name, linear in before.items():
        zero = linear.weight == 0
        assert (after[name].weight[zero] == 0).all(), name
        assert not torch.equal(after[name].weight[~zero], linear.weight[~zero]), f"{name} did not train"
    assert [t["method"] for t in tuned.transforms] == ["magnitude", "fine-tune"]
    assert tuned.transforms[-1]["sparsity"] == pytest.approx(0.5, abs=1e-4)


def test_gradual_pruning_reaches_the_final_sparsity(pretrained, tmp_path):
    pruned = fine_tune(pretrained, config_of(pretrained), steps=12, run_root=tmp_path / "runs", final_sparsity=0.6,
                       logger=False)
    total = core.sparsity_table(pruned.model)[-1]
    assert total["zeros"] == round(0.6 * total["weights"])
    record = pruned.transforms[-1]
    assert record["method"] == "gradual-magnitude" and record["final_sparsity"] == 0.6
    assert record["sparsity"] == pytest.approx(0.6, abs=1e-4)
    assert pruned.model.lm_head.weight.count_nonzero() == pruned.model.lm_head.weight.numel()


# --- the command ------------------------------------------------------------------------------


def prune_command(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", "--ckpt", str(checkpoint), "--out", str(out), *extra]


def test_prune_command_writes_the_export_and_its_sparsity(pretrained, tmp_path, caplog):
    out = tmp_path / "wanda"
    with caplog.at_level("INFO", logger="compression.pruning"):
        assert main(prune_command(pretrained, out, "--method", "wanda", "--sparsity", "0.5",
                                  "--calibration-batches", "2", "--no-tracking")) == 0
    loaded = load_checkpoint(out)
    assert loaded.transforms[-1]["method"] == "wanda" and loaded.transforms[-1]["calibration_batches"] == 2
    report = json.loads((out / "sparsity.json").read_text())
    assert report["layers"][-1]["layer"] == "total" and report["layers"][-1]["sparsity"] == pytest.approx(0.5)
    assert "trunk.blocks.1.mlp.out_proj" in caplog.text and "50.0% zero" in caplog.text


def test_prune_command_fine_tunes_after_pruning(pretrained, tmp_path):
    out = tmp_path / "recovered"
    assert main(prune_command(pretrained, out, "--method", "magnitude-layer", "--sparsity", "0.5",
                              "--fine-tune-steps", "4", "--no-tracking")) == 0
    loaded = load_checkpoint(out)
    assert [t["method"] for t in loaded.transforms] == ["magnitude", "fine-tune"]
    assert all(row["sparsity"] == 0.5 for row in json.loads((out / "sparsity.json").read_text())["layers"])


def test_prune_command_prunes_gradually_while_fine_tuning(pretrained, tmp_path):
    out = tmp_path / "gradual"
    assert main(prune_command(pretrained, out, "--method", "magnitude", "--sparsity", "0.4", "--gradual",
                              "--fine-tune-steps", "8", "--no-tracking")) == 0
    loaded = load_checkpoint(out)
    assert [t["method"] for t in loaded.transforms] == ["gradual-magnitude"]
    assert json.loads((out / "sparsity.json").read_text())["layers"][-1]["sparsity"] == pytest.approx(0.4, abs=1e-4)


@pytest.mark.parametrize(("extra", "message"), [
    (["--method", "magnitude", "--sparsity", "1.5"], r"sparsity=1.5 is outside \[0, 1\)"),
    (["--method", "wanda"], r"--method wanda needs --sparsity"),
    (["--method", "wanda", "--sparsity", "0.5", "--calibration-batches", "0"], r"wanda .* --calibration-batches 1"),
    (["--method", "2:4", "--sparsity", "0.3"], r"--method 2:4 zeroes half .* drop --sparsity"),
    (["--method", "structured"], r"removes nothing"),
    (["--method", "wanda", "--sparsity", "0.5", "--gradual"], r"--gradual .* --method magnitude"),
], ids=["sparsity", "no-sparsity", "no-data", "2:4-sparsity", "structured-nothing", "gradual-wanda"])
def test_prune_command_refuses_bad_requests_in_one_line(tmp_path, capsys, extra, message):
    assert main(prune_command(tmp_path / "missing.ckpt", tmp_path / "out", *extra)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert re.search(message, lines[0]), lines[0]


def test_prune_command_refuses_to_replace_an_export_before_any_work(pretrained, tmp_path, capsys, monkeypatch):
    """A taken --out is refused before the network is loaded or fine-tuned, and stays as it was."""
    out = core.save(tiny(), tmp_path / "taken")
    before = {file.name: file.read_bytes() for file in out.iterdir()}

    def no_work(*args, **kwargs):
        pytest.fail("prune started work before refusing the taken --out")  # BaseException: main cannot catch it

    for step in ("load", "batches", "fine_tune"):
        monkeypatch.setattr(pruning, step, no_work)
    assert main(prune_command(pretrained, out, "--method", "magnitude", "--sparsity", "0.5", "--gradual",
                              "--fine-tune-steps", "50")) == 2
    assert "already holds a config.json: choose another folder or pass --overwrite" in capsys.readouterr().err
    assert {file.name: file.read_bytes() for file in out.iterdir()} == before


def test_prune_command_refuses_2_4_on_a_width_not_divisible_by_4(tmp_path, capsys):
    odd = tiny(n_embd=30)
    export_safetensors(odd.model, odd.config, tmp_path / "odd")
    argv = prune_command(tmp_path / "odd", tmp_path / "out", "--method", "2:4", "--calibration-batches", "0")
    assert main(argv) == 2
    assert "has 30 inputs, not a multiple of 4" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
