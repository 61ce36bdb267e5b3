"""Shared fixtures: tiny generated corpora, isolated caches, quiet CPU trainers."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

# Import Lightning (and the optional packages torchmetrics pulls in, such as transformers) while
# pytest's session-wide capture is active: their loggers bind to sys.stderr at import, and one
# bound inside a capsys test would keep writing to that test's closed stream.
import lightning.pytorch  # noqa: F401, E402

SUBJECTS = ["the cat", "a dog", "the old king", "my friend", "the small bird", "our teacher"]
VERBS = ["sees", "likes", "follows", "finds", "hears", "paints"]
OBJECTS = ["the moon", "a red ball", "the river", "an open door", "the garden", "a quiet song"]


def make_corpus(n_paragraphs: int = 200, seed: int = 0) -> str:
    """Deterministic grammatical text: learnable structure, a few dozen words."""
    rng = random.Random(seed)
    paragraphs = []
    for i in range(n_paragraphs):
        sentences = [
            f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}." for _ in range(rng.randint(2, 4))
        ]
        paragraphs.append(f"Part {i}.\n" + " ".join(sentences).capitalize())
    return "\n\n".join(paragraphs) + "\n"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own token cache, so no test sees another's files."""
    cache = tmp_path / "lmexp-cache"
    monkeypatch.setenv("LMEXP_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="session")
def tracking_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite tracking store for the session: MLflow creates its schema once (~1.5 s)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def isolated_tracking(tracking_store: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs are tracked in the session's store, never in a mlflow.db of the working directory."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_store)
    return tracking_store


@pytest.fixture(autouse=True)
def restore_torch_state():
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


@pytest.fixture
def restore_signal_handlers():
    """Lightning leaves SIGINT ignored after a Ctrl-C (for its shutdown): tests that signal put the handlers back.

    A Ctrl-C needs Python's own SIGINT handler, which a process started in the background by a
    shell without job control never gets (it starts with SIGINT ignored): the test installs it.
    """
    import signal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(make_corpus())
    return path


@pytest.fixture
def cpu_trainer_kwargs(tmp_path: Path) -> dict:
    return {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
    }


def shared_data(name: str) -> Path:
    """A file from the shared real-data folder; fails (never skips) when it is missing."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / name
    if not path.exists():
        pytest.fail(f"real data {path} is missing: slow tests need the shared data folder beside the project")
    return path


@pytest.fixture
def fault(monkeypatch: pytest.MonkeyPatch):
    """Arm ``LMEXP_FAULT`` (lmexp.faults) in this process: ``fault("export.write:enospc")``;
    disarmed afterwards."""
    from lmexp import faults

    def arm(value: str) -> None:
        monkeypatch.setenv(faults.FAULT_VARIABLE, value)
        faults.reload()

    yield arm
    monkeypatch.delenv(faults.FAULT_VARIABLE, raising=False)
    faults.reload()
