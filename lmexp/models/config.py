"""Model configuration shared by every architecture, and named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

from lmexp.errors import ConfigError, check_choice, check_positive

Arch = Literal["gpt", "bert", "lstm"]
Position = Literal["learned", "rotary"]
NormPosition = Literal["pre", "post"]
Activation = Literal["gelu", "gelu_tanh", "relu2"]


@dataclass
class ModelConfig:
    """Architecture and sizes of a language model."""

    arch: Arch = "gpt"
    """Architecture: gpt (causal transformer), bert (bidirectional transformer) or lstm."""
    n_layer: int = 4
    """Number of transformer blocks or LSTM layers."""
    n_head: int = 4
    """Attention heads per block (ignored by lstm)."""
    n_embd: int = 128
    """Width of the hidden states (embedding and LSTM hidden size)."""
    block_size: int = 64
    """Context length in tokens (bert: including [CLS]/[SEP])."""
    vocab_size: int | None = None
    """Vocabulary size; left unset it is taken from the tokenizer."""
    dropout: float = 0.0
    """Dropout probability on embeddings, attention probabilities and residual branches."""
    bias: bool = True
    """Use biases in linear layers and layer norms."""
    position: Position = "learned"
    """Position encoding of transformers: learned absolute embeddings or rotary (RoPE)."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the output projection."""
    mlp_ratio: int = 4
    """Hidden width of the transformer MLP as a multiple of n_embd."""
    type_vocab_size: int = 2
    """Number of bert token types (segments)."""
    norm_position: NormPosition = "pre"
    """Where each block normalises: pre (inside the residual branches, then a final LayerNorm:
    GPT-2, stable for deep stacks) or post (after each residual sum, no final LayerNorm: BERT)."""
    norm_eps: float = 1e-5
    """Epsilon of every LayerNorm (GPT-2: 1e-5; BERT: 1e-12) and of qk_norm's RMSNorms."""
    embedding_norm: bool = False
    """LayerNorm on the summed embeddings before the first block (BERT)."""
    activation: Activation = "gelu"
    """Activation of the MLPs and of BERT's masked-LM transform: exact gelu (BERT), gelu_tanh, the
    tanh approximation (GPT-2's gelu_new), or relu2, squared ReLU relu(x)**2 (Primer, modded-nanoGPT)."""
    qk_norm: bool = False
    """RMSNorm queries and keys per head: keeps attention logits bounded, allowing higher learning rates."""
    activation_checkpointing: bool = False
    """Recompute each transformer block in the backward pass to save activation memory."""
    labels: list[str] | None = None
    """Class names of a sequence classifier, in label-id order; set, the network gets a
    classification head on its pooled output (gpt: last real token; bert: [CLS])."""
    classifier_dropout: float = 0.1
    """Dropout on the pooled state before the classification head."""
    mlm_head: bool = True
    """bert: the network has a masked-LM head. An encoder imported without one (transformers
    BertModel, BertForSequenceClassification) has none, so a classifier made from it carries no
    random head; MaskedLM adds a fresh one."""
    sop_head: bool = True
    """bert: the network has a sentence-order head (present only where the source or MaskedLM has it)."""
    pooler: bool = True
    """bert: the network has the [CLS] pooler (dense + tanh) that classification and sentence order
    read; transformers' BertForMaskedLM has none."""
    layer_heads: list[int] | None = None
    """Attention heads of each block, when blocks differ (a head-pruned model); None: n_head in
    every block. A head stays n_embd/n_head wide, so fewer heads mean narrower projections."""
    layer_mlp_hidden: list[int] | None = None
    """MLP hidden width of each block, when blocks differ (a neuron-pruned model); None:
    mlp_ratio*n_embd in every block."""

    def __post_init__(self) -> None:
        check_choice("arch", self.arch, get_args(Arch))
        check_choice("position", self.position, get_args(Position))
        check_choice("norm_position", self.norm_position, get_args(NormPosition))
        check_choice("activation", self.activation, get_args(Activation))
        if not 0.0 < self.norm_eps < 1.0:
            raise ConfigError(f"norm_eps={self.norm_eps} is outside (0, 1): use e.g. 1e-5 (GPT-2) or 1e-12 (BERT)")
        for name in ("n_layer", "n_head", "n_embd", "block_size", "mlp_ratio", "type_vocab_size"):
            check_positive(name, getattr(self, name))
        if self.vocab_size is not None:
            check_positive("vocab_size", self.vocab_size)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(
                f"dropout={self.dropout} is outside [0, 1): use a probability such as 0.1, or 0 to disable"
            )
        if not 0.0 <= self.classifier_dropout < 1.0:
            raise ConfigError(f"classifier_dropout={self.classifier_dropout} is outside [0, 1): use e.g. 0.1")
        if self.labels is not None:
            if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
                raise ConfigError(
                    f"labels={self.labels} must name at least two distinct classes, in label-id order"
                )
            self.labels = [str(label) for label in self.labels]
        if self.arch == "lstm":
            if self.labels is not None:
                raise ConfigError("labels are set but arch='lstm' has no classification head: use a gpt or bert network")
            return
        if self.n_embd % self.n_head != 0:
            raise ConfigError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                "choose n_embd as a multiple of n_head"
            )
        for name, bound in (("layer_heads", self.n_head), ("layer_mlp_hidden", None)):
            sizes = getattr(self, name)
            if sizes is None:
                continue
            if len(sizes) != self.n_layer or not all(isinstance(n, int) and n >= 1 for n in sizes):
                raise ConfigError(
                    f"{name}={sizes} must list one positive size per block ({self.n_layer}), or be unset"
                )
            if bound is not None and max(sizes) > bound:
                raise ConfigError(f"{name}={sizes} has more than n_head={bound} heads in a block")
            setattr(self, name, list(sizes))
        if self.position == "rotary" and self.head_dim % 2 != 0:
            raise ConfigError(
                f"rotary positions need an even head dimension but n_embd/n_head={self.head_dim}: "
                "choose n_embd as a multiple of 2*n_head"
            )

    @property
    def num_labels(self) -> int:
        """Classes of the classification head; 0 when the network has none."""
        return len(self.labels) if self.labels else 0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def heads_in(self, layer: int) -> int:
        """Attention heads of block `layer`."""
        return self.layer_heads[layer] if self.layer_heads is not None else self.n_head

    def mlp_hidden_in(self, layer: int) -> int:
        """MLP hidden width of block `layer`."""
        return self.layer_mlp_hidden[layer] if self.layer_mlp_hidden is not None else self.mlp_ratio * self.n_embd

    @property
    def uniform_layers(self) -> bool:
        """Whether every block has the full head count and MLP width (no structural pruning)."""
        return self.layer_heads is None and self.layer_mlp_hidden is None

    def require_vocab_size(self) -> int:
        """The vocabulary size, which must be known before any weights are built."""
        if self.vocab_size is None:
            raise ConfigError(
                "vocab_size is not set: it comes from the tokenizer; "
                "set model vocab_size or train through a data module"
            )
        return self.vocab_size

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed, validated like a new config."""
        _check_fields(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The original BERT's layout: post-LayerNorm blocks, a LayerNorm on the embeddings, eps 1e-12 and
# exact GELU, so that BERT checkpoints move to and from transformers unchanged.
BERT_LAYOUT: dict[str, Any] = dict(arch="bert", norm_position="post", embedding_norm=True, norm_eps=1e-12)

PRESETS: dict[str, dict[str, Any]] = {
    # Smallest useful transformer: for tests.
    "gpt-tiny": dict(arch="gpt", n_layer=2, n_head=2, n_embd=32, block_size=32),
    # nanoGPT's CPU recipe for character-level Shakespeare.
    "gpt-nano": dict(arch="gpt", n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0),
    # nanoGPT's GPU recipe for character-level Shakespeare.
    "gpt-mini": dict(arch="gpt", n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2),
    # GPT-2 small: 124M parameters with GPT-2's 50257-token vocabulary (the tokenizer decides).
    "gpt2": dict(arch="gpt", n_layer=12, n_head=12, n_embd=768, block_size=1024, activation="gelu_tanh"),
    "bert-tiny": dict(BERT_LAYOUT, n_layer=2, n_head=2, n_embd=32, block_size=32),
    "bert-mini": dict(BERT_LAYOUT, n_layer=4, n_head=4, n_embd=256, block_size=128),
    # BERT-base: 110M parameters with BERT's 30522-token vocabulary (the tokenizer decides).
    "bert-base": dict(BERT_LAYOUT, n_layer=12, n_head=12, n_embd=768, block_size=512),
    "lstm-small": dict(arch="lstm", n_layer=2, n_embd=256, block_size=64),
}


def from_name(name: str, **overrides: Any) -> ModelConfig:
    """The preset called `name`, with some fields overridden."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)}")
    _check_fields(overrides)
    return ModelConfig(**{**PRESETS[name], **overrides})


def _check_fields(changes: dict[str, Any]) -> None:
    fields = [f.name for f in dataclasses.fields(ModelConfig)]
    unknown = sorted(set(changes) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown model config field(s) {', '.join(unknown)}: valid fields are {', '.join(fields)}"
        )

