"""The layout rules of issue 16, checked on the source: every module of src/q2g <= 400 lines, and
no import cycle among q2g's own modules (imports at module top; the few imports inside functions
are listed too, so a hidden circle shows)."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 400


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "q2g").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(path: Path, name: str, known: set[str], top_only: bool) -> set[str]:
    """q2g modules that `name` (at `path`) imports (a `from pkg import sub` counts as pkg.sub)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_only else list(ast.walk(tree))
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m in known and m != name}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_module_over_400_lines():
    long = {n: len(p.read_text().splitlines()) for n, p in modules().items()}
    assert {n: k for n, k in long.items() if k > MAX_LINES} == {}


def test_no_import_cycle_among_module_level_imports():
    mods = modules()
    graph = {n: imported(p, n, set(mods), top_only=True) for n, p in mods.items()}
    assert cycle(graph) is None


def test_no_import_cycle_counting_imports_inside_functions():
    """The lazy imports left (of modules that pull in heavy packages) hide no circle either."""
    mods = modules()
    graph = {n: imported(p, n, set(mods), top_only=False) for n, p in mods.items()}
    assert cycle(graph) is None


def test_the_checker_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
