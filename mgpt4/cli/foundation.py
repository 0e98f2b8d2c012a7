"""``python -m mgpt4.foundation``: rebuild the shipped micro foundation models, or check them.

    python -m mgpt4.foundation build --out DIR      # the full build (minutes on one CPU thread)
    python -m mgpt4.foundation check [DIR]          # DIR (default: the shipped files) against a
                                                    # rebuild of the first steps and its own digests

A maintainer tool: it prints progress and exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from mgpt4.foundation import SHIPPED_DIR
from mgpt4.foundation.build import TRAJECTORY_STEPS, build_foundation, check_folder


def _progress() -> callable:
    started = time.monotonic()

    def report(name: str, step: int, total: int, loss: float) -> None:
        if step == 1 or step % 100 == 0 or step == total:
            print(f"{name:8s} step {step:5d}/{total}  loss {loss:.4f}  {time.monotonic() - started:7.1f} s",
                  file=sys.stderr, flush=True)  # fmt: skip

    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mgpt4.foundation", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="pretrain both micro models into --out")
    build.add_argument("--out", required=True, help="output folder")
    verify = commands.add_parser("check", help="check a built folder against a partial rebuild")
    verify.add_argument("folder", nargs="?", default=SHIPPED_DIR, help=f"default: {SHIPPED_DIR}")
    args = parser.parse_args(argv)
    if args.command == "build":
        manifest = build_foundation(args.out, progress=_progress())
        print(json.dumps({k: manifest[k] for k in ("vision", "language")}, indent=2))
        return 0
    problems = check_folder(args.folder)
    for problem in problems:
        print(f"FAILED {problem}", file=sys.stderr)
    if not problems:
        print(f"{args.folder}: OK (digests match; steps {list(TRAJECTORY_STEPS)} rebuild bitwise)")
    return 1 if problems else 0


def run() -> None:
    """The process entry point: exits with ``main``'s status."""
    sys.exit(main())
