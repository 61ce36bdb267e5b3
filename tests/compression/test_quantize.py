"""Quantization: bitsandbytes int8 / nf4 / fp4 layers, their exact round trip through an lmexp
export, the rest of lmexp running such exports, and PyTorch's dynamic int8 baseline."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import mlflow
import pytest
import torch
from bitsandbytes.nn import Linear4bit, Linear8bitLt
from torch import nn

from compression.__main__ import main as compression_main
from compression.core import CompressionError, compressible_linears, save
from compression.quantize import (
    DYNAMIC_INT8,
    dynamic_int8,
    is_quantized,
    linear_weight_bytes,
    quantize,
)
from lmexp.checkpoints import WEIGHTS_FILE, LoadedModel, load_checkpoint
from lmexp.cli import main as lmexp_main
from lmexp.data import train_tokenizer
from lmexp.errors import CheckpointError
from lmexp.models import build_model, from_name
from lmexp.verbs.predict import predict_file
from lmexp.runs import build
from tests.conftest import make_corpus

VOCAB = 48
# (method, double_quant): every way quantize stores weights.
SCHEMES = [("int8", False), ("nf4", False), ("fp4", False), ("nf4", True)]
SCHEME_IDS = ["int8", "nf4", "fp4", "nf4-double-quant"]


def tiny(n_embd: int = 64, seed: int = 0, **fields) -> LoadedModel:
    """A random network; n_embd=64 gives every block layer a shape the 4-bit CPU kernel takes."""
    torch.manual_seed(seed)
    config = from_name(fields.pop("preset", "gpt-tiny"), vocab_size=VOCAB, n_embd=n_embd, **fields)
    return LoadedModel(build_model(config).eval(), config, None)


def ids(batch: int = 3, length: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model: nn.Module, arch: str = "gpt") -> torch.Tensor:
    inputs = ids()
    if arch == "bert":
        return model.classify(inputs, torch.ones_like(inputs))
    return model(inputs)


def relative_error(approximate: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approximate - exact).norm() / exact.norm())


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def assert_same_state(saved: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor]) -> None:
    assert list(loaded) == list(saved)
    for key, value in saved.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key


# ------------------------------------------------------------------------ round trip
@pytest.mark.parametrize(("method", "double_quant"), SCHEMES, ids=SCHEME_IDS)
def test_an_export_loads_back_bit_for_bit(method, double_quant, tmp_path):
    original = tiny()
    fp32_logits = logits(original.model)
    quantized = quantize(original, method, double_quant=double_quant)
    assert all(type(m) is nn.Linear for m in compressible_linears(original.model).values())  # original untouched
    assert torch.equal(logits(original.model), fp32_logits)
    kind = Linear8bitLt if method == "int8" else Linear4bit
    layers = list(compressible_linears(original.model))
    assert all(isinstance(quantized.model.get_submodule(name), kind) for name in layers)
    assert quantized.rebuilt and is_quantized(quantized)
    expected = {"method": method, "rebuild": "bitsandbytes", "layers": layers, "kept": [], "skip": []}
    four_bit = {"double_quant": double_quant, "compute_dtype": "float32"}
    expected.update({"threshold": 0.0} if method == "int8" else four_bit)
    assert quantized.transforms == [expected]

    before = logits(quantized.model)  # inference first: on an AVX512-BF16 CPU it repacks 4-bit weights
    saved = state(quantized.model)
    folder = save(quantized, tmp_path / "export")
    loaded = load_checkpoint(folder)
    assert loaded.transforms == quantized.transforms and loaded.rebuilt
    assert_same_state(saved, state(loaded.model))
    assert torch.equal(logits(loaded.model), before)
    assert all(isinstance(loaded.model.get_submodule(name), kind) for name in layers)


@pytest.mark.parametrize(("method", "double_quant"), SCHEMES[1:], ids=SCHEME_IDS[1:])
def test_inference_leaves_a_4bit_state_dict_and_its_outputs_unchanged(method, double_quant):
    quantized = quantize(tiny(), method, double_quant=double_quant)
    before = state(quantized.model)
    first = logits(quantized.model)
    assert_same_state(before, state(quantized.model))
    assert torch.equal(logits(quantized.model), first)  # the save after inference changed nothing


def test_a_bert_classifier_round_trips_with_its_head_in_full_precision(tmp_path):
    original = tiny(preset="bert-tiny", labels=["no", "yes"])
    quantized = quantize(original, "nf4")
    assert type(quantized.model.classifier.out_proj) is nn.Linear  # outside the blocks: left alone
    before = logits(quantized.model, "bert")
    loaded = load_checkpoint(save(quantized, tmp_path / "bert"))
    assert torch.equal(logits(loaded.model, "bert"), before)


# ------------------------------------------------------------------------ size and error
@pytest.fixture(scope="module")
def wide() -> tuple[LoadedModel, torch.Tensor, float]:
    """A network with 128-wide layers (where the statistics' fixed costs matter little), its
    logits, and the relative error of its int8 version's logits."""
    original = tiny(n_embd=128)
    exact = logits(original.model)
    return original, exact, relative_error(logits(quantize(original, "int8").model), exact)


@pytest.mark.parametrize(
    ("method", "double_quant", "smaller"),
    [("int8", False, (3.7, 4.0)), ("nf4", False, (6.9, 7.2)), ("fp4", False, (6.9, 7.2)), ("nf4", True, (7.2, 7.6))],
    ids=SCHEME_IDS,
)
def test_weights_shrink_and_outputs_stay_close(wide, method, double_quant, smaller):
    original, exact, int8_error = wide
    quantized = quantize(original, method, double_quant=double_quant)
    layers = quantized.transforms[-1]["layers"]
    ratio = linear_weight_bytes(original.model, layers) / linear_weight_bytes(quantized.model, layers)
    assert smaller[0] < ratio < smaller[1]
    error = relative_error(logits(quantized.model), exact)
    if method == "int8":
        assert 0 < error < 0.02
    else:  # 4 bits lose clearly more than 8, and still keep the outputs recognisable
        assert 3 * int8_error < error < 0.2


def test_the_4bit_compute_dtype_is_recorded_and_rebuilt(tmp_path):
    quantized = quantize(tiny(), "nf4", compute_dtype=torch.bfloat16)
    assert quantized.transforms[-1]["compute_dtype"] == "bfloat16"
    before = logits(quantized.model)
    loaded = load_checkpoint(save(quantized, tmp_path / "bf16"))
    assert loaded.model.trunk.blocks[0].attn.qkv.compute_dtype == torch.bfloat16
    assert torch.equal(logits(loaded.model), before)


# ------------------------------------------------------------------------ layer choice
def test_layers_the_4bit_kernel_cannot_take_stay_in_full_precision_and_are_listed(tmp_path, caplog):
    original = tiny(n_embd=32)  # 32 inputs: only the MLP's 128 -> 32 projection fits the 4-bit kernel
    with caplog.at_level(logging.WARNING, logger="compression.quantize"):
        quantized = quantize(original, "fp4")
    record = quantized.transforms[-1]
    assert record["layers"] == ["trunk.blocks.0.mlp.out_proj", "trunk.blocks.1.mlp.out_proj"]
    unfit = ("attn.qkv", "attn.out_proj", "mlp.fc_in")
    assert record["kept"] == [f"trunk.blocks.{i}.{layer}" for i in (0, 1) for layer in unfit]
    assert "keeping 6 layer(s) in full precision" in caplog.text and "trunk.blocks.1.attn.qkv (32->96)" in caplog.text
    assert all(type(quantized.model.get_submodule(name)) is nn.Linear for name in record["kept"])
    before = logits(quantized.model)
    assert torch.equal(logits(load_checkpoint(save(quantized, tmp_path / "mixed")).model), before)


def test_skip_patterns_leave_layers_alone():
    quantized = quantize(tiny(), "int8", skip=["*.qkv", "trunk.blocks.1.*"])
    assert quantized.transforms[-1]["layers"] == ["trunk.blocks.0.attn.out_proj", "trunk.blocks.0.mlp.fc_in",
                                                  "trunk.blocks.0.mlp.out_proj"]
    assert type(quantized.model.trunk.blocks[0].attn.qkv) is nn.Linear
    assert quantized.transforms[-1]["skip"] == ["*.qkv", "trunk.blocks.1.*"]


# ------------------------------------------------------------------------ refusals
def test_quantizing_an_already_quantized_model_is_refused(tmp_path):
    quantized = quantize(tiny(), "nf4")
    reloaded = load_checkpoint(save(quantized, tmp_path / "nf4"))
    for network in (quantized, reloaded, dynamic_int8(tiny())):
        for make in (lambda n: quantize(n, "int8"), dynamic_int8):
            with pytest.raises(CompressionError, match=r"^the network is already quantized \((nf4|dynamic-int8)\)"):
                make(network)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "int4"}, r"method='int4' is unknown: use one of int8, nf4, fp4"),
        ({"method": "int8", "double_quant": True}, r"double_quant applies to the 4-bit methods"),
        ({"method": "nf4", "threshold": 6.0}, r"threshold=6.0 applies to int8 only"),
        ({"method": "int8", "threshold": -1.0}, r"threshold=-1.0 must be 0 \(off\) or positive"),
        ({"method": "nf4", "compute_dtype": torch.float16}, r"compute_dtype=torch.float16 is not supported"),
        ({"method": "nf4", "skip": ["*"]}, r"no block layer to quantize to nf4 \(skip=\['\*'\]"),
    ],
)
def test_bad_requests_are_one_line_errors(kwargs, message):
    with pytest.raises(CompressionError, match=message) as error:
        quantize(tiny(), **kwargs)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: {**t, "method": "int3"}, r"cannot be rebuilt \(method='int3' is unknown"),
        (lambda t: {**t, "layers": ["trunk.blocks.7.attn.qkv"]}, r"names trunk.blocks.7.attn.qkv, which the model"),
        (lambda t: {key: value for key, value in t.items() if key != "layers"}, r"lists no layers"),
    ],
)
def test_an_edited_quantization_record_is_a_one_line_checkpoint_error(edit, message, tmp_path):
    folder = save(quantize(tiny(), "nf4"), tmp_path / "nf4")
    meta = json.loads((folder / "config.json").read_text())
    meta["transforms"] = [edit(meta["transforms"][0])]
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(folder)


# ------------------------------------------------------------------------ dynamic int8
def test_dynamic_int8_is_close_and_in_memory_only():
    original = tiny()
    quantized = dynamic_int8(original, skip=["*.qkv"])
    layers = quantized.transforms[-1]["layers"]
    assert quantized.transforms == [{"method": DYNAMIC_INT8, "layers": layers, "skip": ["*.qkv"]}]
    assert len(layers) == 6 and not any(name.endswith(".qkv") for name in layers)
    assert type(original.model.trunk.blocks[0].mlp.fc_in) is nn.Linear
    assert isinstance(quantized.model.trunk.blocks[0].mlp.fc_in, torch.ao.nn.quantized.dynamic.Linear)
    assert relative_error(logits(quantized.model), logits(original.model)) < 0.03
    assert not quantized.rebuilt and is_quantized(quantized)  # no pre-load hook: nothing to reload


# ------------------------------------------------------------------------ the rest of lmexp
@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random gpt (n_embd=64) with a character tokenizer, as trained and as nf4 / int8 exports."""
    folder = tmp_path_factory.mktemp("quantize")
    corpus = folder / "corpus.txt"
    corpus.write_text(make_corpus(60))
    tokenizer = train_tokenizer([corpus.read_text()], "char")
    torch.manual_seed(0)
    config = from_name("gpt-tiny", vocab_size=tokenizer.get_vocab_size(), n_embd=64)
    original = LoadedModel(build_model(config).eval(), config, tokenizer)
    made = {"corpus": corpus, "original": save(original, folder / "original")}
    for method in ("nf4", "int8"):
        made[method] = save(quantize(original, method), folder / method)
    return made


def test_the_quantize_command_writes_an_export_and_logs_sizes(exports, tmp_path, caplog, capsys):
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="compression"):
        assert compression_main(["quantize", "--ckpt", str(exports["original"]), "--out", str(out),
                                 "--method", "nf4", "--double-quant", "--skip", "*.qkv"]) == 0
    transform = load_checkpoint(out).transforms[-1]
    assert transform["method"] == "nf4" and transform["double_quant"] and len(transform["layers"]) == 6
    run = mlflow.search_runs(experiment_names=["compression"], filter_string="params.command = 'quantize'",
                             order_by=["start_time DESC"], output_format="list")[0]
    assert run.data.metrics["linear_bytes_before"] == 294_912 and run.info.run_name == "quantize-out"
    assert "linear weights of the quantized layers: 294,912 -> " in caplog.text
    assert f"{WEIGHTS_FILE} is " in caplog.text and "nf4: quantized 6 layer(s)" in caplog.text
    assert compression_main(["quantize", "--ckpt", str(out), "--out", str(tmp_path / "again"), "--method", "int8"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: the network is already quantized (nf4): quantize the checkpoint from before quantization instead"
    ]


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_lmexp_generate_runs_a_quantized_export(exports, method, capsys):
    lmexp_main(["generate", "--ckpt", str(exports[method]), "--prompt", "The cat", "--max_new_tokens", "12",
                "--temperature", "0"])
    printed = capsys.readouterr().out
    assert printed.startswith("The cat") and len(printed) == len("The cat") + 12 + 1  # a character per token, "\n"


def test_lmexp_test_evaluates_a_quantized_export_as_it_is(exports, tmp_path):
    def test_loss(folder: Path) -> tuple[float, nn.Module]:
        run = build("test", args=[
            "--model=lmexp.CausalLM", f"--model.pretrained={folder}", "--data=lmexp.TextDataModule",
            f"--data.source={exports['corpus']}", "--data.test_fraction=0.2", "--data.batch_size=8",
            "--trainer.limit_test_batches=4", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp_path}",
        ], logger=False, run_name=folder.name)
        return run.execute()[0]["test/loss"], run.model.model

    exact, _ = test_loss(exports["original"])
    quantized, network = test_loss(exports["nf4"])
    assert isinstance(network.trunk.blocks[0].mlp.fc_in, Linear4bit)  # evaluated as loaded, not copied into fp32
    assert quantized != exact and abs(quantized / exact - 1) < 0.02


def test_lmexp_predict_runs_a_quantized_classifier(tmp_path):
    tokenizer = train_tokenizer(["good bad film plot"], "char")
    torch.manual_seed(0)
    config = from_name("gpt-tiny", vocab_size=tokenizer.get_vocab_size(), n_embd=64, labels=["bad", "good"])
    original = LoadedModel(build_model(config).eval(), config, tokenizer, inputs={"text_column": ["sentence"]})
    table = tmp_path / "reviews.tsv"
    table.write_text("label\tsentence\nbad\tbad film\ngood\tgood plot\ngood\tgood good film\n")
    rows = {}
    for name, network in (("original", original), ("int8", quantize(original, "int8"))):
        out = predict_file(str(save(network, tmp_path / name)), str(table), str(tmp_path / f"{name}.csv"))
        rows[name] = list(csv.DictReader(out.read_text().splitlines()))
    assert [row["text"] for row in rows["int8"]] == ["bad film", "good plot", "good good film"]
    for exact, quantized in zip(rows["original"], rows["int8"]):
        assert abs(float(quantized["p_good"]) - float(exact["p_good"])) < 0.02
