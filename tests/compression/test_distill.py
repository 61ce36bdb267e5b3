"""Knowledge distillation: the soft loss, the student's start from the teacher's blocks, the frozen
teacher, what a student checkpoint holds, runs for each task, and the one-line refusals."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

import compression.__main__ as compression_main
from compression import core
from compression.distill import (
    DistilledCausalLM,
    DistilledClassifier,
    copied_blocks,
    distill,
    kd_loss,
    matched_blocks,
)
from lmexp.checkpoints import load_checkpoint, read_checkpoint
from lmexp.errors import CheckpointError
from lmexp.runs import build
from tests.conftest import make_corpus
from tests.test_finetune import write_reviews

TRAINER = """seed_everything: 3
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 2
  val_check_interval: 2
  check_val_every_n_epoch: null
  limit_val_batches: 1
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  logger: false
"""

# Teachers of four blocks, 32 wide, each with the data its config describes.
CONFIGS = {
    "gpt": """model:
  class_path: lmexp.CausalLM
  init_args:
    network: gpt-tiny
    network_overrides: {{n_layer: 4, block_size: 16}}
    lr: 3.0e-3
    warmup_steps: 1
data:
  class_path: lmexp.TextDataModule
  init_args: {{source: {corpus}, tokenizer: char, batch_size: 4, val_fraction: 0.1}}
""",
    "bert": """model:
  class_path: lmexp.MaskedLM
  init_args:
    network: bert-tiny
    network_overrides: {{n_layer: 4, block_size: 16}}
    warmup_steps: 1
data:
  class_path: lmexp.TextDataModule
  init_args: {{source: {corpus}, tokenizer: wordpiece, vocab_size: 120, batch_size: 4, val_fraction: 0.1}}
""",
    "classifier": """model:
  class_path: lmexp.SequenceClassification
  init_args:
    network: bert-tiny
    network_overrides: {{n_layer: 4}}
    warmup_steps: 1
data:
  class_path: lmexp.ClassificationDataModule
  init_args: {{train: {reviews}, text_column: sentence, vocab_size: 120, batch_size: 8, val_fraction: 0.2}}
""",
}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """name -> (best checkpoint, the config it was trained with), each trained for two steps."""
    folder = tmp_path_factory.mktemp("teachers")
    corpus = folder / "corpus.txt"
    corpus.write_text(make_corpus(40))
    reviews = write_reviews(folder / "reviews.tsv", 40)
    made = {}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LMEXP_CACHE_DIR", str(folder / "cache"))
        for name, model_and_data in CONFIGS.items():
            config = folder / f"{name}.yaml"
            config.write_text(TRAINER + model_and_data.format(corpus=corpus, reviews=reviews))
            run = build("fit", [config], overrides={"trainer.default_root_dir": str(folder / name)}, run_name=name)
            run.execute()
            made[name] = (run.run_dir / "checkpoints" / "best.ckpt", config)
    return made


class Watch(pl.Callback):
    """Counts the teacher's forward passes and keeps the metrics the run ends with."""

    def __init__(self) -> None:
        self.teacher_calls = 0
        self.metrics: dict[str, float] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.teacher.register_forward_hook(lambda *_: setattr(self, "teacher_calls", self.teacher_calls + 1))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}


# Steps run by hand, without a trainer: Lightning says it has nowhere to log to.
WITHOUT_TRAINER = pytest.mark.filterwarnings("ignore:You are trying to `self.log")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lm_batch(vocab_size: int, batch_size: int = 3, length: int = 12) -> dict[str, torch.Tensor]:
    tokens = torch.randint(0, vocab_size, (batch_size, length + 1), generator=torch.Generator().manual_seed(0))
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# --- the soft loss and the layer maps ------------------------------------------------------------


def test_kd_loss_is_the_teacher_to_student_kl_times_t_squared():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    teacher = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, -2.0]])
    t = 2.0
    expected = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        p = [math.exp(x / t) for x in t_row]
        q = [math.exp(x / t) for x in s_row]
        p, q = [x / sum(p) for x in p], [x / sum(q) for x in q]
        expected += sum(pk * math.log(pk / qk) for pk, qk in zip(p, q))
    expected = expected / 2 * t**2  # mean over the two rows, times T^2
    assert kd_loss(student, teacher, t).item() == pytest.approx(expected, rel=1e-5)
    assert kd_loss(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(torch.zeros(0, 3), torch.zeros(0, 3), t).item() == 0.0  # nothing masked: 0, not NaN


def test_students_start_from_evenly_spaced_blocks_and_match_the_ends_of_their_spans():
    assert copied_blocks(4, 2) == [0, 2]
    assert copied_blocks(12, 6) == [0, 2, 4, 6, 8, 10]
    assert copied_blocks(4, 4) == [0, 1, 2, 3]
    assert matched_blocks(4, 2) == [1, 3]
    assert matched_blocks(6, 3) == [1, 3, 5]


# --- the objective --------------------------------------------------------------------------------


def test_teacher_layers_copy_blocks_0_and_2_embeddings_and_head(teachers):
    ckpt, _ = teachers["gpt"]
    teacher = load_checkpoint(ckpt).model.state_dict()
    student = DistilledCausalLM(teacher=str(ckpt), network_overrides={"n_layer": 2}).model.state_dict()
    assert len([k for k in student if k.startswith("trunk.blocks.")]) * 2 == len(
        [k for k in teacher if k.startswith("trunk.blocks.")])
    for key, value in student.items():
        source = key.replace("blocks.1.", "blocks.2.")
        torch.testing.assert_close(value, teacher[source], rtol=0, atol=0)
    assert not torch.equal(student["trunk.blocks.1.attn.qkv.weight"], teacher["trunk.blocks.1.attn.qkv.weight"])


@WITHOUT_TRAINER
def test_the_loss_mixes_soft_and_hard_and_alpha_changes_the_gradients(teachers):
    ckpt, _ = teachers["gpt"]
    gradients = {}
    for alpha in (0.0, 0.5, 1.0):
        module = DistilledCausalLM(teacher=str(ckpt), network_overrides={"n_layer": 2}, alpha=alpha, temperature=2.0)
        batch = lm_batch(module.network_config.vocab_size)
        loss = module.compute_loss(batch, "train")
        with torch.no_grad():
            student = module.model(batch["input_ids"]).flatten(0, 1)
            teacher = module.teacher(batch["input_ids"]).flatten(0, 1)
        soft, hard = kd_loss(student, teacher, 2.0), F.cross_entropy(student, batch["labels"].flatten())
        assert loss.item() == pytest.approx((alpha * soft + (1 - alpha) * hard).item(), rel=1e-5)
        loss.backward()
        gradients[alpha] = module.model.trunk.blocks[0].attn.qkv.weight.grad.clone()
    assert not torch.allclose(gradients[0.0], gradients[1.0])
    torch.testing.assert_close(gradients[0.5], (gradients[0.0] + gradients[1.0]) / 2)


@WITHOUT_TRAINER
def test_the_teacher_is_frozen_unsaved_and_unchanged_by_training(teachers):
    ckpt, _ = teachers["gpt"]
    module = DistilledCausalLM(teacher=str(ckpt), network_overrides={"n_layer": 2}, alpha=1.0, hidden_weight=1.0)
    before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    teacher_params = {id(p) for p in module.teacher.parameters()}
    module.train()
    assert not module.teacher.training
    assert not teacher_params & {id(p) for p in module.parameters()}
    assert not any("teacher" in key for key in module.state_dict())
    optimizer = torch.optim.AdamW(module.parameter_groups(), lr=0.1)
    student_before = module.model.trunk.blocks[0].attn.qkv.weight.detach().clone()
    for _ in range(2):
        module.compute_loss(lm_batch(module.network_config.vocab_size), "train").backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.grad is None and not p.requires_grad for p in module.teacher.parameters())
    for key, value in module.teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert not torch.equal(module.model.trunk.blocks[0].attn.qkv.weight, student_before)


@WITHOUT_TRAINER
def test_a_narrower_student_learns_a_projection_onto_the_teacher_hidden_states(teachers):
    ckpt, _ = teachers["gpt"]
    module = DistilledCausalLM(teacher=str(ckpt), network_overrides={"n_layer": 2, "n_embd": 16},
                               student_init="scratch", alpha=0.0, hidden_weight=1.0)
    assert tuple(module.hidden_projection.weight.shape) == (32, 16)
    grouped = {id(p) for group in module.parameter_groups() for p in group["params"]}
    assert id(module.hidden_projection.weight) in grouped
    module.compute_loss(lm_batch(module.network_config.vocab_size), "train").backward()
    assert module.hidden_projection.weight.grad.abs().sum() > 0
    # The same student without the hidden-state loss has no projection and never runs the teacher.
    plain = DistilledCausalLM(teacher=str(ckpt), network_overrides={"n_layer": 2, "n_embd": 16},
                              student_init="scratch", alpha=0.0)
    assert plain.hidden_projection is None and not plain.uses_teacher


def test_teacher_precision_bf16_autocasts_the_teacher_and_32_keeps_it_in_float32(teachers):
    ckpt, _ = teachers["gpt"]
    outputs = {}
    for precision in ("32", "bf16"):
        module = DistilledCausalLM(teacher=str(ckpt), network_overrides={"n_layer": 2}, teacher_precision=precision)
        batch = lm_batch(module.network_config.vocab_size)
        outputs[precision], _ = module._teacher_outputs(batch, [])
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as under a bf16-mixed trainer
            outputs[f"{precision} in bf16-mixed"], _ = module._teacher_outputs(batch, [])
    assert outputs["32"].dtype == outputs["bf16"].dtype == torch.float32
    assert torch.equal(outputs["32"], outputs["32 in bf16-mixed"])
    assert not torch.equal(outputs["32"], outputs["bf16"])
    torch.testing.assert_close(outputs["bf16"], outputs["32"], rtol=0, atol=0.1)


@pytest.mark.parametrize(("settings", "message"), [
    ({"network_overrides": {"n_layer": 6}}, r"^the student is larger than its teacher \(n_layer 6 > 4\): give it fewer layers"),
    ({"network_overrides": {"n_embd": 64, "n_head": 2}, "student_init": "scratch"},
     r"^the student is larger than its teacher \(n_embd 64 > 32\)"),
    ({"network_overrides": {"mlp_ratio": 16}, "student_init": "scratch"},
     r"^the student is larger than its teacher \(parameters [\d,]+ > [\d,]+\)"),
    ({"network_overrides": {"n_layer": 2, "n_embd": 16}},
     r"student_init='teacher-layers' copies the teacher's blocks, so the student needs the teacher's n_embd=32, not 16"),
    ({"network": "gpt-tiny", "network_overrides": {"vocab_size": 99}},
     r"the student's vocab_size=99 differs from the teacher's \d+: .*leave vocab_size out"),
    ({"alpha": 1.5}, r"alpha=1.5 must be in \[0, 1\]"),
    ({"pretrained": "x.ckpt"}, r"pretrained='x.ckpt' does not apply to a distilled student"),
])
def test_bad_students_are_refused_in_one_line(teachers, settings: dict, message: str):
    with pytest.raises(core.CompressionError) as error:
        DistilledCausalLM(teacher=str(teachers["gpt"][0]), **settings)
    assert one_line(error)
    assert error.match(message)


def test_teachers_of_another_task_or_labels_or_not_checkpoints_are_refused(teachers, tmp_path: Path):
    with pytest.raises(core.CompressionError) as error:
        DistilledCausalLM(teacher=str(teachers["bert"][0]))
    assert one_line(error).endswith(
        "was trained for masked_lm, but DistilledCausalLM distills causal_lm: use DistilledMaskedLM for this "
        "teacher, or a causal_lm teacher")
    classifier = DistilledClassifier(teacher=str(teachers["classifier"][0]), network_overrides={"n_layer": 2})
    with pytest.raises(core.CompressionError, match=r"classifies \['0', '1'\] but the data has labels \['neg', 'pos'\]"):
        classifier.read_data(SimpleNamespace(labels=["neg", "pos"]))
    fake = tmp_path / "notes.ckpt"
    fake.write_text("not a checkpoint")
    with pytest.raises(CheckpointError) as error:
        DistilledCausalLM(teacher=str(fake))
    assert one_line(error).startswith(f"teacher: checkpoint '{fake}' is truncated or not a checkpoint")


# --- runs -----------------------------------------------------------------------------------------


def test_causal_lm_distillation_and_its_baseline_end_to_end(teachers, tmp_path: Path):
    ckpt, config = teachers["gpt"]
    teacher_digest = digest(ckpt)
    watch = Watch()
    student = distill(ckpt, [config], tmp_path / "runs", layers=2, steps=3, alpha=0.7, temperature=3.0,
                      callbacks=[watch])
    assert (student.config.n_layer, student.config.n_embd, student.objective) == (2, 32, "CausalLM")
    assert {"train/kd_loss", "train/hard_loss", "train/loss", "val/loss"} <= set(watch.metrics)
    assert watch.teacher_calls == 3
    record = student.transforms[-1]
    assert {k: record[k] for k in ("method", "layers", "teacher_layers", "alpha", "temperature", "steps")} == {
        "method": "distill", "layers": 2, "teacher_layers": 4, "alpha": 0.7, "temperature": 3.0, "steps": 3}
    # The run's checkpoint is an ordinary 2-block network: no teacher inside, loadable as it is.
    saved = read_checkpoint(record["checkpoint"])
    assert all(key.startswith("model.") for key in saved["state_dict"])
    assert not any("teacher" in key for key in saved["state_dict"])
    assert load_checkpoint(record["checkpoint"]).config.n_layer == 2
    # The best export written during training names the task's objective too, as the .ckpt does.
    assert Path(record["checkpoint"]).name == "best.ckpt"
    assert load_checkpoint(Path(record["checkpoint"]).with_suffix("")).objective == "CausalLM"
    assert digest(ckpt) == teacher_digest
    export = load_checkpoint(core.save(student, tmp_path / "export"))
    assert export.config.n_layer == 2 and export.transforms[-1]["method"] == "distill"

    baseline_watch = Watch()
    baseline = distill(ckpt, [config], tmp_path / "runs", layers=2, steps=3, alpha=0.0, callbacks=[baseline_watch])
    assert baseline_watch.teacher_calls == 0
    assert "train/kd_loss" not in baseline_watch.metrics and "train/hard_loss" in baseline_watch.metrics
    assert baseline.config == student.config


def test_masked_lm_distillation_with_hidden_states_end_to_end(teachers, tmp_path: Path):
    ckpt, config = teachers["bert"]
    watch = Watch()
    student = distill(ckpt, [config], tmp_path / "runs", layers=2, steps=2, hidden_weight=1.0, callbacks=[watch])
    assert (student.config.arch, student.config.n_layer, student.objective) == ("bert", 2, "MaskedLM")
    assert {"train/kd_loss", "train/hidden_loss", "train/hard_loss"} <= set(watch.metrics)
    assert watch.teacher_calls == 2


def test_classifier_distillation_end_to_end(teachers, tmp_path: Path):
    ckpt, config = teachers["classifier"]
    watch = Watch()
    student = distill(ckpt, [config], tmp_path / "runs", layers=1, steps=2, callbacks=[watch])
    assert (student.config.n_layer, student.config.labels, student.objective) == (1, ["0", "1"], "SequenceClassification")
    assert {"train/kd_loss", "train/hard_loss", "train/acc", "val/acc"} <= set(watch.metrics)
    assert watch.teacher_calls == 2


# --- the command ----------------------------------------------------------------------------------


def test_the_command_writes_a_student_export_and_refuses_a_larger_one(teachers, tmp_path: Path, capsys):
    ckpt, config = teachers["gpt"]
    out = tmp_path / "student"
    assert compression_main.main([
        "distill", "--ckpt", str(ckpt), "--config", str(config), "--out", str(out), "--layers", "2",
        "--steps", "2", "--runs", str(tmp_path / "runs"), "--no-tracking",
    ]) == 0
    student = load_checkpoint(out)
    assert student.config.n_layer == 2 and student.transforms[-1]["method"] == "distill"
    capsys.readouterr()
    assert compression_main.main([
        "distill", "--ckpt", str(ckpt), "--out", str(tmp_path / "bigger"), "--layers", "8",
    ]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == [errors[0]] and errors[0].startswith("error: the student is larger than its teacher (n_layer 8 > 4)")
