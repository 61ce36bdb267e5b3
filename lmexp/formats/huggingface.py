"""Hugging Face ``transformers`` directories: import BERT and GPT-2 checkpoints, export ours.

A folder written by ``save_pretrained`` (``config.json``, ``model.safetensors``, tokenizer
files) becomes an ordinary lmexp network with its tokenizer, and an lmexp BERT or GPT becomes a
folder that ``AutoModelForMaskedLM`` / ``AutoModelForSequenceClassification`` /
``AutoModelForCausalLM`` and ``AutoTokenizer`` load. Neither direction imports transformers
or downloads anything; weights are read only from safetensors or with ``weights_only=True``,
and no remote code exists here.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from torch import Tensor, nn

from lmexp.atomic import replace_folder
from lmexp.data.tokenizer import CLS, MASK, PAD, SEP, UNK, tokenizer_from_json
from lmexp.errors import CheckpointError, ConfigError
from lmexp.faults import fault_point
from lmexp.formats.native import LoadedModel
from lmexp.hardware import process_rank
from lmexp.models import ModelConfig, build_model

__all__ = [
    "BASE_PREFIX",
    "CONFIG_FILE",
    "HEAD_NAMES",
    "SUPPORTED_TYPES",
    "TOKENIZER_CONFIG",
    "TOKENIZER_FILE",
    "WEIGHTS_FILE",
    "Param",
    "bert_network",
    "bert_params",
    "check_exportable",
    "export_hf",
    "gpt2_network",
    "gpt2_params",
    "guess_model_type",
    "is_hf_directory",
    "load_hf",
    "load_hf_tokenizer",
    "read_hf_config",
    "read_hf_weights",
]

log = logging.getLogger("lmexp.huggingface")  # the name it had before the module moved: logging settings use it

CONFIG_FILE, WEIGHTS_FILE, SHARD_INDEX, PICKLE_FILE, PICKLE_INDEX = (
    "config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILE, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"
SUPPORTED_TYPES = ("bert", "gpt2")
GPT2_EOS = "<|endoftext|>"


def is_hf_directory(folder: str | Path) -> bool:
    """Whether ``folder`` holds a transformers ``config.json`` (an lmexp export's has a ``model`` entry)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(config, dict) and "model" not in config and (
        "model_type" in config or "architectures" in config or guess_model_type(config) is not None)


def guess_model_type(config: dict[str, Any]) -> str | None:
    """``model_type`` where the config names none, as old BERT releases' configs do: from the
    architecture's name, else from the fields only BERT or only GPT-2 configs have."""
    if config.get("model_type"):
        return config["model_type"]
    for architecture in config.get("architectures") or []:
        if architecture.startswith("Bert"):
            return "bert"
        if architecture.startswith("GPT2"):
            return "gpt2"
    if {"hidden_size", "num_attention_heads", "intermediate_size"} <= config.keys():
        return "bert"
    if {"n_embd", "n_layer", "n_head"} <= config.keys():
        return "gpt2"
    return None


# ---------------------------------------------------------------------------------------------
# How parameters correspond. One table per architecture serves both directions.


@dataclass(frozen=True)
class Param:
    """One lmexp parameter and the transformers tensor(s) it is made of.

    Several tensors are concatenated along dim 0 (BERT's separate query, key and value make
    lmexp's fused qkv); ``transpose`` undoes GPT-2's Conv1D layout (in_features, out_features).
    """

    ours: str
    theirs: tuple[str, ...]
    transpose: bool = False
    head: str | None = None
    """The head this belongs to; None for the trunk, which an import must find complete."""


def _linear(ours: str, theirs: str, transpose: bool = False, head: str | None = None) -> list[Param]:
    return [Param(f"{ours}.{p}", (f"{theirs}.{p}",), transpose and p == "weight", head) for p in ("weight", "bias")]


def bert_params(config: ModelConfig) -> list[Param]:
    """lmexp BERT <-> transformers ``BertFor*`` (names after the ``bert.`` prefix for the encoder)."""
    params = [
        Param("trunk.tok_emb.weight", ("embeddings.word_embeddings.weight",)),
        Param("trunk.pos_emb.weight", ("embeddings.position_embeddings.weight",)),
        Param("trunk.type_emb.weight", ("embeddings.token_type_embeddings.weight",)),
        *_linear("trunk.emb_norm", "embeddings.LayerNorm"),
    ]
    for i in range(config.n_layer):
        ours, theirs = f"trunk.blocks.{i}", f"encoder.layer.{i}"
        for p in ("weight", "bias"):
            params.append(Param(f"{ours}.attn.qkv.{p}", tuple(f"{theirs}.attention.self.{n}.{p}" for n in ("query", "key", "value"))))
        params += [
            *_linear(f"{ours}.attn.out_proj", f"{theirs}.attention.output.dense"),
            *_linear(f"{ours}.ln1", f"{theirs}.attention.output.LayerNorm"),
            *_linear(f"{ours}.mlp.fc_in", f"{theirs}.intermediate.dense"),
            *_linear(f"{ours}.mlp.out_proj", f"{theirs}.output.dense"),
            *_linear(f"{ours}.ln2", f"{theirs}.output.LayerNorm"),
        ]
    # Only the heads the network has (ModelConfig.mlm_head, sop_head, pooler).
    if config.pooler:
        params += _linear("pooler", "pooler.dense", head="pooler")
    if config.mlm_head:
        params += [
            *_linear("mlm_head.dense", "cls.predictions.transform.dense", head="masked-LM head"),
            *_linear("mlm_head.ln", "cls.predictions.transform.LayerNorm", head="masked-LM head"),
            Param("mlm_head.bias", ("cls.predictions.bias",), head="masked-LM head"),
        ]
        if not config.tie_embeddings:
            params.append(Param("mlm_head.decoder.weight", ("cls.predictions.decoder.weight",), head="masked-LM head"))
    if config.sop_head:
        params += _linear("sop_head", "cls.seq_relationship", head="sentence-pair head")
    if config.labels:
        params += _linear("classifier.out_proj", "classifier", head="classification head")
    return params


def gpt2_params(config: ModelConfig) -> list[Param]:
    """lmexp GPT <-> transformers ``GPT2LMHeadModel`` (names after the ``transformer.`` prefix)."""
    params = [Param("trunk.tok_emb.weight", ("wte.weight",)), Param("trunk.pos_emb.weight", ("wpe.weight",))]
    for i in range(config.n_layer):
        ours, theirs = f"trunk.blocks.{i}", f"h.{i}"
        params += [
            *_linear(f"{ours}.ln1", f"{theirs}.ln_1"),
            *_linear(f"{ours}.attn.qkv", f"{theirs}.attn.c_attn", transpose=True),
            *_linear(f"{ours}.attn.out_proj", f"{theirs}.attn.c_proj", transpose=True),
            *_linear(f"{ours}.ln2", f"{theirs}.ln_2"),
            *_linear(f"{ours}.mlp.fc_in", f"{theirs}.mlp.c_fc", transpose=True),
            *_linear(f"{ours}.mlp.out_proj", f"{theirs}.mlp.c_proj", transpose=True),
        ]
    params += _linear("trunk.ln_f", "ln_f")
    if not config.tie_embeddings:
        params.append(Param("lm_head.weight", ("lm_head.weight",), head="language-model head"))
    return params


# Model-level prefixes of the base model inside the task models (BertForMaskedLM's ``bert.``).
BASE_PREFIX = {"bert": "bert.", "gpt2": "transformer."}
# Top-level names of the task heads, which carry no base prefix.
HEAD_NAMES = {"bert": ("cls.", "classifier."), "gpt2": ("lm_head.", "score.")}
# Buffers some saved checkpoints carry that are not weights.
IGNORED = re.compile(r"(position_ids|token_type_ids|\.attn\.bias|\.attn\.masked_bias)$")


# ---------------------------------------------------------------------------------------------
# Import


def load_hf(folder: str | Path) -> LoadedModel:
    """A transformers folder as an lmexp network with its weights, config, tokenizer and objective.

    A BERT gets only the heads the folder has (BertModel: no masked-LM head, and its objective is
    ``encoder``), except a classifier's pooler, which is initialized and said so; a folder whose
    weights, config or tokenizer do not fit is refused in one line.
    """
    folder = Path(folder)
    hf_config = read_hf_config(folder)
    model_type = hf_config["model_type"]
    state = _normalize_names(read_hf_weights(folder), model_type)
    tokenizer = load_hf_tokenizer(folder, model_type)
    config = (bert_network if model_type == "bert" else gpt2_network)(hf_config, state, folder)
    if tokenizer.get_vocab_size() > config.require_vocab_size():
        raise CheckpointError(
            f"{str(folder)!r}: the tokenizer has {tokenizer.get_vocab_size()} tokens but {CONFIG_FILE} says "
            f"vocab_size={config.vocab_size}: save the tokenizer that belongs to this model"
        )
    model = build_model(config)
    params = (bert_params if model_type == "bert" else gpt2_params)(config)
    ours = model.state_dict()
    loaded: dict[str, Tensor] = {}
    fresh: set[str] = set()
    for param in params:
        present = [name for name in param.theirs if name in state]
        if not present and param.head is not None:
            fresh.add(param.head)
            continue
        if len(present) < len(param.theirs):
            missing = next(name for name in param.theirs if name not in state)
            raise CheckpointError(
                f"{str(folder)!r} has no weight {missing!r} though its {CONFIG_FILE} describes it: the weights "
                f"do not fit the config; save the model and its config together with save_pretrained"
            )
        expected = _their_shape(param, ours[param.ours].shape)
        for name in param.theirs:
            if tuple(state[name].shape) != expected:
                raise CheckpointError(
                    f"{str(folder)!r}: weight {name!r} has shape {tuple(state[name].shape)} but {CONFIG_FILE} implies "
                    f"{expected}: the weights do not fit the config; save the model and its config together with "
                    "save_pretrained"
                )
        parts = [state[name].t() if param.transpose else state[name] for name in param.theirs]
        loaded[param.ours] = torch.cat(parts) if len(parts) > 1 else parts[0]
    # A head is either wholly present or wholly fresh: half a head is a broken file.
    for param in params:
        if param.head in fresh and param.ours in loaded:
            raise CheckpointError(f"{str(folder)!r} holds only part of its {param.head} ({param.theirs[0]!r}): "
                                  "save the model again with save_pretrained")
    missing, _ = model.load_state_dict(loaded, strict=False)
    tied = {"lm_head.weight", "mlm_head.decoder.weight"} if config.tie_embeddings else set()
    untouched = [k for k in missing if k not in tied and not any(k == p.ours for p in params if p.head in fresh)]
    if untouched:  # a table entry is missing: a bug here, not a user error
        raise RuntimeError(f"the {model_type} import table does not cover {untouched}")
    used = {name for param in params for name in param.theirs}
    if config.tie_embeddings:  # a tied output matrix some savers write out anyway
        used |= {"lm_head.weight", "cls.predictions.decoder.weight"}
    ignored = sorted(name for name in state if name not in used and not IGNORED.search(name))
    if process_rank() == 0:  # every DDP rank imports; one report is enough
        if ignored:
            log.warning("%s: ignored %d weight(s) lmexp has no place for: %s", folder, len(ignored), ", ".join(ignored[:5]))
        for head in sorted(fresh - {"sentence-pair head"}):
            log.warning("%s has no %s: it is initialized randomly", folder, head)
    if model_type == "gpt2":
        objective = "causal_lm"
    else:
        objective = "classification" if config.labels else "masked_lm" if config.mlm_head else "encoder"
    return LoadedModel(model.eval(), config, tokenizer, objective)


def read_hf_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{str(folder)!r} has no {CONFIG_FILE}: pass a folder written by save_pretrained")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({error}): save the model again with save_pretrained") from None
    model_type = guess_model_type(config) if isinstance(config, dict) else None
    if model_type not in SUPPORTED_TYPES:
        architectures = ", ".join(config.get("architectures") or []) if isinstance(config, dict) else ""
        raise CheckpointError(
            f"{str(folder)!r} holds a {model_type!r} model{f' ({architectures})' if architectures else ''}, which lmexp "
            f"cannot import: supported are {', '.join(SUPPORTED_TYPES)} (BERT encoders and GPT-2)"
        )
    return {**config, "model_type": model_type}


def read_hf_weights(folder: Path) -> dict[str, Tensor]:
    """The folder's tensors: safetensors (one file or shards), else a weights-only pickle."""
    if (folder / WEIGHTS_FILE).is_file():
        files = [folder / WEIGHTS_FILE]
    elif (folder / SHARD_INDEX).is_file():
        files = [folder / name for name in sorted(set(_weight_map(folder / SHARD_INDEX).values()))]
    elif (folder / PICKLE_FILE).is_file():
        return _read_pickle(folder / PICKLE_FILE)
    elif (folder / PICKLE_INDEX).is_file():
        state: dict[str, Tensor] = {}
        for name in sorted(set(_weight_map(folder / PICKLE_INDEX).values())):
            state.update(_read_pickle(folder / name))
        return state
    else:
        raise CheckpointError(
            f"{str(folder)!r} has no weights ({WEIGHTS_FILE}, {PICKLE_FILE} or their shard indexes): "
            "save the model with save_pretrained into this folder"
        )
    state: dict[str, Tensor] = {}
    for file in files:
        try:
            state.update(load_file(file))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{str(file)!r} cannot be read as safetensors ({error}): save the model again") from None
    return state


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{str(index)!r} is not a shard index ({error}): save the model again") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{str(index)!r} is not a shard index (its weight_map is not a mapping): save the model again")
    return weight_map


def _read_pickle(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # an unsafe or corrupt pickle: torch raises several types
        first = (str(error).strip().splitlines() or [""])[0].split(". ")[0]
        raise CheckpointError(
            f"{str(path)!r} cannot be loaded safely (weights only: {first}): convert it to safetensors with "
            "save_pretrained(folder, safe_serialization=True) where you trust the file"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{str(path)!r} is not a state dict of tensors: save the model with save_pretrained")
    return state


def _normalize_names(state: dict[str, Tensor], model_type: str) -> dict[str, Tensor]:
    """Names as the base model has them: the task model's prefix off, old TF LayerNorm names updated."""
    prefix, heads = BASE_PREFIX[model_type], HEAD_NAMES[model_type]
    out = {}
    for name, tensor in state.items():
        name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))
        if name.startswith(prefix) and not name.startswith(heads):
            name = name[len(prefix):]
        out[name] = tensor
    # The MLM output bias: transformers 4 ties the decoder's bias to cls.predictions.bias and
    # saves either; transformers 5 adds only the decoder's (untied when the embeddings are).
    if "cls.predictions.decoder.bias" in out:
        out["cls.predictions.bias"] = out.pop("cls.predictions.decoder.bias")
    return out


def _their_shape(param: Param, our_shape: torch.Size) -> tuple[int, ...]:
    shape = list(our_shape)
    shape[0] //= len(param.theirs)
    return tuple(reversed(shape)) if param.transpose else tuple(shape)


def _unsupported(folder: Path, field: str, value: Any, why: str) -> CheckpointError:
    return CheckpointError(f"{str(folder / CONFIG_FILE)!r}: {field}={value!r} is not supported: {why}")


ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}


def _activation(folder: Path, field: str, value: Any) -> str:
    if value not in ACTIVATIONS:
        raise _unsupported(folder, field, value, f"lmexp's transformer uses one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[value]


def _mlp_ratio(folder: Path, field: str, inner: int, width: int) -> int:
    if inner % width:
        raise _unsupported(folder, field, inner, f"lmexp's MLP width is a whole multiple of the hidden size {width}")
    return inner // width


def _network(folder: Path, **fields: Any) -> ModelConfig:
    try:
        return ModelConfig(**fields)
    except ConfigError as error:
        raise CheckpointError(f"{str(folder / CONFIG_FILE)!r} describes a network lmexp cannot build: {error}") from None


def bert_network(hf: dict[str, Any], state: dict[str, Tensor], folder: Path) -> ModelConfig:
    """A transformers ``BertConfig`` as an lmexp network (the original BERT's layout)."""
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise _unsupported(folder, "position_embedding_type", hf["position_embedding_type"], "lmexp imports absolute positions")
    for flag in ("is_decoder", "add_cross_attention"):
        if hf.get(flag):
            raise _unsupported(folder, flag, True, "lmexp imports BERT as a bidirectional encoder")
    labels = None
    architectures = hf.get("architectures") or []
    # classifier.* is also the head of token classification and multiple choice, which lmexp
    # does not have: their encoder imports, the head is reported as ignored.
    if "classifier.weight" in state and (not architectures or any("SequenceClassification" in a for a in architectures)):
        labels = _labels(hf, state["classifier.weight"].shape[0], folder)
    width = hf.get("hidden_size", 768)
    dropout = hf.get("hidden_dropout_prob", 0.1)
    held = {prefix for prefix in ("cls.predictions.", "cls.seq_relationship.", "pooler.")
            if any(name.startswith(prefix) for name in state)}
    return _network(
        folder,
        arch="bert", norm_position="post", embedding_norm=True,
        n_layer=hf.get("num_hidden_layers", 12), n_head=hf.get("num_attention_heads", 12), n_embd=width,
        block_size=hf.get("max_position_embeddings", 512), vocab_size=hf.get("vocab_size", 30522),
        type_vocab_size=hf.get("type_vocab_size", 2), norm_eps=hf.get("layer_norm_eps", 1e-12),
        activation=_activation(folder, "hidden_act", hf.get("hidden_act", "gelu")),
        mlp_ratio=_mlp_ratio(folder, "intermediate_size", hf.get("intermediate_size", 3072), width),
        dropout=dropout, classifier_dropout=dropout if hf.get("classifier_dropout") is None else hf["classifier_dropout"],
        tie_embeddings=hf.get("tie_word_embeddings", True), labels=labels,
        # The heads the folder holds; a classifier reads the pooler, so it has one whatever the folder.
        mlm_head="cls.predictions." in held, sop_head="cls.seq_relationship." in held,
        pooler="pooler." in held or bool(labels),
    )


def _labels(hf: dict[str, Any], count: int, folder: Path) -> list[str]:
    problem = hf.get("problem_type")
    if count < 2 or problem in ("regression", "multi_label_classification"):
        raise _unsupported(folder, "problem_type", problem or "regression",
                           "lmexp fine-tunes single-label classifiers with two or more classes")
    id2label = hf.get("id2label") or {}
    names = [id2label.get(str(i), id2label.get(i)) for i in range(count)]
    return [str(n) for n in names] if all(n is not None for n in names) else [f"LABEL_{i}" for i in range(count)]


def gpt2_network(hf: dict[str, Any], state: dict[str, Tensor], folder: Path) -> ModelConfig:
    """A transformers ``GPT2Config`` as an lmexp network (pre-LayerNorm, learned positions)."""
    if not hf.get("scale_attn_weights", True):
        raise _unsupported(folder, "scale_attn_weights", False, "lmexp scales attention by 1/sqrt(head size)")
    for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf.get(flag):
            raise _unsupported(folder, flag, True, "lmexp's GPT has no such option")
    width = hf.get("n_embd", 768)
    return _network(
        folder,
        arch="gpt", norm_position="pre",
        n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=width,
        block_size=hf.get("n_positions", hf.get("n_ctx", 1024)), vocab_size=hf.get("vocab_size", 50257),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation=_activation(folder, "activation_function", hf.get("activation_function", "gelu_new")),
        mlp_ratio=_mlp_ratio(folder, "n_inner", hf.get("n_inner") or 4 * width, width),
        dropout=hf.get("resid_pdrop", 0.1), tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def load_hf_tokenizer(folder: Path, model_type: str) -> Tokenizer:
    """The folder's tokenizer: ``tokenizer.json`` when present, else BERT's ``vocab.txt`` or
    GPT-2's ``vocab.json`` + ``merges.txt``; either way with the options of ``tokenizer_config.json``
    (lower-casing, accent stripping, a prefix space), which transformers applies too."""
    options = {}
    if (folder / TOKENIZER_CONFIG).is_file():
        try:
            options = json.loads((folder / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{str(folder / TOKENIZER_CONFIG)!r} is not valid JSON ({error})") from None
    if (folder / TOKENIZER_FILE).is_file():
        try:
            definition = json.loads((folder / TOKENIZER_FILE).read_text(encoding="utf-8"))
            _apply_options(definition, options)
            tokenizer = tokenizer_from_json(json.dumps(definition))
        except Exception as error:  # tokenizers raises a bare Exception for a malformed definition
            raise CheckpointError(f"{str(folder / TOKENIZER_FILE)!r} cannot be read ({error}): save the tokenizer again") from None
        # Saved padding or truncation would change every encoding: lmexp pads and cuts batches itself.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        return tokenizer
    if model_type == "bert" and (folder / "vocab.txt").is_file():
        return _wordpiece_from_vocab(folder / "vocab.txt", options)
    if model_type == "gpt2" and (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return _byte_bpe_from_files(folder, options)
    files = "vocab.txt" if model_type == "bert" else "vocab.json and merges.txt"
    raise CheckpointError(
        f"{str(folder)!r} has no tokenizer files ({TOKENIZER_FILE}, or {files}): "
        "save the tokenizer into the same folder with tokenizer.save_pretrained"
    )


def _apply_options(definition: dict[str, Any], options: dict[str, Any]) -> None:
    """Where tokenizer_config.json and tokenizer.json disagree, transformers' BERT and GPT-2
    tokenizers follow tokenizer_config.json: so does lmexp."""
    normalizer, pre_tokenizer = definition.get("normalizer") or {}, definition.get("pre_tokenizer") or {}
    if normalizer.get("type") == "BertNormalizer":
        for option, field in (("do_lower_case", "lowercase"), ("strip_accents", "strip_accents"),
                              ("tokenize_chinese_chars", "handle_chinese_chars")):
            if option in options:
                normalizer[field] = options[option]
    if pre_tokenizer.get("type") == "ByteLevel" and "add_prefix_space" in options:
        pre_tokenizer["add_prefix_space"] = options["add_prefix_space"]


def _special(options: dict[str, Any], key: str, default: str) -> str:
    value = options.get(key, default)
    return value.get("content", default) if isinstance(value, dict) else (value or default)


def _wordpiece_from_vocab(path: Path, options: dict[str, Any]) -> Tokenizer:
    """BERT's WordPiece as transformers builds it from ``vocab.txt``."""
    tokens = path.read_text(encoding="utf-8").split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    vocab = {token: i for i, token in enumerate(tokens)}  # a repeated line keeps its last id, as in transformers
    unk = _special(options, "unk_token", UNK)
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token=unk, max_input_chars_per_word=100))
    lowercase = options.get("do_lower_case", True)
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=options.get("tokenize_chinese_chars", True),
        strip_accents=options.get("strip_accents"), lowercase=lowercase,
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    specials = [_special(options, f"{k}_token", d) for k, d in (("pad", PAD), ("unk", UNK), ("cls", CLS), ("sep", SEP), ("mask", MASK))]
    tokenizer.add_special_tokens([t for t in specials if t in vocab])
    _bert_template(tokenizer, _special(options, "cls_token", CLS), _special(options, "sep_token", SEP))
    return tokenizer_from_json(tokenizer.to_str())


def _bert_template(tokenizer: Tokenizer, cls: str = CLS, sep: str = SEP) -> None:
    """[CLS] A [SEP] (B [SEP]) when transformers encodes with special tokens (lmexp frames its own)."""
    cls_id, sep_id = tokenizer.token_to_id(cls), tokenizer.token_to_id(sep)
    if cls_id is None or sep_id is None:
        return
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A:0 {sep}:0", pair=f"{cls} $A:0 {sep}:0 $B:1 {sep}:1", special_tokens=[(cls, cls_id), (sep, sep_id)],
    )


def _byte_bpe_from_files(folder: Path, options: dict[str, Any]) -> Tokenizer:
    """GPT-2's byte-level BPE from ``vocab.json`` and ``merges.txt``."""
    try:
        model = models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
    except Exception as error:  # tokenizers raises a bare Exception for malformed files
        raise CheckpointError(f"{str(folder)!r}: vocab.json or merges.txt cannot be read ({error})") from None
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=options.get("add_prefix_space", False))
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    eos = _special(options, "eos_token", GPT2_EOS)
    if tokenizer.token_to_id(eos) is not None:
        tokenizer.add_special_tokens([eos])
    return tokenizer_from_json(tokenizer.to_str())


# ---------------------------------------------------------------------------------------------
# Export


def export_hf(model: nn.Module, config: ModelConfig, folder: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write ``model`` as a transformers folder: GPT -> ``GPT2LMHeadModel``; BERT ->
    ``BertForMaskedLM``, or ``BertForSequenceClassification`` when it has labels; the tokenizer
    as ``tokenizer.json`` + ``tokenizer_config.json`` for ``AutoTokenizer``."""
    check_exportable(config)
    folder = Path(folder)
    state = model.state_dict()
    if config.arch == "bert":
        # Exactly what the target class holds, so that transformers loads it without a report
        # of unexpected keys: BertForMaskedLM has no pooler; an encoder without heads is a BertModel.
        heads = {"pooler", "classification head"} if config.labels else {"masked-LM head"} if config.mlm_head else \
            {"pooler"}
        params = [p for p in bert_params(config) if p.head is None or p.head in heads]
        hf_config, model_type = _bert_config(config), "bert"
    else:
        params, hf_config, model_type = gpt2_params(config), _gpt2_config(config), "gpt2"
    tensors: dict[str, Tensor] = {}
    if config.arch == "bert" and not config.labels and config.mlm_head:  # the decoder's bias, under both names
        tensors["cls.predictions.decoder.bias"] = state["mlm_head.bias"].detach().float().contiguous().clone()
    for param in params:
        value = state[param.ours].detach().float()
        in_base = not param.theirs[0].startswith(HEAD_NAMES[model_type])  # the pooler is part of BertModel
        for name, part in zip(param.theirs, value.chunk(len(param.theirs))):
            full_name = BASE_PREFIX[model_type] + name if in_base else name
            tensors[full_name] = (part.t() if param.transpose else part).contiguous().clone()

    def fill(temporary: Path) -> None:
        save_file(tensors, str(temporary / WEIGHTS_FILE), metadata={"format": "pt"})
        fault_point("export.write", path=folder)
        (temporary / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
        if tokenizer is not None:
            _export_tokenizer(tokenizer, config, temporary)

    # The folder is replaced as a whole: a crash leaves the previous export, never a mix.
    return replace_folder(folder, fill, fault="export.write")


def check_exportable(config: ModelConfig) -> None:
    """Refuse, naming the field, a network transformers' BERT or GPT-2 cannot express."""
    if config.arch == "lstm":
        raise ConfigError("arch='lstm' has no transformers equivalent: export a gpt or bert network")
    if config.position != "learned":
        raise ConfigError(f"position={config.position!r} has no place in transformers' BERT or GPT-2: train with position: learned")
    if not config.bias:
        raise ConfigError("bias=False has no place in transformers' BERT or GPT-2 (they always have biases): train with bias: true")
    if config.qk_norm:
        raise ConfigError(
            "qk_norm=True has no place in transformers' BERT or GPT-2 (their attention does not normalise queries and "
            "keys): train with qk_norm: false, or use lmexp's own export"
        )
    if config.activation not in ("gelu", "gelu_tanh"):
        raise ConfigError(
            f"activation={config.activation!r} is not exported to transformers' BERT or GPT-2 (lmexp exports gelu and "
            "gelu_tanh only): train with activation: gelu or gelu_tanh, or use lmexp's own export"
        )
    expected = ("post", True) if config.arch == "bert" else ("pre", False)
    target = "BERT" if config.arch == "bert" else "GPT-2"
    if (config.norm_position, config.embedding_norm) != expected:
        raise ConfigError(
            f"norm_position={config.norm_position!r} with embedding_norm={config.embedding_norm} is not {target}'s layout "
            f"(norm_position={expected[0]!r}, embedding_norm={expected[1]}): train with the {config.arch} presets' layout"
        )
    if not config.uniform_layers:
        raise ConfigError(
            f"layer_heads={config.layer_heads} / layer_mlp_hidden={config.layer_mlp_hidden} (a structurally pruned "
            "network) have no place in transformers' BERT or GPT-2 configs, whose blocks are all alike: export the "
            "network before structured pruning, or use lmexp's own export"
        )
    if config.arch == "gpt" and config.labels:
        raise ConfigError(
            "a GPT classifier has no transformers equivalent (GPT2ForSequenceClassification's head has no bias and "
            "pools by pad token): export a BERT classifier, or the GPT language model before fine-tuning"
        )


def _bert_config(config: ModelConfig) -> dict[str, Any]:
    hf = {
        "architectures": ["BertForSequenceClassification" if config.labels else
                          "BertForMaskedLM" if config.mlm_head else "BertModel"],
        "model_type": "bert",
        "vocab_size": config.require_vocab_size(),
        "hidden_size": config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "intermediate_size": config.mlp_ratio * config.n_embd,
        "hidden_act": "gelu" if config.activation == "gelu" else "gelu_new",
        "hidden_dropout_prob": config.dropout,
        "attention_probs_dropout_prob": config.dropout,
        "max_position_embeddings": config.block_size,
        "type_vocab_size": config.type_vocab_size,
        "layer_norm_eps": config.norm_eps,
        "position_embedding_type": "absolute",
        "pad_token_id": 0,
        "tie_word_embeddings": config.tie_embeddings,
    }
    if config.labels:
        hf["classifier_dropout"] = config.classifier_dropout
        hf["id2label"] = {str(i): label for i, label in enumerate(config.labels)}
        hf["label2id"] = {label: i for i, label in enumerate(config.labels)}
        hf["problem_type"] = "single_label_classification"
    return hf


def _gpt2_config(config: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.require_vocab_size(),
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.mlp_ratio * config.n_embd,
        "activation_function": "gelu" if config.activation == "gelu" else "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.norm_eps,
        "scale_attn_weights": True,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": None,
        "eos_token_id": None,
    }


def _export_tokenizer(tokenizer: Tokenizer, config: ModelConfig, folder: Path) -> None:
    tokenizer = Tokenizer.from_str(tokenizer.to_str())
    if config.arch == "bert":
        _bert_template(tokenizer)
    tokenizer.save(str(folder / TOKENIZER_FILE))
    options: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.block_size}
    names = {"pad_token": PAD, "unk_token": UNK, "cls_token": CLS, "sep_token": SEP, "mask_token": MASK}
    if config.arch == "gpt":
        names = {"unk_token": UNK, "eos_token": GPT2_EOS, "bos_token": GPT2_EOS}
    options.update({key: token for key, token in names.items() if tokenizer.token_to_id(token) is not None})
    (folder / TOKENIZER_CONFIG).write_text(json.dumps(options, indent=2) + "\n")
