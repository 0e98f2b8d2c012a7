"""Entry point of one training process started by DeepSpeed's launcher.

    python -m mgpt4.train.worker --config RUN/config.yaml
"""

from __future__ import annotations

import argparse
import sys

from mgpt4.config import load_config
from mgpt4.console import err_console, setup_logging
from mgpt4.errors import Mgpt4Error
from mgpt4.train.config import TrainRunConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mgpt4.train.worker")
    parser.add_argument("--config", required=True, help="the resolved RUN/config.yaml")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        from mgpt4.train.engine import run_worker

        run_worker(load_config(TrainRunConfig, args.config))
    except Mgpt4Error as exc:
        err_console.print(f"error: {exc}", markup=False, highlight=False)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
