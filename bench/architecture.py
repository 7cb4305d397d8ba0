"""The package's shape in figures: modules, import cycles, upward imports, the longest module and notebook.

    python bench/architecture.py [--json]

Imports are read by grimp (the graph import-linter checks), lazy ones inside functions included. A module's layer
comes from `LAYERS` (top first, as the import-linter contract in pyproject.toml declares them); the flat `vertex_*`
modules of older trees count as the cloud wing, and `pipeline.*` as the pipeline, so a tree before and after a
move can be compared by the same rule. An upward import is a direct import from a lower layer to a higher one.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["cli", "cloud", "pipeline", "evaluation", "embeddings", "serving", "registry", "automl", "task", "training",
          "features", "statistics", "exploration", "preprocessing", "data", "config"]


def layer(module: str) -> int | None:
    "Index of `module`'s layer in LAYERS (0 = top), None for modules outside them (the package root, _modidx)."
    parts = module.split(".")[1:]
    if not parts: return None
    head = "cloud" if parts[0].startswith("vertex_") else parts[0]
    return LAYERS.index(head) if head in LAYERS else None


def strongly_connected(nodes, edges) -> list[list[str]]:
    "Tarjan's components of size > 1: each is one or more import cycles."
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]
    def visit(v):
        index[v] = low[v] = n[0]; n[0] += 1; stack.append(v); on.add(v)
        for w in edges.get(v, ()):
            if w not in index: visit(w); low[v] = min(low[v], low[w])
            elif w in on: low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v: break
            if len(comp) > 1: out.append(sorted(comp))
    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index: visit(v)
    return out


def shape(root: Path = ROOT) -> dict:
    import grimp
    sys.path.insert(0, str(root))
    graph = grimp.build_graph("fmnist_gcp", cache_dir=None)
    mods = sorted(m for m in graph.modules if m != "fmnist_gcp._modidx")
    edges = {m: sorted(i for i in graph.find_modules_directly_imported_by(m) if i in mods and i != m) for m in mods}
    pairs = sorted({tuple(sorted((a, b))) for a in mods for b in edges[a] if a in edges.get(b, ())})
    upward = [(a, b) for a in mods for b in edges[a] if None not in (layer(a), layer(b)) and layer(b) < layer(a)]
    files = {m: root / (m.replace(".", "/") + ".py") for m in mods}
    files = {m: (f if f.exists() else f.with_suffix("") / "__init__.py") for m, f in files.items()}
    lines = {m: len(f.read_text().splitlines()) for m, f in files.items() if f.exists()}
    cells = {nb.name: len(json.loads(nb.read_text())["cells"]) for nb in sorted((root / "nbs").glob("*.ipynb"))}
    code = {m: n for m, n in lines.items() if n}  # empty __init__ files are not modules a reader opens
    longest, nb = max(code, key=code.get), max(cells, key=cells.get)
    return {"modules": len(code), "cycles": strongly_connected(mods, edges), "two_way_pairs": pairs,
            "upward_imports": upward, "longest_module": [longest, code[longest]],
            "longest_notebook": [nb, cells[nb]], "notebooks": len(cells)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="a checkout of this repository (default: this one)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    a = ap.parse_args(argv)
    s = shape(a.root.resolve())
    if a.json: print(json.dumps(s, indent=1)); return
    print(f"modules {s['modules']}, notebooks {s['notebooks']}")
    print(f"import cycles (strongly connected groups) {len(s['cycles'])}; modules importing each other {len(s['two_way_pairs'])}")
    for a_, b in s["two_way_pairs"]: print(f"  {a_} <-> {b}")
    print(f"upward imports {len(s['upward_imports'])}")
    for a_, b in s["upward_imports"]: print(f"  {a_} -> {b}")
    print(f"longest module {s['longest_module'][0]} ({s['longest_module'][1]} lines); "
          f"longest notebook {s['longest_notebook'][0]} ({s['longest_notebook'][1]} cells)")


if __name__ == "__main__":
    main()
