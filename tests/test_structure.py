"""The shape of the code: no import cycles in `app/` or `workers/`, and a job's state is assigned in one place.

Imports are read with `ast` (module level and inside functions alike), so a cycle hidden behind a
function-level import is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "workers")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            for target in targets:
                # `import a.b.c` runs a, a.b and a.b.c; an edge to a module's own package is no cycle
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles_in_app_or_workers():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_app_never_imports_workers():
    graph = import_graph()
    offenders = {m: sorted(t for t in targets if t.startswith("workers")) for m, targets in graph.items()
                 if m.startswith("app") and any(t.startswith("workers") for t in targets)}
    assert offenders == {}


def job_state_writers(tree: ast.AST) -> int:
    """Assignments to `.state` of a parameter annotated `JobRecord` (how every state change is written:
    a `change(record: JobRecord)` passed to `Records.mutate_job`); other records' states are their own."""
    count = 0
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        arguments = [*function.args.posonlyargs, *function.args.args, *function.args.kwonlyargs]
        jobs = {a.arg for a in arguments if a.annotation is not None and "JobRecord" in ast.unparse(a.annotation)}
        for node in ast.walk(function):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign | ast.AugAssign) else []
            for target in targets:
                for element in target.elts if isinstance(target, ast.Tuple) else [target]:
                    if (isinstance(element, ast.Attribute) and element.attr == "state"
                            and isinstance(element.value, ast.Name) and element.value.id in jobs):
                        count += 1
    return count


def test_only_the_lifecycle_assigns_a_job_state():
    writers = {name for name, path in modules().items() if job_state_writers(ast.parse(path.read_text()))}
    assert writers == {"app.jobs.lifecycle"}


def test_the_state_writer_check_sees_a_change_function():
    code = "def change(record: JobRecord) -> bool:\n    record.state, record.x = 'failed', 1\n    return True\n"
    assert job_state_writers(ast.parse(code)) == 1
    other = "def change(record: UnlearningRequestRecord) -> bool:\n    record.state = 'completed'\n"
    assert job_state_writers(ast.parse(other)) == 0
