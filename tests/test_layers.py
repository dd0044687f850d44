"""The import graph of `app` has no loop (the layer contracts in setup.cfg, run by `lint-imports` in make test,
keep each layer above the ones it uses; this keeps modules inside a layer from importing each other in a circle)."""

from __future__ import annotations

import grimp


def test_the_app_import_graph_has_no_cycle() -> None:
    graph = grimp.build_graph("app")
    modules = sorted(m for m in graph.modules if m.startswith("app"))
    edges = {m: sorted(x for x in graph.find_modules_directly_imported_by(m) if x.startswith("app")) for m in modules}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        path.append(module)
        for target in edges[module]:
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path)
        path.pop()
        state[module] = 2

    for module in modules:
        if module not in state:
            visit(module, [])
    assert cycles == []
