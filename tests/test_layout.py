"""The layout rules of the tree (README, "Where things are"), checked on the source itself:
no import cycles, every module of ``tasks/`` shared by web and workers, small modules and
functions, and each package importing only what its room allows."""
from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tasks", "web", "workers", "modelbay")
GENERATED = "workers/backends/proto/"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 50


def modules() -> dict[str, Path]:
    """Dotted name → path of every product module (generated gRPC stubs left out)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith(GENERATED):
                continue
            name = rel[:-3].replace("/", ".")
            found[name.removesuffix(".__init__")] = path
    return found


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, lazy ones included; ``if TYPE_CHECKING:`` blocks left out."""
    for node in ast.iter_child_nodes(tree):
        if _type_checking(node):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        else:
            yield from _imports(node)


def import_graph() -> dict[str, set[str]]:
    """Module → the product modules it imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    mods = modules()
    graph: dict[str, set[str]] = {name: set() for name in mods}
    for name, path in mods.items():
        for node in _imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif node.level == 0 and node.module:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                           for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def test_there_are_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def _reach(graph: dict[str, set[str]], roots: list[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        node = todo.pop()
        for nxt in graph[node] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_every_module_of_tasks_is_shared_by_web_and_workers():
    """tasks/ is the contract: each of its modules is reached from web/ and from workers/."""
    graph = import_graph()
    from_web = _reach(graph, [m for m in graph if m.split(".")[0] == "web"])
    from_workers = _reach(graph, [m for m in graph if m.split(".")[0] == "workers"])
    contract = [m for m in graph if m.startswith("tasks.")]
    assert contract
    only_one = [f"{m} (web: {m in from_web}, workers: {m in from_workers})" for m in contract
                if not (m in from_web and m in from_workers)]
    assert not only_one, "not shared: " + ", ".join(only_one)


def test_each_room_imports_only_what_it_may():
    """tasks/ imports no other room; web/ never imports workers/ or modelbay/; workers/ never
    imports web/ or modelbay/; modelbay/ (the CLI) imports tasks/ and one stdlib-only helper of
    the supervisor (how a process exited)."""
    allowed = {"tasks": {"tasks"}, "web": {"tasks", "web"}, "workers": {"tasks", "workers"},
               "modelbay": {"tasks", "modelbay", "workers.supervisor.exits"}}
    problems = []
    for name, targets in import_graph().items():
        room = name.split(".")[0]
        for target in targets:
            if target.split(".")[0] not in allowed[room] and target not in allowed[room]:
                problems.append(f"{name} imports {target}")
    assert not problems, "\n".join(problems)


def test_modules_and_functions_are_small():
    problems = []
    for name, path in modules().items():
        source = path.read_text()
        lines = source.count("\n")
        if lines > MAX_MODULE_LINES:
            problems.append(f"{name}: {lines} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    problems.append(f"{name}:{node.lineno} {node.name}(): {length} lines (at most {MAX_FUNCTION_LINES})")
    assert not problems, "\n".join(problems)


def test_the_checks_see_a_cycle_and_a_stray_module(tmp_path, monkeypatch):
    """The graph these checks walk is built right: a planted cycle and a worker-only module in
    tasks/ are found (a check that sees nothing would pass forever)."""
    for rel, text in {"tasks/__init__.py": "", "tasks/a.py": "from tasks import b\n",
                      "tasks/b.py": "import tasks.a\n", "tasks/lonely.py": "",
                      "web/__init__.py": "from tasks.a import x\n", "workers/__init__.py": "import tasks.lonely\n",
                      "modelbay/__init__.py": "", "workers/backends/proto/x.py": "import web\n"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    graph = import_graph()
    assert graph["tasks.a"] == {"tasks.b"} and graph["tasks.b"] == {"tasks.a"}
    assert "workers.backends.proto.x" not in graph
    assert _reach(graph, ["web"]) == {"tasks.a", "tasks.b"}
    assert _reach(graph, ["workers"]) == {"tasks.lonely"}
