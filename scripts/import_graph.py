"""Print the import graph of vmbeam_kvm (TYPE_CHECKING imports included) and its cycles.

Used for the "One migration engine" issue's check: the package must have no import circle.
``from . import sub`` counts as an edge to ``sub`` only (not to the package's __init__).
Exits 1 when there is a cycle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def graph(root: Path) -> dict[str, set[str]]:
    mods: dict[str, Path] = {}
    for f in root.rglob("*.py"):
        name = ".".join(f.relative_to(root.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = f
    # Compiled extensions (cffi modules): leaves of the graph.
    natives = {".".join((*f.relative_to(root.parent).parent.parts, f.name.split(".")[0]))
               for f in root.rglob("*.so")}
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        pkg = m if f.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    tgt = ".".join(base + ([node.module] if node.module else []))
                else:
                    tgt = node.module or ""
                subs = [f"{tgt}.{a.name}" for a in node.names if f"{tgt}.{a.name}" in mods]
                if any(f"{tgt}.{a.name}" in natives or a.name == "_pagemap" for a in node.names):
                    continue
                if subs:
                    edges[m].update(s for s in subs if s != m)
                elif tgt in mods and tgt != m:
                    edges[m].add(tgt)
            elif isinstance(node, ast.Import):
                edges[m].update(a.name for a in node.names if a.name in mods and a.name != m)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def main() -> int:
    edges = graph(Path(sys.argv[1] if len(sys.argv) > 1 else "vmbeam_kvm"))
    for m in sorted(edges):
        print(f"{m} -> {', '.join(sorted(edges[m])) or '-'}")
    found = cycles(edges)
    print(f"cycles: {found or 'none'}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
