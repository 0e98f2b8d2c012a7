"""Shared fixtures: one intra-op thread, no user settings, deterministic seeds, and a tiny saved micro model
folder for CLI tests."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from mgpt4.config import ModelConfig
from mgpt4.model.build import build_model, save_model_dir


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than 20 s; runs by default and in CI")


@pytest.fixture(autouse=True, scope="session")
def _no_user_settings(tmp_path_factory):
    """No default model from the machine running the tests: an empty XDG config dir, no $MGPT4_MODEL
    (set in os.environ, so that CLI subprocesses inherit it too)."""
    saved = {name: os.environ.get(name) for name in ("XDG_CONFIG_HOME", "MGPT4_MODEL")}
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("xdg_config"))
    os.environ.pop("MGPT4_MODEL", None)
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    """One torch thread here and in every CLI subprocess (OMP_NUM_THREADS). The tests run micro models,
    which gain nothing from intra-op threads; on a shared 2-core machine two spinning OpenMP threads per
    process made single tests 10-30x slower (curate's e2e tests: 0.7 s alone, 20 s beside other work)."""
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = omp


@pytest.fixture(autouse=True)
def _deterministic():
    """Reset seeds and the default dtype around every test."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="session")
def micro_model_dir(tmp_path_factory) -> str:
    """A saved (untrained, random) micro model folder: ``config.yaml`` + weights + tokenizer."""
    folder = tmp_path_factory.mktemp("micro_model")
    torch.manual_seed(1234)
    cfg = ModelConfig(preset="micro", trainable=["proj"], grad_checkpointing=False)
    save_model_dir(build_model(cfg), cfg, folder)
    return str(folder)
