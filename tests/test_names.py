"""
The repository's top-level names shadow nothing, and its top-level modules import one way.

Run:  python -m pytest tests/test_names.py -q          (about 1 s)

Scripts run from the repository root, and pytest, put the root first on sys.path, so a top-level
module or package of the repository is imported in place of any installed package of the same
name. transformers 5.25 made Hugging Face's `kernels` package one of its requirements and imports
it from every Qwen modeling file: a folder `kernels/` here broke every model import on a fresh
install. The first test fails when any top-level name of the repository is also a module that an
installed distribution provides, or a module of the standard library.
"""

import ast
import importlib.metadata
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def top_level_names():
    """Import names the repository defines at its root: modules and packages (with __init__.py)."""
    names = {p.stem for p in ROOT.glob("*.py")}
    names |= {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    return sorted(names)


def test_top_level_names_shadow_no_installed_or_stdlib_module():
    installed = importlib.metadata.packages_distributions()  # import name -> [distribution, ...]
    clashes = {n: installed[n] for n in top_level_names() if n in installed}
    clashes.update({n: ["the standard library"] for n in top_level_names() if n in sys.stdlib_module_names})
    assert not clashes, f"repository modules shadow installed modules: {clashes}"


def repo_imports(path, names):
    """(module-level imports, function-level imports) of repository modules in one file."""
    tree = ast.parse(path.read_text())
    top, local = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found = {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found = {node.module.split(".")[0]}
        else:
            continue
        (top if node in tree.body else local).update(found & set(names))
    return top, local


def test_top_level_modules_import_one_way_and_never_inside_a_function():
    """No import circle among the repository's modules, and no import of one inside a function (a
    function-local import is how a circle hides)."""
    names = top_level_names()
    files = {n: ROOT / f"{n}.py" if (ROOT / f"{n}.py").exists() else ROOT / n / "__init__.py" for n in names}
    graph, local = {}, {}
    for n, path in files.items():
        graph[n], local[n] = repo_imports(path, names)
        graph[n].discard(n)
    assert not {n: sorted(v) for n, v in local.items() if v}, "function-local imports of repository modules"
    done, stack = set(), []

    def visit(n):  # depth-first; a module met again on the current path closes a circle
        if n in stack:
            raise AssertionError("import circle: " + " -> ".join(stack[stack.index(n):] + [n]))
        if n in done:
            return
        stack.append(n)
        for m in sorted(graph[n]):
            visit(m)
        stack.pop()
        done.add(n)

    for n in names:
        visit(n)


def test_real_scale_files_reach_the_tiny_world_by_one_name():
    """The embedded default lives in tiny_world.py; a real-scale file that needs it (the default model,
    data and generator) imports the module by that one name, never its pieces one by one, and
    model.py, data.py and the kernels do not need it at all."""
    for n in ("model", "data", "zr_kernels"):
        path = ROOT / f"{n}.py" if (ROOT / f"{n}.py").exists() else ROOT / n / "__init__.py"
        assert "tiny_world" not in repo_imports(path, top_level_names())[0], n
    for path in ROOT.glob("*.py"):
        if path.stem == "tiny_world":
            continue
        tree = ast.parse(path.read_text())
        pieces = [a.name for node in tree.body if isinstance(node, ast.ImportFrom) and node.module == "tiny_world"
                  for a in node.names]
        assert not pieces, (path.name, pieces)
