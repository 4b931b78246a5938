"""The layout ARCHITECTURE.md describes holds: every module has its line, libraries never
import a stage, nothing but the command line imports the Ray driver, no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGES = {"pipeline.manifest", "pipeline.fetch", "pipeline.harmonize", "pipeline.write"}
LIBRARIES = {
    "pipeline.config", "pipeline.storage", "pipeline.decode", "pipeline.imaging",
    "pipeline.results", "pipeline.placement", "pipeline.preflight",
}  # fmt: skip


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted([*REPO.glob("pipeline/**/*.py"), *REPO.glob("schemas/**/*.py")]):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports when it runs (TYPE_CHECKING blocks left out)."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for child in block.body
        for node in ast.walk(child)
    }
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return names & modules


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}


def test_every_module_has_its_line_in_architecture() -> None:
    text = (REPO / "ARCHITECTURE.md").read_text()
    missing = []
    for path in _modules().values():
        relative = path.relative_to(REPO).as_posix()
        short = relative.removeprefix("pipeline/")
        if path.name == "__init__.py" and path.read_text().count("\n") < 3:
            continue  # a package's one-line docstring
        if f"`{relative}`" not in text and f"`{short}`" not in text:
            missing.append(relative)
    assert not missing, f"ARCHITECTURE.md has no line for {missing}"


def test_libraries_never_import_stages_and_only_the_cli_imports_the_driver() -> None:
    graph = _graph()
    for library in LIBRARIES:
        assert not graph[library] & (STAGES | {"pipeline.run"}), (library, graph[library])
    importers = sorted(name for name, imported in graph.items() if "pipeline.run" in imported)
    assert importers == ["pipeline.cli.job"], importers


def test_no_import_cycle() -> None:
    graph = _graph()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(name) :], name]))
        if name in done:
            return
        for imported in sorted(graph[name]):
            visit(imported, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
