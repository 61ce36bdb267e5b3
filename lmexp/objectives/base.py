"""What every training objective shares, whatever the task: building the network (from a preset
or a pretrained checkpoint), optimizer and parameter groups, schedule, clipping and the loss; exact
resume and throughput come as callbacks it configures (``resume``, ``throughput``). Language
modelling and classification sit on top."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from tokenizers import Tokenizer
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from lmexp.checkpoints import CHECKPOINT_KEY, LoadedModel, load_checkpoint
from lmexp.data.contract import DataContract, Task
from lmexp.deprecation import moved_names
from lmexp.errors import CheckpointError, ConfigError, check_positive
from lmexp.faults import poisoned
from lmexp.hardware import cpu_has_bf16_units
from lmexp.lightning_internals import logs_this_step as _logs_this_step  # its old name here warns (MOVED)
from lmexp.models import ModelConfig, build_model, count_parameters, from_name
from lmexp.objectives.optimizers import MuonWithAdamW, clip_gradients, hidden_matrices
from lmexp.objectives.resume import ExactResume
from lmexp.objectives.schedule import SCHEDULES, Schedule, lr_multiplier, warmup_length
from lmexp.objectives.throughput import Throughput

MOVED = {"logs_this_step": "lmexp.lightning_internals"}
__getattr__ = moved_names(__name__, MOVED)


def attached_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    """The trainer running ``module``, or None outside one (a module built or loaded on its own)."""
    try:
        return module.trainer
    except RuntimeError:  # Lightning's answer when no trainer is attached
        return None


def resolve_network(network: str | ModelConfig | Mapping[str, Any], overrides: Mapping[str, Any] | None) -> ModelConfig:
    """Preset name, config or plain dict (as stored in checkpoints) -> validated ModelConfig."""
    if isinstance(network, str):
        config = from_name(network)
    elif isinstance(network, ModelConfig):
        config = network
    else:
        config = ModelConfig().replace(**network)  # replace() names unknown fields
    if overrides:
        config = config.replace(**overrides)
    return config


# The arguments that say what the network is: a checkpoint's weights fix them.
NETWORK_SETTINGS = ("network", "network_overrides", "pretrained")
# The arguments that shape the learning-rate schedule: its state in a checkpoint is only the step.
SCHEDULE_SETTINGS = ("max_steps", "warmup_steps", "warmup_fraction", "schedule", "min_lr_ratio", "decay_fraction")
# Warmup when neither warmup_steps nor warmup_fraction is set.
DEFAULT_WARMUP_STEPS = 100
# Network fields that leave what trained weights compute unchanged (dropout is off in evaluation),
# and the heads a network has, which its source and its objective decide (never a command).
_WEIGHT_NEUTRAL_FIELDS = frozenset({"dropout", "classifier_dropout", "activation_checkpointing"})
HEAD_FIELDS = ("mlm_head", "sop_head", "pooler")
# Module names of those heads in a network's state dict.
_HEAD_MODULES = ("mlm_head.", "sop_head.", "pooler.")


def check_stated_network(stated: Mapping[str, Any], saved_network: Mapping[str, Any], checkpoint: str) -> None:
    """Refuse network settings that contradict the network a checkpoint's weights were trained as.

    ``stated`` holds the objective's arguments a command states (config files and flags, not the
    class's defaults). Where it says nothing the checkpoint's network stands, so a field left to
    the data (vocab_size, labels) never conflicts, nor does a pretrained start (the checkpoint
    holds the weights trained on from it), nor a field that does not change what the weights
    compute (dropout).

    Raises:
        ConfigError: naming the first contradicting setting, the checkpoint's value and the fix.
    """
    network, overrides = stated.get("network"), dict(stated.get("network_overrides") or {})
    preset_given = network is not None and stated.get("pretrained") is None
    described = resolve_network(network if preset_given else saved_network, overrides).to_dict()
    defaults = ModelConfig().to_dict()  # for fields newer than the checkpoint
    for field, value in described.items():
        trained = saved_network.get(field, defaults[field])
        if field in _WEIGHT_NEUTRAL_FIELDS or field in HEAD_FIELDS or value is None or _plain(value) == _plain(trained):
            continue
        if field in overrides:
            setting = f"model.network_overrides.{field}={value!r}"
        else:
            setting = f"model.network={network!r} ({field}={value!r})" if isinstance(network, str) else \
                f"model.network ({field}={value!r})"
        raise ConfigError(
            f"{setting} does not match the checkpoint {checkpoint!r}, whose network has {field}={trained!r}: "
            "evaluating a checkpoint keeps the network its weights were trained as (settings such as "
            "model.continuation_passages or data.eval_stride do apply); drop the setting, or evaluate with the "
            "config the checkpoint was trained with (its run's config.yaml)"
        )


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class TrainingObjective(pl.LightningModule):
    """Base LightningModule: wraps any ``lmexp.models`` network with a task's loss.

    The network is described by data (a preset name, a ``ModelConfig`` or a pretrained
    checkpoint), not passed as a module, so checkpoints rebuild it without extra arguments. What
    the data decides (vocabulary size, class labels) is filled in from the data module before
    the weights are made; what the model decides (task, context, a pretrained tokenizer) is
    handed to the data as a ``DataContract``.

    To write an objective: set ``task`` (the kind of batches the data makes: ``causal_lm``,
    ``masked_lm`` or ``classification``) and implement ``compute_loss``; a subclass of
    ``LanguageModelObjective`` implements ``lm_step`` instead, and its ``compute_loss`` logs and
    accumulates the metrics. Optional hooks: ``check_network`` (refuse a network it cannot train),
    ``network_complete``, ``build_heads`` (modules made once the network exists), ``read_data``
    (calling ``super().read_data``), ``unused_modules``. An override of ``configure_callbacks``
    keeps ``super().configure_callbacks()`` in its list: without it a resumed run does not
    continue exactly and throughput goes unlogged.

    Args:
        network: Preset name (``gpt-nano``, ``bert-mini``, ...) or a full model config.
        network_overrides: Fields replaced on top of ``network`` (e.g. ``{dropout: 0.1}``).
        pretrained: A checkpoint (``.ckpt``) or export folder to start from: its network config
            replaces ``network`` (``network_overrides`` still apply), its weights are loaded, and
            the data is encoded with its tokenizer.
        lr: Peak learning rate (AdamW).
        weight_decay: AdamW decay on weight matrices; biases, norms and embeddings get none.
        betas: AdamW betas.
        warmup_steps: Linear warmup length in optimizer steps (default 100 unless ``warmup_fraction``
            is set; not both).
        warmup_fraction: Warmup as a share of the planned steps (e.g. 0.1, the usual setting for
            fine-tuning, whatever the epochs and batch size make the length); not with ``warmup_steps``.
        max_steps: Length of the schedule; ``None`` uses the trainer's planned step count.
        min_lr_ratio: The floor of the decay as a fraction of ``lr``.
        optimizer: ``adamw`` (torch), ``adamw8bit`` (bitsandbytes: optimizer state in 8 bits,
            about a quarter of AdamW's state memory, at some speed cost on CPU) or ``muon``
            (``torch.optim.Muon`` on the weight matrices inside the transformer blocks, AdamW on
            embeddings, heads, norms and biases).
        fused_adamw: Use the fused AdamW kernel (CPU and CUDA); ignored by ``adamw8bit``.
        muon_lr: Muon's peak learning rate; ``None``: ``lr`` (Muon's step is scaled to AdamW's
            update size, so one rate suits both).
        muon_momentum: Muon's momentum.
        schedule: ``cosine`` (warmup, then a cosine decay to the floor), ``linear`` (warmup, then a
            straight line down to the floor: with ``min_lr_ratio: 0`` the usual fine-tuning decay) or ``wsd``
            (warmup-stable-decay: warmup, the peak held, a linear decay over the last
            ``decay_fraction`` of the steps).
        decay_fraction: Share of the steps ``wsd`` spends decaying.
        compile: Compile the network with ``torch.compile`` before training.
    """

    task: ClassVar[Task]

    def __init__(
        self,
        network: str | ModelConfig = "gpt-nano",
        network_overrides: dict[str, Any] | None = None,
        pretrained: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.99),
        warmup_steps: int | None = None,
        max_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        optimizer: Literal["adamw", "adamw8bit", "muon"] = "adamw",
        fused_adamw: bool = True,
        compile: bool = False,
        muon_lr: float | None = None,
        muon_momentum: float = 0.95,
        schedule: Schedule = "cosine",
        decay_fraction: float = 0.2,
        warmup_fraction: float | None = None,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ConfigError(f"lr={lr} must be positive, e.g. 1e-3")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio={min_lr_ratio} must be in [0, 1], e.g. 0.1")
        if warmup_steps is not None and warmup_steps < 0:
            raise ConfigError(f"warmup_steps={warmup_steps} must be >= 0")
        if warmup_fraction is not None and not 0.0 <= warmup_fraction < 1.0:
            raise ConfigError(f"warmup_fraction={warmup_fraction} must be in [0, 1), e.g. 0.1 (a tenth of the steps)")
        if warmup_steps is not None and warmup_fraction is not None:
            raise ConfigError(
                f"warmup_steps={warmup_steps} and warmup_fraction={warmup_fraction} are both set: give one "
                "(set the other to null, e.g. --model.init_args.warmup_steps null)"
            )
        if optimizer not in ("adamw", "adamw8bit", "muon"):
            raise ConfigError(f"optimizer={optimizer!r} is unknown: use 'adamw', 'adamw8bit' or 'muon'")
        if muon_lr is not None and muon_lr <= 0:
            raise ConfigError(f"muon_lr={muon_lr} must be positive (or unset to use lr), e.g. 5e-3")
        if not 0.0 <= muon_momentum < 1.0:
            raise ConfigError(f"muon_momentum={muon_momentum} must be in [0, 1), e.g. 0.95")
        if schedule not in SCHEDULES:
            raise ConfigError(
                f"schedule={schedule!r} is unknown: use 'cosine', 'linear' or 'wsd' (warmup-stable-decay)"
            )
        if not 0.0 < decay_fraction <= 1.0:
            raise ConfigError(f"decay_fraction={decay_fraction} must be in (0, 1], e.g. 0.2")
        if weight_decay < 0:
            raise ConfigError(f"weight_decay={weight_decay} is negative: use 0 (none) or more, e.g. 0.1")
        if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
            raise ConfigError(f"betas={list(betas)} must be two values in [0, 1), e.g. [0.9, 0.99]")
        if max_steps is not None:
            check_positive("max_steps", max_steps)
        self.save_hyperparameters()
        self._pretrained: LoadedModel | None = None  # until its weights are copied into the network
        self.source_tokenizer: Tokenizer | None = None  # the tokenizer the weights were trained with
        self.transforms: list[dict[str, Any]] = []  # what compression did to the weights (LoadedModel.transforms)
        if pretrained is not None:
            self._pretrained = load_checkpoint(pretrained)
            self.source_tokenizer = self._pretrained.tokenizer
            self.transforms = list(self._pretrained.transforms)
            network = self._pretrained.config
            if self._pretrained.rebuilt and network_overrides:
                raise ConfigError(
                    f"pretrained checkpoint {pretrained!r} is quantized, so network_overrides={network_overrides} "
                    "cannot apply: evaluate it as it is, or start from the checkpoint before quantization"
                )
        self.network_config = self.with_heads(resolve_network(network, network_overrides))
        self.check_network(self.network_config)
        self.model: nn.Module | None = None
        self._schedule_steps: int | None = None
        self._saved_schedule_steps: int | None = None
        self._data_vocab_size: int | None = None  # what read_data found
        self._data_labels: list[str] | None = None
        self._log_train_now = False  # set by each training step
        if self.network_complete(self.network_config):
            self._build()

    # --------------------------------------------------------------- building
    @property
    def block_size(self) -> int:
        return self.network_config.block_size

    @property
    def objective_name(self) -> str:
        """The objective checkpoints and exports record: what loads the network back (predict,
        prompting) reads it. A training method on top of a task (distillation) names the task's."""
        return type(self).__name__

    def check_network(self, config: ModelConfig) -> None:
        """Refuse a network this objective cannot train (override); the error names the fix."""

    def with_heads(self, config: ModelConfig) -> ModelConfig:
        """The network with the heads this objective trains (override): one its start lacks (an
        encoder imported without a masked-LM head) is made fresh and reported when the weights load;
        heads it does not use stay as the start has them, so none is made only to sit unused."""
        return config

    def network_complete(self, config: ModelConfig) -> bool:
        """Whether the config says all the data would tell it, so weights can be made now."""
        return config.vocab_size is not None

    def unused_modules(self) -> list[nn.Module]:
        """Parts of the network this objective's loss never reaches (another task's head). Their
        parameters are frozen: DDP would otherwise wait for gradients that never come."""
        return []

    def data_contract(self) -> DataContract:
        """What the data must provide for this model: the task, the context, a tokenizer, the labels
        a trained classifier has."""
        labels = self.network_config.labels
        return DataContract(self.task, self.block_size, self.network_config.arch, self.source_tokenizer,
                            tuple(labels) if labels else None)

    def adopt_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Encode the data with this tokenizer: that of a checkpoint about to be loaded, when the
        data cannot rebuild it from its own settings (a fine-tuned model's comes from its
        pre-training)."""
        self.source_tokenizer = tokenizer

    def _describe_source(self) -> str:
        return f"pretrained checkpoint {self.hparams.pretrained!r}" if self.hparams.pretrained else "the network config"

    def _build(self) -> None:
        if self._pretrained is not None and self._pretrained.rebuilt:
            # Quantized layers are not lmexp's own: run the loaded network itself (evaluation).
            if self._pretrained.config.labels != self.network_config.labels:
                raise CheckpointError(
                    f"pretrained checkpoint {self.hparams.pretrained!r} is quantized for labels "
                    f"{self._pretrained.config.labels}, not the data's {self.network_config.labels}: evaluate it on "
                    "data with its labels, or fine-tune the checkpoint before quantization"
                )
            self.model = self._pretrained.model
            self._pretrained = None
        else:
            self.model = build_model(self.network_config)
        if self._pretrained is not None:
            self._load_pretrained(self.model, self._pretrained)
            self._pretrained = None  # the weights are copied: free them
        self._freeze(self.unused_modules())
        self.build_heads()
        if self.hparams.compile:
            self.model.compile()
        rank_zero_info(
            f"{type(self).__name__}: {self.network_config.arch} with "
            f"{count_parameters(self.model):,} parameters ({self.network_config.n_layer} layers, "
            f"{self.network_config.n_embd} dims, context {self.block_size}, vocab {self.network_config.vocab_size})"
        )

    def build_heads(self) -> None:
        """Create objective-specific modules once the network exists (override when needed)."""

    def _freeze(self, modules: list[nn.Module]) -> None:
        """Stop training these modules' parameters, except those tied to a part still in use (a
        GPT's output layer shares the token embedding)."""
        if not modules:
            return
        prefixes = [name for name, m in self.model.named_modules(remove_duplicate=False)
                    if name and any(m is module for module in modules)]
        in_use = {
            id(param) for name, param in self.model.named_parameters(remove_duplicate=False)
            if not any(name.startswith(prefix + ".") for prefix in prefixes)
        }
        for module in modules:
            for param in module.parameters():
                if id(param) not in in_use:
                    param.requires_grad_(False)

    def _load_pretrained(self, model: nn.Module, pretrained: LoadedModel) -> None:
        """Copy a pretrained network's weights; a classification head for other labels (or none)
        starts fresh."""
        state = pretrained.model.state_dict()
        fresh = [k for k, v in model.state_dict().items() if k not in state or state[k].shape != v.shape]
        if pretrained.config.labels != self.network_config.labels:  # other classes: a new head
            fresh = sorted(set(fresh) | {k for k in model.state_dict() if k.startswith("classifier.")})
        state = {k: v for k, v in state.items() if k not in fresh}
        missing, unexpected = model.load_state_dict(state, strict=False)
        # A head the start does not have at all (with_heads added it) starts fresh; anything else
        # missing or of another shape means the sizes were overridden.
        added = {k for k in missing if k.startswith(_HEAD_MODULES) and k not in pretrained.model.state_dict()}
        wrong = [k for k in missing if not k.startswith("classifier.") and k not in added] + [
            k for k in unexpected if not k.startswith("classifier.")]
        if wrong:
            raise CheckpointError(
                f"pretrained checkpoint {self.hparams.pretrained!r} does not fit the network "
                f"({', '.join(wrong[:3])}{', ...' if len(wrong) > 3 else ''}): do not override sizes of a pretrained network"
            )
        ours = model.state_dict()
        loaded = {ours[k].data_ptr() for k in state if k in ours}
        fresh = [k for k in fresh if ours[k].data_ptr() not in loaded]  # not a decoder tied to a loaded embedding
        if fresh:
            rank_zero_info(f"{type(self).__name__}: new {', '.join(sorted({k.rsplit('.', 1)[0] for k in fresh}))} "
                           f"on top of {self.hparams.pretrained}")

    def setup(self, stage: str) -> None:
        precision = str(getattr(self.trainer, "precision", ""))
        if precision.startswith("bf16") and self.device.type == "cpu" and not cpu_has_bf16_units():
            rank_zero_warn(
                f"precision={precision} on a CPU without bf16 units (no AMX or AVX512-BF16, CPU "
                f"capability {torch.backends.cpu.get_cpu_capability()}): bf16 matrix products are "
                "emulated and training runs far slower than fp32; use --trainer.precision 32-true"
            )

    def configure_model(self) -> None:
        """Build the network once the data has told what it decides (vocabulary, labels).

        Under a trainer the data is the trainer's data module. Without one (``load_from_checkpoint``,
        or building a network to probe it) it is what ``read_data`` last recorded: call
        ``read_data(datamodule)`` first.
        """
        trainer = attached_trainer(self)
        if trainer is not None:
            self.read_data(trainer.datamodule)
        vocab_size, labels = self._data_vocab_size, self._data_labels
        if self.model is not None and labels is not None and list(labels) != self.network_config.labels:
            raise CheckpointError(
                f"the model was trained for labels {self.network_config.labels} but the data has {list(labels)}: "
                "evaluate on data with the same label set (data.labels fixes their order)"
            )
        if self.model is not None:
            # A larger model vocabulary is allowed: padding it (e.g. 50257 -> 50304) is a common
            # speed trick, and the extra rows are simply never targets.
            if vocab_size is not None and vocab_size > self.network_config.vocab_size:
                raise ConfigError(
                    f"the model's vocab_size={self.network_config.vocab_size} is smaller than the tokenizer's "
                    f"{vocab_size} that the data settings produce: when resuming, use the data settings the "
                    "checkpoint was trained with (source, tokenizer, vocab_size, split); otherwise leave vocab_size "
                    "out of the model config (it comes from the tokenizer) or set it to at least the tokenizer's"
                )
            return
        if vocab_size is None:
            raise ConfigError(
                "the model's vocab_size is unknown: train with a data module that has a tokenizer, "
                "or set vocab_size in the model config"
            )
        if self.network_config.vocab_size is not None and vocab_size > self.network_config.vocab_size:
            raise ConfigError(
                f"the {self._describe_source()} has vocab_size={self.network_config.vocab_size}, fewer than the "
                f"data's tokenizer ({vocab_size}): encode the data with the checkpoint's tokenizer"
            )
        changes: dict[str, Any] = {"vocab_size": self.network_config.vocab_size or vocab_size}
        if labels is not None:
            changes["labels"] = list(labels)
        self.network_config = self.network_config.replace(**changes)
        self._build()

    def read_data(self, datamodule: Any) -> None:
        """Take what the objective needs from the data module (vocabulary and labels; subclasses add
        bytes per token, class counts) before the network is built. ``configure_model`` calls it with
        the trainer's data module; overrides call ``super().read_data``."""
        self._data_vocab_size = getattr(datamodule, "vocab_size", None)
        labels = getattr(datamodule, "labels", None)
        self._data_labels = list(labels) if labels is not None else None

    # ----------------------------------------------------------- optimization
    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: decay weight matrices; spare biases, norms and embeddings."""
        embedding_params = {
            id(p) for m in self.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
        }
        decay, no_decay = [], []
        for param in self.parameters():  # a tied weight comes once
            if not param.requires_grad:
                continue
            (decay if param.ndim >= 2 and id(param) not in embedding_params else no_decay).append(param)
        return [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def build_optimizer(self) -> torch.optim.Optimizer:
        betas = tuple(self.hparams.betas)
        if self.hparams.optimizer == "muon":
            return self._muon_with_adamw(betas)
        if self.hparams.optimizer == "adamw8bit":
            try:
                from bitsandbytes.optim import AdamW8bit
            except ImportError as error:
                raise ConfigError(
                    f"optimizer='adamw8bit' needs bitsandbytes ({error}): pip install bitsandbytes"
                ) from error
            return AdamW8bit(self.parameter_groups(), lr=self.hparams.lr, betas=betas)
        return torch.optim.AdamW(
            self.parameter_groups(), lr=self.hparams.lr, betas=betas, fused=self.hparams.fused_adamw or None
        )

    def _muon_with_adamw(self, betas: tuple[float, float]) -> MuonWithAdamW:
        matrices = {id(p) for p in hidden_matrices(self)}
        if not matrices:
            raise ConfigError(
                f"optimizer='muon' trains the weight matrices of transformer blocks, and the "
                f"{self.network_config.arch} network has none: use optimizer 'adamw'"
            )
        muon_groups, adamw_groups = [], []
        for group in self.parameter_groups():
            muon = [p for p in group["params"] if id(p) in matrices]
            rest = [p for p in group["params"] if id(p) not in matrices]
            if muon:
                muon_groups.append({**group, "params": muon})
            if rest:
                adamw_groups.append({**group, "params": rest})
        return MuonWithAdamW(
            muon_groups, adamw_groups, lr=self.hparams.lr, muon_lr=self.hparams.muon_lr or self.hparams.lr,
            betas=betas, momentum=self.hparams.muon_momentum, fused=self.hparams.fused_adamw or None,
        )

    def check_training_length(self, max_steps: int | None, max_epochs: int | None) -> None:
        """Refuse, before a fit reads any data, a schedule ``configure_optimizers`` would refuse.

        A fit prepares its data (long, for a large corpus) before Lightning asks
        for the optimizers: whatever the trainer's ``max_steps``/``max_epochs`` (-1: no limit)
        already settle is checked here, the rest when the data gives the length.
        """
        if self.hparams.max_steps:
            self._check_warmup(self.hparams.max_steps)
        elif max_steps is not None and max_steps > 0:
            self._check_warmup(max_steps)  # the training steps are at most max_steps
        elif max_steps == -1 and max_epochs == -1:
            self._check_warmup(math.inf)

    def warmup_steps_for(self, total_steps: int) -> int:
        """The warmup length of a schedule ``total_steps`` long (``warmup_fraction`` of it, if set)."""
        hp = self.hparams
        return warmup_length(hp.warmup_steps, hp.get("warmup_fraction"), total_steps, DEFAULT_WARMUP_STEPS)

    def _check_warmup(self, planned: float) -> None:
        if not math.isfinite(planned):
            raise ConfigError(
                "training has no end (trainer.max_steps and max_epochs are both -1), so the LR schedule "
                "has no length: set trainer.max_steps, trainer.max_epochs or model.max_steps"
            )
        if self.hparams.get("warmup_fraction") is not None:
            return  # a share of the steps: below them whatever their number
        warmup = self.warmup_steps_for(int(planned))
        if warmup >= planned:
            raise ConfigError(
                f"warmup_steps={warmup} is not below the {int(planned)} training steps: "
                "lower model.warmup_steps or train longer (or set model.warmup_fraction)"
            )

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.build_optimizer()
        planned = self.hparams.max_steps or self.trainer.estimated_stepping_batches
        self._check_warmup(planned)
        total = int(planned)
        if self._saved_schedule_steps and self._saved_schedule_steps != total:
            rank_zero_warn(
                f"the LR schedule was {self._saved_schedule_steps} steps long and is now {total} "
                f"(trainer.max_steps changed), so the learning rate jumps on resume: pass "
                f"--model.max_steps {self._saved_schedule_steps} to keep the original schedule"
            )
        self._schedule_steps = total
        hp = self.hparams
        warmup = self.warmup_steps_for(total)
        if hp.get("warmup_fraction") is not None:
            rank_zero_info(f"LR warmup: {warmup} of {total} steps (warmup_fraction={hp.warmup_fraction})")
        scheduler = LambdaLR(optimizer, lr_multiplier(hp.schedule, warmup, total, hp.min_lr_ratio, hp.decay_fraction))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # Lightning's mixed-precision plugin refuses to clip fused optimizers because they
        # unscale fp16 gradients inside step(). Under bf16 autocast there is no grad scaler and
        # nothing to unscale, so clipping directly is correct and keeps the fused kernel.
        # Lightning's FSDP plugin refuses norm clipping: the norm is over every rank's shard, which
        # only the root FSDP module's clip_grad_norm_ computes. Everything else stays Lightning's.
        if gradient_clip_val and gradient_clip_algorithm != "value" and isinstance(self.trainer.strategy, FSDPStrategy):
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
            return
        plugin = self.trainer.precision_plugin
        if gradient_clip_val and isinstance(plugin, MixedPrecision) and plugin.scaler is None:
            clip_gradients(self.parameters(), gradient_clip_val, gradient_clip_algorithm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -------------------------------------------------------------- the step
    def compute_loss(
        self, batch: dict[str, torch.Tensor], stage: str, return_outputs: bool = False, loss_name: str = "loss",
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to optimize; subclasses also update their evaluation metrics here.

        Args:
            batch: A batch as the data module makes it.
            stage: ``train``, ``val`` or ``test``.
            return_outputs: Also return what the loss was computed from, as ``(loss, outputs)``:
                ``logits``, ``scored`` (the ``(N, K)`` rows of logits the loss scores) and what
                else an objective adds. ``logits`` differ per objective: ``CausalLM``, every
                position ``(B, T, V)``; ``MaskedLM``, only the masked positions ``(N, V)``
                (``hidden`` holds the network's full ``(B, T, H)`` states);
                ``SequenceClassification``, one row per example ``(B, K)``. A method built on top
                of the task's loss (distillation) reads them instead of hooking the network.
            loss_name: Training logs the loss as ``train/<loss_name>``, on the progress bar only
                as ``loss``: a method that logs its own total as ``loss`` names the task's part.
        """
        raise NotImplementedError

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # Training metrics are logged only on the steps Lightning writes: each self.log costs
        # ~1 ms of Python on a small model.
        trainer = attached_trainer(self)
        self._log_train_now = trainer is not None and _logs_this_step(trainer)
        loss = self.compute_loss(batch, "train")
        if poisoned("train.loss", self.global_step):  # LMEXP_FAULT=train.loss@N:nan|diverge (lmexp.faults)
            loss = loss * float("nan")
        return loss

    def log_train(self, name: str, value: torch.Tensor, batch_size: int, prog_bar: bool = False) -> None:
        """Log a training value on the steps Lightning writes, as a CPU copy: Lightning turns every
        progress-bar value back into a number after each batch, a device sync per step otherwise.
        Outside a training step (no trainer, a probe) nothing is logged."""
        if self._log_train_now:
            self.log(f"train/{name}", value.detach().cpu(), prog_bar=prog_bar, batch_size=batch_size)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.compute_loss(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.compute_loss(batch, "test")

    def configure_callbacks(self) -> list[Callback]:
        """Exact resume and throughput logging, for any trainer (a plain ``pl.Trainer`` too)."""
        return [ExactResume(), Throughput()]

    # ------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Store the resolved network as a plain dict: loadable with torch.load(weights_only=True)
        # and complete (vocab_size included) for rebuilding without the data.
        checkpoint["hyper_parameters"]["network"] = self.network_config.to_dict()
        checkpoint["hyper_parameters"]["network_overrides"] = None
        checkpoint["hyper_parameters"]["pretrained"] = None  # its weights are in this checkpoint
        # The random generators and the loop position: ExactResume, which runs first.
        trainer = attached_trainer(self)
        datamodule = trainer.datamodule if trainer is not None else None
        extra: dict[str, Any] = {"objective": self.objective_name, "schedule_steps": self._schedule_steps}
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is None:
            tokenizer = self.source_tokenizer
        if tokenizer is not None:
            extra["tokenizer"] = tokenizer.to_str()
        if hasattr(datamodule, "input_settings"):  # how raw inputs become model inputs, for predict
            extra["inputs"] = datamodule.input_settings()
        if self.transforms:
            extra["transforms"] = self.transforms
        checkpoint.setdefault(CHECKPOINT_KEY, {}).update(extra)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint.get(CHECKPOINT_KEY, {})
        self.transforms = list(extra.get("transforms", []))
        trainer = attached_trainer(self)
        datamodule = trainer.datamodule if trainer is not None else None
        tokenizer = getattr(datamodule, "tokenizer", None)
        if "tokenizer" in extra and tokenizer is not None and extra["tokenizer"] != tokenizer.to_str():
            saved = checkpoint["hyper_parameters"]["network"].get("vocab_size")
            raise CheckpointError(
                f"the checkpoint's tokenizer (vocab {saved}) differs from the one the data settings "
                f"produce (vocab {datamodule.vocab_size}): use the data settings the checkpoint was "
                "trained with (source, tokenizer, vocab_size, split)"
            )
        self._saved_schedule_steps = extra.get("schedule_steps")
