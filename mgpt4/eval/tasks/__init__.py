"""The eval tasks by name: each module reads its data into items and scores the answered records."""

from __future__ import annotations

import importlib

from mgpt4.errors import UsageError
from mgpt4.eval.config import TASK_NAMES
from mgpt4.eval.tasks.base import Task


def get_task(name: str) -> Task:
    """The task called ``name`` (its module is imported only when asked for).

    Raises:
        UsageError: no such task.
    """
    if name not in TASK_NAMES:
        raise UsageError(f"task: '{name}' is not one of {', '.join(TASK_NAMES)}")
    return importlib.import_module(f"mgpt4.eval.tasks.{name}").TASK
