"""The layering docs/design.md ("Modules") states, held by test: the storage layer knows bytes and URLs, not training,
and each module knows only the ones below it (no import cycle among runner's modules)."""
from __future__ import annotations

import ast
from pathlib import Path

import runner

PACKAGE = Path(runner.__file__).parent
STORE_MAY_IMPORT = {"runner.errors", "runner.console"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runner_imports(path: Path) -> set[str]:
    """The runner modules `path` imports anywhere in its code: function-level imports and those under
    `if TYPE_CHECKING:` too (a module that names another's types knows it)."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "runner"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "runner":
                continue
            for alias in node.names:  # `from . import dist` names a module; `from .dist import X` a name in one
                candidate = f"{base}.{alias.name}"
                found.add(candidate if (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).exists()
                          or (PACKAGE.parent / candidate.replace(".", "/")).is_dir() else base)
    return found - {"runner"}


def in_store(name: str) -> bool:
    return name == "runner.store" or name.startswith("runner.store.")


def modules() -> dict[str, set[str]]:
    return {module_name(p): runner_imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_storage_layer_imports_nothing_of_runner_but_errors_and_console_output():
    graph = modules()
    store = {name: deps for name, deps in graph.items() if in_store(name)}
    assert "runner.store.directory" in store and "runner.store.lease" in store  # the walk found the package
    outside = {name: sorted(d for d in deps if not in_store(d) and d not in STORE_MAY_IMPORT)
               for name, deps in store.items()}
    assert not any(outside.values()), f"the storage layer imports training modules: {outside}"


def test_no_module_imports_one_that_imports_it_back():
    graph = modules()
    graph = {name: {d for d in deps if d in graph and d != name} for name, deps in graph.items()}
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        for dep in graph[name]:
            if dep in path:
                cycles.append(" → ".join(path[path.index(dep):] + [dep]))
            elif dep not in done:
                visit(dep, path + [dep])
        done.add(name)

    done: set[str] = set()
    for name in graph:
        if name not in done:
            visit(name, [name])
    assert "runner.job" in graph and "runner.continuation" in graph["runner.checkpointer"]
    assert not cycles, f"import cycles: {sorted(set(cycles))}"
