"""The downloader is library code: none of its modules imports click or rich (terminal code is the CLI's)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import mgpt4.download


def test_download_modules_import_neither_click_nor_rich() -> None:
    names = [m.name for m in pkgutil.iter_modules(mgpt4.download.__path__, "mgpt4.download.")]
    assert "mgpt4.download.run" in names and "mgpt4.download.shard_writer" in names
    code = (
        "import importlib, sys\n"
        f"for name in {names + ['mgpt4.download', 'mgpt4.data.sources']!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('click', 'rich'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""
