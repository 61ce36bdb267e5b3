"""Hugging Face interop: folders saved by transformers import with equal hidden states and
logits, ours export to folders transformers loads with equal logits, tokenizers give the same
ids, and bad folders fail in one line."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from lmexp.checkpoints import load_checkpoint
from lmexp.cli import main
from lmexp.data.tokenizer import MLM_SPECIAL_TOKENS, train_tokenizer
from lmexp.errors import CheckpointError, ConfigError
from lmexp.generation import generate
from lmexp.formats.huggingface import export_hf
from lmexp.models import build_model, from_name
from tests.test_bad_input import one_line_error
from tests.test_finetune import classify_args, write_reviews

TOL = 1e-4
WORDS = (
    "the film was a story with some actors and a plot that moved me Café naïve résumé Ångström São Paulo "
    "Zoë façade jalapeño Straße ÉCOLE Über 中文 字符 你好 世界 電影 😀 🚀 👍🏽 ❤️ 🇫🇷 don't 3.14 $5 e-mail "
    "U.S.A. HELLO MiXeD #tag @user (parenthesis) «quotes» tab\there"
).split(" ")


def sentences(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 14))) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tokenizers saved by transformers: BERT uncased and cased (tokenizer.json), BERT as
    transformers 4 saved it (vocab.txt only), GPT-2 (tokenizer.json) and GPT-2 as vocab/merges."""
    root = tmp_path_factory.mktemp("tokenizers")
    corpus = sentences(600, seed=1)
    wordpiece = train_tokenizer([s.lower() for s in corpus], "wordpiece", 400, MLM_SPECIAL_TOKENS)
    vocab = [t for t, _ in sorted(wordpiece.get_vocab().items(), key=lambda kv: kv[1])]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    dirs = {}
    for name, lower in (("bert", True), ("bert_cased", False)):
        transformers.BertTokenizer(str(root / "vocab.txt"), do_lower_case=lower).save_pretrained(root / name)
        dirs[name] = root / name
    dirs["bert_vocab_only"] = root / "bert_vocab_only"
    dirs["bert_vocab_only"].mkdir()
    shutil.copy(root / "vocab.txt", dirs["bert_vocab_only"])
    (dirs["bert_vocab_only"] / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "strip_accents": None}))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.model.save(str(root), "gpt2")
    transformers.GPT2Tokenizer(str(root / "gpt2-vocab.json"), str(root / "gpt2-merges.txt")).save_pretrained(root / "gpt2")
    dirs["gpt2"] = root / "gpt2"
    dirs["gpt2_files"] = root / "gpt2_files"
    dirs["gpt2_files"].mkdir()
    shutil.copy(root / "gpt2-vocab.json", dirs["gpt2_files"] / "vocab.json")
    shutil.copy(root / "gpt2-merges.txt", dirs["gpt2_files"] / "merges.txt")
    return dirs


def vocab_size(folder: Path) -> int:
    return len(transformers.AutoTokenizer.from_pretrained(folder))


def scramble(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight drawn at N(0, 0.2) (LayerNorm scales around 1). Initial weights are so small
    that a wrong activation or a missing LayerNorm changes outputs by less than the tolerance;
    at this scale the exact GELU against its tanh approximation differs by about 1e-3."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_scale = name.endswith("weight") and param.dim() == 1
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2 + (1.0 if is_scale else 0.0))
    return model.eval()


def save_hf(model: torch.nn.Module, tokenizer_dir: Path, folder: Path) -> Path:
    scramble(model).save_pretrained(folder)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, folder)
    return folder


def padded_batch(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Four rows of 12 ids, three of them right-padded (id 0) to different lengths."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (4, 12), generator=generator)
    mask = torch.ones_like(ids)
    for row, length in ((1, 9), (2, 4), (3, 1)):
        mask[row, length:] = 0
        ids[row, length:] = 0
    return ids, mask


def max_diff(ours: torch.Tensor, theirs: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Largest absolute difference, over real tokens only when a mask is given."""
    diff = (ours - theirs).abs()
    if mask is not None:
        diff = diff[mask.bool()]
    return diff.max().item()


def bert_config(tokenizer_dir: Path, **extra) -> transformers.BertConfig:
    sizes = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192, max_position_embeddings=40)
    return transformers.BertConfig(vocab_size=vocab_size(tokenizer_dir), **{**sizes, **extra})


@pytest.mark.parametrize("kind", ["BertModel", "BertForMaskedLM", "BertForPreTraining", "BertForSequenceClassification"])
def test_bert_import_matches_transformers(kind: str, tokenizer_dirs: dict[str, Path], tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    extra = {"num_labels": 3, "id2label": {0: "neg", 1: "neutral", 2: "pos"}} if "Sequence" in kind else {}
    theirs = getattr(transformers, kind)(bert_config(tokenizer_dirs["bert"], **extra)).eval()
    folder = save_hf(theirs, tokenizer_dirs["bert"], tmp_path / kind)
    with caplog.at_level("WARNING", logger="lmexp.huggingface"):
        loaded = load_checkpoint(folder)
    ours = loaded.model
    ids, mask = padded_batch(loaded.config.vocab_size)
    types = torch.zeros_like(ids)
    types[:, 6:] = 1  # a second segment, so the token-type embeddings count
    with torch.no_grad():
        out = theirs(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        hidden = ours(ids, mask, types)
        assert max_diff(hidden, out.hidden_states[-1]) < TOL  # every position, padding included
        left = theirs(input_ids=ids.flip(1), attention_mask=mask.flip(1), token_type_ids=types, output_hidden_states=True)
        assert max_diff(ours(ids.flip(1), mask.flip(1), types), left.hidden_states[-1]) < TOL
        if kind == "BertModel":
            assert max_diff(ours.pool(hidden), out.pooler_output) < TOL
        if kind in ("BertForMaskedLM", "BertForPreTraining"):
            logits = out.logits if kind == "BertForMaskedLM" else out.prediction_logits
            assert max_diff(ours.mlm_logits(hidden), logits, mask) < TOL
        if kind == "BertForPreTraining":
            assert max_diff(ours.sop_head(ours.pool(hidden)), out.seq_relationship_logits) < TOL
        if kind == "BertForSequenceClassification":
            assert max_diff(ours.classify(ids, mask, types), out.logits) < TOL
    expected = {"BertModel": "encoder", "BertForMaskedLM": "masked_lm", "BertForPreTraining": "masked_lm",
                "BertForSequenceClassification": "classification"}[kind]
    assert loaded.objective == expected
    assert loaded.config.labels == (["neg", "neutral", "pos"] if "Sequence" in kind else None)
    assert (loaded.config.norm_position, loaded.config.embedding_norm, loaded.config.norm_eps) == ("post", True, 1e-12)
    assert "initialized randomly" not in caplog.text  # only the heads the folder has
    heads = (loaded.config.mlm_head, loaded.config.sop_head, loaded.config.pooler)
    assert heads == {"BertModel": (False, False, True), "BertForMaskedLM": (True, False, False),
                     "BertForPreTraining": (True, True, True),
                     "BertForSequenceClassification": (False, False, True)}[kind]


def test_gpt2_import_matches_transformers_with_right_and_left_padding(tokenizer_dirs: dict[str, Path], tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab_size(tokenizer_dirs["gpt2"]), n_embd=48, n_layer=2, n_head=4,
                                     n_positions=40, bos_token_id=0, eos_token_id=0)
    theirs = transformers.GPT2LMHeadModel(config).eval()
    loaded = load_checkpoint(save_hf(theirs, tokenizer_dirs["gpt2"], tmp_path / "gpt2"))
    assert loaded.objective == "causal_lm" and loaded.config.activation == "gelu_tanh"
    ids, mask = padded_batch(loaded.config.vocab_size)
    with torch.no_grad():
        out = theirs(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        assert max_diff(loaded.model.trunk(ids, mask), out.hidden_states[-1], mask) < TOL
        assert max_diff(loaded.model(ids, mask), out.logits, mask) < TOL
        # Left padding: transformers needs the positions spelt out; lmexp counts them from the mask.
        left_ids, left_mask = ids.flip(1), mask.flip(1)
        positions = (left_mask.cumsum(1) - 1).clamp(min=0)
        out = theirs(input_ids=left_ids, attention_mask=left_mask, position_ids=positions)
        assert max_diff(loaded.model(left_ids, left_mask), out.logits, left_mask) < TOL


def test_pickled_weights_load_weights_only_and_a_pickle_with_code_is_refused(tokenizer_dirs: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    torch.manual_seed(0)
    theirs = transformers.BertForMaskedLM(bert_config(tokenizer_dirs["bert"])).eval()
    folder = save_hf(theirs, tokenizer_dirs["bert"], tmp_path / "bin")
    (folder / "model.safetensors").unlink()
    torch.save(theirs.state_dict(), folder / "pytorch_model.bin")
    ids, mask = padded_batch(theirs.config.vocab_size)
    loaded = load_checkpoint(folder)
    with torch.no_grad():
        assert max_diff(loaded.model.mlm_logits(loaded.model(ids, mask)), theirs(input_ids=ids, attention_mask=mask).logits, mask) < TOL
    torch.save({"weights": theirs.state_dict(), "how": Path("not a tensor")}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="cannot be loaded safely .*weights only"):
        load_checkpoint(folder)


@pytest.mark.parametrize("name", ["bert", "bert_cased", "bert_vocab_only", "gpt2", "gpt2_files"])
def test_tokenizers_give_transformers_ids(name: str, tokenizer_dirs: dict[str, Path]) -> None:
    """Hundreds of sentences with accents, Chinese characters and emoji, with special tokens."""
    from lmexp.formats.huggingface import load_hf_tokenizer

    folder = tokenizer_dirs[name]
    ours = load_hf_tokenizer(folder, "gpt2" if name.startswith("gpt2") else "bert")
    if name == "gpt2_files":
        theirs = transformers.GPT2Tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    else:
        theirs = transformers.AutoTokenizer.from_pretrained(folder)
    texts = sentences(300)
    expected = theirs(texts)["input_ids"]
    got = [e.ids for e in ours.encode_batch(texts)]
    assert got == expected
    if name == "bert":  # uncased: accents stripped, as BERT-uncased does
        assert ours.encode("Café").tokens[1:-1] == theirs.tokenize("Café")
        assert "é" not in "".join(ours.encode("Café").tokens)


def lmexp_bert(tokenizer: Tokenizer, labels: list[str] | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    config = from_name("bert-tiny", vocab_size=tokenizer.get_vocab_size(), labels=labels)
    return scramble(build_model(config))


@pytest.mark.parametrize("labels", [None, ["neg", "pos"]])
def test_bert_export_loads_in_transformers_with_equal_logits(labels: list[str] | None, tmp_path: Path) -> None:
    tokenizer = train_tokenizer(sentences(200), "wordpiece", 300, MLM_SPECIAL_TOKENS)
    model = lmexp_bert(tokenizer, labels)
    folder = export_hf(model, model.config, tmp_path / "out", tokenizer)
    auto = transformers.AutoModelForSequenceClassification if labels else transformers.AutoModelForMaskedLM
    theirs, info = auto.from_pretrained(folder, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(theirs).__name__ == ("BertForSequenceClassification" if labels else "BertForMaskedLM")
    theirs.eval()
    ids, mask = padded_batch(tokenizer.get_vocab_size())
    with torch.no_grad():
        logits = theirs(input_ids=ids, attention_mask=mask).logits
        if labels:
            assert max_diff(model.classify(ids, mask), logits) < TOL
            assert theirs.config.id2label == {0: "neg", 1: "pos"}
        else:
            assert max_diff(model.mlm_logits(model(ids, mask)), logits, mask) < TOL
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    texts = sentences(50)
    assert hf_tokenizer(texts)["input_ids"] == [[hf_tokenizer.cls_token_id, *tokenizer.encode(t).ids, hf_tokenizer.sep_token_id]
                                                for t in texts]
    assert hf_tokenizer.mask_token == "[MASK]" and hf_tokenizer.pad_token_id == tokenizer.token_to_id("[PAD]")
    # And back: the export imports as the same network.
    again = load_checkpoint(folder)
    with torch.no_grad():
        assert max_diff(again.model(ids, mask), model(ids, mask)) < TOL


@pytest.mark.parametrize("tokenizer_kind", ["char", "bpe"])
def test_gpt_export_loads_in_transformers_with_equal_logits_and_generates(tokenizer_kind: str, tmp_path: Path) -> None:
    tokenizer = train_tokenizer(sentences(200), tokenizer_kind, 300)
    torch.manual_seed(0)
    config = from_name("gpt-tiny", vocab_size=tokenizer.get_vocab_size(), activation="gelu_tanh")
    model = scramble(build_model(config))
    folder = export_hf(model, config, tmp_path / "out", tokenizer)
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    theirs.eval()
    ids, mask = padded_batch(tokenizer.get_vocab_size())
    with torch.no_grad():
        assert max_diff(model(ids, mask), theirs(input_ids=ids, attention_mask=mask).logits, mask) < TOL
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    texts = sentences(50)
    assert hf_tokenizer(texts)["input_ids"] == [tokenizer.encode(t).ids for t in texts]
    prompt = hf_tokenizer("the film", return_tensors="pt")
    greedy = theirs.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ours = prompt["input_ids"]
        for _ in range(5):
            ours = torch.cat([ours, model(ours)[:, -1:].argmax(-1)], dim=1)
    assert greedy.tolist() == ours.tolist()


def test_export_refuses_what_transformers_cannot_express(tmp_path: Path) -> None:
    tokenizer = train_tokenizer(sentences(50), "char")
    cases = [
        (dict(arch="gpt", position="rotary"), "position='rotary'"),
        (dict(arch="gpt", bias=False), "bias=False"),
        (dict(arch="bert", norm_position="pre"), "norm_position='pre'"),
        (dict(arch="lstm"), "arch='lstm'"),
        (dict(arch="gpt", labels=["a", "b"]), "GPT classifier"),
    ]
    for fields, message in cases:
        config = from_name("gpt-tiny" if fields["arch"] != "bert" else "bert-tiny", vocab_size=tokenizer.get_vocab_size(), **fields)
        with pytest.raises(ConfigError, match=message):
            export_hf(build_model(config), config, tmp_path / "out", tokenizer)
        assert not (tmp_path / "out").exists()


# --- bad folders: one line each --------------------------------------------------------------


@pytest.fixture()
def bert_dir(tokenizer_dirs: dict[str, Path], tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_hf(transformers.BertForMaskedLM(bert_config(tokenizer_dirs["bert"])), tokenizer_dirs["bert"], tmp_path / "bert")


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


BAD_FOLDERS = {
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "has no weights"),
    "unsupported architecture": (lambda d: edit_config(d, model_type="llama", architectures=["LlamaForCausalLM"]),
                                 "holds a 'llama' model (LlamaForCausalLM), which lmexp cannot import"),
    "weights that do not fit": (lambda d: edit_config(d, hidden_size=64), "do not fit the config"),
    "more layers than weights": (lambda d: edit_config(d, num_hidden_layers=3), "has no weight 'encoder.layer.2"),
    "tokenizer missing": (lambda d: [(d / f).unlink() for f in ("tokenizer.json", "tokenizer_config.json")], "has no tokenizer files"),
    "unsupported field": (lambda d: edit_config(d, hidden_act="relu"), "hidden_act='relu' is not supported"),
    "relative positions": (lambda d: edit_config(d, position_embedding_type="relative_key"),
                           "position_embedding_type='relative_key' is not supported"),
    "tokenizer of another model": (lambda d: edit_config(d, vocab_size=100), "tokens but config.json says vocab_size=100: save the tokenizer that belongs"),
    "corrupt weights": (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64), "cannot be read as safetensors"),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_folders_fail_in_one_line(case: str, bert_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spoil, message = BAD_FOLDERS[case]
    spoil(bert_dir)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_checkpoint(bert_dir)
    line = one_line_error(capsys, ["generate", "--ckpt", str(bert_dir), "--max_new_tokens", "1"])
    assert message.split("'")[0] in line


# --- through the command line ----------------------------------------------------------------


def test_fine_tune_an_imported_bert_then_export_it(tokenizer_dirs: dict[str, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """lmexp fit --model.pretrained <transformers folder>, then lmexp export of the result."""
    monkeypatch.setenv("LMEXP_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    hf_dir = save_hf(transformers.BertForMaskedLM(bert_config(tokenizer_dirs["bert"], max_position_embeddings=64)),
                     tokenizer_dirs["bert"], tmp_path / "hf")
    train = write_reviews(tmp_path / "train.tsv", 200)
    main(["fit", *classify_args(tmp_path / "runs", train, hf_dir, "--trainer.max_steps=20", "--trainer.val_check_interval=10"),
          "--trainer.logger=false", "--run_name=ft"])
    checkpoint = tmp_path / "runs" / "ft" / "checkpoints" / "best.ckpt"
    tuned = load_checkpoint(checkpoint)
    assert tuned.config.labels == ["0", "1"] and tuned.config.norm_position == "post"
    assert tuned.tokenizer.to_str() == load_checkpoint(hf_dir).tokenizer.to_str()  # the import's tokenizer, kept
    main(["export", str(checkpoint), str(tmp_path / "exported")])
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "exported").eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    batch = hf_tokenizer(["the film was lovely", "a dull plot"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = tuned.model.classify(batch["input_ids"], batch["attention_mask"])
        assert max_diff(ours, theirs(**batch).logits) < TOL
    line = one_line_error(capsys, ["export", str(checkpoint), str(tmp_path / "exported")])
    assert "already holds a config.json: choose another folder or pass --overwrite true" in line


def test_generate_from_an_imported_gpt2_matches_transformers_greedy(tokenizer_dirs: dict[str, Path], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Greedy decoding of an imported GPT-2 gives transformers' greedy tokens, through lmexp's
    generation and through ``lmexp generate --temperature 0``."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab_size(tokenizer_dirs["gpt2"]), n_embd=32, n_layer=2, n_head=2,
                                     n_positions=32, bos_token_id=0, eos_token_id=0)
    theirs = transformers.GPT2LMHeadModel(config)
    folder = save_hf(theirs, tokenizer_dirs["gpt2"], tmp_path / "gpt2")  # scrambled: decisive argmaxes
    prompt, new = "the film", 12
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = hf_tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)
    assert expected.shape == (1, ids.size(1) + new)  # no early stop: every step is compared
    assert len(set(expected[0, ids.size(1):].tolist())) > 1  # not one token over and over
    loaded = load_checkpoint(folder)
    assert loaded.tokenizer.encode(prompt).ids == ids[0].tolist()
    with torch.no_grad():
        ours = generate(loaded.model, ids, new, temperature=0.0)
    assert ours.tolist() == expected.tolist()
    main(["generate", "--ckpt", str(folder), "--prompt", prompt, "--max_new_tokens", str(new), "--temperature", "0"])
    assert capsys.readouterr().out.rstrip("\n") == hf_tokenizer.decode(expected[0])


@pytest.mark.parametrize("objective", ["CausalLM", "MaskedLM"])
def test_imported_language_models_train_and_test_on_text(objective: str, tokenizer_dirs: dict[str, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """lmexp fit continues a GPT-2 (causal LM) or a BERT (masked LM) on new text with the folder's
    tokenizer, and lmexp test scores the imported folder as it is."""
    monkeypatch.setenv("LMEXP_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    if objective == "CausalLM":
        config = transformers.GPT2Config(vocab_size=vocab_size(tokenizer_dirs["gpt2"]), n_embd=32, n_layer=2, n_head=2,
                                         n_positions=32, bos_token_id=0, eos_token_id=0)
        folder = save_hf(transformers.GPT2LMHeadModel(config), tokenizer_dirs["gpt2"], tmp_path / "hf")
    else:
        folder = save_hf(transformers.BertForMaskedLM(bert_config(tokenizer_dirs["bert"], max_position_embeddings=32)),
                         tokenizer_dirs["bert"], tmp_path / "hf")
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(sentences(400, seed=3)), encoding="utf-8")
    common = [f"--model=lmexp.{objective}", f"--model.pretrained={folder}", "--model.warmup_steps=2",
              "--data=lmexp.TextDataModule", f"--data.source={text}", "--data.batch_size=8", "--data.test_fraction=0.1",
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false",
              f"--trainer.default_root_dir={tmp_path / 'runs'}"]
    main(["fit", *common, "--trainer.max_steps=6", "--trainer.val_check_interval=3",
          "--trainer.check_val_every_n_epoch=null", "--run_name=continued"])
    continued = load_checkpoint(tmp_path / "runs" / "continued" / "checkpoints" / "last.ckpt")
    imported = load_checkpoint(folder)
    assert continued.tokenizer.to_str() == imported.tokenizer.to_str()
    assert continued.config == imported.config
    assert not torch.equal(continued.model.trunk.tok_emb.weight, imported.model.trunk.tok_emb.weight)  # it trained
    from lmexp.runs import build

    run = build("test", args=common, logger=False, run_name="scored")
    result = run.execute()[0]
    assert math.isfinite(result["test/loss"]) and result["test/loss"] > 0


def test_untied_bert_imports_and_exports_its_own_decoder_bias(tokenizer_dirs: dict[str, Path], tmp_path: Path) -> None:
    """transformers 5 keeps an untied decoder's bias apart from cls.predictions.bias."""
    theirs = transformers.BertForMaskedLM(bert_config(tokenizer_dirs["bert"], tie_word_embeddings=False))
    loaded = load_checkpoint(save_hf(theirs, tokenizer_dirs["bert"], tmp_path / "untied"))
    assert not loaded.config.tie_embeddings
    ids, mask = padded_batch(loaded.config.vocab_size)
    with torch.no_grad():
        assert max_diff(loaded.model.mlm_logits(loaded.model(ids, mask)), theirs(input_ids=ids, attention_mask=mask).logits) < TOL
    folder = export_hf(loaded.model, loaded.config, tmp_path / "out", loaded.tokenizer)
    again, info = transformers.AutoModelForMaskedLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        assert max_diff(again.eval()(input_ids=ids, attention_mask=mask).logits, theirs(input_ids=ids, attention_mask=mask).logits) < TOL


def test_a_config_without_model_type_imports(tokenizer_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Old BERT releases' config.json name no model_type (transformers guesses it): nor must lmexp need it."""
    theirs = transformers.BertModel(bert_config(tokenizer_dirs["bert"]))
    folder = save_hf(theirs, tokenizer_dirs["bert"], tmp_path / "old")
    config = json.loads((folder / "config.json").read_text())
    del config["model_type"], config["architectures"]
    (folder / "config.json").write_text(json.dumps(config))
    loaded = load_checkpoint(folder)
    ids, mask = padded_batch(loaded.config.vocab_size)
    with torch.no_grad():
        assert max_diff(loaded.model(ids, mask), theirs(input_ids=ids, attention_mask=mask).last_hidden_state) < TOL


def test_a_token_classifier_imports_its_encoder_and_says_the_head_is_ignored(
        tokenizer_dirs: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    theirs = transformers.BertForTokenClassification(bert_config(tokenizer_dirs["bert"], num_labels=5))
    with caplog.at_level("WARNING", logger="lmexp.huggingface"):
        loaded = load_checkpoint(save_hf(theirs, tokenizer_dirs["bert"], tmp_path / "ner"))
    assert loaded.objective == "encoder" and loaded.config.labels is None
    assert "ignored 2 weight(s) lmexp has no place for: classifier.bias, classifier.weight" in caplog.text
    ids, mask = padded_batch(loaded.config.vocab_size)
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        assert max_diff(loaded.model(ids, mask), expected) < TOL


def test_tokenizer_config_options_win_over_tokenizer_json_as_in_transformers(tokenizer_dirs: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    from lmexp.formats.huggingface import load_hf_tokenizer

    folder = tmp_path / "cased"
    shutil.copytree(tokenizer_dirs["bert"], folder)  # tokenizer.json lower-cases
    options = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**options, "do_lower_case": False}))
    texts = sentences(100)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)(texts)["input_ids"]
    assert [e.ids for e in load_hf_tokenizer(folder, "bert").encode_batch(texts)] == theirs
    assert theirs != transformers.AutoTokenizer.from_pretrained(tokenizer_dirs["bert"])(texts)["input_ids"]


def test_the_readme_python_example_runs_on_imported_folders(tokenizer_dirs: dict[str, Path], tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [block.split("```", 1)[0] for block in readme.split("```python\n")[1:]]
    example = next(block for block in blocks if "path/to/bert-folder" in block)
    bert = transformers.BertModel(bert_config(tokenizer_dirs["bert"]))
    bert_dir = save_hf(bert, tokenizer_dirs["bert"], tmp_path / "bert")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=vocab_size(tokenizer_dirs["gpt2"]), n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0,
        eos_token_id=0))
    gpt2_dir = save_hf(gpt2, tokenizer_dirs["gpt2"], tmp_path / "gpt2")
    scope: dict = {}
    exec(compile(example.replace("path/to/bert-folder", str(bert_dir)).replace("path/to/gpt2-folder", str(gpt2_dir)),
                 "README.md", "exec"), scope)
    batch = transformers.AutoTokenizer.from_pretrained(bert_dir)("a gem of a film", return_tensors="pt")
    with torch.no_grad():
        out = bert(**batch)
        assert max_diff(scope["hidden"], out.last_hidden_state) < TOL
        assert max_diff(scope["pooled"], out.pooler_output) < TOL
        hello = transformers.AutoTokenizer.from_pretrained(gpt2_dir)("Hello", return_tensors="pt")
        assert max_diff(scope["logits"], gpt2(**hello).logits) < TOL


def test_a_structurally_pruned_network_is_not_exported_to_transformers():
    from lmexp.formats.huggingface import check_exportable

    with pytest.raises(ConfigError, match="structurally pruned"):
        check_exportable(from_name("gpt-tiny", vocab_size=40, layer_heads=[1, 2]))
