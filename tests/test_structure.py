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


# ---------------------------------------------------------------- layers (issue 25)

STAGES = ("generate", "finetune", "evaluation", "sweep")
ENTRY_POINTS = ("q2g.cli", "q2g.run")  # the only top-level modules that may import a stage
FOUNDATION = ("data", "answers", "backends", "decoding")  # below every stage


def package_of(name: str, mods: dict[str, Path]) -> str | None:
    """'finetune' for q2g.finetune.loss, None for a top-level module (q2g.models, q2g itself)."""
    parts = name.split(".")
    if len(parts) > 2 or mods[name].name == "__init__.py" and len(parts) == 2:
        return parts[1]
    return None


def edges() -> list[tuple[str, str, str | None, str | None]]:
    mods = modules()
    return [
        (n, m, package_of(n, mods), package_of(m, mods))
        for n, p in mods.items()
        for m in sorted(imported(p, n, set(mods), top_only=False))
    ]


def test_evaluation_never_imports_finetune():
    assert [(a, b) for a, b, pa, pb in edges() if pa == "evaluation" and pb == "finetune"] == []


def test_no_top_level_module_imports_a_stage_but_the_entry_points():
    bad = [(a, b) for a, b, pa, pb in edges() if pa is None and pb in STAGES and a not in ENTRY_POINTS]
    assert bad == []


def test_the_foundation_imports_no_stage_and_data_stands_below_answers():
    assert [(a, b) for a, b, pa, pb in edges() if pa in FOUNDATION and pb in STAGES] == []
    assert [(a, b) for a, b, pa, pb in edges() if pa == "data" and pb == "answers"] == []


def test_the_layer_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The checks above are not vacuous: a lazy `from q2g.finetune import loss` inside a function
    of an evaluation module is an edge evaluation -> finetune."""
    pkg = tmp_path / "q2g"
    for sub in ("evaluation", "finetune"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "finetune" / "loss.py").write_text("X = 1\n")
    (pkg / "evaluation" / "core.py").write_text("def f():\n    from q2g.finetune import loss\n")
    monkeypatch.setattr(__import__(__name__), "SRC", tmp_path)
    assert [(a, b) for a, b, pa, pb in edges() if pa == "evaluation" and pb == "finetune"] == [
        ("q2g.evaluation.core", "q2g.finetune.loss")
    ]


def test_ignore_index_is_assigned_once():
    where = [
        n
        for n, p in modules().items()
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "IGNORE_INDEX" for t in node.targets)
    ]
    assert where == ["q2g.examples"]


def test_no_test_hook_is_read_by_the_product():
    """Faults are injected by the tests (tests/faults.py, test_sweep.install_kills), not read from
    the environment by q2g."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in modules().values())
    for hook in ("Q2G_FINETUNE_EVAL_DELAY", "Q2G_GENERATE_BATCH_DELAY", "KILL_AT", "Q2G_TEST_", "DELAY_ENV"):
        assert hook not in text, hook
