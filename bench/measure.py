"""Run a command in a subprocess and measure it: wall seconds and the peak RSS of its process tree.

Shared by the bench scripts, which run each measured step in its own process so that its peak host
memory is its own (the kernel's ``ru_maxrss`` for that child, plus polling for the whole tree).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

GIB = 2**30


def run_measured(command: list[str], poll_s: float = 0.05) -> dict:
    """Run ``command``; peak RSS by polling its process tree, and the kernel's ``ru_maxrss`` of it."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        handle = psutil.Process(process.pid)
        polled = 0
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            try:
                tree = [handle, *handle.children(recursive=True)]
                polled = max(polled, sum(p.memory_info().rss for p in tree))
            except psutil.NoSuchProcess:
                pass
            time.sleep(poll_s)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    return {
        "command": " ".join(Path(c).name if "/" in c else c for c in command[:8]) + " …",
        "exit_code": os.waitstatus_to_exitcode(status),
        "seconds": round(seconds, 1),
        "peak_rss_gib_polled": round(polled / GIB, 2),
        "peak_rss_gib_kernel": round(usage.ru_maxrss * 1024 / GIB, 2),  # ru_maxrss is in KiB on Linux
        "stdout_tail": stdout[-600:],
        "stderr_tail": stderr[-1200:],
    }
