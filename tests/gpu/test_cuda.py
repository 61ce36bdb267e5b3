"""CUDA paths: bf16 autocast, bitsandbytes kernels and FSDP. Selected with ``-m gpu``; each test
skips with "requires CUDA" on a machine without a usable GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from bitsandbytes.nn import Linear4bit, Linear8bitLt

from compression.quantize import quantize
from lmexp.checkpoints import LoadedModel, load_checkpoint
from lmexp.models import GPT, build_model, from_name
from tests.conftest import make_corpus

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="requires CUDA")]

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 48


def ids(batch: int = 4, length: int = 32) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1)).cuda()


def relative_error(approximate: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approximate.float() - exact.float()).norm() / exact.float().norm())


# ------------------------------------------------------------------------ bf16 autocast
def test_bf16_autocast_forward_and_backward_of_a_tiny_gpt():
    torch.manual_seed(0)
    model = GPT(from_name("gpt-tiny", vocab_size=VOCAB, dropout=0.0)).cuda().train()
    inputs = ids()

    def loss_and_logits(bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), inputs.flatten())
        loss.backward()
        return logits, torch.cat([p.grad.flatten() for p in model.parameters()])

    exact_logits, exact_grads = loss_and_logits(bf16=False)
    logits, grads = loss_and_logits(bf16=True)
    assert exact_logits.dtype == torch.float32 and logits.dtype == torch.bfloat16  # the matmuls ran in bf16
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert torch.isfinite(grads).all()
    # bf16 keeps 8 bits of mantissa: about 0.3 % here (measured with CPU autocast), not more.
    assert 0 < relative_error(logits, exact_logits) < 0.02
    assert 0 < relative_error(grads, exact_grads) < 0.05


# ------------------------------------------------------------------------ bitsandbytes kernels
@pytest.mark.parametrize(("method", "bound"), [("int8", 0.03), ("nf4", 0.2), ("fp4", 0.2)])
def test_bitsandbytes_quantization_on_cuda_keeps_outputs_close(method, bound):
    """The project's quantize() on a network on the GPU: every block layer becomes a quantized
    bitsandbytes layer there, and the logits stay near the float network's."""
    torch.manual_seed(0)
    config = from_name("gpt-tiny", vocab_size=VOCAB, n_embd=128)
    original = LoadedModel(build_model(config).cuda().eval(), config, None)
    with torch.no_grad():
        exact = original.model(ids())
    quantized = quantize(original, method)
    record = quantized.transforms[-1]
    assert len(record["layers"]) == 4 * config.n_layer and record["kept"] == []
    kind, stored = (Linear8bitLt, torch.int8) if method == "int8" else (Linear4bit, torch.uint8)
    for name in record["layers"]:
        layer = quantized.model.get_submodule(name)
        assert isinstance(layer, kind) and layer.weight.device.type == "cuda" and layer.weight.dtype == stored, name
    with torch.no_grad():
        approximate = quantized.model(ids())
    assert approximate.device.type == "cuda" and torch.isfinite(approximate).all()
    assert 0 < relative_error(approximate, exact) < bound


# ------------------------------------------------------------------------ FSDP
def named_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters under the names of the bare network (FSDP's wrapper prefixes removed), on the CPU."""
    return {
        name.replace("_fsdp_wrapped_module.", ""): p.detach().float().cpu().clone()
        for name, p in module.named_parameters()
    }


class FSDPProbe(pl.Callback):
    """Written to ``out_dir`` by a run: what the strategy wrapped, where the weights were, and the
    network's weights before and after training."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(named_weights(pl_module.model), self.out_dir / "initial.pt")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        from lmexp.models.layers import Block

        units = [m for m in trainer.model.modules() if isinstance(m, FullyShardedDataParallel)]
        facts = {
            "strategy": type(trainer.strategy).__name__,
            "wrapped_blocks": sum(isinstance(unit.module, Block) for unit in units),
            "n_layer": pl_module.network_config.n_layer,
            "devices": sorted({p.device.type for p in pl_module.parameters()}),
            "global_step": trainer.global_step,
        }
        (self.out_dir / "facts.json").write_text(json.dumps(facts))
        torch.save(named_weights(pl_module.model), self.out_dir / "final.pt")


def test_fsdp_fit_of_two_steps_on_one_gpu(tmp_path: Path):
    """The quickstart config as shipped (gradient clipping included) under TransformerFSDP, in a
    process of its own (FSDP starts a process group): every block is an FSDP unit on the GPU, two
    steps train, and the checkpoint loads without FSDP with the trained weights."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus(400))
    probe = tmp_path / "probe"
    command = [
        sys.executable, "-m", "lmexp", "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
        "--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.strategy.class_path=lmexp.strategies.TransformerFSDP",
        f"--data.source={corpus}", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1", "--model.warmup_steps=1", "--model.network_overrides={block_size: 32}",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--trainer.callbacks+=tests.gpu.test_cuda.FSDPProbe", f"--trainer.callbacks.out_dir={probe}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    facts = json.loads((probe / "facts.json").read_text())
    assert facts == {
        "strategy": "TransformerFSDP", "wrapped_blocks": facts["n_layer"], "n_layer": 4, "devices": ["cuda"],
        "global_step": 2,
    }
    initial, final = (torch.load(probe / f"{name}.pt", weights_only=True) for name in ("initial", "final"))
    assert initial.keys() == final.keys()
    assert any(not torch.equal(initial[name], final[name]) for name in initial)  # it trained

    checkpoint = tmp_path / "run" / "latest" / "checkpoints" / "best.ckpt"  # saved at step 2, the last
    saved = named_weights(load_checkpoint(checkpoint).model)
    assert saved.keys() == final.keys()
    for name, value in final.items():
        torch.testing.assert_close(saved[name], value, rtol=0, atol=0, msg=name)
