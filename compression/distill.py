"""Knowledge distillation: train a smaller student network to reproduce a trained teacher.

The student learns from the teacher's softened output distribution (Hinton et al. 2015,
"Distilling the Knowledge in a Neural Network") and, optionally, from its hidden states
(TinyBERT, Jiao et al. 2020), alongside the task's own labels. Distillation is a mixin on
lmexp's objectives, so a student trains with the same data modules, run folders, tracking and
checkpoints as any lmexp network, and ``lmexp fit`` can run it from a config::

    model:
      class_path: compression.distill.DistilledCausalLM
      init_args:
        teacher: runs/quickstart/latest/checkpoints/best.ckpt
        network_overrides: {n_layer: 2}

``distill`` builds such a run from the teacher's own config; ``python -m compression distill``
is the command line for it.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn

from compression import core
from compression.core import EXPERIMENT
from lmexp.checkpoints import LoadedModel, load_checkpoint
from lmexp.data import Task
from lmexp.errors import CheckpointError, check_choice, check_positive
from lmexp.models import ModelConfig, count_parameters, key_in_blocks, transformer_blocks
from lmexp.objectives import CausalLM, MaskedLM, SequenceClassification, TrainingObjective, resolve_network
from lmexp.runs import build

log = logging.getLogger(__name__)

StudentInit = Literal["teacher-layers", "scratch"]
TeacherPrecision = Literal["32", "bf16"]

# What a block-copying initialisation needs to be the same in teacher and student: the copied
# tensors must not only fit, they must mean the same thing (heads split the width alike, ...).
_SHARED_FOR_LAYER_COPY = (
    "arch", "n_embd", "n_head", "mlp_ratio", "position", "norm_position", "embedding_norm", "bias",
    "tie_embeddings", "block_size", "type_vocab_size", "activation",
)


# ------------------------------------------------------------------------ pure functions
def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(teacher_T || student_T) * T^2, averaged over rows (positions or examples).

    Both (N, K). The T^2 factor keeps the soft loss's gradients on the scale of the hard loss's
    as T changes (Hinton et al. 2015, section 2). No rows (a masked-LM batch with nothing
    masked) gives 0, not NaN.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: they must cover the same positions and classes")
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="batchmean")
    return kl * temperature**2


def copied_blocks(teacher_layers: int, student_layers: int) -> list[int]:
    """The teacher blocks a student of ``student_layers`` starts from: evenly spaced from the
    bottom (4 -> 2: blocks 0 and 2; 12 -> 6: every other block, as DistilBERT)."""
    return [i * teacher_layers // student_layers for i in range(student_layers)]


def matched_blocks(teacher_layers: int, student_layers: int) -> list[int]:
    """The teacher block whose output student block i learns to reproduce: the last of the
    span of teacher blocks it stands in for (4 -> 2: blocks 1 and 3), as TinyBERT maps layers."""
    return [(i + 1) * teacher_layers // student_layers - 1 for i in range(student_layers)]


def student_config(teacher: ModelConfig, layers: int | None = None, width: int | None = None) -> ModelConfig:
    """The teacher's network with fewer blocks and/or a smaller width.

    Per-block sizes of a structurally pruned teacher follow the blocks the student copies; a
    new width drops them (they were counted in the teacher's heads and neurons).
    """
    changes: dict[str, Any] = {}
    if layers is not None:
        changes["n_layer"] = layers
        blocks = copied_blocks(teacher.n_layer, layers) if layers <= teacher.n_layer else None
        for name in ("layer_heads", "layer_mlp_hidden"):
            sizes = getattr(teacher, name)
            if sizes is not None:
                changes[name] = [sizes[b] for b in blocks] if blocks is not None else None
    if width is not None and width != teacher.n_embd:
        changes.update(n_embd=width, layer_heads=None, layer_mlp_hidden=None)
    return teacher.replace(**changes)


def check_student_size(student: ModelConfig, teacher: ModelConfig, student_parameters: int | None = None,
                       teacher_parameters: int | None = None) -> None:
    """Refuse a student that is not smaller than its teacher in any dimension we can compare:
    distilling into a larger network is training a larger network, which this is not for."""
    larger = [f"{name} {getattr(student, name)} > {getattr(teacher, name)}"
              for name in ("n_layer", "n_embd") if getattr(student, name) > getattr(teacher, name)]
    if student_parameters is not None and teacher_parameters is not None and student_parameters > teacher_parameters:
        larger.append(f"parameters {student_parameters:,} > {teacher_parameters:,}")
    if larger:
        raise core.CompressionError(
            f"the student is larger than its teacher ({', '.join(larger)}): give it fewer layers (--layers, "
            f"n_layer at most {teacher.n_layer}) or a smaller width (--width, n_embd at most {teacher.n_embd})"
        )


def teacher_layer_state(student: nn.Module, teacher: nn.Module, blocks: Sequence[int]) -> dict[str, Tensor]:
    """The student's state dict filled from the teacher: embeddings, final norm and heads as
    they are, student block i from teacher block ``blocks[i]``."""
    teacher_state = teacher.state_dict()
    state = {}
    for key, value in student.state_dict().items():
        source = key_in_blocks(key, blocks)
        copied = teacher_state.get(source)
        if copied is None or copied.shape != value.shape:
            found = "nothing" if copied is None else f"shape {tuple(copied.shape)}"
            raise core.CompressionError(
                f"student_init='teacher-layers' cannot fill {key} {tuple(value.shape)} from the teacher's {source} "
                f"({found}): give the student the teacher's block sizes, or use student_init='scratch'"
            )
        state[key] = copied
    return state


def task_of(loaded: LoadedModel) -> Task:
    """The task a loaded network was trained for: from its objective's name (an lmexp class or a
    transformers folder's task), else from its config (labels: classification; bert: masked LM)."""
    by_name = {cls.__name__: cls.task for cls in (*TASK_OBJECTIVES.values(), *DISTILLED.values())}
    by_name.update({task: task for task in TASK_OBJECTIVES})
    if loaded.objective in by_name:
        return by_name[loaded.objective]
    if loaded.config.labels:
        return "classification"
    return "masked_lm" if loaded.config.arch == "bert" else "causal_lm"


def _checked_number(name: str, value: object, valid: Callable[[float], bool], rule: str) -> float:
    """``value`` as a float when it is a number ``valid`` accepts; else a one-line error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not valid(value):
        raise core.CompressionError(f"{name}={value!r} {rule}")
    return float(value)


@contextmanager
def captured_outputs(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, Tensor]]:
    """The outputs of these modules' forward passes inside the block, by name.

    Forward hooks let the distillation read the block outputs (hidden states) of the forward
    pass the objective's own loss runs, so the network runs once.
    """
    outputs: dict[str, Tensor] = {}

    def hook(name: str):
        def store(module: nn.Module, inputs: Any, output: Tensor) -> None:
            outputs[name] = output
        return store

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------- the objectives
class Distillation:
    """Distillation on top of a task objective: a frozen teacher's soft targets (and optionally
    hidden states) join the task's hard-label loss::

        loss = alpha * KL(teacher_T || student_T) * T^2 + (1 - alpha) * task loss
               + hidden_weight * MSE(project(student blocks), matched teacher blocks)

    Put it first among the bases (``class DistilledCausalLM(Distillation, CausalLM)``); a
    subclass says how the teacher computes the logits the task loss scores (the student's come
    with the task loss: ``compute_loss(..., return_outputs=True)``). Validation and test report the student's plain task metrics, so a
    distilled student and one trained without its teacher compare directly; ``alpha=0,
    hidden_weight=0`` is that second one (the teacher then only initialises and never runs).

    The teacher is not a child module: it is never trained, moved by Lightning, wrapped by DDP
    or saved, so a student checkpoint is an ordinary network of its own size.

    Args:
        teacher: The trained network: a ``.ckpt``, an lmexp export folder or a transformers
            folder. Its tokenizer encodes the data; its labels must be the data's.
        alpha: Weight of the soft (teacher) loss; ``1 - alpha`` weighs the hard-label loss.
        temperature: Softmax temperature of both distributions in the soft loss (> 0); higher
            shows the student more of the teacher's ranking of wrong answers.
        hidden_weight: Weight of the hidden-state loss (0 disables): the mean squared error
            between each student block's output and the teacher block it stands in for, through
            a learned linear projection when the widths differ.
        student_init: ``teacher-layers`` copies the teacher's embeddings, heads and evenly
            spaced blocks (0, 2, ... for half the depth) into the student, which must then have
            the teacher's width; ``scratch`` starts from random weights.
        teacher_precision: ``32`` runs the teacher in float32 (also under a bf16-mixed
            trainer); ``bf16`` runs its forward pass under bf16 autocast, faster on GPUs and on
            CPUs with bf16 units (AMX, AVX512-BF16), slower where bf16 is emulated.
        network: The student network: a preset name or config; default: the teacher's network,
            resized by ``network_overrides`` (e.g. ``{n_layer: 2}``).
        network_overrides: Fields replaced on top of ``network`` (``n_layer``, ``n_embd``, ...).
        **kwargs: See the task objective and ``TrainingObjective``.
    """

    task: ClassVar[Task]

    def __init__(
        self,
        teacher: str,
        alpha: float = 0.5,
        temperature: float = 2.0,
        hidden_weight: float = 0.0,
        student_init: StudentInit = "teacher-layers",
        teacher_precision: TeacherPrecision = "32",
        network: str | ModelConfig | None = None,
        network_overrides: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        alpha = _checked_number("alpha", alpha, lambda v: 0 <= v <= 1,
                                "must be in [0, 1]: the weight of the soft loss, e.g. 0.5")
        temperature = _checked_number("temperature", temperature, lambda v: v > 0, "must be positive, e.g. 2.0")
        hidden_weight = _checked_number("hidden_weight", hidden_weight, lambda v: v >= 0,
                                        "must be 0 (off) or positive, e.g. 1.0")
        check_choice("student_init", student_init, get_args(StudentInit))
        check_choice("teacher_precision", str(teacher_precision), get_args(TeacherPrecision))
        loaded = _load_teacher(teacher)
        teacher_task = task_of(loaded)
        if teacher_task != self.task:
            raise core.CompressionError(
                f"teacher {teacher!r} was trained for {teacher_task}, but {type(self).__name__} distills {self.task}: "
                f"use {DISTILLED[teacher_task].__name__} for this teacher, or a {self.task} teacher"
            )
        if loaded.tokenizer is None:
            raise core.CompressionError(
                f"teacher {teacher!r} has no tokenizer, so the data cannot be encoded as it was trained: "
                "pass a checkpoint or export that lmexp wrote (they carry their tokenizer)"
            )
        if loaded.rebuilt and student_init == "teacher-layers":
            raise core.CompressionError(
                f"teacher {teacher!r} is quantized, so its blocks cannot be copied into the student: "
                "use student_init='scratch', or the teacher before quantization"
            )
        if kwargs.get("pretrained") is not None:
            raise core.CompressionError(
                f"pretrained={kwargs['pretrained']!r} does not apply to a distilled student: it starts from the "
                "teacher's blocks (student_init='teacher-layers') or from random weights ('scratch'); leave pretrained out"
            )
        # Set before the network is built: building calls build_heads, which copies the teacher's blocks.
        self._teacher = loaded
        self._teacher_path = str(teacher)
        self._teacher_device: torch.device | None = None
        self.student_init = student_init
        super().__init__(network=self._student_network(network, network_overrides), **kwargs)
        self.alpha, self.temperature, self.hidden_weight = alpha, temperature, hidden_weight
        self.teacher_precision = str(teacher_precision)
        self._check_student()
        for param in loaded.model.parameters():
            param.requires_grad_(False)
        loaded.model.eval()
        self.source_tokenizer = loaded.tokenizer  # the data is encoded as the teacher saw it
        self.hidden_projection = self._make_hidden_projection()

    # ------------------------------------------------------------- the student
    def _student_network(self, network: str | ModelConfig | None,
                         overrides: Mapping[str, Any] | None) -> ModelConfig:
        """The student's config, with the vocabulary and labels the teacher decides."""
        teacher = self._teacher.config
        overrides = dict(overrides or {})
        if network is None:
            base = student_config(teacher, overrides.pop("n_layer", None), overrides.pop("n_embd", None))
        else:
            base = resolve_network(network, None)
        config = resolve_network(base, overrides)
        for name in ("vocab_size", "labels"):
            given, needed = getattr(config, name), getattr(teacher, name)
            if given is None:
                config = config.replace(**{name: needed})
            elif given != needed:
                raise core.CompressionError(
                    f"the student's {name}={given} differs from the teacher's {needed}: the student must predict "
                    f"the teacher's {'tokens' if name == 'vocab_size' else 'classes'}; leave {name} out of the student's network"
                )
        check_student_size(config, teacher)
        return config

    def _check_student(self) -> None:
        """What only the built network tells: its size, and whether it has blocks to match."""
        check_student_size(self.network_config, self._teacher.config, count_parameters(self.model),
                           count_parameters(self._teacher.model))
        if self.hidden_weight and not _has_blocks(self.model):
            raise core.CompressionError(
                f"hidden_weight={self.hidden_weight} matches transformer blocks, but the student is an "
                f"{self.network_config.arch}: use hidden_weight=0 or a transformer student"
            )

    def build_heads(self) -> None:
        super().build_heads()
        if self.student_init != "teacher-layers":
            return
        student, teacher = self.network_config, self._teacher.config
        different = [name for name in _SHARED_FOR_LAYER_COPY if getattr(student, name) != getattr(teacher, name)]
        if different:
            name = different[0]
            raise core.CompressionError(
                f"student_init='teacher-layers' copies the teacher's blocks, so the student needs the teacher's "
                f"{name}={getattr(teacher, name)!r}, not {getattr(student, name)!r}: keep it, or use student_init='scratch'"
            )
        blocks = copied_blocks(teacher.n_layer, student.n_layer)
        self.model.load_state_dict(teacher_layer_state(self.model, self._teacher.model, blocks))

    def _make_hidden_projection(self) -> nn.Linear | None:
        """Student width -> teacher width, trained with the student (TinyBERT's W_h), when the
        hidden-state loss is on and the widths differ."""
        student, teacher = self.network_config.n_embd, self._teacher.config.n_embd
        if not self.hidden_weight or student == teacher:
            return None
        return nn.Linear(student, teacher, bias=False)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The task objective's groups, and the hidden-state projection (outside the network)."""
        groups = super().parameter_groups()
        listed = {id(p) for group in groups for p in group["params"]}
        extra = [p for p in self.parameters() if p.requires_grad and id(p) not in listed]
        if extra:
            groups.append({"params": extra, "weight_decay": self.hparams.weight_decay})
        return groups

    # ------------------------------------------------------------- the teacher
    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher network, on the student's device."""
        network = self._teacher.model
        if self._teacher_device != self.device:
            network.to(self.device)
            self._teacher_device = self.device
        return network

    @property
    def uses_teacher(self) -> bool:
        """Whether training runs the teacher (not with alpha=0 and hidden_weight=0)."""
        return self.alpha > 0 or self.hidden_weight > 0

    def teacher_logits(self, teacher: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """The teacher's logits for the rows the task loss scores (override per task)."""
        raise NotImplementedError

    def distilled_rows(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """(N, K) rows of the teacher's logits the soft loss compares: those the task loss scores
        in the student's (override where the task loss scores a subset of the positions)."""
        return logits

    def _teacher_outputs(self, batch: dict[str, Tensor], blocks: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
        """The teacher's logits and the outputs of ``blocks``, without gradients, in float32."""
        teacher = self.teacher
        teacher_blocks = transformer_blocks(teacher) if blocks else []
        block_modules = {str(i): teacher_blocks[i] for i in blocks}
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.teacher_precision == "bf16")
        with torch.no_grad(), autocast, captured_outputs(block_modules) as hidden:
            logits = self.teacher_logits(teacher, batch)
        return logits.float(), [hidden[str(i)].float() for i in blocks]

    # ------------------------------------------------------------- the loss
    def compute_loss(
        self, batch: dict[str, Tensor], stage: str, return_outputs: bool = False, loss_name: str = "loss",
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        if stage != "train":
            return super().compute_loss(batch, stage, return_outputs, loss_name)  # the student's own metrics
        watched = dict(enumerate(transformer_blocks(self.model))) if self.hidden_weight else {}
        # The task's loss is the hard-label part here, logged as hard_loss; "loss" is the total.
        with captured_outputs({str(i): block for i, block in watched.items()}) as student:
            hard_loss, outputs = super().compute_loss(batch, stage, return_outputs=True, loss_name="hard_loss")
        loss = (1.0 - self.alpha) * hard_loss
        batch_size = batch["input_ids"].shape[0]
        if self.uses_teacher:
            matched = matched_blocks(self._teacher.config.n_layer, self.network_config.n_layer) \
                if self.hidden_weight else []
            teacher_logits, teacher_hidden = self._teacher_outputs(batch, matched)
            if self.alpha > 0:
                soft_loss = kd_loss(outputs["scored"], self.distilled_rows(teacher_logits, batch), self.temperature)
                loss = loss + self.alpha * soft_loss
                self.log_train("kd_loss", soft_loss, batch_size)
            if self.hidden_weight:
                student_hidden = [student[str(i)] for i in range(self.network_config.n_layer)]
                hidden_loss = self.hidden_state_loss(student_hidden, teacher_hidden, batch.get("attention_mask"))
                loss = loss + self.hidden_weight * hidden_loss
                self.log_train("hidden_loss", hidden_loss, batch_size)
        self.log_train(loss_name, loss, batch_size, prog_bar=loss_name == "loss")
        return (loss, outputs) if return_outputs else loss

    def hidden_state_loss(self, student: Sequence[Tensor], teacher: Sequence[Tensor],
                          attention_mask: Tensor | None) -> Tensor:
        """Mean over blocks of the squared error per real token between the (projected) student
        block outputs and the teacher's, each (B, T, C)."""
        losses = []
        for student_states, teacher_states in zip(student, teacher):
            if self.hidden_projection is not None:
                student_states = self.hidden_projection(student_states)
            error = (student_states.float() - teacher_states).pow(2).mean(dim=-1)  # (B, T)
            if attention_mask is not None:
                real = attention_mask.to(error.dtype)
                losses.append((error * real).sum() / real.sum().clamp(min=1))
            else:
                losses.append(error.mean())
        return torch.stack(losses).mean()

    # ------------------------------------------------------------- checkpoints
    @property
    def objective_name(self) -> str:
        """The student is an ordinary network of its task: checkpoints and exports name the task's
        own objective, not the training method."""
        return next(cls for cls in type(self).__mro__
                    if issubclass(cls, TrainingObjective) and not issubclass(cls, Distillation)).__name__


def _has_blocks(model: nn.Module) -> bool:
    try:
        transformer_blocks(model)
    except ValueError:
        return False
    return True


def _load_teacher(path: str) -> LoadedModel:
    try:
        return core.load(path)
    except CheckpointError as error:
        raise CheckpointError(f"teacher: {error}") from None


class DistilledCausalLM(Distillation, CausalLM):
    """A causal LM student distilled on every next-token position the task loss scores."""

    def teacher_logits(self, teacher: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return teacher(batch["input_ids"])  # (B, T, V); called as a module, so forward hooks see it run

    def distilled_rows(self, logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return logits[batch["labels"] != -100]  # (N, V)


class DistilledMaskedLM(Distillation, MaskedLM):
    """A BERT student distilled on the masked positions (labels != -100), as its task loss."""

    def teacher_logits(self, teacher: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        hidden = teacher(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"))  # (B, T, C)
        return teacher.mlm_logits(hidden[batch["labels"] != -100])  # (N_selected, V): only the masked positions


class DistilledClassifier(Distillation, SequenceClassification):
    """A sequence classifier distilled on the teacher's label logits."""

    def teacher_logits(self, teacher: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return teacher.classify(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))  # (B, num_labels)

    def read_data(self, datamodule: Any) -> None:
        super().read_data(datamodule)
        labels = getattr(datamodule, "labels", None)
        if labels is not None and list(labels) != self._teacher.config.labels:
            raise core.CompressionError(
                f"teacher {self._teacher_path!r} classifies {self._teacher.config.labels} but the data has labels "
                f"{list(labels)}: distill on data with the teacher's label set (data.labels fixes their order)"
            )


TASK_OBJECTIVES: dict[str, type[TrainingObjective]] = {
    "causal_lm": CausalLM, "masked_lm": MaskedLM, "classification": SequenceClassification,
}
DISTILLED: dict[str, type[Distillation]] = {
    "causal_lm": DistilledCausalLM, "masked_lm": DistilledMaskedLM, "classification": DistilledClassifier,
}


# ------------------------------------------------------------------------ the run
def distill(
    teacher_path: str | Path,
    configs: Sequence[str | Path],
    out: str | Path | None = None,
    layers: int | None = None,
    width: int | None = None,
    steps: int | None = None,
    alpha: float = 0.5,
    temperature: float = 2.0,
    hidden_weight: float = 0.0,
    student_init: StudentInit = "teacher-layers",
    teacher_precision: TeacherPrecision = "32",
    lr: float | None = None,
    warmup_steps: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    callbacks: Sequence[pl.Callback] = (),
    logger: Logger | bool | None = None,
) -> LoadedModel:
    """Train a student of the teacher's task on the data of ``configs``; return the student.

    The run is an ordinary lmexp ``fit`` of the configs (usually the teacher's own
    ``config.yaml``) with the model switched to the task's distillation objective, every
    distillation setting passed explicitly (a config's ``init_args`` for the task objective
    stay valid: the distillation classes take all of them). The student is the teacher's
    network with ``layers`` blocks and ``width`` dims, loaded back from the run's best
    checkpoint (else its last) with a ``distill`` transform recorded; save it with
    ``core.save``. ``alpha=0, hidden_weight=0`` trains the same student from the same start
    without the teacher's outputs: the baseline distillation is measured against.

    Args:
        teacher_path: The trained network (``.ckpt``, lmexp export or transformers folder).
        configs: YAML configs whose data and trainer sections the run uses.
        out: Folder the distillation run's folder (checkpoints, ``config.yaml``) is made in;
            default: the config's ``default_root_dir``, else ``runs/compression``.
        layers: Blocks of the student (default: the teacher's).
        width: Hidden width of the student (default: the teacher's).
        steps: Training steps (default: the config's ``trainer.max_steps``).
        alpha, temperature, hidden_weight, student_init, teacher_precision: See ``Distillation``.
        lr: Peak learning rate (default: the config's).
        warmup_steps: Warmup steps (default: the config's); must be below ``steps``.
        overrides: Further dotted settings, as ``lmexp.runs.build`` takes them; they win.
        callbacks: Callbacks added to the run.
        logger: The run's tracking instead of the config's (False: none).

    Raises:
        CompressionError, ConfigError, CheckpointError, DataError: bad input, in one line.
    """
    for name, value in (("layers", layers), ("width", width), ("steps", steps)):
        if value is not None:
            check_positive(name, value)
    teacher = _load_teacher(str(teacher_path))
    task = task_of(teacher)
    planned = student_config(teacher.config, layers, width)
    check_student_size(planned, teacher.config)
    objective = DISTILLED[task]
    sizes = {name: value for name, value in (("n_layer", layers), ("n_embd", width)) if value is not None}
    settings: dict[str, Any] = {
        "model.class_path": f"{objective.__module__}.{objective.__name__}",
        "model.init_args.teacher": str(teacher_path),
        "model.init_args.alpha": alpha,
        "model.init_args.temperature": temperature,
        "model.init_args.hidden_weight": hidden_weight,
        "model.init_args.student_init": student_init,
        "model.init_args.teacher_precision": str(teacher_precision),
        "model.init_args.network": None,  # the teacher's network, resized below
        "model.init_args.network_overrides": sizes,
        "model.init_args.pretrained": None,
        # A teacher's saved config names its own run and any checkpoint it resumed from.
        "run_name": None,
        "ckpt_path": None,
    }
    optional = (("trainer.max_steps", steps), ("model.init_args.lr", lr), ("model.init_args.warmup_steps", warmup_steps),
                ("trainer.default_root_dir", None if out is None else str(out)))
    settings.update({key: value for key, value in optional if value is not None})
    settings.update(overrides or {})
    log.info(
        "distilling %s into a student of %d layers and %d dims (alpha %s, temperature %s, hidden weight %s, init %s)",
        core.describe(teacher), planned.n_layer, planned.n_embd, alpha, temperature, hidden_weight, student_init,
    )
    run = build("fit", configs, overrides=settings, callbacks=callbacks, logger=logger, experiment=EXPERIMENT)
    run.execute()
    checkpoint = run.trainer.checkpoint_callback
    saved = (checkpoint.best_model_path or checkpoint.last_model_path) if checkpoint is not None else ""
    if not saved:
        raise core.CompressionError(
            f"the distillation run in {run.run_dir} saved no checkpoint: keep checkpointing on "
            "(trainer.enable_checkpointing) so the student can be read back"
        )
    student = load_checkpoint(saved)
    student.transforms.append({
        "method": "distill", "teacher": str(teacher_path), "teacher_layers": teacher.config.n_layer,
        "teacher_width": teacher.config.n_embd, "layers": student.config.n_layer, "width": student.config.n_embd,
        "alpha": alpha, "temperature": temperature, "hidden_weight": hidden_weight, "student_init": student_init,
        "teacher_precision": str(teacher_precision), "steps": run.trainer.global_step, "checkpoint": str(saved),
    })
    log.info("student: %s, from %s", core.describe(student), saved)
    return student


# ------------------------------------------------------------------------ the command
def add_command(subparsers: argparse._SubParsersAction) -> None:
    """``python -m compression distill``."""
    parser = subparsers.add_parser(
        "distill", help="train a smaller student to reproduce a trained network",
        description="Distill a trained lmexp network into a student with fewer layers and/or a smaller width, on "
        "the teacher's data (its run's config.yaml, or --config), and write the student as an lmexp export. "
        "--alpha 0 --hidden-weight 0 trains the same student without the teacher, for comparison.",
    )
    core.common_arguments(parser, skip=False)
    parser.add_argument("--layers", type=int, default=None, help="blocks of the student (default: the teacher's)")
    parser.add_argument("--width", type=int, default=None, help="hidden width n_embd of the student (default: the teacher's)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's trainer.max_steps)")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the soft (teacher) loss; 1-alpha weighs the labels")
    parser.add_argument("--temperature", type=float, default=2.0, help="softmax temperature of the soft loss")
    parser.add_argument("--hidden-weight", type=float, default=0.0,
                        help="weight of the loss between student and teacher hidden states (0: off)")
    parser.add_argument("--init", choices=get_args(StudentInit), default="teacher-layers",
                        help="teacher-layers: start from the teacher's embeddings, heads and evenly spaced blocks "
                        "(same width only); scratch: random weights")
    parser.add_argument("--teacher-precision", choices=get_args(TeacherPrecision), default="32",
                        help="32: teacher in float32; bf16: under bf16 autocast (faster only with bf16 units: GPU, AMX, AVX512-BF16)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the config's)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="warmup steps (default: the config's)")
    parser.add_argument("--runs", default=None,
                        help="folder the distillation run's folder (checkpoints, config.yaml) is made in "
                        "(default: the config's default_root_dir, else runs/compression)")
    parser.set_defaults(func=run_distill)


def run_distill(args: argparse.Namespace) -> None:
    """Distill, then write the student into --out."""
    from compression.data import configs_for

    core.check_output(args.out, args.overwrite)  # before training, not after
    configs = configs_for(args.ckpt, args.config)
    logger = core.run_logger(args)
    student = distill(
        args.ckpt, configs, args.runs, layers=args.layers, width=args.width, steps=args.steps, alpha=args.alpha,
        temperature=args.temperature, hidden_weight=args.hidden_weight, student_init=args.init,
        teacher_precision=args.teacher_precision, lr=args.lr, warmup_steps=args.warmup_steps, logger=logger,
    )
    if not core.is_main_process():  # the other ranks of a DDP run: rank 0 writes the student
        return
    folder = core.save(student, args.out, overwrite=args.overwrite)
    log.info("wrote the student to %s", folder)
    record = student.transforms[-1]
    core.track(args, {key: record[key] for key in record if key != "method"},
               {"parameters": count_parameters(student.model)})
