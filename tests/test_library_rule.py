"""The layout rule: library code never imports click or rich, never prints, never exits.

Terminal code lives in ``mgpt4/cli`` only. Two checks: every library source file is read with ``ast``
(fast, names the file and line), and every library module is imported in a fresh interpreter whose
``sys.modules`` must then hold neither click nor rich (what actually loads, transitively).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import mgpt4

ROOT = Path(mgpt4.__file__).parent
TERMINAL_PACKAGES = {"click", "rich"}
# Processes of our own that must die at once: a download worker whose parent is gone (pool.py) and a
# training rank whose launcher is gone (train/launch.exit_when_gone). Nothing else ends a process.
HARD_EXITS = {("download/pool.py", "_exit"), ("train/launch.py", "_exit")}
# Library modules that need an optional extra (skipped in the import check when it is not installed).
EXTRAS = {
    "mgpt4.serve.server": "uvicorn",
    "mgpt4.serve.app": "fastapi",
    "mgpt4.download.ray_distributor": "ray",
}


def library_files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if "cli" not in p.relative_to(ROOT).parts[:1])


def library_modules() -> list[str]:
    """Module names from the files (``pkgutil.walk_packages`` would import ``mgpt4.cli`` on its way)."""
    names = []
    for path in library_files():
        parts = ("mgpt4", *path.relative_to(ROOT).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        extra = EXTRAS.get(name)
        if name.endswith("__main__") or (extra and importlib.util.find_spec(extra) is None):
            continue
        names.append(name)
    return names


def test_every_library_package_is_checked():
    packages = {p.relative_to(ROOT).parts[0] for p in library_files() if len(p.relative_to(ROOT).parts) > 1}
    assert {"model", "data", "download", "train", "curate", "infer", "eval", "serve"} <= packages
    assert (ROOT / "cli" / "__init__.py").is_file() and not (ROOT / "cli.py").exists()


def test_library_source_imports_no_terminal_package_and_never_prints_or_exits():
    problems = []
    for path in library_files():
        where = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                modules = []
            for module in modules:
                if module.split(".")[0] in TERMINAL_PACKAGES:
                    problems.append(f"{where}:{node.lineno}: imports {module}")
            if isinstance(node, ast.Call):
                name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
                owner = getattr(getattr(node.func, "value", None), "id", None)
                if name in ("print", "exit", "quit") and owner is None:
                    problems.append(f"{where}:{node.lineno}: calls {name}()")
                if owner in ("sys", "os") and name in ("exit", "_exit") and (where, name) not in HARD_EXITS:
                    problems.append(f"{where}:{node.lineno}: calls {owner}.{name}()")
    assert problems == []


# Run in a fresh interpreter: an import hook notes which module asks for click or rich. Third-party
# packages may use them (uvicorn's own CLI imports click); an mgpt4 module may not.
_GUARD = """
import importlib, json, sys
asked = set()

class Guard:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("click", "rich"):
            frame = sys._getframe(1)
            while frame is not None and frame.f_globals.get("__name__", "").startswith(
                ("importlib", "_frozen_importlib")
            ):
                frame = frame.f_back
            importer = frame.f_globals.get("__name__", "?") if frame is not None else "?"
            if importer.split(".")[0] == "mgpt4":
                asked.add(f"{importer} imports {name}")
        return None

sys.meta_path.insert(0, Guard())
for module in MODULES:
    importlib.import_module(module)
print(json.dumps(sorted(asked)))
"""


@pytest.mark.slow  # a fresh interpreter imports torch, transformers, deepspeed: 10-30 s on 2 busy cores
def test_importing_every_library_module_loads_neither_click_nor_rich():
    modules = library_modules()
    assert "mgpt4.download.run" in modules and "mgpt4.infer.describe" in modules and len(modules) > 80
    code = _GUARD.replace("MODULES", repr(modules))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_the_import_guard_catches_a_library_module_that_imports_click(tmp_path):
    """The check above can fail: a module named like ours that imports click is reported."""
    package = tmp_path / "mgpt4_probe"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "bad.py").write_text("import click\n")
    code = _GUARD.replace("MODULES", "['mgpt4_probe.bad']").replace('== "mgpt4"', '== "mgpt4_probe"')
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=tmp_path)  # fmt: skip
    assert json.loads(result.stdout.strip().splitlines()[-1]) == ["mgpt4_probe.bad imports click"]
