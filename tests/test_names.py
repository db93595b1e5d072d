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
