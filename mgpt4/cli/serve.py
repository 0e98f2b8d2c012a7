"""``mgpt4 serve``: the OpenAI-compatible endpoint (``serve.run_serve``) and its logs.

Logs go to stderr (mgpt4's and uvicorn's); with ``--json`` stdout carries one JSON line per request
(latency, tokens, batch size) and nothing else, for operators' log pipelines.
"""

from __future__ import annotations

import logging
import sys

import click

from mgpt4.cli.console import setup_logging
from mgpt4.cli.infer import MODEL_FLAGS, model_option, model_overrides
from mgpt4.cli.options import Flag, config_option, config_overrides, options_from
from mgpt4.serve.config import ServeConfig

REQUEST_LOG = "mgpt4.serve.requests"


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@config_option
@model_option
@options_from(ServeConfig, *MODEL_FLAGS)
@options_from(
    ServeConfig, "host", "port", "api_key", "allow_remote_images", Flag("allow_local_images", metavar="DIR"),
    "model_name", "max_batch_size", "batch_wait_ms", "json",
)  # fmt: skip
@click.pass_context
def serve(
    ctx: click.Context, overrides: tuple[str, ...], config_path: str | None, model_source: str | None
) -> None:
    """An OpenAI-compatible chat endpoint (/v1/chat/completions, /v1/models) and a chat page at /.

    Concurrent requests are decoded together. Binds 127.0.0.1 unless --host says otherwise; images
    come as data URLs only, unless --allow-remote-images / --allow-local-images DIR allow more.
    Ctrl-C stops it after the open requests.

    \b
    Examples:
      mgpt4 serve -m runs/stage2 --port 8000
      mgpt4 serve -m models/minigpt4-7b --host 0.0.0.0 --api-key sk-local --json > requests.jsonl
    \b
    Then, in Python:
      client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
      client.chat.completions.create(model="mgpt4", messages=[{"role": "user", "content": "hi"}])
    """
    from mgpt4.config import load_config
    from mgpt4.serve import require_serve_extra

    require_serve_extra()
    from mgpt4.serve import run_serve

    key_values = list(overrides)
    cfg = load_config(
        ServeConfig,
        config_path,
        [*config_overrides(ctx, key_values), *model_overrides(model_source, config_path, key_values)],
    )
    setup_logging()
    _share_logging("uvicorn")
    if cfg.json:
        request_log = logging.getLogger(REQUEST_LOG)
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        request_log.addHandler(handler)
        request_log.setLevel(logging.INFO)
        request_log.propagate = False  # stdout only: not also on stderr through mgpt4's handler
    result = run_serve(cfg)
    logging.getLogger("mgpt4.serve").info("stopped %s after %d batch(es)", result.url, result.batches)


def _share_logging(name: str) -> None:
    """uvicorn's startup and access lines through mgpt4's stderr handler (``run_serve`` gives uvicorn no
    logging config of its own)."""
    logger = logging.getLogger(name)
    logger.handlers[:] = logging.getLogger("mgpt4").handlers
    logger.setLevel(logging.INFO)
    logger.propagate = False
