"""Entry point of one training process started by DeepSpeed's launcher.

    python -m mgpt4.train.worker --config RUN/config.yaml [--resume RUN/checkpoints/step-N]

The ``mgpt4`` process that launched it chose the checkpoint (``--resume``) and holds the run's lock.
When that process ends — finished, failed, or SIGKILLed — the workers on its machine exit at once
(DeepSpeed's launcher does not stop them when its parent dies); once one rank exits, the launcher
stops the others.
"""

from __future__ import annotations

import argparse
import os
import select
import sys
import threading
import time
from pathlib import Path

from mgpt4.config import load_config
from mgpt4.console import err_console, setup_logging
from mgpt4.errors import Mgpt4Error
from mgpt4.train.config import TrainRunConfig
from mgpt4.train.launch import WATCH_PID_ENV


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mgpt4.train.worker")
    parser.add_argument("--config", required=True, help="the resolved RUN/config.yaml")
    parser.add_argument("--resume", default=None, help="the checkpoint folder to continue from")
    args = parser.parse_args(argv)
    setup_logging()
    if os.environ.get(WATCH_PID_ENV):
        exit_when_gone(int(os.environ[WATCH_PID_ENV]))
    try:
        from mgpt4.train.engine import run_worker

        run_worker(load_config(TrainRunConfig, args.config), Path(args.resume) if args.resume else None)
    except Mgpt4Error as exc:
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return exc.exit_code
    return 0


def exit_when_gone(pid: int) -> None:
    """Start a daemon thread that ends this process as soon as process ``pid`` has ended."""

    def gone() -> None:
        os.write(2, f"error: the mgpt4 process {pid} that started this run has ended; stopping\n".encode())
        os._exit(1)  # from a thread: no cleanup that could still write checkpoints or metrics

    def watch() -> None:
        try:
            # Linux >= 5.3: a pidfd turns readable when that very process ends (no pid-reuse race).
            handle = os.pidfd_open(pid)
        except ProcessLookupError:
            gone()
        except (AttributeError, OSError):  # macOS, old kernels: poll
            while _alive(pid):
                time.sleep(0.5)
            gone()
        select.select([handle], [], [])
        gone()

    threading.Thread(target=watch, name="mgpt4-parent-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


if __name__ == "__main__":
    sys.exit(main())
