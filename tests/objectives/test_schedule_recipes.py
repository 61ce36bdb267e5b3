"""Fine-tuning schedules: warmup as a share of the steps, linear decay, and the encoder recipe files."""

import math
from pathlib import Path

import pytest

from lmexp import CausalLM
from lmexp.errors import ConfigError
from lmexp.objectives.schedule import warmup_length, warmup_linear

ROOT = Path(__file__).resolve().parents[2]


def test_linear_schedule_matches_hand_values():
    # 10 warmup steps to the peak, then a straight line from 1 at step 10 to 0.1 at step 100.
    assert warmup_linear(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_linear(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_linear(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_linear(55, 10, 100, 0.1) == pytest.approx(1.0 - 0.9 * 45 / 90)
    assert warmup_linear(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_linear(300, 10, 100, 0.1) == pytest.approx(0.1)  # stays at the floor
    assert warmup_linear(50, 0, 100, 0.0) == pytest.approx(0.5)  # no warmup, decay to zero


def test_warmup_fraction_is_a_share_of_the_planned_steps():
    assert warmup_length(None, 0.1, 2000, 100) == 200
    assert warmup_length(None, 0.29, 100, 100) == 29  # not 28 from 28.999...
    assert warmup_length(None, 0.5, 1, 100) == 0  # rounded down: always below the steps
    assert warmup_length(7, None, 2000, 100) == 7
    assert warmup_length(None, None, 2000, 100) == 100  # neither: the default


def learning_rates(objective: CausalLM, steps: int) -> list[float]:
    setup = objective.configure_optimizers()
    optimizer, scheduler = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def objective(**settings) -> CausalLM:
    return CausalLM("gpt-tiny", network_overrides={"vocab_size": 40, "n_layer": 1, "n_embd": 32, "n_head": 2},
                    **settings)


def test_the_optimizer_follows_warmup_fraction_and_linear_decay():
    rates = learning_rates(objective(lr=1e-3, max_steps=20, warmup_fraction=0.1, schedule="linear",
                                     min_lr_ratio=0.0), 21)
    # 2 warmup steps (10% of 20), then 1e-3 at step 2 down to 0 at step 20.
    expected = [5e-4, 1e-3] + [1e-3 * (1 - (step - 2) / 18) for step in range(2, 21)]
    assert rates == pytest.approx(expected, abs=1e-12)


def test_warmup_fraction_and_warmup_steps_together_are_refused():
    with pytest.raises(ConfigError, match=r"warmup_steps=10 and warmup_fraction=0.1 are both set: give one") as error:
        objective(warmup_steps=10, warmup_fraction=0.1)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=r"warmup_fraction=1.0 must be in \[0, 1\)"):
        objective(warmup_fraction=1.0)
    with pytest.raises(ConfigError, match="use 'cosine', 'linear' or 'wsd'"):
        objective(schedule="step")


def test_the_length_check_knows_warmup_fraction():
    # 100 default warmup steps do not fit 20 steps; 10% of them always does; no end is still refused.
    with pytest.raises(ConfigError, match="warmup_steps=100 is not below the 20 training steps"):
        objective().check_training_length(20, -1)
    objective(warmup_fraction=0.1).check_training_length(20, -1)
    objective(warmup_fraction=0.1).check_training_length(None, 1)  # length from the data: checked later
    with pytest.raises(ConfigError, match="training has no end"):
        objective(warmup_fraction=0.1).check_training_length(-1, -1)


PLACEHOLDER = "path/to/transformers-folder"


def test_the_encoder_recipe_builds_with_a_folder_and_says_what_is_missing_without(tmp_path: Path, monkeypatch):
    from lmexp.runs import check
    from tests.models.test_heads import tiny_bert_folder

    monkeypatch.chdir(ROOT)
    folder = tiny_bert_folder("BertModel", tmp_path / "encoder")
    config = check("fit", [ROOT / "configs" / "finetune_encoder.yaml"], {"model.init_args.pretrained": str(folder)})
    model = config["model"]["init_args"]
    assert (model["lr"], model["warmup_fraction"], model["warmup_steps"], model["schedule"], model["min_lr_ratio"],
            model["weight_decay"], config["trainer"]["max_epochs"]) == (5e-5, 0.1, None, "linear", 0.0, 0.01, 2)
    with pytest.raises(ConfigError, match=f"checkpoint '{PLACEHOLDER}' does not exist"):
        check("fit", [ROOT / "configs" / "finetune_encoder.yaml"])


def test_the_encoder_sweep_checks_against_its_fit_config(tmp_path: Path, monkeypatch):
    from sweeps.spec import load_spec
    from sweeps.study import check_space, make_sampler
    from tests.models.test_heads import tiny_bert_folder

    monkeypatch.chdir(ROOT)
    spec = load_spec(ROOT / "configs" / "sweeps" / "finetune-encoder.yaml")
    assert spec.overrides["model.init_args.pretrained"] == PLACEHOLDER  # the user's folder goes there
    spec.overrides["model.init_args.pretrained"] = str(tiny_bert_folder("BertModel", tmp_path / "encoder"))
    check_space(spec)  # every lr, batch size and epoch count against the schema
    assert type(make_sampler(spec)).__name__ == "GridSampler"
    assert spec.n_trials == math.prod(len(param.choices) for param in spec.params) == 24  # the whole grid
