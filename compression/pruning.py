"""Pruning: zero, or remove, the weights of a trained network that its outputs need least.

Four one-shot methods act on the linear layers inside the transformer blocks
(``core.compressible_linears``; embeddings, the tied LM head and classifiers stay whole):

- ``magnitude``: the smallest weights by absolute value, over all layers at once or per layer.
- ``wanda``: the smallest ``|weight| * ||input activation||`` in each output row (Sun et al.
  2023), which keeps small weights that see large inputs.
- ``semi_structured``: N:M sparsity (2:4 by default), the pattern sparse tensor cores run fast.
- ``structured``: whole attention heads and MLP neurons removed, so the network gets smaller.

``fine_tune`` trains a pruned network with its zeros held at zero (recovery), or prunes a
dense one gradually while it trains (Zhu & Gupta 2017). Every function takes a ``LoadedModel``
or a checkpoint, leaves it as it is, and returns a new ``LoadedModel`` with what was done
appended to ``transforms``, ready for ``core.save``. ``python -m compression prune`` runs them.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelPruning
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn
from torch.nn.utils import prune

from compression.core import (
    CompressionError,
    check_fraction,
    check_output,
    common_arguments,
    compressible_linears,
    copy_loaded,
    format_sparsity,
    is_main_process,
    load,
    run_blocks,
    run_logger,
    save,
    sparsity_table,
    track,
    write_json,
)
from compression.data import batches, build_run, configs_for
from lmexp.checkpoints import LoadedModel, load_checkpoint
from lmexp.models import block_linears, count_parameters, keep_heads_and_neurons

log = logging.getLogger(__name__)

Batches = Iterable[dict[str, Tensor]]
Scope = Literal["global", "layer"]
METHODS = ("magnitude", "magnitude-layer", "wanda", "2:4", "structured")
CALIBRATED = ("wanda", "2:4", "structured")  # the methods that score by activations when given data
SPARSITY_FILE = "sparsity.json"


# ------------------------------------------------------------------------- shared steps
def _prunable_copy(loaded: LoadedModel, skip: Sequence[str]) -> tuple[LoadedModel, dict[str, nn.Linear]]:
    """A copy of the network to prune and its block linear layers (``skip`` left out)."""
    _refuse_quantized(loaded)
    pruned = copy_loaded(loaded)
    linears = compressible_linears(pruned.model, skip)
    if not linears:
        raise CompressionError(f"skip={list(skip)} leaves no block linear layer to prune: narrow the --skip patterns")
    return pruned, linears


def _refuse_quantized(loaded: LoadedModel) -> None:
    if loaded.rebuilt:
        raise CompressionError(
            "the network is quantized (its linear layers were replaced), so it cannot be pruned: "
            "prune the checkpoint before quantizing it"
        )


def _apply_masks(linears: Mapping[str, nn.Linear], masks: Mapping[str, Tensor]) -> None:
    """Zero each layer's weights where its mask is 0, permanently (no mask buffers or hooks
    remain, so the network deep-copies, saves and quantizes as a plain one)."""
    for name, mask in masks.items():
        prune.custom_from_mask(linears[name], "weight", mask)
    _make_permanent(linears.values())


def _make_permanent(linears: Iterable[nn.Linear]) -> None:
    for linear in linears:
        if prune.is_pruned(linear):
            prune.remove(linear, "weight")


def _recorded(pruned: LoadedModel, transform: dict[str, Any]) -> LoadedModel:
    pruned.transforms.append(transform)
    return pruned


def _require_calibration(method: str, calibration: Batches | None) -> Batches:
    if calibration is None:
        raise CompressionError(
            f"{method} scores weights by the activations they see, so it needs calibration batches: "
            "pass calibration data (--calibration-batches 1 or more with a data config)"
        )
    return calibration


def activation_norms(
    model: nn.Module, linears: Mapping[str, nn.Linear], calibration: Batches
) -> tuple[dict[str, Tensor], int]:
    """The L2 norm of every input feature of each layer over all real tokens of the calibration
    batches, and the number of batches run.

    Padding positions (``attention_mask`` 0) are left out: their activations never reach a
    real token's output, so counting them would score weights by inputs that do not matter.
    """
    squares: dict[str, Tensor] = {}
    real_tokens: Tensor | None = None  # (B, T) of the batch being run, True where a token is real

    def announced(stream: Batches) -> Iterator[dict[str, Tensor]]:
        nonlocal real_tokens
        for batch in stream:
            mask = batch.get("attention_mask")
            real_tokens = mask.bool() if mask is not None else None
            yield batch

    def accumulate(name: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            x = inputs[0].detach()  # (B, T, in)
            if real_tokens is not None:
                x = x[real_tokens.to(x.device)]  # (real tokens, in)
            total = x.reshape(-1, x.shape[-1]).double().pow(2).sum(dim=0)  # (in,)
            squares[name] = squares[name] + total if name in squares else total

        return hook

    handles = [linear.register_forward_hook(accumulate(name)) for name, linear in linears.items()]
    try:
        seen = run_blocks(model, announced(calibration))
    finally:
        for handle in handles:
            handle.remove()
    return {name: squares[name].sqrt().float() for name in linears}, seen


def _lowest_per_row(scores: Tensor, fraction: float) -> Tensor:
    """Mask (out, in) that zeros the lowest-scoring ``floor(in * fraction)`` weights of each
    output row: Wanda's comparison group, so every neuron keeps the same share of its inputs."""
    mask = torch.ones_like(scores)
    pruned_per_row = int(scores.shape[1] * fraction)
    if pruned_per_row:
        lowest = scores.topk(pruned_per_row, dim=1, largest=False).indices
        mask.scatter_(1, lowest, 0.0)
    return mask


# ------------------------------------------------------------------- unstructured methods
def magnitude(loaded: LoadedModel, sparsity: float, scope: Scope = "global", skip: Sequence[str] = ()) -> LoadedModel:
    """Zero the fraction ``sparsity`` of block linear weights with the smallest absolute value.

    ``global`` ranks all layers' weights together (layers with many small weights lose more);
    ``layer`` prunes every layer to the same sparsity. Biases are kept.
    """
    sparsity = check_fraction("sparsity", sparsity)
    if scope not in ("global", "layer"):
        raise CompressionError(f"scope={scope!r} is unknown: use 'global' (all layers ranked together) or 'layer'")
    pruned, linears = _prunable_copy(loaded, skip)
    if scope == "global":
        parameters = [(linear, "weight") for linear in linears.values()]
        prune.global_unstructured(parameters, pruning_method=prune.L1Unstructured, amount=sparsity)
    else:
        for linear in linears.values():
            prune.l1_unstructured(linear, "weight", amount=sparsity)
    _make_permanent(linears.values())
    return _recorded(pruned, {"method": "magnitude", "scope": scope, "sparsity": sparsity, "skip": list(skip)})


def wanda(loaded: LoadedModel, sparsity: float, calibration: Batches | None, skip: Sequence[str] = ()) -> LoadedModel:
    """Wanda (Sun et al. 2023): zero, in each output row, the fraction ``sparsity`` of weights
    with the lowest ``|W_ij| * ||X_j||_2``, ``X_j`` being input feature j over every real
    calibration token.

    One shot: all layers are scored with the activations of the dense network, in a single
    pass over the calibration batches (the paper's default; its sequential variant, which
    re-runs the data through each pruned block, is not done).
    """
    sparsity = check_fraction("sparsity", sparsity)
    calibration = _require_calibration("wanda", calibration)
    pruned, linears = _prunable_copy(loaded, skip)
    norms, seen = activation_norms(pruned.model, linears, calibration)
    masks = {
        name: _lowest_per_row(linear.weight.detach().abs() * norms[name], sparsity)  # (out, in) * (in,)
        for name, linear in linears.items()
    }
    _apply_masks(linears, masks)
    return _recorded(pruned, {"method": "wanda", "sparsity": sparsity, "calibration_batches": seen, "skip": list(skip)})


def n_m_mask(scores: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """Mask (out, in) keeping the ``n`` highest scores of every ``m`` consecutive inputs of a row."""
    rows, columns = scores.shape
    groups = scores.reshape(rows, columns // m, m)  # (out, in/m, m)
    mask = torch.zeros_like(groups)
    mask.scatter_(2, groups.topk(n, dim=2).indices, 1.0)
    return mask.reshape(rows, columns)


def has_n_m_pattern(weight: Tensor, n: int = 2, m: int = 4) -> bool:
    """Whether every ``m`` consecutive inputs of each row hold at most ``n`` non-zero weights."""
    rows, columns = weight.shape
    if columns % m:
        return False
    return bool(((weight.reshape(rows, columns // m, m) != 0).sum(dim=2) <= n).all())


def semi_structured(
    loaded: LoadedModel, calibration: Batches | None = None, skip: Sequence[str] = (), n: int = 2, m: int = 4
) -> LoadedModel:
    """N:M sparsity: of every ``m`` consecutive input weights of each row, keep the ``n`` that
    score highest (NVIDIA's 2:4 convention: at most 2 non-zero in every 4, half the weights).

    Scores are Wanda's ``|W| * ||X||`` when calibration batches are given, else ``|W|``. The
    weights stay dense tensors with the pattern: ``torch.sparse.to_sparse_semi_structured``,
    which turns them into the compressed form sparse tensor cores run, needs a CUDA GPU.
    """
    if not 0 < n < m:
        raise CompressionError(f"{n}:{m} sparsity is impossible: keep n of every m weights with 0 < n < m, e.g. 2:4")
    pruned, linears = _prunable_copy(loaded, skip)
    uneven = {name: linear.in_features for name, linear in linears.items() if linear.in_features % m}
    if uneven:
        name, width = next(iter(uneven.items()))
        raise CompressionError(
            f"{name} has {width} inputs, not a multiple of {m}, so it has no {n}:{m} groups: "
            f"leave it out with --skip '{name}'"
        )
    transform: dict[str, Any] = {"method": f"{n}:{m}", "sparsity": 1 - n / m, "scored_by": "magnitude"}
    norms: dict[str, Tensor] = {}
    if calibration is not None:
        norms, transform["calibration_batches"] = activation_norms(pruned.model, linears, calibration)
        transform["scored_by"] = "wanda"
    masks = {
        name: n_m_mask(linear.weight.detach().abs() * norms.get(name, 1.0), n, m) for name, linear in linears.items()
    }
    _apply_masks(linears, masks)
    return _recorded(pruned, {**transform, "skip": list(skip)})


# --------------------------------------------------------------------------- structured
def _kept(scores: Tensor, fraction: float) -> Tensor:
    """Indices, in order, of the ``n - floor(n * fraction)`` highest scores (at least one stays,
    since fraction < 1)."""
    keep = len(scores) - math.floor(len(scores) * fraction)
    return scores.topk(keep).indices.sort().values


def _group_scores(activation: Tensor, out_weight: Tensor, group_size: int) -> Tensor:
    """Importance of each group of ``group_size`` consecutive inputs of an output projection:
    the norm of what flows into the group times the norm of its weight columns, an estimate of
    how much of the projection's output the group makes.

    activation (F,) per input feature; out_weight (C, F) -> (F / group_size,).
    """
    flow = activation.reshape(-1, group_size).norm(dim=1)  # (groups,)
    columns = out_weight.detach().t().reshape(-1, group_size * out_weight.shape[0])  # (groups, size * C)
    return flow * columns.norm(dim=1)


def structured(
    loaded: LoadedModel,
    heads: float = 0.0,
    neurons: float = 0.0,
    calibration: Batches | None = None,
    skip: Sequence[str] = (),
) -> LoadedModel:
    """Remove the fraction ``heads`` of attention heads and ``neurons`` of MLP hidden neurons
    from every block, physically: the returned network is a smaller one (its config lists each
    block's heads and MLP width), so it is faster and its export smaller.

    A block with n heads keeps ``n - floor(n * heads)``, at least one; the same rule sets the
    neurons kept. A group's importance is the size of what flows into the output projection
    through it times its output weights' norm; with calibration batches that flow is measured
    (norm of the output projection's inputs over real tokens), without them it is estimated by
    the norm of the weights that produce it (value rows of the attention's input projection for
    a head, rows of the MLP's input projection for a neuron). A block whose attention (or MLP) layers match ``skip`` keeps all its heads
    (or neurons).
    """
    heads = check_fraction("heads", heads)
    neurons = check_fraction("neurons", neurons)
    _refuse_quantized(loaded)
    model = loaded.model
    blocks = block_linears(model)
    prunable = compressible_linears(model, skip)
    out_projections = {block.names[role]: block.layers[role] for block in blocks for role in ("attention_out", "mlp_out")}
    transform: dict[str, Any] = {"method": "structured", "heads": heads, "neurons": neurons}
    if calibration is not None:
        flows, transform["calibration_batches"] = activation_norms(model, out_projections, calibration)
        transform["scored_by"] = "activations"
    else:
        flows = {}
        for block in blocks:
            flows[block.names["attention_out"]] = block.value_rows().norm(dim=1)
            flows[block.names["mlp_out"]] = block.layers["mlp_in"].weight.detach().norm(dim=1)
        transform["scored_by"] = "weights"

    kept_heads, kept_neurons = [], []
    for block in blocks:
        names, layers = block.names, block.layers
        kept = torch.arange(block.n_head)
        if all(names[role] in prunable for role in ("attention_in", "attention_out")):
            scores = _group_scores(flows[names["attention_out"]], layers["attention_out"].weight, block.head_dim)
            kept = _kept(scores, heads)
        kept_heads.append(kept)
        kept = torch.arange(layers["mlp_in"].out_features)
        if all(names[role] in prunable for role in ("mlp_in", "mlp_out")):
            scores = _group_scores(flows[names["mlp_out"]], layers["mlp_out"].weight, 1)
            kept = _kept(scores, neurons)
        kept_neurons.append(kept)

    smaller, network = keep_heads_and_neurons(model, loaded.config, kept_heads, kept_neurons)
    transform["skip"] = list(skip)
    return LoadedModel(network.eval(), smaller, loaded.tokenizer, loaded.objective, copy.deepcopy(loaded.inputs),
                       [*copy.deepcopy(loaded.transforms), transform])


# ---------------------------------------------------------------- pruning while training
def cubic_sparsity(step: int, end_step: int, initial: float, final: float) -> float:
    """Zhu & Gupta's (2017) gradual schedule: ``s_t = s_f + (s_i - s_f) (1 - t / T)^3``; fast at
    first, while many redundant weights remain, then slower; ``s_f`` from step T on."""
    progress = min(max(step / end_step, 0.0), 1.0) if end_step > 0 else 1.0
    return final + (initial - final) * (1.0 - progress) ** 3


class SparseTraining(ModelPruning):
    """Lightning's ModelPruning set up for lmexp's block linear layers, to fine-tune sparse.

    - ``keep_zeros``: the weights that are zero when training starts (a pruned network) get a
      fixed mask, so they stay exactly zero while the others learn (recovery fine-tuning).
    - ``final_sparsity``: global L1 magnitude pruning, step by step, on Zhu & Gupta's cubic
      schedule from the starting sparsity to ``final_sparsity``, reached after
      ``prune_fraction`` of the steps; the remaining steps train with the masks fixed.

    ModelPruning applies pruning when a training epoch or a validation ends, with an amount
    indexed by epoch; a fine-tune of some hundred steps needs a schedule in optimizer steps,
    independent of the config's validation interval. So its epoch-end pruning is off and its
    ``apply_pruning`` runs every ``every_n_steps`` optimizer steps instead. ModelPruning itself
    makes the masks permanent in every checkpoint and when training ends.
    """

    def __init__(
        self,
        steps: int,
        final_sparsity: float | None = None,
        keep_zeros: bool = True,
        skip: Sequence[str] = (),
        prune_fraction: float = 0.75,
        every_n_steps: int | None = None,
    ) -> None:
        super().__init__(
            "l1_unstructured", use_global_unstructured=True, amount=0, apply_pruning=False,
            make_pruning_permanent=True, use_lottery_ticket_hypothesis=False,
        )
        if final_sparsity is not None:
            final_sparsity = check_fraction("final_sparsity", final_sparsity)
        self.steps = steps
        self.final_sparsity = final_sparsity
        self.keep_zeros = keep_zeros
        self.skip = list(skip)
        self.end_step = max(1, round(steps * prune_fraction))
        self.every_n_steps = every_n_steps or max(1, self.end_step // 10)
        self.linears: dict[str, nn.Linear] = {}
        self.initial_sparsity = 0.0
        self.prunable = 0
        self.last_pruned_step = 0
        self.record: dict[str, Any] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if getattr(pl_module, "model", None) is None:
            raise CompressionError("sparse training needs the network built before training starts: "
                                   "start from a pretrained checkpoint (model.init_args.pretrained)")
        self.linears = compressible_linears(pl_module.model, self.skip)
        super().setup(trainer, pl_module, stage)
        if self.keep_zeros:
            for linear in self.linears.values():
                prune.custom_from_mask(linear, "weight", linear.weight.detach() != 0)
        self.prunable = sum(linear.weight.numel() for linear in self.linears.values())
        self.initial_sparsity = self.zeros() / self.prunable

    def filter_parameters_to_prune(
        self, parameters_to_prune: Sequence[tuple[nn.Module, str]] = ()
    ) -> list[tuple[nn.Module, str]]:
        """The block linear layers' weights only (ModelPruning's default is every parameter)."""
        return [(linear, "weight") for linear in self.linears.values()]

    def zeros(self) -> int:
        """Weights masked to zero now, over the layers being pruned."""
        return sum(int((linear.weight_mask == 0).sum()) for linear in self.linears.values()
                   if hasattr(linear, "weight_mask"))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The objective writes its transforms into each checkpoint it saves.
        if self.final_sparsity is None:
            self.record = {"method": "fine-tune", "steps": self.steps, "keep_zeros": self.keep_zeros}
        else:
            self.record = {"method": "gradual-magnitude", "steps": self.steps, "final_sparsity": self.final_sparsity,
                           "schedule": "cubic", "pruned_until_step": self.end_step, "skip": self.skip}
        pl_module.transforms.append(self.record)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step  # optimizer steps done
        if self.final_sparsity is None or step == self.last_pruned_step:
            return
        if step % self.every_n_steps and step < self.end_step:
            return
        self.last_pruned_step = step
        target = round(cubic_sparsity(step, self.end_step, self.initial_sparsity, self.final_sparsity) * self.prunable)
        more = target - self.zeros()
        if more > 0:
            self.apply_pruning(more)  # an int amount: that many more of the weights not yet pruned

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self.record["sparsity"] = self.zeros() / max(self.prunable, 1)
        super().on_save_checkpoint(trainer, pl_module, checkpoint)


def fine_tune(
    pretrained: str | Path,
    configs: Sequence[str | Path],
    steps: int,
    run_root: str | Path | None = None,
    lr: float | None = None,
    final_sparsity: float | None = None,
    keep_sparsity: bool = True,
    skip: Sequence[str] = (),
    overrides: Mapping[str, Any] | None = None,
    logger: Logger | bool | None = None,
) -> LoadedModel:
    """Train the network in ``pretrained`` (a checkpoint or export) for ``steps`` optimizer
    steps on the data, objective and optimizer of ``configs``, sparse, and return the result.

    Recovery (``final_sparsity=None``): a pruned network regains quality while its zeros stay
    exactly zero (``keep_sparsity``). Gradual pruning (``final_sparsity`` set): the network is
    pruned while it trains, from its starting sparsity to ``final_sparsity`` (see
    ``SparseTraining``).

    The run is an ordinary lmexp fit (run folder under ``run_root``, default the config's;
    tracking as the config says unless ``logger`` is given) with these changes: it starts from
    ``pretrained``; it trains ``steps`` steps, however many epochs they take, with a warmup of
    a tenth of them and the learning-rate schedule over exactly those steps (``lr`` if given,
    else the config's); it validates once, at the end, so its checkpoint holds the final
    weights; and it writes no ``best/`` export (the caller saves the result with
    ``core.save``). ``overrides`` (dotted keys, as ``lmexp.runs.build`` takes them) apply last.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise CompressionError(f"steps={steps!r} must be a positive number of optimizer steps, e.g. 200")
    callback = SparseTraining(steps, final_sparsity, keep_zeros=keep_sparsity, skip=skip)
    settings: dict[str, Any] = {
        "model.init_args.max_steps": None,
        "model.init_args.warmup_steps": steps // 10,
        "trainer.max_steps": steps,
        "trainer.max_epochs": None,
        "trainer.val_check_interval": steps,
        "trainer.check_val_every_n_epoch": None,
        "checkpoint.export_best": False,
        "run_name": None,
    }
    if lr is not None:
        settings["model.init_args.lr"] = lr
    if run_root is not None:
        settings["trainer.default_root_dir"] = str(run_root)
    run = build_run("fit", pretrained, configs, {**settings, **(overrides or {})}, callbacks=[callback], logger=logger)
    run.execute()
    checkpoint = run.trainer.checkpoint_callback
    last = getattr(checkpoint, "last_model_path", "") if checkpoint is not None else ""
    if not last:
        raise CompressionError(
            f"the fine-tuning run in {run.run_dir} saved no checkpoint: keep the config's checkpoint settings "
            "(save_last) so its final weights are written"
        )
    log.info(f"fine-tuned for {steps} steps in {run.run_dir}")
    return load_checkpoint(last)


# ------------------------------------------------------------------------------ the command
def add_command(subparsers: argparse._SubParsersAction) -> None:
    """``python -m compression prune``."""
    parser = subparsers.add_parser(
        "prune",
        help="zero or remove the weights a trained network needs least",
        description="Prune a trained network's block linear layers, optionally fine-tune it sparse, "
        "and write it as an lmexp export with its per-layer sparsity (sparsity.json).",
    )
    common_arguments(parser)
    parser.add_argument("--method", required=True, choices=METHODS,
                        help="magnitude (global), magnitude-layer (each layer to the same sparsity), wanda, "
                        "2:4 (semi-structured), structured (whole heads and MLP neurons)")
    parser.add_argument("--sparsity", type=float, default=None,
                        help="fraction of weights to zero, in [0, 1) (magnitude, magnitude-layer, wanda, --gradual)")
    parser.add_argument("--heads", type=float, default=0.0, help="structured: fraction of each block's heads to remove")
    parser.add_argument("--neurons", type=float, default=0.0,
                        help="structured: fraction of each block's MLP neurons to remove")
    parser.add_argument("--calibration-batches", type=int, default=8,
                        help="training batches whose activations score the weights (wanda; 2:4 and structured use "
                        "weights alone with 0)")
    parser.add_argument("--fine-tune-steps", type=int, default=0,
                        help="after pruning, fine-tune this many steps with the zeros kept (recovery)")
    parser.add_argument("--gradual", action="store_true",
                        help="prune gradually while fine-tuning --fine-tune-steps steps, to --sparsity "
                        "(magnitude only)")
    parser.add_argument("--lr", type=float, default=None, help="fine-tuning learning rate (default: the config's)")
    parser.set_defaults(func=run_prune)


def _check_arguments(args: argparse.Namespace) -> None:
    """Refuse a request that cannot work before any network or data is loaded."""
    method = args.method
    if method in ("magnitude", "magnitude-layer", "wanda"):
        if args.sparsity is None:
            raise CompressionError(f"--method {method} needs --sparsity: the fraction of weights to zero, e.g. 0.5")
        check_fraction("sparsity", args.sparsity)
    elif args.sparsity is not None:
        what = "zeroes half the weights by its pattern" if method == "2:4" else "takes --heads and --neurons"
        raise CompressionError(f"--method {method} {what}: drop --sparsity {args.sparsity}")
    if method == "structured":
        check_fraction("heads", args.heads)
        check_fraction("neurons", args.neurons)
        if args.heads == 0 and args.neurons == 0:
            raise CompressionError(
                "--method structured with --heads 0 and --neurons 0 removes nothing: pass e.g. --heads 0.25"
            )
    elif args.heads or args.neurons:
        raise CompressionError(f"--heads and --neurons apply to --method structured, not {method}: drop them")
    if args.calibration_batches < 0 or args.fine_tune_steps < 0:
        raise CompressionError("--calibration-batches and --fine-tune-steps count batches and steps: use 0 or more")
    if method == "wanda" and args.calibration_batches == 0:
        raise CompressionError(
            "wanda scores weights by their inputs' activations: pass --calibration-batches 1 or more"
        )
    if args.gradual and (method != "magnitude" or args.fine_tune_steps == 0):
        raise CompressionError("--gradual prunes by global magnitude while fine-tuning: use it with --method magnitude "
                               "and --fine-tune-steps N")
    check_output(args.out, args.overwrite)


def _one_shot(args: argparse.Namespace, loaded: LoadedModel, calibration: Batches | None) -> LoadedModel:
    if args.method in ("magnitude", "magnitude-layer"):
        return magnitude(loaded, args.sparsity, "global" if args.method == "magnitude" else "layer", args.skip)
    if args.method == "wanda":
        return wanda(loaded, args.sparsity, calibration, args.skip)
    if args.method == "2:4":
        return semi_structured(loaded, calibration, args.skip)
    return structured(loaded, args.heads, args.neurons, calibration, args.skip)


def run_prune(args: argparse.Namespace) -> None:
    """``python -m compression prune``: prune, optionally fine-tune, save, report the sparsity."""
    _check_arguments(args)
    loaded = load(args.ckpt)
    fine_tuning = args.fine_tune_steps > 0
    calibrated = args.method in CALIBRATED and args.calibration_batches > 0 and not args.gradual
    configs = configs_for(args.ckpt, args.config) if fine_tuning or calibrated else []
    training = {"lr": args.lr, "skip": args.skip, "logger": run_logger(args)}
    if args.gradual:
        result = fine_tune(args.ckpt, configs, args.fine_tune_steps, final_sparsity=args.sparsity, **training)
    else:
        calibration = batches(args.ckpt, configs, "train", args.calibration_batches) if calibrated else None
        result = _one_shot(args, loaded, calibration)
        if fine_tuning:
            # A run starts from a saved network: the pruned one is written for the run's duration.
            with tempfile.TemporaryDirectory(prefix="lmexp-pruned-") as pruned:
                save(result, pruned, overwrite=True)
                result = fine_tune(pruned, configs, args.fine_tune_steps, keep_sparsity=True, **training)
    if not is_main_process():  # the other ranks of a DDP fine-tuning run: rank 0 writes the result
        return
    folder = save(result, args.out, args.overwrite)
    table = sparsity_table(result.model)  # skipped layers too, to show them dense
    before, after = count_parameters(loaded.model), count_parameters(result.model)
    write_json(folder / SPARSITY_FILE, {"transforms": result.transforms, "parameters": after, "layers": table})
    log.info(format_sparsity(table))
    methods = " + ".join(t["method"] for t in result.transforms[len(loaded.transforms):])
    log.info(f"{methods}: block weights {table[-1]['sparsity']:.1%} zero, parameters {before:,} -> {after:,}; "
             f"saved to {folder}")
    settings = {key: getattr(args, key) for key in
                ("method", "sparsity", "heads", "neurons", "calibration_batches", "fine_tune_steps", "gradual", "lr")}
    track(args, {**settings, "skip": args.skip, "transforms": result.transforms},
          {"sparsity": table[-1]["sparsity"], "parameters": after}, [folder / SPARSITY_FILE])


__all__ = [
    "METHODS",
    "SparseTraining",
    "activation_norms",
    "add_command",
    "cubic_sparsity",
    "fine_tune",
    "has_n_m_pattern",
    "magnitude",
    "n_m_mask",
    "semi_structured",
    "structured",
    "wanda",
]
