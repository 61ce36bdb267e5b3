from types import SimpleNamespace

import pytest
from lightning.pytorch.plugins.precision import FSDPPrecision
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from lmexp.models import BERT, GPT, from_name
from lmexp.models.layers import Block
from lmexp.objectives import CausalLM
from lmexp.strategies import TransformerFSDP


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fsdp_wraps_every_transformer_block_of_gpt_and_bert(checkpointing: bool):
    strategy = TransformerFSDP(activation_checkpointing=checkpointing)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and policy._module_classes == {Block}
    for model in (GPT(from_name("gpt-tiny", vocab_size=50)), BERT(from_name("bert-tiny", vocab_size=50))):
        blocks = [m for m in model.modules() if type(m) in policy._module_classes]
        assert len(blocks) == model.config.n_layer
    recompute = strategy._activation_checkpointing_kwargs.get("auto_wrap_policy")
    assert (recompute is not None and recompute._module_classes == {Block}) == checkpointing


class RootModule:
    """Stands in for the root FSDP module: records the norm clipping asked of it."""

    def __init__(self) -> None:
        self.clipped: list[float] = []

    def clip_grad_norm_(self, max_norm: float) -> None:
        self.clipped.append(max_norm)


@pytest.mark.parametrize("algorithm", ["norm", None])
def test_norm_clipping_under_fsdp_goes_to_the_root_module(algorithm):
    """Lightning's FSDP precision plugin refuses norm clipping; the objective clips through the
    root FSDP module, whose norm covers every rank's shard (``configs/quickstart.yaml`` clips)."""
    objective = CausalLM("gpt-tiny", network_overrides={"vocab_size": 50})
    root = RootModule()
    objective.trainer = SimpleNamespace(strategy=TransformerFSDP(), model=root, precision_plugin=FSDPPrecision("32-true"),
                                        gradient_clip_val=0.5, gradient_clip_algorithm=algorithm)
    objective.configure_gradient_clipping(optimizer=None, gradient_clip_val=0.5, gradient_clip_algorithm=algorithm)
    assert root.clipped == [0.5]
