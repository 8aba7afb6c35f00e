"""Shape of the dist_ssl package: big files, long functions, upward imports and import circles.

Counts what issue 17 asks to record before and after the architecture step:
  * files over ``--max-lines`` lines (default 300),
  * functions over ``--max-function-lines`` lines (default 40, decorators and docstring included),
  * upward imports: a module importing from a layer above its own (``LAYERS`` below, lowest first;
    the order STYLE.md draws: losses/heads/models know nothing of methods or engine, ...),
  * method-to-method imports: a registered method file (one with ``@register_method``) importing
    another one, i.e. helpers a method borrows from a sibling instead of a shared module,
  * import circles between modules (strongly connected components of the module import graph,
    counting every ``import``/``from ... import`` inside the package, also ones inside functions).

Plain ``ast``; imports nothing from the package, so it runs on any checkout:
    python tools/dev/code_shape.py            # summary + lists
    python tools/dev/code_shape.py --summary  # one line per count
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGE = "dist_ssl"
# lowest first; a module may import from its own layer or any layer listed before it
LAYERS = [
    ("atomic", "errors", "run_files", "entry_points", "config", "step_schedules"),
    ("data", "models", "losses", "heads", "parallel"),
    ("methods",),
    ("engine",),
    ("eval", "experiments", "cluster", "launch", "slurm"),
]


def _layer_of(module: str) -> int:
    parts = module.split(".")
    sub = parts[1] if len(parts) > 1 else ""
    for rank, names in enumerate(LAYERS):
        if sub in names:
            return rank
    return len(LAYERS)  # the package root (__init__) or an unknown folder: top


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str | None:
    if node.level == 0:
        return node.module
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Package modules this module imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, module, is_package)
            if target is None:
                continue
            names = [f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target
                     for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import a.b.c` of a package: nearest module
                name = name.rpartition(".")[0]
            if name and name.startswith(PACKAGE) and name != module:
                found.add(name)
    return found


def _long_functions(tree: ast.AST, limit: int) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            length = node.end_lineno - first + 1
            if length > limit:
                out.append((node.name, length))
    return out


def _registers_method(tree: ast.AST) -> bool:
    """True for a file with a class decorated ``@register_method(...)``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for dec in node.decorator_list:
                func = dec.func if isinstance(dec, ast.Call) else dec
                if getattr(func, "id", getattr(func, "attr", None)) == "register_method":
                    return True
    return False


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of size > 1."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                result.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return result


def measure(root: Path, max_lines: int, max_function_lines: int) -> dict:
    files = sorted(root.rglob("*.py"))
    modules = {_module_name(f, root): f for f in files}
    known = set(modules)
    big_files, long_functions, upward, graph = [], [], [], {}
    method_files = {m for m, f in modules.items() if _registers_method(ast.parse(f.read_text()))}
    for module, path in modules.items():
        text = path.read_text()
        tree = ast.parse(text)
        n_lines = len(text.splitlines())
        rel = path.relative_to(root.parent)
        if n_lines > max_lines:
            big_files.append((str(rel), n_lines))
        long_functions += [(f"{rel}:{name}", n) for name, n in _long_functions(tree, max_function_lines)]
        deps = _imports(tree, module, path.name == "__init__.py", known)
        graph[module] = deps
        for dep in sorted(deps):
            if _layer_of(dep) > _layer_of(module):
                upward.append((module, dep))
    sideways = [(src, dst) for src in sorted(method_files) for dst in sorted(graph[src])
                if dst in method_files]
    return {"big_files": big_files, "method_to_method": sideways, "long_functions": sorted(long_functions, key=lambda x: -x[1]),
            "upward_imports": upward, "circles": _circles(graph), "modules": len(modules)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[2] / PACKAGE)
    parser.add_argument("--max-lines", type=int, default=300)
    parser.add_argument("--max-function-lines", type=int, default=40)
    parser.add_argument("--summary", action="store_true", help="counts only")
    args = parser.parse_args(argv)
    shape = measure(args.root, args.max_lines, args.max_function_lines)
    print(f"modules: {shape['modules']}")
    print(f"files over {args.max_lines} lines: {len(shape['big_files'])}")
    print(f"functions over {args.max_function_lines} lines: {len(shape['long_functions'])}")
    print(f"upward imports: {len(shape['upward_imports'])}")
    print(f"method-to-method imports: {len(shape['method_to_method'])}")
    print(f"import circles: {len(shape['circles'])}")
    if args.summary:
        return 0
    for path, n in shape["big_files"]:
        print(f"  big file   {path}: {n}")
    for name, n in shape["long_functions"]:
        print(f"  long func  {name}: {n}")
    for src, dst in shape["upward_imports"]:
        print(f"  upward     {src} -> {dst}")
    for src, dst in shape["method_to_method"]:
        print(f"  sideways   {src} -> {dst}")
    for comp in shape["circles"]:
        print(f"  circle     {' <-> '.join(comp)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
