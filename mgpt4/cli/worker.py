"""Entry point of one training process started by DeepSpeed's launcher (``mgpt4 pretrain --gpus N``).

    python -m mgpt4.cli.worker --config RUN/config.yaml [--resume RUN/checkpoints/step-N]

The ``mgpt4`` process that launched it chose the checkpoint (``--resume``) and holds the run's lock.
When that process ends — finished, failed, or SIGKILLed — the workers on its machine exit at once
(``train.launch.exit_when_gone``); once one rank exits, the launcher stops the others. Rank 0 draws
the progress bar on a terminal.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mgpt4.cli.console import setup_logging, step_bar, warn
from mgpt4.config import load_config
from mgpt4.errors import Mgpt4Error
from mgpt4.train.config import TrainRunConfig
from mgpt4.train.launch import WATCH_PID_ENV, exit_when_gone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mgpt4.cli.worker")
    parser.add_argument("--config", required=True, help="the resolved RUN/config.yaml")
    parser.add_argument("--resume", default=None, help="the checkpoint folder to continue from")
    args = parser.parse_args(argv)
    setup_logging()
    if os.environ.get(WATCH_PID_ENV):
        exit_when_gone(int(os.environ[WATCH_PID_ENV]))
    try:
        from mgpt4.train.engine import run_worker

        cfg = load_config(TrainRunConfig, args.config)
        with step_bar(quiet=os.environ.get("RANK", "0") != "0") as bar:
            run_worker(cfg, Path(args.resume) if args.resume else None, bar)
    except Mgpt4Error as exc:
        warn(f"error: {exc}")
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
