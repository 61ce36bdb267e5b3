"""``lmexp data prepare``: the token cache a fit would build, built ahead of it, in parts if asked."""

from pathlib import Path

import numpy as np
import pytest

from lmexp.cli import main
from lmexp.data.cache import PrepareReport, TokenCache
from lmexp.data.datamodule import TextDataModule
from lmexp.verbs.data import run as data_verb
from tests.conftest import make_corpus
from tests.helpers import one_line_error

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def test_help_names_the_sub_verb_and_its_options(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["data", "--help"])
    assert stop.value.code == 0 and "prepare" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        main(["data", "prepare", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert stop.value.code == 0
    assert "--shard k/N" in out and "--workers W" in out and "lmexp fit --help" in out


@pytest.mark.parametrize("value", ["2/2", "1/0", "a/b", "1", "-1/2", "0/-2", "1/2/3"])
def test_a_bad_shard_value_is_one_line_naming_it_and_the_form(capsys, value):
    message = one_line_error(capsys, ["data", "prepare", "--config", QUICKSTART, "--shard", value])
    assert f"{value!r}" in message and "k/N with 0 <= k < N" in message


def test_an_unknown_sub_verb_is_one_line(capsys):
    assert "invalid choice: 'build'" in one_line_error(capsys, ["data", "build", "--config", QUICKSTART])


def test_workers_must_be_positive(capsys):
    assert "--workers=0 must be a positive integer" in one_line_error(
        capsys, ["data", "prepare", "--config", QUICKSTART, "--workers", "0"])


def test_a_classification_table_needs_no_preparing(tmp_path, capsys):
    table = tmp_path / "train.tsv"
    table.write_text("sentence\tlabel\na good film\t1\na bad film\t0\n")
    message = one_line_error(capsys, [
        "data", "prepare", "--config", str(ROOT / "configs" / "sst2_bert.yaml"), "--model.init_args.pretrained=null",
        f"--data.train={table}", "--data.test=null",
    ])
    assert "token cache of a text corpus" in message and "ClassificationDataModule" in message


def test_prepare_builds_for_the_data_fit_would_configure(tmp_path, capsys, monkeypatch):
    """The data module is the one fit would make, bound to the model's contract, and told which
    part to build and with how many workers."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus(50))
    seen = {}

    def prepare_cache(self, part=None, workers=None, log=print):
        seen.update(part=part, workers=workers, source=self.source, block_size=self.resolved_block_size(),
                    task=self.resolved_task())
        return PrepareReport(entry=tmp_path / "entry", built=[1, 3], present=[0], missing=[2], complete=False)

    monkeypatch.setattr(TextDataModule, "prepare_cache", prepare_cache, raising=False)
    main(["data", "prepare", "--config", QUICKSTART, f"--data.source={corpus}", "--shard", "1/2", "--workers", "3"])
    assert seen == {"part": (1, 2), "workers": 3, "source": str(corpus), "block_size": 128, "task": "causal_lm"}
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == (f"token cache {tmp_path / 'entry'}: 2 shards built, 1 already present, 1 missing: "
                    "1 shard still to build: run the other --shard parts")

    monkeypatch.setattr(TextDataModule, "prepare_cache", lambda self, part=None, workers=None, log=print:
                        PrepareReport(entry=tmp_path / "entry", built=[0], present=[], missing=[], complete=True))
    main(["data", "prepare", "--config", QUICKSTART, f"--data.source={corpus}"])
    assert capsys.readouterr().out.splitlines()[-1].endswith(": 1 shard built, 0 already present, 0 missing: complete")


def cache_files(root: Path) -> dict[str, int]:
    """What a token cache root holds that a build writes: each file and when it was written."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and p.name != "build.log" and not p.name.endswith(".lock")}


def test_fit_after_prepare_reads_the_prepared_cache_without_building(tmp_path, capsys, caplog, isolated_cache):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus(200))
    data = [f"--data.source={corpus}"]
    report = data_verb(["prepare", "--config", QUICKSTART, *data])
    out = capsys.readouterr().out
    assert out.splitlines()[-1].endswith(": complete") and f"token cache {report.entry}:" in out
    before = cache_files(isolated_cache)
    assert (report.entry / "manifest.json").is_file() and any(name.endswith(".bin") for name in before)

    caplog.set_level("INFO")
    main(["fit", "--config", QUICKSTART, *data, "--trainer.max_steps=2", "--model.warmup_steps=1",
          "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path / 'runs'}",
          "--trainer.enable_progress_bar=false"])
    assert f"token cache hit: {report.entry}" in caplog.text
    assert cache_files(isolated_cache) == before  # nothing rebuilt, nothing added

    again = data_verb(["prepare", "--config", QUICKSTART, *data])  # a second prepare finds it all there
    assert again.entry == report.entry and again.built == [] and again.complete
    assert capsys.readouterr().out.splitlines()[-1].endswith("0 missing: complete")


def test_shard_parts_on_several_machines_make_one_complete_entry(tmp_path, capsys, isolated_cache):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(4):
        (folder / f"part{i}.txt").write_text(make_corpus(60, seed=i))
    sizes = [path.stat().st_size for path in folder.iterdir()]
    assert 2 * min(sizes) > max(sizes)  # shards of the largest file's size: one file each, four shards
    argv = ["prepare", "--config", QUICKSTART, f"--data.source={folder}", "--workers", "1",
            f"--data.shard_mb={max(sizes) / 1e6}"]

    first = data_verb([*argv, "--shard", "1/2"])
    assert first.built == [1, 3] and first.missing == [0, 2] and not first.complete
    assert not (first.entry / "manifest.json").exists()  # a fit would still build the rest
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"token cache {first.entry}: 2 shards built, 0 already present, 2 missing: "
        "2 shards still to build: run the other --shard parts")

    second = data_verb([*argv, "--shard", "0/2"])
    assert second.entry == first.entry and second.built == [0, 2] and second.missing == [] and second.complete
    assert (second.entry / "manifest.json").is_file()
    assert capsys.readouterr().out.splitlines()[-1].endswith("2 shards built, 0 already present, 0 missing: complete")

    # The entry is the one a single prepare builds: the same key, the same tokens.
    whole = tmp_path / "whole-cache"
    single = data_verb([*argv, f"--data.cache_dir={whole}"])
    assert single.entry.name == first.entry.name and single.built == [0, 1, 2, 3]
    for split in ("train", "val"):
        np.testing.assert_array_equal(np.asarray(TokenCache.load(single.entry).tokens(split)[:]),
                                      np.asarray(TokenCache.load(first.entry).tokens(split)[:]))
