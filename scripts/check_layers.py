#!/usr/bin/env python3
"""The package's layering, checked: every import points one way down, and no file imports itself back.

    python scripts/check_layers.py [PACKAGE_DIR]      # default: bshadow_jax next to this script

Every `import` and `from ... import` counts, at module level or inside a function (an import
inside a function is still a dependency; hiding one there only delays the cycle). Imports under
`if TYPE_CHECKING:` do not run and are not counted.

Rules:
  1. Each subpackage and top-level module belongs to one layer of `LAYERS`, lowest first.
     A module may import modules of its own package and of lower layers only; packages that
     share a layer may not import each other. A module not listed is an error, so a new
     package has to be placed on purpose.
  2. No cycle among files, across or within packages.
Exit status 0 when both hold; 1 with one line per violation otherwise.
"""
from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

# lowest first; each entry is a layer (names are the first component under the package)
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "lazy", "allocator"),    # no imports of our own; allocator: glibc malloc settings at start
    ("fileio", "config", "distributed"),                # core helpers: atomic writes, cache root, YAML -> dataclasses
    ("formats", "reporting"),            # checkpoint files tensor by tensor; figure/table plumbing
    ("models",),                         # the decoder, its config, load_pretrained / save_pretrained
    ("data",),                           # skill world, text, tokenizer, eval split, interventions, pipelines
    ("evals",),                          # scoring models on the eval sets
    ("training", "diagnostics"),         # the train loop; parameter-space diagnostics (siblings)
    ("studies",),                        # experiments composed from everything below
    ("cli",),                            # the command line: wires each package's cli.py
    ("__main__", "__init__"),            # `python -m bshadow_jax` and the lazy package root
)


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                for child in node.body:
                    skip.update(id(n) for n in ast.walk(child))
    return skip


def import_graph(root: Path) -> tuple[dict[str, set[tuple[str, int]]], set[str]]:
    """{module: {(imported module, line)}} over the package's own modules, and the module set."""
    files = {_module_name(f, root): f for f in sorted(root.rglob("*.py"))}
    pkg = root.name

    def resolve(name: str) -> str | None:
        while name:
            if name in files:
                return name
            name = name.rpartition(".")[0]
        return None

    edges: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for mod, f in files.items():
        tree = ast.parse(f.read_text(encoding="utf-8"), filename=str(f))
        skip = _type_checking_nodes(tree)
        here = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                if origin == pkg or origin.startswith(pkg + "."):
                    targets += [f"{origin}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets += [a.name for a in node.names if a.name == pkg or a.name.startswith(pkg + ".")]
            for t in targets:
                r = resolve(t)
                if r is not None and r != mod:
                    edges[mod].add((r, node.lineno))
    return edges, set(files)


def _unit(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_violations(edges, layers=LAYERS) -> list[str]:
    rank = {name: i for i, layer in enumerate(layers) for name in layer}
    out = []
    units = {_unit(m) for m in edges} | {_unit(t) for ts in edges.values() for t, _ in ts}
    for u in sorted(units - set(rank)):
        out.append(f"{u}: not placed in any layer (add it to LAYERS in scripts/check_layers.py)")
    for mod in sorted(edges):
        for target, line in sorted(edges[mod]):
            a, b = _unit(mod), _unit(target)
            if a == b or a not in rank or b not in rank:
                continue
            if rank[b] >= rank[a]:
                how = "the same layer" if rank[a] == rank[b] else "a higher layer"
                out.append(f"{mod}:{line}: imports {target}, which is in {how} ({b} vs {a})")
    return out


def cycles(edges, modules) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    succ = {m: sorted({t for t, _ in edges.get(m, ())}) for m in modules}
    for start in sorted(modules):
        if start in index:
            continue
        work = [(start, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on.add(v)
            nxt = succ[v]
            if i < len(nxt):
                work.append((v, i + 1))
                w = nxt[i]
                if w not in index:
                    work.append((w, 0))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
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
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    return found


def check(root: Path) -> list[str]:
    edges, modules = import_graph(root)
    problems = layer_violations(edges)
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(edges, modules)]
    return problems


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent / "bshadow_jax"
    problems = check(root.resolve())
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} layering problem(s) in {root}", file=sys.stderr)
        return 1
    edges, modules = import_graph(root.resolve())
    n = sum(len(v) for v in edges.values())
    print(f"layers ok: {len(modules)} modules, {n} internal imports, no cycle, every import points down")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
