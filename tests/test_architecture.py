"""The architecture of DESIGN.md, as far as a test can hold it: the import-linter contracts
of pyproject.toml are kept, no two modules import each other round a circle (inside a
package too, which the layers contract does not look at), and no module outgrows one job.

Imports inside functions count as imports: a lazy import is still a dependency.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp  # import-linter's own graph builder (the dev extra)

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "normbench"

#: DESIGN.md's "no module over ~700 lines": the line this test draws (Python only; the C++
#: kernel reads as one file).
MAX_LINES = 750


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, targets = work[-1]
            for target in targets:
                if target not in edges:
                    continue
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(edges[target]))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
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


def test_the_circle_finder_finds_circles_and_only_circles():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e", "d"}}
    assert _circles(edges) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_round_a_circle():
    graph = grimp.build_graph("normbench")
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    assert _circles(edges) == []


def test_the_layers_contracts_are_kept():
    lint = Path(sys.executable).parent / "lint-imports"  # import-linter, of the dev extra
    done = subprocess.run(
        [str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout[-3000:]


def test_no_module_outgrows_one_job():
    sizes = {
        str(path.relative_to(REPO)): len(path.read_text().splitlines())
        for path in PACKAGE.rglob("*.py")
    }
    assert {path: n for path, n in sizes.items() if n > MAX_LINES} == {}
