"""The faster-training options of the objectives: Muon beside AdamW, and warmup-stable-decay."""

import copy
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lmexp import CausalLM, TextDataModule
from lmexp.errors import ConfigError
from lmexp.objectives import warmup_cosine, warmup_stable_decay
from lmexp.objectives.optimizers import Fp32Muon, MuonWithAdamW


def test_wsd_warms_up_holds_the_peak_then_decays_linearly_to_the_floor():
    values = [warmup_stable_decay(step, 10, 100, 0.1, 0.2) for step in range(120)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in values[10:80])  # stable until the last 20% of the steps
    assert values[90] == pytest.approx(1.0 - 0.9 * 0.5)  # half way down the decay
    assert values[100] == pytest.approx(0.1) and values[119] == pytest.approx(0.1)
    # Held higher than cosine's for most of the run: the point of the schedule.
    assert sum(values[:100]) > sum(warmup_cosine(step, 10, 100, 0.1) for step in range(100))


def muon_objective(**settings) -> CausalLM:
    return CausalLM("gpt-tiny", network_overrides={"vocab_size": 40}, optimizer="muon", **settings)


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    objective = muon_objective(lr=2e-3, muon_lr=0.02)
    optimizer = objective.build_optimizer()
    names = {id(p): n for n, p in objective.named_parameters()}
    muon = {names[id(p)] for g in optimizer.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in optimizer.adamw.param_groups for p in g["params"]}
    assert muon == {n for n, p in objective.named_parameters() if ".blocks." in n and p.ndim == 2}
    assert "model.trunk.tok_emb.weight" in adamw and any(n.endswith("bias") for n in adamw)
    assert not muon & adamw and len(muon | adamw) == len(list(objective.parameters()))
    assert {g["lr"] for g in optimizer.muon.param_groups} == {0.02}
    assert {g["lr"] for g in optimizer.adamw.param_groups} == {2e-3}
    # The no-decay group keeps its zero decay in AdamW; matrices keep the objective's decay in Muon.
    assert {g["weight_decay"] for g in optimizer.muon.param_groups} == {0.1}
    assert 0.0 in {g["weight_decay"] for g in optimizer.adamw.param_groups}


def test_one_schedule_sets_both_learning_rates():
    objective = muon_objective(lr=1e-3, muon_lr=0.02)
    optimizer = objective.build_optimizer()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    assert {g["lr"] for g in optimizer.muon.param_groups} == {0.01}
    assert {g["lr"] for g in optimizer.adamw.param_groups} == {5e-4}
    assert scheduler.get_last_lr()[0] == pytest.approx(0.01)


def _step(objective: CausalLM, optimizer: torch.optim.Optimizer, batch: dict) -> None:
    loss, *_ = objective.lm_loss(batch, "train")
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_muon_state_survives_a_save_and_load():
    torch.manual_seed(0)
    tokens = torch.randint(0, 40, (4, 33))
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    first = muon_objective()
    optimizer = first.build_optimizer()
    for _ in range(3):
        _step(first, optimizer, batch)
    second = muon_objective()
    second.load_state_dict(first.state_dict())
    reloaded = second.build_optimizer()
    reloaded.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as from a file: no shared tensors
    assert isinstance(reloaded, MuonWithAdamW)
    matrix = second.model.trunk.blocks[0].mlp.fc_in.weight
    assert "momentum_buffer" in reloaded.muon.state[matrix]  # the halves see the loaded state
    for objective, opt in ((first, optimizer), (second, reloaded)):
        _step(objective, opt, batch)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name} differs after the reloaded step")


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_muon_and_wsd_train_through_the_trainer(tiny_corpus: Path, cpu_trainer_kwargs: dict, schedule: str):
    pl.seed_everything(0)
    data = TextDataModule(str(tiny_corpus), batch_size=4)
    objective = CausalLM("gpt-tiny", optimizer="muon", lr=1e-2, warmup_steps=3, schedule=schedule)
    trainer = pl.Trainer(max_steps=30, limit_val_batches=0, **cpu_trainer_kwargs)
    trainer.fit(objective, datamodule=data)
    assert isinstance(trainer.optimizers[0], MuonWithAdamW)
    batch = next(iter(data.train_dataloader()))
    assert objective.lm_loss(batch, "train")[0].item() < math.log(data.vocab_size) * 0.8
    final = trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0]
    assert final == pytest.approx(1e-2 * 0.1)  # both schedules end at the floor


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"optimizer": "muon", "muon_lr": -1.0}, "muon_lr=-1.0 must be positive"),
        ({"muon_momentum": 1.0}, r"muon_momentum=1.0 must be in \[0, 1\)"),
        ({"schedule": "step"}, "schedule='step' is unknown"),
        ({"decay_fraction": 0.0}, r"decay_fraction=0.0 must be in \(0, 1\]"),
    ],
)
def test_recipe_settings_are_checked(settings: dict, expected: str):
    with pytest.raises(ConfigError, match=expected):
        CausalLM("gpt-tiny", **settings)


def test_muon_refuses_a_network_without_transformer_blocks():
    objective = CausalLM("lstm-small", network_overrides={"vocab_size": 40}, optimizer="muon")
    with pytest.raises(ConfigError, match="optimizer='muon' .* lstm network has none: use optimizer 'adamw'"):
        objective.build_optimizer()


def test_fp32_muon_takes_torchs_step_up_to_bf16_rounding():
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(48, 16)), torch.nn.Parameter(torch.randn(16, 40))]
    twins = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    starts = [w.detach().clone() for w in weights]
    settings = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.95, "adjust_lr_fn": "match_rms_adamw"}
    ours, torchs = Fp32Muon(weights, **settings), torch.optim.Muon(twins, **settings)
    for _ in range(3):
        grads = [torch.randn_like(w) for w in weights]
        for params, optimizer in ((weights, ours), (twins, torchs)):
            for param, grad in zip(params, grads):
                param.grad = grad.clone()
            optimizer.step()
    for mine, theirs, start in zip(weights, twins, starts):
        moved = (theirs.detach() - start).abs().max()
        # torch orthogonalizes in bf16 (about 3 significant digits): the two agree to that precision.
        assert (mine.detach() - theirs.detach()).abs().max() < 0.02 * moved
    assert set(ours.state[weights[0]]) == set(torchs.state[twins[0]]) == {"momentum_buffer"}


def test_muon_orthogonalizes_in_fp32_on_a_cpu_without_bf16_units(monkeypatch):
    from lmexp.objectives import optimizers

    monkeypatch.setattr(optimizers, "cpu_has_bf16_units", lambda: False)
    assert type(muon_objective().build_optimizer().muon) is Fp32Muon
    monkeypatch.setattr(optimizers, "cpu_has_bf16_units", lambda: True)
    assert type(muon_objective().build_optimizer().muon) is torch.optim.Muon
