"""The installed commands: pyproject's [project.scripts] against the package's cli_*.py modules.

Checked without installing anything (the dev venv is an editable install of another checkout):
each console script is read from pyproject.toml, its module imported in this process and its
``main(["--help"])`` run. The naming scheme is ``dist-ssl-<command>`` ->
``dist_ssl.<package>.cli_<command>:main`` (``-`` as ``_``), both ways: a new cli_*.py without a console script
fails here, and so does package code that finds files through its own location.
"""
from __future__ import annotations

import ast
import contextlib
import importlib
import io
import re
import tomllib
from pathlib import Path

import pytest

from dist_ssl import entry_points

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "dist_ssl"
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def _cli_modules() -> set[str]:
    return {".".join(p.relative_to(REPO).with_suffix("").parts) for p in PACKAGE.rglob("cli*.py")}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_imports_and_its_help_exits_0(script):
    module_name, _, func = SCRIPTS[script].partition(":")
    command = script.removeprefix("dist-ssl-").replace("-", "_")
    assert re.fullmatch(rf"dist_ssl\.\w+\.cli_{command}", module_name) and func == "main", \
        f"{script} = {SCRIPTS[script]!r}: expected dist_ssl.<package>.cli_{command}:main"
    main = getattr(importlib.import_module(module_name), func)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "usage:" in out.getvalue()


def test_every_cli_module_has_a_console_script():
    targets = {target.partition(":")[0] for target in SCRIPTS.values()}
    assert _cli_modules(), "no dist_ssl/**/cli*.py found: did the naming scheme change?"
    assert _cli_modules() - targets == set(), "cli modules without a console script in pyproject.toml"


@pytest.mark.parametrize("name", [n for n in dir(entry_points) if n.endswith("_MODULE")])
def test_modules_the_package_launches_exist(name):
    """The `python -m` targets of batch scripts and the experiment runner import and have a main."""
    assert callable(importlib.import_module(getattr(entry_points, name)).main)


def test_package_code_finds_no_file_through_its_own_location():
    """``Path(__file__).parents[2] / "tools" / ...`` works in a checkout only, never once installed."""
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in PACKAGE.rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if re.search(r"parents\[\d+\]|__file__\)?\.(?:resolve\(\)\.)?parent", line)]
    assert offenders == []


@pytest.mark.parametrize("tool", sorted(p.name for p in (REPO / "tools").glob("*.py")))
def test_tools_are_thin_wrappers_of_a_console_script(tool):
    """tools/<name>.py (for a checkout that is not installed) only imports a command's main."""
    tree = ast.parse((REPO / "tools" / tool).read_text())
    body = [node for node in tree.body if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
    froms = [node.module for node in body if isinstance(node, ast.ImportFrom)]
    targets = {target.partition(":")[0] for target in SCRIPTS.values()}
    assert len(froms) == 1 and froms[0] in targets, f"{tool}: imports {froms}, expected one of {sorted(targets)}"
    assert all(isinstance(node, (ast.Import, ast.ImportFrom, ast.If)) for node in body), \
        f"{tool}: code beyond the imports and the __main__ guard belongs in the package"
