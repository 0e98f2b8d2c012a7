"""The eval task a training run ends with (``eval.task`` in the recipe; off by default).

- ``check_final_eval``: before any training, the eval settings are valid and its data parses, so a typo
  exits with code 2 at once rather than after hours of training. Nothing is written.
- ``run_final_eval``: after the final checkpoint is saved, ``run_eval`` on that checkpoint folder into
  ``RUN/eval/TASK``, then ``{"step": N, "eval": {TASK: metrics}}`` in ``metrics.jsonl`` (one line per
  step and task, however often it reruns). Eval is resumable: rerunning the training command after a
  kill or a failure during eval answers only what is missing. Results made from another checkpoint (the
  run was extended with a larger ``train.max_steps``) are kept as ``RUN/eval/TASK.step-M``.
  A failure is one ``Mgpt4Error`` (exit 1) naming the saved checkpoint and how to rerun the eval.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import shlex
from pathlib import Path
from typing import Any

import torch

from mgpt4.config import to_dict, to_dotted
from mgpt4.errors import ConfigError, Mgpt4Error, UsageError
from mgpt4.eval.config import EvalConfig
from mgpt4.train.config import TrainRunConfig
from mgpt4.train.metrics import METRICS_FILE, read_metrics

log = logging.getLogger("mgpt4.train")

EVAL_DIR = "eval"


def eval_out(run: Path, task: str) -> Path:
    return run / EVAL_DIR / task


def check_final_eval(cfg: TrainRunConfig) -> None:
    """Validate ``cfg.eval`` and parse its data (nothing happens when ``eval.task`` is unset).

    Raises:
        ConfigError: naming the ``eval.`` key or the data file and line.
    """
    if cfg.eval.task is None:
        return
    from mgpt4.eval.pipeline import check_eval
    from mgpt4.infer.loading import resolve_device

    eval_cfg = cfg.eval.eval_config(checkpoint="", out=str(eval_out(Path(cfg.out), cfg.eval.task)))
    try:
        resolve_device(eval_cfg.device)
    except UsageError as exc:
        raise ConfigError(
            f"eval.device: {exc}".replace("--device cpu", "eval.device=cpu").replace("--device ", "")
        ) from exc
    try:
        check_eval(eval_cfg)
    except UsageError as exc:
        message = str(exc)
        names_a_key = message.split(":", 1)[0].split(".", 1)[0] in {
            f.name for f in dataclasses.fields(EvalConfig)
        }
        raise ConfigError(f"eval.{message}" if names_a_key else f"eval.data: {message}") from exc


def run_final_eval(
    cfg: TrainRunConfig, run: Path, checkpoint: Path, step: int
) -> tuple[dict[str, dict[str, Any]], str]:
    """Evaluate ``checkpoint`` (step ``step`` of ``run``); returns ``({task: metrics}, eval folder)``.

    Raises:
        Mgpt4Error: the eval failed (exit code 1); the message names the checkpoint and the rerun command.
    """
    from mgpt4.eval.pipeline import run_eval

    task = cfg.eval.task
    out = eval_out(run, task)
    eval_cfg = cfg.eval.eval_config(checkpoint=str(checkpoint), out=str(out))
    gc.collect()  # the training engine of an in-process run is gone: give its memory back first
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log.info("eval %s on %s → %s", task, checkpoint, out)
    try:
        _keep_results_of_other_checkpoints(out, checkpoint)
        result = run_eval(eval_cfg)
    except Exception as exc:  # noqa: BLE001 - any failure here leaves a finished training run behind
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not isinstance(exc, Mgpt4Error):
            reason = f"{type(exc).__name__}: {reason}"
        raise Mgpt4Error(
            f"eval {task} of {checkpoint} failed: {reason}. The checkpoint is saved; rerun the same training "
            f"command to run the eval again, or: {rerun_command(eval_cfg)}"
        ) from exc
    _record(run, step, task, result.metrics)
    log.info("eval %s at step %d: %s", task, step, json.dumps(result.metrics))
    return {task: result.metrics}, str(out)


def rerun_command(eval_cfg: EvalConfig) -> str:
    """The ``mgpt4 eval`` command line of the same eval (settings that differ from defaults as KEY=VALUE)."""
    words = ["mgpt4", "eval", "-m", eval_cfg.checkpoint, eval_cfg.task]
    if eval_cfg.data is not None:
        words.append(eval_cfg.data)
    words += ["--out", eval_cfg.out]
    defaults = to_dotted(to_dict(EvalConfig()))
    skip = {"task", "data", "checkpoint", "out", "judge.key"}
    for key, value in to_dotted(to_dict(eval_cfg)).items():
        if key not in skip and not key.startswith("model.") and value != defaults.get(key):
            words.append(f"{key}={json.dumps(value) if not isinstance(value, str) else value}")
    return " ".join(shlex.quote(str(word)) for word in words)


def _keep_results_of_other_checkpoints(out: Path, checkpoint: Path) -> None:
    """Move ``out`` aside as ``TASK.step-M`` when its answers came from another checkpoint."""
    identity = out / "run.json"
    if not identity.is_file():
        return
    try:
        saved = json.loads(identity.read_text(encoding="utf-8")).get("model", {}).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        return  # run_eval decides what to do with a folder it cannot read
    if saved is None or saved == os.path.abspath(checkpoint):
        return
    target = out.with_name(f"{out.name}.{Path(saved).name}")
    number = 2
    while target.exists():
        target = out.with_name(f"{out.name}.{Path(saved).name}-{number}")
        number += 1
    out.rename(target)
    log.info("kept the eval of %s as %s", saved, target)


def _record(run: Path, step: int, task: str, metrics: dict[str, Any]) -> None:
    """Append ``{"step", "eval": {task: metrics}}`` to metrics.jsonl, replacing one of that step and task."""
    kept = [m for m in read_metrics(run) if not (m["step"] == step and task in m.get("eval", {}))]
    kept.append({"step": step, "eval": {task: metrics}})
    tmp = run / (METRICS_FILE + ".tmp")
    tmp.write_text("".join(json.dumps(m) + "\n" for m in kept))
    tmp.replace(run / METRICS_FILE)
