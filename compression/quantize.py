"""Quantization: store the block linear layers' weights in 8 or 4 bits with bitsandbytes.

``quantize`` swaps the linear layers inside the transformer blocks (``core.compressible_linears``;
embeddings, the tied LM head and classifiers stay in full precision) for bitsandbytes layers:

- ``int8``: ``Linear8bitLt`` (LLM.int8(), Dettmers et al. 2022): one scale per output row,
  activations quantized per row on the fly (via float16), optional outlier columns in float16.
- ``nf4`` / ``fp4``: ``Linear4bit`` (QLoRA, Dettmers et al. 2023): one scale per block of 64
  weights; ``double_quant`` stores those scales in 8 bits too.

bitsandbytes quantizes a layer when it moves to a device (``.to("cpu")`` or ``.to("cuda")``), so
everything here works on whatever device the network is on. The result saves with
``core.save`` as an lmexp export whose transform names the pre-load hook ``bitsandbytes``
(``rebuild_quantized``, registered in pyproject.toml): ``lmexp.load_checkpoint``,
``lmexp generate``/``test``/``predict`` and ``--model.init_args.pretrained`` load it back bit
for bit.

``dynamic_int8`` is PyTorch's dynamic int8 quantization, the fast int8 path on CPU. Its packed
weights have no safetensors form, so such a network lives in memory only: make it again from
the original after loading that.
"""

from __future__ import annotations

import argparse
import copy
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn

from compression.core import (
    CheckpointError,
    CompressionError,
    common_arguments,
    compressible_linears,
    copy_loaded,
    load,
    save,
    track,
)
from lmexp.checkpoints import WEIGHTS_FILE, LoadedModel

log = logging.getLogger(__name__)

# bitsandbytes logs a warning when it imports on a CPU without the optional `kernels` package
# (it falls back to its own kernel) and another on every int8 matmul (activations go through
# float16, as documented above): drop just those two messages, before the import below.
_NOISE = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
    "bitsandbytes.autograd._functions": "MatMul8bitLt: inputs will be cast",
}
for _logger, _start in _NOISE.items():
    logging.getLogger(_logger).addFilter(lambda record, start=_start: not record.getMessage().startswith(start))

from bitsandbytes.nn import Linear4bit, Linear8bitLt, Params4bit

Method = Literal["int8", "nf4", "fp4"]
METHODS: tuple[str, ...] = get_args(Method)
PRELOAD_HOOK = "bitsandbytes"  # the entry point in group lmexp.preload_hooks that runs rebuild_quantized
DYNAMIC_INT8 = "dynamic-int8"  # the transform method of dynamic_int8: in memory only
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

CPU_4BIT_OUT_MULTIPLE, CPU_4BIT_IN_MULTIPLE = 32, 64
"""bitsandbytes' 4-bit CPU kernel (used on CPUs with AVX512-BF16) packs the weight in tiles of 32
output rows and keeps one scale per 64 inputs: a layer whose out_features or in_features is not a
multiple of these stops with an AssertionError on such a CPU. Those layers stay in full
precision everywhere, so an export runs on every machine."""


# ------------------------------------------------------------------------ the 4-bit layer
class SavableLinear4bit(Linear4bit):
    """bitsandbytes' ``Linear4bit`` with a state dict that loads back strictly and stays the same
    after the layer has run.

    Loading: ``Linear4bit`` saves its quantization statistics as ``weight.*`` entries but cannot
    load them (bitsandbytes#1946); here they rebuild the weight with
    ``Params4bit.from_prequantized`` before the ordinary copy.

    Saving: on a CPU with AVX512-BF16, the first inference pass repacks the weight for the CPU
    kernel and turns its scales into bfloat16 in place. Saving unpacks the weight exactly but not
    the scales (bitsandbytes 0.50.2): the file differs from the one saved before that pass, and a
    layer without double quantization gives wrong outputs from then on (its scales come back
    transposed). The statistics the layer was quantized with are kept aside before each CPU pass
    and put back when it saves.
    """

    _quantized_state: Any = None  # a QuantState, before the CPU kernel repacked it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quant_state = self.weight.quant_state
        if x.device.type == "cpu" and quant_state is not None and not _packed_for_cpu(quant_state):
            self._quantized_state = copy.copy(quant_state)  # packing rebinds its tensors, never edits them
        return super().forward(x)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        repacked = _packed_for_cpu(self.weight.quant_state)
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if repacked and self._quantized_state is not None:
            restored = copy.copy(self._quantized_state)
            self.weight.quant_state = self.quant_state = restored
            for key in [k for k in destination if k.startswith(prefix + "weight.")]:
                del destination[key]
            for key, value in restored.as_dict(packed=True).items():
                destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        weight_key = prefix + "weight"
        statistics = {key[len(weight_key) + 1:]: state_dict.pop(key).clone()
                      for key in list(state_dict) if key.startswith(weight_key + ".")}
        if statistics and weight_key in state_dict:
            try:
                self.weight = Params4bit.from_prequantized(
                    torch.empty_like(state_dict[weight_key]), statistics, device=self.weight.device, module=self
                )
            except (KeyError, ValueError, AssertionError) as error:
                raise CheckpointError(
                    f"4-bit layer {prefix[:-1]!r} has incomplete quantization statistics ({type(error).__name__}: "
                    f"{error}): re-export the network with python -m compression quantize"
                ) from None
        super()._load_from_state_dict(state_dict, prefix, *args)  # copies the packed weight and the bias


def _packed_for_cpu(quant_state: Any) -> bool:
    return bool(getattr(quant_state, "packing_format_for_cpu", False))


# ------------------------------------------------------------------------ the scheme
@dataclass(frozen=True)
class Scheme:
    """How layers are quantized: what ``quantize`` is asked for and what a transform records."""

    method: str
    double_quant: bool = False
    compute_dtype: torch.dtype = torch.float32
    threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CompressionError(f"method={self.method!r} is unknown: use one of {', '.join(METHODS)}")
        if self.compute_dtype not in COMPUTE_DTYPES.values():
            raise CompressionError(
                f"compute_dtype={self.compute_dtype} is not supported: use torch.float32 or torch.bfloat16"
            )
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or self.threshold < 0:
            raise CompressionError(f"threshold={self.threshold!r} must be 0 (off) or positive, e.g. 6.0")
        if self.four_bit and self.threshold:
            raise CompressionError(f"threshold={self.threshold} applies to int8 only: leave it out for {self.method}")
        if not self.four_bit and self.double_quant:
            raise CompressionError("double_quant applies to the 4-bit methods: use nf4 or fp4, or leave it out")
        if not self.four_bit and self.compute_dtype != torch.float32:
            raise CompressionError(
                f"compute_dtype={self.compute_dtype} applies to the 4-bit methods (int8 computes in float16 "
                "and returns the input's dtype): leave it out for int8"
            )

    @property
    def four_bit(self) -> bool:
        return self.method != "int8"

    def fits(self, linear: nn.Linear) -> bool:
        """Whether every bitsandbytes kernel takes this layer's shape (see CPU_4BIT_OUT_MULTIPLE)."""
        return not self.four_bit or (
            linear.out_features % CPU_4BIT_OUT_MULTIPLE == 0 and linear.in_features % CPU_4BIT_IN_MULTIPLE == 0
        )

    def layer(self, linear: nn.Linear) -> nn.Module:
        """A bitsandbytes layer of `linear`'s shape and mode, on the CPU, not quantized yet."""
        bias = linear.bias is not None
        if self.four_bit:
            layer: nn.Module = SavableLinear4bit(
                linear.in_features, linear.out_features, bias, compute_dtype=self.compute_dtype,
                compress_statistics=self.double_quant, quant_type=self.method,
            )
        else:
            layer = Linear8bitLt(linear.in_features, linear.out_features, bias, has_fp16_weights=False,
                                 threshold=self.threshold)
        return layer.train(linear.training)

    def quantized(self, linear: nn.Linear) -> nn.Module:
        """A bitsandbytes layer holding `linear`'s weights, quantized on `linear`'s device."""
        layer = self.layer(linear)
        # Full-precision weights go in on the CPU, where bitsandbytes expects them; the move quantizes.
        layer.load_state_dict(linear.state_dict())
        return layer.to(linear.weight.device)

    def receiver(self, linear: nn.Linear) -> nn.Module:
        """A layer of `linear`'s shape that a saved quantized state dict loads into. An int8 layer
        must be quantized already (bitsandbytes copies the saved scales into its own); a 4-bit one
        is rebuilt from the saved statistics as it loads (``SavableLinear4bit``)."""
        layer = self.layer(linear)
        return layer if self.four_bit else layer.to(linear.weight.device)

    def record(self) -> dict[str, Any]:
        """The transform's settings, enough for ``from_transform`` to rebuild the layers."""
        if self.four_bit:
            dtype = next(name for name, value in COMPUTE_DTYPES.items() if value == self.compute_dtype)
            return {"method": self.method, "rebuild": PRELOAD_HOOK, "double_quant": self.double_quant,
                    "compute_dtype": dtype}
        return {"method": self.method, "rebuild": PRELOAD_HOOK, "threshold": self.threshold}

    @classmethod
    def from_transform(cls, transform: dict[str, Any]) -> Scheme:
        dtype = transform.get("compute_dtype", "float32")
        if dtype not in COMPUTE_DTYPES:
            raise CompressionError(f"compute_dtype={dtype!r} is unknown: use one of {', '.join(COMPUTE_DTYPES)}")
        return cls(transform["method"], bool(transform.get("double_quant", False)), COMPUTE_DTYPES[dtype],
                   transform.get("threshold", 0.0))


def _swap(model: nn.Module, names: Sequence[str], replacement: Callable[[nn.Linear], nn.Module]) -> None:
    for name in names:
        model.set_submodule(name, replacement(model.get_submodule(name)))


# ------------------------------------------------------------------------ public API
def is_quantized(loaded: LoadedModel) -> bool:
    """Whether a transform already quantized the network (bitsandbytes or dynamic int8)."""
    return loaded.rebuilt or any(t["method"] == DYNAMIC_INT8 for t in loaded.transforms)


def _check_not_quantized(loaded: LoadedModel) -> None:
    if is_quantized(loaded):
        done = " + ".join(t["method"] for t in loaded.transforms)
        raise CompressionError(
            f"the network is already quantized ({done}): quantize the checkpoint from before quantization instead"
        )


def quantize(
    loaded: LoadedModel,
    method: Method,
    double_quant: bool = False,
    skip: Sequence[str] = (),
    compute_dtype: torch.dtype = torch.float32,
    threshold: float = 0.0,
) -> LoadedModel:
    """A copy of the network with its block linear layers quantized by bitsandbytes.

    Args:
        loaded: The network (``core.load``); it is left as it is.
        method: ``int8``, ``nf4`` or ``fp4``.
        double_quant: 4-bit only: store the per-block scales in 8 bits as well (about 0.4 bits
            less per weight).
        skip: ``fnmatch`` patterns of block layers to keep in full precision.
        compute_dtype: 4-bit only: the dtype the dequantized weights multiply in (float32 or
            bfloat16; the CPU kernel for AVX512-BF16 computes in bfloat16 either way).
        threshold: int8 only: activations above it are multiplied in float16 instead (LLM.int8()
            outlier decomposition; 6.0 is usual); 0 quantizes all of them.

    Layers the 4-bit kernels cannot take (``CPU_4BIT_OUT_MULTIPLE``) stay in full precision, with
    a warning; the transform appended lists them as ``kept`` and the quantized ones as ``layers``.
    """
    _check_not_quantized(loaded)
    scheme = Scheme(method, double_quant, compute_dtype, threshold)
    result = copy_loaded(loaded)
    linears = compressible_linears(result.model, skip)
    layers = [name for name, linear in linears.items() if scheme.fits(linear)]
    kept = [name for name in linears if name not in layers]
    if kept:
        shapes = ", ".join(f"{name} ({linears[name].in_features}->{linears[name].out_features})" for name in kept)
        log.warning(
            f"{method}: keeping {len(kept)} layer(s) in full precision, as the 4-bit CPU kernel needs "
            f"in_features % {CPU_4BIT_IN_MULTIPLE} == 0 and out_features % {CPU_4BIT_OUT_MULTIPLE} == 0: {shapes}"
        )
    if not layers:
        raise CompressionError(
            f"no block layer to quantize to {method} (skip={list(skip)}, {len(kept)} of unsupported shape): "
            "narrow the --skip patterns, or use int8, which takes every shape"
        )
    _swap(result.model, layers, scheme.quantized)
    log.info(f"{method}: quantized {len(layers)} layer(s): {', '.join(layers)}")
    result.transforms.append({**scheme.record(), "layers": layers, "kept": kept, "skip": list(skip)})
    return result


def rebuild_quantized(model: nn.Module, transform: dict[str, Any]) -> nn.Module:
    """The pre-load hook ``bitsandbytes``: swap the layers a ``quantize`` transform lists for
    bitsandbytes layers, so that the saved quantized weights load into them (strictly)."""
    layers = transform.get("layers")
    if not isinstance(layers, list) or not all(isinstance(name, str) for name in layers):
        raise CheckpointError(
            f"the quantization transform lists no layers ({transform!r}): re-export the network with "
            "python -m compression quantize"
        )
    try:
        scheme = Scheme.from_transform(transform)
    except CompressionError as error:
        raise CheckpointError(
            f"the quantization transform cannot be rebuilt ({error}): re-export the network with this version "
            "of python -m compression quantize"
        ) from None
    modules = dict(model.named_modules())
    wrong = [name for name in layers if not isinstance(modules.get(name), nn.Linear)]
    if wrong:
        raise CheckpointError(
            f"the quantization transform names {', '.join(wrong[:3])}, which the model config has no linear "
            "layer for: pass the export as written, unedited"
        )
    _swap(model, layers, scheme.receiver)
    return model


def dynamic_int8(loaded: LoadedModel, skip: Sequence[str] = ()) -> LoadedModel:
    """A copy of the network with PyTorch's dynamic int8 quantization of its block linear layers
    (``torch.ao.quantization.quantize_dynamic``, qint8 weights, activations quantized per batch).

    The fast int8 path on CPU (CPU only), as a baseline for bitsandbytes. Its packed weights have
    no safetensors form, so the result cannot be saved: the transform it appends
    (``dynamic-int8``) has no pre-load hook, and a report makes it again from the original.
    """
    _check_not_quantized(loaded)
    result = copy_loaded(loaded)
    layers = list(compressible_linears(result.model, skip))
    if not layers:
        raise CompressionError(
            f"skip={list(skip)} leaves no block linear layer to quantize: narrow the --skip patterns"
        )
    with warnings.catch_warnings():
        # torch marks eager-mode quantization deprecated in favour of torchao, yet ships it.
        warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="torch.quantize_per_tensor", category=UserWarning)
        torch.ao.quantization.quantize_dynamic(result.model, set(layers), dtype=torch.qint8, inplace=True)
    result.transforms.append({"method": DYNAMIC_INT8, "layers": layers, "skip": list(skip)})
    return result


def linear_weight_bytes(model: nn.Module, layers: Sequence[str]) -> int:
    """Bytes of these layers' weights as stored in the state dict: the full-precision matrix, or
    the int8 / packed 4-bit codes with their scales and metadata (biases left out)."""
    total = 0
    for name in layers:
        for key, value in model.get_submodule(name).state_dict().items():
            if key != "bias" and isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


# ------------------------------------------------------------------------ command line
def run_quantize(args: argparse.Namespace) -> Path:
    """``python -m compression quantize``: quantize, save, log (and track) what changed in size."""
    original = load(args.ckpt)
    quantized = quantize(original, args.method, double_quant=args.double_quant, skip=args.skip,
                         compute_dtype=COMPUTE_DTYPES[args.compute_dtype], threshold=args.threshold)
    transform = quantized.transforms[-1]
    before = linear_weight_bytes(original.model, transform["layers"])
    after = linear_weight_bytes(quantized.model, transform["layers"])
    log.info(f"linear weights of the quantized layers: {before:,} -> {after:,} bytes ({before / after:.1f}x smaller)")
    folder = save(quantized, args.out, overwrite=args.overwrite)
    file_bytes = (folder / WEIGHTS_FILE).stat().st_size
    log.info(f"wrote {folder}: {WEIGHTS_FILE} is {file_bytes:,} bytes")
    track(args, {"transforms": quantized.transforms},
          {"linear_bytes_before": before, "linear_bytes_after": after, "file_bytes": file_bytes})
    return folder


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """``python -m compression quantize``."""
    parser = subparsers.add_parser(
        "quantize",
        help="store the block linear layers in 8 or 4 bits (bitsandbytes)",
        description="Quantize a trained network's block linear layers with bitsandbytes and write it as an "
        "lmexp export that lmexp generate/test/predict load as it is.",
    )
    common_arguments(parser)
    parser.add_argument("--method", required=True, choices=METHODS,
                        help="int8 (LLM.int8()), nf4 or fp4 (4-bit, QLoRA)")
    parser.add_argument("--double-quant", action="store_true",
                        help="nf4/fp4: quantize the per-block scales too (smaller)")
    parser.add_argument("--compute-dtype", choices=list(COMPUTE_DTYPES), default="float32",
                        help="nf4/fp4: the dtype 4-bit weights multiply in")
    parser.add_argument("--threshold", type=float, default=0.0,
                        help="int8: activations above this run in float16 (outliers; 6.0 is usual; 0: off)")
    parser.set_defaults(func=run_quantize)


__all__ = [
    "COMPUTE_DTYPES",
    "DYNAMIC_INT8",
    "METHODS",
    "PRELOAD_HOOK",
    "SavableLinear4bit",
    "Scheme",
    "add_command",
    "dynamic_int8",
    "is_quantized",
    "linear_weight_bytes",
    "quantize",
    "rebuild_quantized",
]
