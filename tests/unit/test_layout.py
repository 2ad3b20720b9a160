"""The layout's rules, checked on the source: no import cycle in the package, DeepSpeed behind one boundary,
nothing changes the working directory, and no text points at documents outside the repository."""

import ast
import re
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "aligntI"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[str]:
    """Every module ``path`` imports, at module level or inside functions; ``if TYPE_CHECKING:`` blocks aside."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found += [f"{node.module}.{a.name}" for a in node.names]
    return found


def package_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_package():
    graph = package_graph()
    assert "aligntI.training.objective" in graph and "aligntI.engine" in graph["aligntI.training.objective"]
    assert find_cycle(graph) is None


def test_only_the_engine_package_imports_deepspeed():
    importers = sorted(module_name(p) for p in PACKAGE.rglob("*.py")
                       if any(m == "deepspeed" or m.startswith("deepspeed.") for m in imports(p)))
    assert importers and all(m.startswith("aligntI.engine") for m in importers), importers


def source_files():
    for folder in ("aligntI", "recipes", "slurm", "tests", "docs", "ds_configs"):
        for path in (REPO / folder).rglob("*"):
            if path.suffix in {".py", ".sh", ".md", ".yaml", ".json", ".jinja"} and "__pycache__" not in path.parts:
                yield path
    yield REPO / "README.md"


def test_nothing_changes_the_working_directory():
    """The package and the drivers resolve paths instead (a test may still use monkeypatch.chdir)."""
    code = [p for folder in ("aligntI", "recipes", "slurm") for p in (REPO / folder).rglob("*") if p.suffix in {".py", ".sh"}]
    assert len(code) > 50
    assert [p for p in code if p.suffix == ".py" and "chdir(" in p.read_text()] == []


def test_no_reference_to_documents_outside_the_repository():
    outside = re.compile(r"\b(SPEC|ENGINEERING|MINITASK|STYLE)(\.md| §)|\.\./shared")
    hits = [f"{p.relative_to(REPO)}: {m.group(0)}" for p in source_files() if p != Path(__file__)
            for m in outside.finditer(p.read_text())]
    assert hits == []


def test_pointers_into_docs_name_a_section_that_exists():
    """Code says where a design is explained ("docs/engineering.md, section 3"); the numbering must hold."""
    pointer = re.compile(r"docs/(\w+\.md), sections? (\d+)(?: and (\d+))?")
    pointers = [(p, m) for p in source_files() if p.suffix == ".py" for m in pointer.finditer(p.read_text())]
    assert len(pointers) >= 10
    broken = []
    for path, match in pointers:
        doc = (REPO / "docs" / match.group(1)).read_text()
        for number in filter(None, match.group(2, 3)):
            if not re.search(rf"^## {number}\. ", doc, flags=re.MULTILINE):
                broken.append(f"{path.relative_to(REPO)}: {match.group(0)}")
    assert broken == []
