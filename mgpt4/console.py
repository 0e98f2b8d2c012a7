"""The one rich console for human output; errors and progress go to stderr so stdout stays clean."""

from __future__ import annotations

import logging
import sys

from rich.console import Console
from rich.logging import RichHandler

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def is_interactive() -> bool:
    """True when progress bars make sense (stderr is a terminal)."""
    return err_console.is_terminal


def setup_logging(quiet: bool = False) -> None:
    """Log to stderr: rich formatting on a TTY, plain timestamped lines otherwise."""
    level = logging.WARNING if quiet else logging.INFO
    root = logging.getLogger("mgpt4")
    root.handlers.clear()
    root.setLevel(level)
    root.propagate = False
    if is_interactive():
        handler: logging.Handler = RichHandler(console=err_console, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
