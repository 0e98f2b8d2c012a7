"""The training loop of both stages on DeepSpeed (ZeRO 1/2/3, CPU offload, bf16/fp16/fp32).

``run_worker`` is what each process runs, whether the CLI process itself (one process) or a worker
started by DeepSpeed's launcher (``--gpus N`` / ``--hostfile``). On a CPU machine DeepSpeed uses its
``cpu`` accelerator and the ``gloo`` backend, so the same code path runs N real processes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mgpt4.config import resolve_recipe_path
from mgpt4.errors import ConfigError
from mgpt4.model.build import build_model, resolve_model_dir
from mgpt4.model.checkpoints import TRAINABLE_FILE, load_weights
from mgpt4.model.minigpt4 import MiniGPT4
from mgpt4.train import checkpointing
from mgpt4.train.config import TrainRunConfig
from mgpt4.train.data import make_prefetched_batches
from mgpt4.train.launch import free_port
from mgpt4.train.metrics import MetricsLog, StepProgress, peak_memory_mib, plot_loss
from mgpt4.train.schedule import lr_at

log = logging.getLogger("mgpt4.train")


def run_worker(
    cfg: TrainRunConfig, resume_dir: Path | None = None, progress: StepProgress | None = None
) -> dict[str, Any]:
    """Train ``cfg`` in this process (one rank of however many were launched); returns a summary.

    ``resume_dir`` is the checkpoint the launching process chose and checked (``mgpt4.train.resume``);
    it also truncated ``metrics.jsonl`` to that step. ``progress`` gets every step's record on rank 0.
    """
    import deepspeed

    _log_deepspeed_to_stderr(deepspeed)
    rank, world_size = _init_distributed(deepspeed)
    run = Path(cfg.out)
    model = _setup_model(cfg)
    batches = make_prefetched_batches(cfg, model.preset, rank, world_size)
    if resume_dir is not None:
        checkpointing.restore_weights(model, resume_dir)
    engine = _setup_engine(deepspeed, cfg, model, world_size)
    start_step = 0
    if resume_dir is not None:
        start_step = checkpointing.restore_state(engine, resume_dir, batches, rank)
        log.info("resumed from %s at step %d", resume_dir, start_step)
    metrics = MetricsLog(run, cfg.train.max_steps, rank == 0, cfg.train.tensorboard, progress)
    try:
        last = _train_loop(cfg, engine, model, batches, metrics, run, start_step, rank, world_size)
    finally:
        batches.close()
        metrics.close()
    if rank == 0 and cfg.train.plot and last is not None:
        plot_loss(run)
    summary = {"run": str(run), "steps": cfg.train.max_steps, "resumed_from": start_step,
               "final_loss": last, "skipped_samples": batches.skipped,
               "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
               "total_params": sum(p.numel() for p in model.parameters())}  # fmt: skip
    dist.barrier()
    return summary


def _log_deepspeed_to_stderr(deepspeed) -> None:
    """DeepSpeed's logger writes to the stdout of its import time; stdout is for the --json summary."""
    for handler in deepspeed.utils.logging.logger.handlers:
        if type(handler) is logging.StreamHandler:  # its own handler, not e.g. pytest's capture handlers
            handler.setStream(sys.stderr)


def _init_distributed(deepspeed) -> tuple[int, int]:
    """Join the launcher's process group, or make a one-process group (gloo on CPU)."""
    if "RANK" not in os.environ:
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine insists on it, even alone
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "gloo":
            # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op with g++ at start-up
            # (about a minute on 2 cores, redone whenever its build cache is invalidated). ZeRO's
            # collectives run on gloo without it, so skip it.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if "RANK" in os.environ:  # started by a launcher: its env rendezvous
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        else:
            # One process of our own: a private TCP rendezvous rather than RANK/MASTER_* variables,
            # which would leak into every process this one starts later.
            deepspeed.init_distributed(
                dist_backend=backend, auto_mpi_discovery=False, init_method=f"tcp://127.0.0.1:{free_port()}",
                rank=0, world_size=1,
            )  # fmt: skip
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def _setup_model(cfg: TrainRunConfig) -> MiniGPT4:
    # Same seed on every rank: identical random init wherever weights come from no file.
    torch.manual_seed(cfg.train.seed)
    tokenizer_dir = None
    if cfg.init is not None:
        init_dir = resolve_model_dir(cfg.init)
        tokenizer_dir = init_dir / "tokenizer" if (init_dir / "tokenizer").is_dir() else None
    # Frozen parts load straight into the compute precision on this rank's device; the trainable ones
    # are fp32, DeepSpeed's master weights (it casts the module to bf16/fp16 and keeps fp32 copies).
    # With fp32 precision (the CPU default) everything is fp32, exactly as before.
    model = build_model(
        dataclasses.replace(cfg.model, dtype=resolve_precision(cfg.train.precision)),
        device=_rank_device(),
        tokenizer_dir=tokenizer_dir,
        trainable_dtype=torch.float32,
    )
    if cfg.init is not None:
        loaded = load_weights(model, init_dir / TRAINABLE_FILE)
        log.info("initialised %d tensors from %s", len(loaded), init_dir)
    model.train()
    return model


def deepspeed_config(cfg: TrainRunConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config: the ZeRO recipe plus batch, optimizer, precision and clipping."""
    try:
        zero = json.loads(resolve_recipe_path(cfg.train.zero if cfg.train.zero.endswith(".json")
                                              else cfg.train.zero).read_text())  # fmt: skip
    except ValueError as exc:
        raise ConfigError(f"train.zero: {cfg.train.zero} is not valid JSON ({exc})") from exc
    on_cuda = torch.cuda.is_available()
    precision = resolve_precision(cfg.train.precision)
    optim = cfg.optim
    ds = {
        **zero,
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        "train_batch_size": cfg.data.micro_batch_size * cfg.train.gradient_accumulation_steps * world_size,
        "optimizer": {
            "type": "AdamW",
            # FusedAdam needs CUDA; torch's AdamW is DeepSpeed's CPU choice.
            "params": {"lr": optim.lr, "betas": [optim.beta1, optim.beta2],
                       "weight_decay": optim.weight_decay, "torch_adam": not on_cuda},
        },
        "steps_per_print": 10**9,
    }  # fmt: skip
    if optim.grad_clip > 0:
        ds["gradient_clipping"] = optim.grad_clip
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0}
    return ds


def resolve_precision(precision: str) -> str:
    """``auto`` → bf16 on CUDA (fp16 without bf16 support), fp32 on CPU.

    Raises:
        ConfigError: not one of auto, fp32, bf16, fp16.
    """
    if precision == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"train.precision: '{precision}' is not one of auto, fp32, bf16, fp16")
    return precision


def _rank_device() -> torch.device:
    """This rank's GPU (the launcher's LOCAL_RANK), or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _param_groups(model: MiniGPT4, weight_decay: float) -> list[dict[str, Any]]:
    """MG runner_base.py: no decay on biases, norms and 1-D parameters."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim < 2 or "bias" in name or "ln" in name or "bn" in name or "norm" in name
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _setup_engine(deepspeed, cfg: TrainRunConfig, model: MiniGPT4, world_size: int):
    optim = cfg.optim

    def schedule(optimizer):
        def factor(step: int) -> float:
            return lr_at(step, init_lr=optim.lr, min_lr=optim.min_lr, warmup_lr=optim.warmup_lr,
                         warmup_steps=optim.warmup_steps, iters_per_epoch=optim.iters_per_epoch,
                         total_steps=cfg.train.max_steps) / optim.lr  # fmt: skip

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=_param_groups(model, optim.weight_decay),
        config=deepspeed_config(cfg, world_size),
        lr_scheduler=schedule,
    )
    return engine


def _train_loop(cfg, engine, model, batches, metrics, run, start_step, rank, world_size) -> float | None:
    last_loss = None
    for step in range(start_step + 1, cfg.train.max_steps + 1):
        started = time.monotonic()
        lr = engine.get_lr()[0]
        loss_sum, samples, tokens = 0.0, 0, 0
        for _ in range(cfg.train.gradient_accumulation_steps):
            batch = batches.next_batch()
            loss = engine(batch)
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().float()
            samples += len(batch["text"])
            tokens += _target_tokens(model, batch["text"])
        seconds = time.monotonic() - started
        mean_loss = _mean_over_ranks(loss_sum / cfg.train.gradient_accumulation_steps)
        last_loss = mean_loss
        write = step % cfg.train.log_every == 0 or step == cfg.train.max_steps
        record = {
            "step": step, "loss": mean_loss, "lr": lr, "samples_per_s": samples * world_size / seconds,
            "tokens_per_s": tokens * world_size / seconds, "peak_memory_mib": peak_memory_mib(engine.device),
            "skipped": sum(batches.skipped.values()), "world_size": world_size,
        }  # fmt: skip
        metrics.step(record, write)
        if step % cfg.train.save_every == 0 or step == cfg.train.max_steps:
            checkpointing.save(engine, model, cfg, run, step, batches, rank)
    return last_loss


def _target_tokens(model: MiniGPT4, texts: list[str]) -> int:
    tokenizer = model.tokenizer
    ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=model.max_txt_len).input_ids
    return sum(len(row) for row in ids)


def _mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().clone().reshape(1)
    if dist.get_world_size() > 1:
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)
