"""The architecture's import rules: models know nothing of Lightning; inference needs none of it."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

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


# ---------------------------------------------------------------- the layers of lmexp
# A module may import only from its own layer or a lower one. Lazy imports, ``if TYPE_CHECKING``
# imports and the lazy tables (``MOVED`` of lmexp.deprecation, ``_EXPORTS``: module names as the
# values of a dict literal) count like any import, so an old path or a lazy name can only point down.
# "pkg.*" matches the package and every module under it. Inside layer 5 the order is
# run_folders, recording < lightning_cli < crossval < runs.
LAYERS: dict[float, tuple[str, ...]] = {
    0: ("lmexp.errors", "lmexp.faults", "lmexp.arguments", "lmexp.deprecation", "lmexp.hardware",
        "lmexp.atomic", "lmexp.lightning_internals"),
    1: ("lmexp.models.*", "lmexp.data.*", "lmexp.generation", "lmexp.text_metrics", "lmexp.mlflow_store",
        "lmexp.system_metrics"),
    2: ("lmexp.formats.*",),
    2.5: ("lmexp.mlflow_models",),
    3: ("lmexp.checkpoints",),
    4: ("lmexp.objectives.*", "lmexp.tracking", "lmexp.guards", "lmexp.callbacks", "lmexp.strategies",
        "lmexp.prompting", "lmexp.precision"),
    5.0: ("lmexp.run_folders", "lmexp.recording"),
    5.1: ("lmexp.lightning_cli",),
    5.2: ("lmexp.crossval",),
    5.3: ("lmexp.runs",),
    6: ("lmexp.verbs.*",),
    7: ("lmexp.cli", "lmexp.__main__", "lmexp", "lmexp.huggingface", "lmexp.predict", "lmexp.chaos",
        "lmexp.cleanup"),
}
CLIENTS = ("compression", "sweeps")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules(package: str) -> dict[str, Path]:
    return {module_name(path): path for path in sorted((ROOT / package).rglob("*.py"))}


def _absolute(node: ast.ImportFrom, module: str, path: Path) -> str:
    """The module an ``ImportFrom`` names, relative forms resolved against ``module``."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(path: Path, module: str, known: set[str], package: str = "lmexp") -> list[tuple[str, int]]:
    """Every ``package`` module ``module`` may import, with the line: import statements anywhere,
    ``importlib.import_module("...")`` calls and module names as dict literal values."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(node, module, path)
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.append((sub if sub in known else source, node.lineno))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.append((node.args[0].value, node.lineno))
        elif isinstance(node, ast.Dict):
            for value in node.values:
                if isinstance(value, ast.Constant) and isinstance(value.value, str) and value.value.startswith(
                        f"{package}."):
                    found.append((value.value, value.lineno))
    return [(name, line) for name, line in found if name.split(".")[0] == package and name != module]


def import_graph(package: str = "lmexp") -> dict[str, list[tuple[str, int]]]:
    """Each module of ``package`` -> the modules of that package it imports, with the line."""
    modules = package_modules(package)
    known = set(modules)
    return {name: _targets(path, name, known, package) for name, path in modules.items()}


def layer_of(module: str) -> float | None:
    for layer, patterns in LAYERS.items():
        for pattern in patterns:
            if module == pattern or (pattern.endswith(".*") and (module + ".").startswith(pattern[:-1])):
                return layer
            if pattern.endswith(".*") and module == pattern[:-2]:
                return layer
    return None


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    cycles = []
    for component in components:  # the shortest cycle through the component's first module, then its members
        members, start = set(component), component[0]
        parents: dict[str, str] = {}
        frontier, back = [start], None
        while frontier and back is None:
            following = []
            for node in frontier:
                for nxt in sorted(graph[node] & members):
                    if nxt == start:
                        back = node
                        break
                    if nxt not in parents:
                        parents[nxt] = node
                        following.append(nxt)
                if back is not None:
                    break
            frontier = following
        cycle = [start]
        node = back
        while node != start:
            cycle.insert(1, node)
            node = parents[node]
        cycles.append(cycle + [start, f"(all of: {', '.join(component)})"])
    return cycles


@pytest.mark.parametrize("package", ["lmexp", *CLIENTS])
def test_no_import_cycle(package):
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    graph = import_graph(package)
    edges = {name: {target for target, _ in targets if target in graph} for name, targets in graph.items()}
    cycles = find_cycles(edges)
    assert not cycles, f"import cycles in {package}:\n" + "\n".join(" -> ".join(cycle[:-1]) + " " + cycle[-1] for cycle in cycles)


def test_lmexp_imports_only_down_the_layers():
    graph = import_graph()
    unplaced = sorted(name for name in graph if layer_of(name) is None)
    assert not unplaced, f"modules in no layer: {', '.join(unplaced)}: add each to LAYERS in {Path(__file__).name}"
    offences = []
    for name, targets in sorted(graph.items()):
        for target, line in targets:
            if target not in graph:
                offences.append(f"{module_name_path(name)}:{line} imports {target}, which does not exist")
            elif layer_of(target) > layer_of(name):
                offences.append(f"{module_name_path(name)}:{line} (layer {layer_of(name):g}) imports {target} "
                                f"(layer {layer_of(target):g})")
    offences = list(dict.fromkeys(offences))
    assert not offences, "imports that point up the layers:\n" + "\n".join(offences)


def module_name_path(module: str) -> str:
    path = ROOT / Path(*module.split("."))
    return str((path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).relative_to(ROOT))


# ---------------------------------------------------------------- what clients may import


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def lmexp_uses(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name) for each lmexp name a client file uses; name None: the module itself."""
    tree = ast.parse(path.read_text())
    uses: list[tuple[int, str, str | None]] = []
    aliases: dict[str, str] = {}  # local name -> lmexp module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "lmexp":
            for alias in node.names:
                uses.append((node.lineno, node.module, alias.name))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "lmexp":
                    continue
                uses.append((node.lineno, alias.name, None))
                if alias.asname:
                    aliases[alias.asname] = alias.name
                else:
                    aliases["lmexp"] = "lmexp"
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or isinstance(getattr(node, "_parent_attr", None), ast.Attribute):
            continue
        dotted = _dotted(node)
        if dotted is None or dotted.split(".")[0] not in aliases:
            continue
        head, *rest = dotted.split(".")
        module = aliases[head]
        for i, part in enumerate(rest):  # walk down submodules named in the chain to the first name
            candidate = f"{module}.{part}"
            if (ROOT / Path(*candidate.split("."))).is_dir() or (ROOT / Path(*candidate.split("."))).with_suffix(
                    ".py").exists():
                module = candidate
                continue
            uses.append((node.lineno, module, part))
            break
    return sorted(set(uses), key=lambda use: (use[0], use[1], use[2] or ""))


def test_clients_import_only_the_declared_api():
    """compression/ and sweeps/ use lmexp as any client would: modules in lmexp.CLIENT_MODULES, and
    from them only the names in their ``__all__``; everything else may change without notice.
    benchmarks/ are left out: they time lmexp's inner pieces on purpose."""
    import importlib
    import warnings

    import lmexp

    allowed = set(lmexp.CLIENT_MODULES)
    offences = []
    for client in CLIENTS:
        for path in sorted((ROOT / client).rglob("*.py")):
            for line, module, name in lmexp_uses(path):
                where = f"{path.relative_to(ROOT)}:{line}"
                if name is not None and f"{module}.{name}" in allowed | set(package_modules("lmexp")):
                    module, name = f"{module}.{name}", None
                if module not in allowed:
                    offences.append(f"{where} uses {module}, not in lmexp.CLIENT_MODULES")
                    continue
                if name is None:
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    declared = getattr(importlib.import_module(module), "__all__", ())
                if name not in declared:
                    offences.append(f"{where} uses {module}.{name}, not in {module}.__all__")
    offences = list(dict.fromkeys(offences))
    assert not offences, "client imports outside lmexp's declared API:\n" + "\n".join(offences)


def test_the_client_api_is_declared_and_resolves():
    """Each client module declares ``__all__`` and has every name in it; ``lmexp`` exports what it lists."""
    import importlib
    import warnings

    import lmexp

    assert sorted(lmexp.__all__) == sorted([*lmexp._EXPORTS, "CLIENT_MODULES"])
    missing = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the client API serves no old path
        for module_path in lmexp.CLIENT_MODULES:
            module = importlib.import_module(module_path)
            declared = getattr(module, "__all__", None)
            if declared is None:
                missing.append(f"{module_path} declares no __all__")
                continue
            missing += [f"{module_path}.{name}" for name in declared if not hasattr(module, name)]
    assert not missing, "client API names that do not resolve: " + ", ".join(missing)


def deprecated_paths() -> tuple[set[str], set[str]]:
    """Whole modules kept only as shims (they call ``warn_moved`` at import), and old ``module.name``
    paths of the ``MOVED`` tables."""
    shims, moved = set(), set()
    for name, path in package_modules("lmexp").items():
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and _dotted(node.value.func) in (
                    "warn_moved", "deprecation.warn_moved", "lmexp.deprecation.warn_moved"):
                shims.add(name)
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign) else []
            if any(isinstance(t, ast.Name) and t.id == "MOVED" for t in targets) and isinstance(node.value, ast.Dict):
                moved.update(f"{name}.{key.value}" for key in node.value.keys if isinstance(key, ast.Constant))
    return shims, moved


def test_nothing_outside_tests_uses_a_deprecated_path():
    """Old paths exist for users' code; lmexp, its clients and the benchmarks use the new ones."""
    shims, moved = deprecated_paths()
    offences = []
    for folder in ("lmexp", *CLIENTS, "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if module_name(path) in shims:
                continue
            modules = package_modules("lmexp")
            for line, module, name in lmexp_uses(path) + [
                    (line, target, None) for target, line in _targets(path, module_name(path), set(modules))]:
                if module in shims or f"{module}.{name}" in moved:
                    offences.append(f"{path.relative_to(ROOT)}:{line} uses {module}{'.' + name if name else ''}")
    assert not offences, "deprecated paths in use:\n" + "\n".join(sorted(set(offences)))


# ---------------------------------------------------------------- Lightning's private API
INTERNALS = ROOT / "lmexp" / "lightning_internals.py"
LIGHTNING_ROOTS = ("lightning", "pytorch_lightning")
# Where Lightning's public classes live: every class these modules export is scanned, with its bases.
LIGHTNING_MODULES = ("lightning.pytorch", "lightning.pytorch.callbacks", "lightning.pytorch.callbacks.progress",
                     "lightning.pytorch.loops", "lightning.pytorch.loops.progress", "lightning.pytorch.loggers",
                     "lightning.pytorch.strategies", "lightning.pytorch.plugins", "lightning.pytorch.cli",
                     "lightning.pytorch.profilers", "lightning.pytorch.accelerators", "lightning.pytorch.core")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_names(cls: type) -> set[str]:
    """Underscore names that Lightning's classes among ``cls`` and its bases define: attributes and
    what their methods assign to ``self._x`` (instance attributes such as ``Trainer._logger_connector``).
    Names from torch's ``nn.Module`` are torch's, not Lightning's, and are left out."""
    import inspect
    import textwrap

    names = set()
    for klass in cls.__mro__:
        if klass.__module__.split(".")[0] not in (*LIGHTNING_ROOTS, "jsonargparse", "argparse"):
            continue
        names |= {name for name in vars(klass) if _private(name)}
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _private(node.attr)
                    and isinstance(node.value, ast.Name) and node.value.id == "self"):
                names.add(node.attr)
    return names


def lightning_classes() -> dict[str, type]:
    """Every class Lightning exports from its public modules, by qualified name."""
    import importlib
    import inspect

    classes = {}
    for module_path in LIGHTNING_MODULES:
        module = importlib.import_module(module_path)
        for name in dir(module):
            value = getattr(module, name)
            if inspect.isclass(value) and value.__module__.split(".")[0] in LIGHTNING_ROOTS and not _private(name):
                classes[f"{module_path}.{name}"] = value
    return classes


class _Source:
    """One scanned file: which local names are bound to what (``import``), and its classes' bases."""

    def __init__(self, path: Path, text: str | None = None) -> None:
        self.path = path
        self.module = module_name(path)
        self.tree = ast.parse(path.read_text() if text is None else text)
        self.bound: dict[str, str] = {}
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        self.bound[alias.asname] = alias.name
                    else:
                        self.bound[alias.name.split(".")[0]] = alias.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom):
                source = _absolute(node, self.module, path)
                for alias in node.names:
                    self.bound[alias.asname or alias.name] = f"{source}.{alias.name}"
        self.classes = {node.name: node for node in ast.walk(self.tree) if isinstance(node, ast.ClassDef)}

    def qualify(self, node: ast.AST) -> str | None:
        dotted = _dotted(node)
        if dotted is None:
            return None
        head, _, rest = dotted.partition(".")
        if head in self.bound:
            return self.bound[head] + (f".{rest}" if rest else "")
        if head in self.classes:
            return f"{self.module}.{dotted}"
        return dotted


def _resolve_lightning(qualified: str) -> type | None:
    import importlib

    parts = qualified.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for part in parts[cut:]:
                value = getattr(value, part)
        except AttributeError:
            return None
        return value if isinstance(value, type) else None
    return None


# Uses of an underscore name that Lightning also has, on a receiver the scan cannot prove is an lmexp
# object: {"path/from/root.py": {"_name": "why the object is lmexp's"}}. Each entry must be in use.
PRIVATE_ALLOWED: dict[str, dict[str, str]] = {}


def _binding_names(tree: ast.AST) -> set[str]:
    """Names bound other than by a store: parameters, imports, definitions, ``except ... as``,
    ``global``. A receiver with such a binding anywhere in the file is not provably lmexp's."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.ExceptHandler)):
            names.add(node.name or "")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            names.update(node.names)
    return names


def _attribute_use(node: ast.AST) -> tuple[ast.AST, str] | None:
    """(receiver, name) for ``receiver.name`` and ``getattr(receiver, "name")`` (or set/has/del)."""
    if isinstance(node, ast.Attribute):
        return node.value, node.attr
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
        return node.args[0], node.args[1].value
    return None


def private_lightning_uses(extra: dict[str, str] | None = None) -> list[str]:
    """Every use of Lightning's private API outside lightning_internals.py; ``extra`` adds files
    (path from the root -> source text) to the scan."""
    sources = {}
    for folder in ("lmexp", *CLIENTS):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path != INTERNALS:
                sources[module_name(path)] = _Source(path)
    for relative, text in (extra or {}).items():
        source = _Source(ROOT / relative, text)
        sources[source.module] = source
    everything = set().union(*(private_names(cls) for cls in lightning_classes().values()))

    inherited: dict[str, set[str] | None] = {}  # "module.Class" -> Lightning's private names it inherits

    def lmexp_class(qualified: str) -> str | None:
        """``module.Class`` where an lmexp (or client) module defines ``qualified``, else None."""
        module, _, cls_name = qualified.rpartition(".")
        if module not in sources:
            return None
        if cls_name in sources[module].classes:
            return qualified
        if cls_name in sources[module].bound:  # a class re-exported by a package
            return lmexp_class(sources[module].bound[cls_name])
        return None

    def lightning_privates(qualified: str) -> set[str]:
        if qualified in inherited:
            return inherited[qualified] or set()
        inherited[qualified] = None  # a guard against cycles of names
        names: set[str] = set()
        module, _, cls_name = qualified.rpartition(".")
        if qualified.split(".")[0] in LIGHTNING_ROOTS:
            cls = _resolve_lightning(qualified)
            names = private_names(cls) if cls is not None else set()
        elif module in sources and cls_name in sources[module].classes:
            source = sources[module]
            for base in source.classes[cls_name].bases:
                base_name = source.qualify(base)
                if base_name:
                    names |= lightning_privates(base_name)
        elif module in sources and cls_name in sources[module].bound:
            names = lightning_privates(sources[module].bound[cls_name])
        inherited[qualified] = names
        return names

    def owned(qualified: str, seen: frozenset[str] = frozenset()) -> set[str]:
        """The underscore names an lmexp class and its lmexp bases define, less Lightning's."""
        source = sources[qualified.rpartition(".")[0]]
        cls = source.classes[qualified.rpartition(".")[2]]
        names: set[str] = set()
        for node in ast.walk(cls):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _private(node.name):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _private(node.attr):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and _private(node.id):
                names.add(node.id)
        for base in cls.bases:
            base_name = source.qualify(base)
            base_class = lmexp_class(base_name) if base_name else None
            if base_class and base_class not in seen:
                names |= owned(base_class, seen | {qualified})
        return names - lightning_privates(qualified)

    def receivers(source: _Source) -> dict[str, set[str]]:
        """What each receiver (``name`` or ``self.attr``) is assigned in the file: the lmexp classes
        it is built from, or "?" for anything else (another value, a parameter, a loop target...)."""
        kinds: dict[str, set[str]] = {name: {"?"} for name in _binding_names(source.tree)}
        built: dict[int, str] = {}  # id of an assignment target -> the lmexp class assigned to it
        for node in ast.walk(source.tree):
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Call):
                qualified = source.qualify(node.value.func)
                cls = lmexp_class(qualified) if qualified else None
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if cls and len(targets) == 1:
                    built[id(targets[0])] = cls
        for node in ast.walk(source.tree):
            if isinstance(node, (ast.Name, ast.Attribute)) and isinstance(node.ctx, (ast.Store, ast.Del)):
                key = _dotted(node)
                if key and (isinstance(node, ast.Name) or key.count(".") == 1 and key.startswith("self.")):
                    kinds.setdefault(key, set()).add(built.get(id(node), "?"))
        return kinds

    def lmexps(receiver: ast.AST, name: str, kinds: dict[str, set[str]]) -> bool:
        """Whether ``receiver.<name>`` is provably an lmexp object's own name."""
        key = _dotted(receiver)
        if key in ("self", "cls"):
            return True  # a Lightning subclass's own uses are checked class by class below
        classes = kinds.get(key or "", {"?"})
        return "?" not in classes and all(name in owned(cls) for cls in classes)

    offences, allowed_used = [], set()
    for source in sources.values():
        where = source.path.relative_to(ROOT)
        for node in ast.walk(source.tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                root = (node.module or "") if isinstance(node, ast.ImportFrom) else ""
                names = [f"{root}.{alias.name}" if root else alias.name for alias in node.names]
                for name in names:
                    if name.split(".")[0] in LIGHTNING_ROOTS and any(_private(part) for part in name.split(".")):
                        offences.append(f"{where}:{node.lineno} imports {name}")
        for cls in source.classes.values():  # overriding or setting Lightning's private names in a subclass
            theirs = lightning_privates(f"{source.module}.{cls.name}")
            for node in ast.walk(cls):
                used = _attribute_use(node)
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in theirs:
                    offences.append(f"{where}:{node.lineno} {cls.name} overrides Lightning's {node.name}")
                elif used and used[1] in theirs and _dotted(used[0]) in ("self", "cls"):
                    offences.append(f"{where}:{node.lineno} {cls.name} uses Lightning's self.{used[1]}")
        kinds = receivers(source)
        allowed = PRIVATE_ALLOWED.get(str(where), {})
        for node in ast.walk(source.tree):  # private attributes of other objects: trainer._x, super()._x
            used = _attribute_use(node)
            if used is None:
                continue
            receiver, name = used
            if name not in everything or lmexps(receiver, name, kinds):
                continue
            if name in allowed:
                allowed_used.add((str(where), name))
            else:
                offences.append(f"{where}:{node.lineno} uses {ast.unparse(node)}")
    offences += [f"PRIVATE_ALLOWED[{path!r}][{name!r}] matches no use: drop it"
                 for path, names in PRIVATE_ALLOWED.items() for name in names if (path, name) not in allowed_used]
    return sorted(set(offences))


def test_lightning_private_api_only_in_lightning_internals():
    """Lightning changes its underscore names without notice: one module holds every use of them, and
    tests/test_lightning_internals.py checks each against the installed version."""
    offences = private_lightning_uses()
    assert not offences, (f"private Lightning API outside {INTERNALS.relative_to(ROOT)}:\n" + "\n".join(offences))


PRIVATE_PROBE = '''
from lmexp.callbacks import StopTogether
from lmexp.tracking import MLflowTracker
from sweeps.worker import Worker


def lightnings(trainer, logger, store):
    trainer.strategy._launcher.kill(15)
    trainer._run(None)
    getattr(trainer, "_logger_connector")
    store._store  # a parameter: any object
    return logger._save_dir


def reassigned(trainer):
    stopper = StopTogether()
    stopper = trainer.strategy
    return stopper._launcher


class Owner:
    def __init__(self):
        self.stopper = StopTogether()

    def lmexps(self):
        tracker = MLflowTracker()
        worker: Worker = Worker()
        return tracker._store, self.stopper._launcher, getattr(self.stopper, "_launcher"), worker._run(None)
'''


def test_private_api_scan_tells_lightnings_objects_from_lmexps():
    """An underscore name lmexp's own classes define is exempt only on a receiver built from one."""
    offences = private_lightning_uses({"lmexp/private_probe.py": PRIVATE_PROBE})
    found = {offence.partition(" uses ")[2] for offence in offences if offence.startswith("lmexp/private_probe.py")}
    assert found == {"trainer.strategy._launcher", "trainer._run", "getattr(trainer, '_logger_connector')",
                     "store._store", "logger._save_dir", "stopper._launcher"}
