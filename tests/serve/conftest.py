"""Serve tests run a real uvicorn server (``helpers.serving.start_server``) on the saved micro model."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from mgpt4.config import ModelConfig
from mgpt4.infer.loading import load_model
from mgpt4.model.minigpt4 import MiniGPT4

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'mgpt4[serve]'")
pytest.importorskip("openai", reason="the dev extra is not installed: pip install 'mgpt4[dev]'")


@pytest.fixture(scope="session")
def serve_model(micro_model_dir) -> MiniGPT4:
    """The saved micro model, loaded the way ``mgpt4 serve --model DIR`` loads it."""
    return load_model(ModelConfig(), checkpoint=micro_model_dir, device="cpu")


@pytest.fixture(scope="module")
def one_thread():
    """Micro model: one intra-op thread is faster, and much faster on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(serve_model, one_thread) -> Iterator:
    """One server for a test module: default caps, and a 200 ms batching window so that concurrent
    test clients on a busy 2-core machine still meet in one batch."""
    from helpers.serving import start_server

    with start_server(serve_model, batch_wait_ms=200, max_images=4) as running:
        yield running
