"""Fixtures of the sweep tests: a tiny fit config, sweep files, and a PostgreSQL server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_corpus

ROOT = Path(__file__).resolve().parents[2]
SIZES = {
    "small": {"model.init_args.network_overrides.n_layer": 1, "model.init_args.network_overrides.n_embd": 16,
              "model.init_args.network_overrides.n_head": 2},
    "medium": {"model.init_args.network_overrides.n_layer": 2, "model.init_args.network_overrides.n_embd": 32,
               "model.init_args.network_overrides.n_head": 4},
}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder to sweep in, holding a tiny corpus and a 20-step fit config."""
    (tmp_path / "corpus.txt").write_text(make_corpus(120))
    fit = {
        "seed_everything": 1,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 20, "val_check_interval": 10,
                    "check_val_every_n_epoch": None, "limit_val_batches": 2, "log_every_n_steps": 5,
                    "enable_model_summary": False},
        "model": {"class_path": "lmexp.CausalLM", "init_args": {"network": "gpt-tiny", "lr": 3e-3, "warmup_steps": 2}},
        "data": {"class_path": "lmexp.TextDataModule",
                 "init_args": {"source": "corpus.txt", "tokenizer": "char", "batch_size": 4}},
    }
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(fit))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return tmp_path


def write_sweep(folder: Path, name: str = "sweep", **settings) -> Path:
    """A sweep file over fit.yaml: lr and model size, 3 trials, unless ``settings`` say otherwise."""
    sweep = {
        "study": name,
        "fit": {"config": ["fit.yaml"]},
        "n_trials": 3,
        "sampler": {"name": "random", "seed": 0},
        "space": {"model.init_args.lr": {"low": 1e-3, "high": 1e-2, "log": True}, "size": {"choices": SIZES}},
    }
    sweep.update(settings)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def sweeps_command(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "sweeps", *args], capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"sweeps {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def _postgres_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return versions[-1].parent if versions else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server on 127.0.0.1 for this session (Debian's package; .ci/run installs it).

    Skipped where PostgreSQL is not installed, unless LMEXP_REQUIRE_POSTGRES=1 (set by CI) makes
    that a failure. As root, the server runs as the ``postgres`` user, as PostgreSQL requires.
    """
    binaries = _postgres_bin()
    if binaries is None:
        if os.environ.get("LMEXP_REQUIRE_POSTGRES") == "1":
            pytest.fail("PostgreSQL is not installed (apt-get install -y postgresql)")
        pytest.skip("PostgreSQL is not installed (apt-get install -y postgresql); CI installs it")
    folder = Path(tempfile.mkdtemp(prefix="lmexp-pg-"))
    folder.chmod(0o755)
    data, sockets = folder / "data", folder / "sockets"
    sockets.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        shutil.chown(sockets, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()

    def run(*command: str) -> None:
        subprocess.run([*as_user, *command], check=True, capture_output=True, timeout=120)

    run(str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync")
    run(str(binaries / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w", "-o",
        f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        run(str(binaries / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "sweeps")
        yield f"postgresql://postgres@127.0.0.1:{port}/sweeps"
    finally:
        subprocess.run([*as_user, str(binaries / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)
