import pytest
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from lmexp.models import BERT, GPT, from_name
from lmexp.models.layers import Block
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
