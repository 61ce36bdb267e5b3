"""Lightning strategies preset for lmexp's networks."""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch.strategies import FSDPStrategy

from lmexp.models.layers import Block


class TransformerFSDP(FSDPStrategy):
    """FSDP that shards each transformer block as one unit (GPT and BERT share ``Block``).

    Wrapping per block keeps one block's full parameters in memory at a time, which is what
    lets a model larger than one device train. ``activation_checkpointing`` recomputes each
    block in the backward pass as well.

    Args:
        sharding_strategy: ``FULL_SHARD`` (parameters, gradients and optimizer state sharded),
            ``SHARD_GRAD_OP`` or ``HYBRID_SHARD``.
        activation_checkpointing: Recompute block activations in the backward pass.
        state_dict_type: ``full`` writes one ordinary checkpoint file, loadable without FSDP;
            ``sharded`` writes one shard per rank (faster for large models).
        **kwargs: Passed to Lightning's ``FSDPStrategy``.
    """

    def __init__(
        self,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD"] = "FULL_SHARD",
        activation_checkpointing: bool = False,
        state_dict_type: Literal["full", "sharded"] = "full",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            auto_wrap_policy={Block},
            activation_checkpointing_policy={Block} if activation_checkpointing else None,
            sharding_strategy=sharding_strategy,
            state_dict_type=state_dict_type,
            **kwargs,
        )
