"""Eval tests run the random micro model on CPU: one intra-op thread, the model loaded once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mgpt4.config import ModelConfig
from mgpt4.data.synthetic import make_samples


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def micro_model(micro_model_dir):
    """The saved random micro model, loaded once (eval never changes it)."""
    from mgpt4.infer.loading import load_model

    return load_model(ModelConfig(), micro_model_dir, "cpu")


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """Six real JPEG files (synthetic shapes drawn with seed 5), ``img0.jpg`` … ``img5.jpg``."""
    folder = tmp_path_factory.mktemp("photos")
    for index, sample in enumerate(make_samples(6, seed=5)):
        sample.image.save(folder / f"img{index}.jpg", quality=90)
    return folder
