"""Only the heads a task uses: an encoder imported without a masked-LM head stays without one."""

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lmexp import ClassificationDataModule, MaskedLM, SequenceClassification
from lmexp.checkpoints import load_checkpoint
from lmexp.models import BERT, ModelConfig, build_model, from_name

transformers = pytest.importorskip("transformers")

SENTENCES = ["a fine film", "a dull film", "truly great acting", "boring and long", "great fun", "long and dull"]
HEADS = ("mlm_head", "sop_head", "pooler")


def tiny_bert_folder(kind: str, folder: Path, **extra) -> Path:
    """A transformers ``kind`` (BertModel, BertForMaskedLM, ...) saved with its WordPiece tokenizer."""
    from tokenizers import BertWordPieceTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(SENTENCES * 4, vocab_size=120,
                                  special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False)
    wordpiece.save_model(str(folder))
    tokenizer = transformers.BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True)
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=32, **extra)
    torch.manual_seed(0)
    getattr(transformers, kind)(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def head_parameters(module: torch.nn.Module) -> list[str]:
    return [name for name, _ in module.named_parameters() if any(f"{head}." in name for head in HEADS)]


@pytest.mark.parametrize("kind", ["BertModel", "BertForSequenceClassification"])
def test_an_encoder_without_a_masked_lm_head_imports_without_one(kind: str, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture):
    extra = {"num_labels": 2} if "Sequence" in kind else {}
    with caplog.at_level("WARNING"):
        loaded = load_checkpoint(tiny_bert_folder(kind, tmp_path / kind, **extra))
    assert (loaded.config.mlm_head, loaded.config.sop_head, loaded.config.pooler) == (False, False, True)
    assert loaded.model.mlm_head is None and loaded.model.sop_head is None
    assert loaded.objective == ("classification" if extra else "encoder")  # not masked_lm
    assert "initialized randomly" not in caplog.text
    with pytest.raises(ValueError, match="no masked-LM head"):
        loaded.model.logits(torch.tensor([[2, 5, 3]]))


def test_a_masked_lm_folder_keeps_its_head_and_has_no_pooler_or_sentence_order_head(tmp_path: Path):
    loaded = load_checkpoint(tiny_bert_folder("BertForMaskedLM", tmp_path / "mlm"))
    assert (loaded.config.mlm_head, loaded.config.sop_head, loaded.config.pooler) == (True, False, False)
    assert loaded.objective == "masked_lm"
    assert loaded.model.mlm_logits(loaded.model(torch.tensor([[2, 5, 3]]))).shape == (1, 3, loaded.config.vocab_size)


def test_a_classifier_fine_tuned_from_an_encoder_has_no_masked_lm_head(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture):
    folder = tiny_bert_folder("BertModel", tmp_path / "encoder")
    train = tmp_path / "train.tsv"
    train.write_text("label\ttext\n" + "".join(f"{i % 2}\t{s}\n" for i, s in enumerate(SENTENCES * 6)))
    objective = SequenceClassification(pretrained=str(folder), lr=1e-3, warmup_steps=0)
    data = ClassificationDataModule(train=str(train), val_fraction=0.2, batch_size=8, max_length=16)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, num_sanity_val_steps=0, val_check_interval=2)
    with caplog.at_level("WARNING"):
        trainer.fit(objective, datamodule=data)
    assert "initialized randomly" not in caplog.text
    assert head_parameters(objective.model) == ["pooler.weight", "pooler.bias"]  # what classification reads
    assert all(p.requires_grad for p in objective.parameters())  # nothing random sits frozen
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert not [k for k in saved["state_dict"] if k.startswith(("model.mlm_head", "model.sop_head"))]
    reloaded = load_checkpoint(checkpoint)
    assert reloaded.objective == "SequenceClassification" and not reloaded.config.mlm_head
    ids = torch.tensor([[2, 7, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model.classify(ids), objective.model.eval().classify(ids))


def test_masked_lm_from_an_encoder_adds_a_fresh_head_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                  caplog: pytest.LogCaptureFixture):
    folder = tiny_bert_folder("BertModel", tmp_path / "encoder")
    with caplog.at_level("INFO"):
        objective = MaskedLM(pretrained=str(folder))
    said = caplog.text + capsys.readouterr().err
    assert "MaskedLM: new mlm_head, mlm_head.dense, mlm_head.ln on top of" in said  # the tied decoder is not new
    assert objective.model.sop_head is None  # no sentence order asked for: no head for it
    encoder = load_checkpoint(folder).model
    torch.testing.assert_close(objective.model.trunk.tok_emb.weight, encoder.trunk.tok_emb.weight)
    torch.testing.assert_close(objective.model.pooler.weight, encoder.pooler.weight)  # loaded, not fresh
    hidden = objective.model(torch.tensor([[2, 5, 3]]))
    assert objective.model.mlm_logits(hidden).shape[-1] == objective.network_config.vocab_size


def test_networks_saved_before_the_head_fields_load_with_every_head(tmp_path: Path):
    config = ModelConfig(arch="bert", n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=40)
    model = build_model(config)
    network = {k: v for k, v in config.to_dict().items() if k not in HEADS}  # as older versions wrote it
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"network": network}, "lmexp": {"objective": "MaskedLM"}}, path)
    loaded = load_checkpoint(path)
    assert (loaded.config.mlm_head, loaded.config.sop_head, loaded.config.pooler) == (True, True, True)
    assert loaded.objective == "MaskedLM"
    torch.testing.assert_close(loaded.model.mlm_head.dense.weight, model.mlm_head.dense.weight)


def test_a_plain_encoder_exports_as_a_bert_model_transformers_loads(tmp_path: Path):
    from lmexp.checkpoints import export_checkpoint

    folder = tiny_bert_folder("BertModel", tmp_path / "encoder")
    exported = export_checkpoint(str(folder), str(tmp_path / "exported"))
    theirs = transformers.AutoModel.from_pretrained(exported).eval()
    assert type(theirs).__name__ == "BertModel"
    ids = torch.tensor([[2, 7, 9, 3]])
    with torch.no_grad():
        out = theirs(input_ids=ids)
        ours = load_checkpoint(folder).model
        torch.testing.assert_close(ours(ids), out.last_hidden_state, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.pool(ours(ids)), out.pooler_output, atol=1e-5, rtol=0)


def test_sentence_order_on_a_masked_lm_folder_adds_its_head_and_pooler(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    from types import SimpleNamespace

    folder = tiny_bert_folder("BertForMaskedLM", tmp_path / "mlm")
    objective = MaskedLM(pretrained=str(folder))
    assert objective.model.sop_head is None and objective.model.pooler is None  # plain masked LM: none made
    with caplog.at_level("INFO"):
        objective.read_data(SimpleNamespace(vocab_size=objective.network_config.vocab_size, labels=None,
                                            sentence_order=True))
    assert "MaskedLM: new pooler, sop_head for sentence order on top of" in caplog.text
    assert objective.network_config.sop_head and objective.network_config.pooler
    hidden = objective.model(torch.tensor([[2, 5, 3]]))
    assert objective.model.sop_head(objective.model.pool(hidden)).shape == (1, 2)
    assert objective.model.mlm_head.decoder.weight is objective.model.trunk.tok_emb.weight  # still tied


def test_adding_a_tied_masked_lm_head_keeps_the_trained_embedding():
    config = from_name("bert-tiny", vocab_size=40, n_layer=1, n_embd=32, n_head=2).replace(mlm_head=False)
    encoder = BERT(config)
    trained = encoder.trunk.tok_emb.weight.detach().clone()
    assert encoder.add_heads(config.replace(mlm_head=True)) == ["mlm_head"]
    torch.testing.assert_close(encoder.trunk.tok_emb.weight, trained)
    assert encoder.mlm_head.decoder.weight is encoder.trunk.tok_emb.weight  # still tied
