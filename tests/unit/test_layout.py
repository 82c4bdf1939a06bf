"""The package's layout: no import cycle, and the folders say where code runs (docs/design.md, Layout).

import-linter's contracts ([tool.importlinter] in pyproject.toml, `lint-imports` in .ci/run) hold the
layering; this test holds what they cannot say: no module reaches itself again through its imports,
deferred ones inside functions included, type-checking-only imports aside.
"""

from __future__ import annotations

import grimp

PACKAGE = "celery_signal_exporter"


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph.modules):
        if root in order:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        order[root] = low[root] = len(order)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in order:
                    order[child] = low[child] = len(order)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], order[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == order[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle_in_the_package() -> None:
    graph = grimp.build_graph(PACKAGE, exclude_type_checking_imports=True)
    assert len(graph.modules) > 40, "the graph misses most of the package"
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    """The check itself can fail: a graph with a -> b -> c -> a is one cycle."""
    graph = grimp.ImportGraph()
    for importer, imported in (("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")):
        graph.add_import(importer=importer, imported=imported)
    assert _cycles(graph) == [["a", "b", "c"]]


def test_the_folders_say_where_code_runs() -> None:
    graph = grimp.build_graph(PACKAGE)
    top = {m.split(".")[1] for m in graph.modules if m.count(".") >= 1}
    assert {"recording", "server", "probes", "mixin"} <= top
    assert {"receivers", "worker", "collect", "service", "store", "serving"}.isdisjoint(top), \
        "a module of recording/ or server/ is back at the top"
