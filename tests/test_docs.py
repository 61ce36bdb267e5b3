"""The README's Layout names every module of the packages, and nothing that is gone, in the order
the imports run; its examples are the shipped files."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lmexp", "sweeps", "compression")


def layout_block(readme: str) -> list[str]:
    """The lines of the code block under the README's ``## Layout`` heading."""
    section = readme.split("\n## Layout\n", 1)
    assert len(section) == 2, "README.md has no '## Layout' section"
    match = re.search(r"```\n(.*?)\n```", section[1], re.DOTALL)
    assert match, "README.md's Layout section has no code block"
    return match.group(1).splitlines()


def named_paths(lines: list[str]) -> set[str]:
    """Paths the tree names: two spaces of indent per level, a trailing slash for a folder."""
    stack: list[str] = []
    paths = set()
    for line in lines:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        assert indent % 2 == 0, f"odd indent in the Layout tree: {line!r}"
        depth = indent // 2
        name = line.split()[0]
        del stack[depth:]
        assert len(stack) == depth, f"Layout line deeper than its parent allows: {line!r}"
        path = "/".join([*stack, name.rstrip("/")])
        paths.add(path)
        if name.endswith("/"):
            stack.append(name.rstrip("/"))
    return paths


def modules_on_disk() -> set[str]:
    return {
        path.relative_to(ROOT).as_posix()
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if path.name != "__init__.py"
    }


def test_layout_tree_parses_folders_and_files() -> None:
    tree = ["a/", "  b/   text", "    c.py  text", "  d.py", "e/"]
    assert named_paths(tree) == {"a", "a/b", "a/b/c.py", "a/d.py", "e"}


def test_readme_layout_names_every_module_and_no_missing_one() -> None:
    named = named_paths(layout_block((ROOT / "README.md").read_text(encoding="utf-8")))
    on_disk = modules_on_disk()
    missing = sorted(on_disk - named)
    gone = sorted(path for path in named if path.endswith(".py") and path not in on_disk)
    assert not missing, f"modules the README's Layout does not name: {missing}"
    assert not gone, f"the README's Layout names modules that do not exist: {gone}"
    for package in PACKAGES:
        assert package in named


def lmexp_entries(lines: list[str]) -> list[tuple[str, str]]:
    """The top-level entries under ``lmexp/`` in the tree, in order: (module prefix, description)."""
    entries, inside = [], False
    for line in lines:
        if not line.startswith(" "):
            inside = line.startswith("lmexp/")
            continue
        if inside and line.startswith("  ") and not line.startswith("    "):
            name, _, description = line.strip().partition(" ")
            entries.append(("lmexp." + name.removesuffix(".py").removesuffix("/"), description.strip()))
    return entries


def lmexp_imports(path: Path) -> set[str]:
    """The lmexp modules a file imports anywhere in it (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.update([node.module, *(f"{node.module}.{alias.name}" for alias in node.names)])
    return {name for name in names if name.startswith("lmexp.")}


def upward_in_tree(entries: list[tuple[str, str]]) -> list[str]:
    """Imports of an entry listed above the importing one (deprecated paths, listed last, excepted)."""
    position = {name: i for i, (name, _) in enumerate(entries)}
    problems = []
    for i, (name, description) in enumerate(entries):
        if description.startswith("deprecated"):
            continue
        folder = ROOT / Path(*name.split("."))
        files = sorted(folder.rglob("*.py")) if folder.is_dir() else [folder.with_suffix(".py")]
        for path in files:
            for imported in lmexp_imports(path):
                parts = imported.split(".")
                target = next((".".join(parts[:n]) for n in range(len(parts), 1, -1) if ".".join(parts[:n]) in position), None)
                if target is not None and position[target] < i:
                    problems.append(f"{path.relative_to(ROOT)} imports {imported}, listed above it")
    return problems


def test_readme_layout_lists_lmexp_from_the_top_layer_down() -> None:
    entries = lmexp_entries(layout_block((ROOT / "README.md").read_text(encoding="utf-8")))
    assert entries[0][0] == "lmexp.__main__" and len(entries) > 20
    assert upward_in_tree(entries) == []


def test_upward_in_tree_finds_an_import_of_an_entry_listed_above() -> None:
    entries = [("lmexp.errors", "one-line errors"), ("lmexp.cli", "the verbs")]
    assert "lmexp/cli.py imports lmexp.errors.find_user_error, listed above it" in upward_in_tree(entries)
    assert upward_in_tree(entries[::-1]) == []


def test_readme_sweep_example_is_the_shipped_study() -> None:
    """The README shows the shipped sweep file under its name: the two must say the same."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```yaml\n(.*?)\n```", readme, re.DOTALL) if "study: shakespeare-lr-size" in b]
    assert len(blocks) == 1, "README.md should show configs/sweeps/shakespeare-lr-size.yaml once"
    shipped = yaml.safe_load((ROOT / "configs/sweeps/shakespeare-lr-size.yaml").read_text(encoding="utf-8"))
    assert yaml.safe_load(blocks[0]) == shipped


def summary_rows(benchmarks: str) -> list[list[str]]:
    """The cells of the rows of BENCHMARKS.md's summary table (the header and rule left out)."""
    summary = benchmarks.split("\n## Summary\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in summary.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows[1:] if not row.startswith("|---")]


def entry_headings(benchmarks: str) -> list[str]:
    return [line.lstrip("#").strip() for line in benchmarks.splitlines() if re.match(r"#{3,4} ", line)]


def test_benchmarks_entries_have_distinct_headings() -> None:
    headings = entry_headings((ROOT / "BENCHMARKS.md").read_text(encoding="utf-8"))
    repeated = sorted({h for h in headings if headings.count(h) > 1})
    assert not repeated, f"BENCHMARKS.md entries that share a heading: {repeated}"


def test_every_benchmarks_summary_row_names_the_entries_it_comes_from() -> None:
    benchmarks = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    headings = entry_headings(benchmarks)
    rows = summary_rows(benchmarks)
    assert len(rows) >= 10
    for row in rows:
        evidence = row[-1]
        assert evidence and evidence != "-", f"summary row without an entry: {row[0]!r}"
        for cited in evidence.split("; "):
            matching = [h for h in headings if h.startswith(cited)]
            assert len(matching) == 1, f"summary row {row[0]!r} cites {cited!r}, which starts {len(matching)} entry headings"


def test_benchmark_entries_get_distinct_headings(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("benchmark_report", ROOT / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    output = tmp_path / "BENCHMARKS.md"
    for _ in range(3):
        report.append_entry("Speed", "python bench.py", "| a |\n|---|\n| 1 |", output=output)
    headings = entry_headings(output.read_text(encoding="utf-8"))
    assert len(headings) == 3 and len(set(headings)) == 3
    assert headings[1] == headings[0] + " (run 2)"
