"""An import-linter contract type for the two rules its built-in `forbidden` contract cannot state.

import-linter forbids only root external packages (`google`, not `google.cloud`: `google.auth` is fine at the
bottom, in the stores' credentials) and it cannot tell a module-level import from one inside a function (the CLI's
one-second `--help` relies on TensorFlow being imported lazily everywhere but in the modules that train and serve).
This contract reads each source module's code with `ast` and reports every import of a forbidden dotted prefix,
anywhere in the module or, with `module_level_only`, only in statements that run at import time.

Declared in pyproject.toml (`[tool.importlinter] contract_types`); `lint-imports` runs it with the other contracts.
"""
from __future__ import annotations

import ast
import importlib.util

from importlinter import Contract, ContractCheck, fields, output


def _matches(name: str, prefixes) -> str | None:
    "The forbidden prefix that dotted `name` is or lies under, else None."
    return next((p for p in sorted(prefixes) if name == p or name.startswith(p + ".")), None)


def _imported_names(node: ast.AST) -> list[str]:
    "Dotted names an import statement brings in (`from a.b import c` gives a.b and a.b.c)."
    if isinstance(node, ast.Import): return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and not node.level and node.module:
        return [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    return []


def _import_nodes(tree: ast.Module, module_level_only: bool):
    "Import statements of `tree`: all of them, or only those that run at import time (not inside def/lambda/class)."
    if not module_level_only:
        yield from (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))); return
    todo = list(tree.body)
    while todo:
        n = todo.pop()
        if isinstance(n, (ast.Import, ast.ImportFrom)): yield n
        elif not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            todo.extend(c for c in ast.iter_child_nodes(n) if isinstance(c, ast.stmt) or hasattr(c, "body"))


def forbidden_imports(source: str, forbidden, module_level_only: bool = False) -> list[tuple[int, str, str]]:
    "(line, imported name, forbidden prefix) for each import in `source` that falls under `forbidden`."
    found = []
    for node in _import_nodes(ast.parse(source), module_level_only):
        for name in _imported_names(node):
            hit = _matches(name, forbidden)
            if hit: found.append((node.lineno, name, hit)); break
    return sorted(found)


class ForbiddenExternalContract(Contract):
    "Modules under `source_modules` (less `ignore_modules`) must not import any of `forbidden` (dotted prefixes)."
    type_name = "forbidden_external"

    source_modules = fields.ListField(subfield=fields.StringField())
    ignore_modules = fields.ListField(subfield=fields.StringField(), required=False)
    forbidden = fields.ListField(subfield=fields.StringField())
    module_level_only = fields.BooleanField(required=False, default=False)

    def check(self, graph, verbose: bool) -> ContractCheck:
        sources, ignored = set(self.source_modules), set(self.ignore_modules or [])
        under = lambda m, roots: any(m == r or m.startswith(r + ".") for r in roots)
        modules = sorted(m for m in graph.modules if under(m, sources) and not under(m, ignored))
        if not modules: raise ValueError(f"no module of the graph lies under {sorted(sources)}")
        bad = []
        for m in modules:
            spec = importlib.util.find_spec(m)
            if spec is None or not spec.origin or not spec.origin.endswith(".py"): continue
            with open(spec.origin, encoding="utf-8") as f:
                bad += [(m, *hit) for hit in forbidden_imports(f.read(), self.forbidden, self.module_level_only)]
        return ContractCheck(kept=not bad, metadata={"imports": bad})

    def render_broken_contract(self, check: ContractCheck) -> None:
        where = "at module level " if self.module_level_only else ""
        for module, line, name, prefix in check.metadata["imports"]:
            output.print_error(f"{module} imports {name} {where}(l.{line}): {prefix} is forbidden here", bold=False)
            output.new_line()
