"""The packages depend one way: bundle/ <- model/ <- export/, bundle/ <- service/, and the CLI
(encoder_cli.py) on top, imported by nobody. Checked by walking every import statement of the source
files with ast, including the imports deferred into functions: a cycle through a deferred import is
still a cycle, only one that shows up later."""

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bundle", "model", "export", "service")
CLI = "encoder_cli"
# What each part may import besides itself.
ALLOWED = {
    "bundle": set(),
    "model": {"bundle"},
    "export": {"bundle", "model"},
    "service": {"bundle"},
    CLI: set(PACKAGES),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> dict[str, Path]:
    files = {CLI: REPO_ROOT / f"{CLI}.py"}
    for package in PACKAGES:
        files.update({module_name(path): path for path in (REPO_ROOT / package).rglob("*.py")})
    return files


def first_party_imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules that `path` imports anywhere in its body."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            # The project uses absolute imports only, which is what makes this walk complete.
            assert node.level == 0 and node.module, f"{path}:{node.lineno}: relative import"
            # `from export import parity` imports the module export.parity, not just the package.
            names.update(
                f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                for alias in node.names
            )
    return {name for name in names if name.split(".")[0] in ALLOWED}


def import_graph() -> dict[str, set[str]]:
    files = source_files()
    return {module: first_party_imports(path, set(files)) for module, path in files.items()}


def test_parts_depend_one_way() -> None:
    wrong = [
        f"{module} imports {imported}"
        for module, imports in import_graph().items()
        for imported in sorted(imports)
        if imported.split(".")[0] not in ALLOWED[module.split(".")[0]] | {module.split(".")[0]}
    ]
    assert wrong == []


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (depth-first search)."""
    finished: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in finished:
            return None
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            if cycle := visit(imported):
                return cycle
        path.pop()
        finished.add(module)
        return None

    for module in sorted(graph):
        if cycle := visit(module):
            return cycle
    return None


def test_no_import_cycle() -> None:
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_bench_does_not_reach_into_tests() -> None:
    """The benchmarks use the installed packages and their own modules, never tests/ via sys.path."""
    test_modules = {path.stem for path in (REPO_ROOT / "tests").glob("*.py")}
    for path in (REPO_ROOT / "bench").glob("*.py"):
        source = path.read_text()
        assert "sys.path" not in source, path
        for node in ast.walk(ast.parse(source, filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not {name.split(".")[0] for name in names} & test_modules, f"{path}:{node.lineno}"
