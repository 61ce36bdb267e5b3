"""The architecture's import rules: models know nothing of Lightning; inference needs none of it."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAINING_STACK = ("lightning", "pytorch_lightning", "torchmetrics")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_models_import_only_torch_stdlib_and_themselves():
    allowed_roots = {"torch", "lmexp", "__future__"} | set(sys.stdlib_module_names)
    for path in sorted((ROOT / "lmexp" / "models").glob("*.py")):
        for name in imported_modules(path):
            root = name.split(".")[0]
            assert root in allowed_roots, f"{path.name} imports {name}"
            if root == "lmexp":
                assert name.startswith("lmexp.models") or name == "lmexp.errors", f"{path.name} imports {name}"


def test_inference_path_loads_without_the_training_stack():
    code = (
        "import sys, lmexp.models, lmexp.checkpoints, lmexp.generation, lmexp.cli, lmexp.data.cache, lmexp.mlflow_store;"
        f"print([m for m in sys.modules if m.split('.')[0] in {TRAINING_STACK!r}])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]"


def test_lmexp_never_imports_its_clients():
    """sweeps (and compression) use lmexp's public API; lmexp knows nothing of them."""
    for path in sorted((ROOT / "lmexp").rglob("*.py")):
        for name in imported_modules(path):
            assert name.split(".")[0] not in ("sweeps", "compression"), f"{path.relative_to(ROOT)} imports {name}"


def test_sweeps_import_no_private_lmexp_module():
    for path in sorted((ROOT / "sweeps").glob("*.py")):
        for name in imported_modules(path):
            private = [part for part in name.split(".") if part.startswith("_") and part != "__future__"]
            assert not private, f"{path.name} imports {name}"
