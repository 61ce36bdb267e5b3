"""A process killed while it builds the token cache: nothing half-built is trusted, the next run
removes what it left and builds and trains normally."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lmexp.atomic import TEMPORARY_PREFIX
from lmexp.data.cache import build_token_cache, cache_key, verify_cache_entry
from tests.data.test_tokenizer_cache import settings_for

pytestmark = pytest.mark.fault
ROOT = Path(__file__).resolve().parents[2]

BUILD = """
import sys
from pathlib import Path
from lmexp.data.cache import build_token_cache
from tests.data.test_tokenizer_cache import settings_for
build_token_cache(Path(sys.argv[1]), settings_for(Path(sys.argv[2])), log=lambda _: None)
"""


def run_python(code: str, *args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LMEXP_FAULT", None)
    if fault:
        env["LMEXP_FAULT"] = fault
    command = [sys.executable, "-c", code, *args]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_a_build_killed_half_way_is_never_trusted_and_the_next_build_cleans_up(tiny_corpus: Path, tmp_path: Path):
    root = tmp_path / "tokens"
    killed = run_python(BUILD, str(root), str(tiny_corpus), fault="cache.write:kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    entry = root / cache_key(settings_for(tiny_corpus))
    # The kill came while the shard was written: no manifest, no shard, only a temporary.
    assert not (entry / "manifest.json").exists() and not (entry / "shards" / "00000").exists()
    left = [p.name for p in (entry / "shards").iterdir()]
    assert left and all(name.startswith(TEMPORARY_PREFIX) for name in left)
    assert "manifest.json is missing" in (verify_cache_entry(entry) or "")

    messages: list[str] = []
    cache = build_token_cache(root, settings_for(tiny_corpus), log=messages.append)
    assert any("built" in m for m in messages)
    assert [p.name for p in root.iterdir()] == [entry.name]
    assert not list(root.rglob(f"{TEMPORARY_PREFIX}*"))
    assert verify_cache_entry(cache.path, full=True) is None


def test_a_fit_killed_while_caching_trains_normally_when_run_again(tiny_corpus: Path, tmp_path: Path):
    cache_dir = tmp_path / "tokens"
    fit = (
        "import sys; from lmexp.cli import main; "
        "main(['fit', '--config', 'configs/quickstart.yaml', '--trainer.max_steps=2', '--trainer.limit_val_batches=1', "
        "'--trainer.val_check_interval=2', '--trainer.callbacks=[]', '--model.warmup_steps=1', "
        "'--data.source', sys.argv[1], '--data.cache_dir', sys.argv[2], '--trainer.default_root_dir', sys.argv[3]])"
    )
    args = (str(tiny_corpus), str(cache_dir), str(tmp_path / "runs"))
    killed = run_python(fit, *args, fault="cache.write:kill")
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    again = run_python(fit, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    entries = list(cache_dir.iterdir())
    assert len(entries) == 1 and not list(cache_dir.rglob(f"{TEMPORARY_PREFIX}*"))
    assert verify_cache_entry(entries[0], full=True) is None
