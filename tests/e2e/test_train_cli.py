"""`mgpt4 pretrain` / `finetune` / `plot` through the CLI, on the micro preset and tiny synthetic data.

Single-process runs go through ``CliRunner`` in this process (DeepSpeed's import and gloo start-up are
paid once); a real process is started where the test is about processes: SIGKILL + exact resume and
stdout holding nothing but the ``--json`` summary. ``--gpus 2`` (and its SIGKILL) is tested in
test_train_resume_cli.py.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import webdataset as wds
from helpers.train_cli import (
    MGPT4,
    child_env,
    clean_process_state,
    invoke,
    metrics,
    stage1_args,
)

from mgpt4.config import load_config
from mgpt4.conversation import ALIGNMENT_INSTRUCTIONS, stage2_prompt
from mgpt4.data.aligned import write_aligned
from mgpt4.data.synthetic import make_samples
from mgpt4.model.build import build_model, load_model_dir
from mgpt4.train.config import TrainRunConfig
from mgpt4.train.data import make_batches
from mgpt4.train.schedule import lr_at

METRIC_KEYS = {
    "step",
    "loss",
    "lr",
    "samples_per_s",
    "tokens_per_s",
    "peak_memory_mib",
    "world_size",
    "skipped",
}
PNG = b"\x89PNG\r\n\x1a\n"
STAGE1_STEPS = 20


# --------------------------------------------------------------------------------------------------
# data and helpers
# --------------------------------------------------------------------------------------------------


def _write_shard(folder: Path, index: int, samples, corrupt_keys=frozenset()) -> None:
    """One img2dataset-layout shard (KEY.jpg/.txt/.json) plus the NNNNN_stats.json that marks it done."""
    folder.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(folder / f"{index:05d}.tar")) as writer:
        for sample in samples:
            jpeg = io.BytesIO()
            sample.image.save(jpeg, "JPEG", quality=95)
            data = jpeg.getvalue()[:200] if sample.key in corrupt_keys else jpeg.getvalue()  # truncated
            meta = json.dumps({"caption": sample.caption, "key": sample.key})
            writer.write({"__key__": sample.key, "jpg": data, "txt": sample.caption, "json": meta})
    (folder / f"{index:05d}_stats.json").write_text(json.dumps({"count": len(samples)}))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """64 shape images in two shards, a shard with 3 truncated JPEGs, and a 32-item aligned set."""
    root = tmp_path_factory.mktemp("train_data")
    samples = make_samples(64, split="train")
    _write_shard(root / "shards", 0, samples[:32])
    _write_shard(root / "shards", 1, samples[32:])
    _write_shard(root / "bad_shards", 0, samples[:16], corrupt_keys={s.key for s in samples[3:6]})
    write_aligned(root / "aligned", [(s.key, s.image, s.detailed) for s in samples[:32]])
    samples[0].image.save(root / "image.png")
    return {
        "shards": root / "shards",
        "bad_shards": root / "bad_shards",
        "aligned": root / "aligned",
        "image": root / "image.png",
    }


_clean_process_state = pytest.fixture(scope="module", autouse=True)(clean_process_state)


@pytest.fixture(scope="module")
def stage1_run(data, tmp_path_factory) -> tuple[Path, dict]:
    """A 20-step stage-1 run with a high learning rate, a checkpoint every 5 steps, the last 2 kept."""
    run = tmp_path_factory.mktemp("stage1") / "run"
    settings = [f"train.max_steps={STAGE1_STEPS}", "train.save_every=5", "train.keep_last=2"]
    schedule = ["optim.lr=3e-3", "optim.min_lr=1e-3", "optim.warmup_steps=2"]
    result = invoke(*stage1_args(data["shards"], run, *settings, *schedule, "--json"))
    assert result.exit_code == 0, result.stderr
    return run, json.loads(result.stdout)


# --------------------------------------------------------------------------------------------------
# stage 1
# --------------------------------------------------------------------------------------------------


def test_pretrain_writes_a_complete_run(stage1_run):
    run, summary = stage1_run
    assert summary["run"] == str(run) and summary["steps"] == STAGE1_STEPS and summary["resumed_from"] == 0
    cfg = load_config(TrainRunConfig, run / "config.yaml")
    assert (cfg.stage, cfg.train.max_steps, cfg.data.micro_batch_size) == (1, STAGE1_STEPS, 4)
    assert (run / "config.yaml").read_text().startswith("# mgpt4 pretrain --config")

    lines = metrics(run)
    assert [m["step"] for m in lines] == list(range(1, STAGE1_STEPS + 1))  # log_every=1: one line a step
    assert all(set(m) >= METRIC_KEYS and m["world_size"] == 1 and m["skipped"] == 0 for m in lines)
    assert all(m["samples_per_s"] > 0 and m["tokens_per_s"] > 0 and m["peak_memory_mib"] > 0 for m in lines)
    assert summary["final_loss"] == lines[-1]["loss"]
    # The rate of step s is the schedule at s - 1 (the scheduler steps after each optimizer step).
    o = cfg.optim
    schedule = {"init_lr": o.lr, "min_lr": o.min_lr, "warmup_lr": o.warmup_lr, "warmup_steps": o.warmup_steps,
                "iters_per_epoch": o.iters_per_epoch, "total_steps": STAGE1_STEPS}  # fmt: skip
    expected = [lr_at(m["step"] - 1, **schedule) for m in lines]
    assert [m["lr"] for m in lines] == pytest.approx(expected, rel=1e-9)

    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-15", "step-20"]  # keep_last=2
    assert (checkpoints / "latest").read_text().strip() == "step-20"
    for step in (checkpoints / "step-15", checkpoints / "step-20"):
        assert (step / "trainable.safetensors").is_file() and (step / "config.yaml").is_file()
        assert (step / "tokenizer" / "tokenizer.json").is_file()
        assert (step / "state_rank0.json").is_file()
        assert list((step / "deepspeed").glob("*optim_states.pt")), "DeepSpeed optimizer state missing"
    assert (run / "loss.png").read_bytes()[:8] == PNG


def test_pretrain_loss_decreases(stage1_run):
    losses = [m["loss"] for m in metrics(stage1_run[0])]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, losses


def test_saved_step_loads_and_describes(stage1_run, data):
    run, _ = stage1_run
    weight = "llama_proj.weight"
    trained = dict(load_model_dir(run).named_parameters())[weight]  # the run resolves to checkpoints/latest
    older = dict(load_model_dir(run / "checkpoints" / "step-15").named_parameters())[weight]
    torch.manual_seed(42)
    initial = dict(build_model(load_config(TrainRunConfig, run / "config.yaml").model).named_parameters())[
        weight
    ]
    assert not torch.equal(trained, older) and not torch.equal(trained, initial)

    result = invoke("describe", "--model", run, data["image"], "--json", "--max-new-tokens", "5")
    assert result.exit_code == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert json.loads(line)["image"].endswith("image.png")


def test_plot_writes_a_png(stage1_run, tmp_path):
    out = tmp_path / "curve.png"
    result = invoke("plot", stage1_run[0], "--output", out)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert out.read_bytes()[:8] == PNG
    empty = tmp_path / "empty_run"
    empty.mkdir()
    result = invoke("plot", empty)
    assert result.exit_code == 2 and "no metrics.jsonl" in result.stderr


def test_bad_samples_are_skipped_and_counted(data, tmp_path):
    run = tmp_path / "run"
    # 4 steps x 4 samples > the 13 good samples of the shard: a full pass, so all 3 bad ones are met.
    settings = ["train.max_steps=4", "train.save_every=4", "train.plot=false", "--json"]
    result = invoke(*stage1_args(data["bad_shards"], run, *settings))
    assert result.exit_code == 0, result.stderr
    lines = metrics(run)
    assert len(lines) == 4 and lines[-1]["skipped"] >= 3
    assert json.loads(result.stdout)["skipped_samples"]["bad_image"] >= 3


# --------------------------------------------------------------------------------------------------
# stage 2
# --------------------------------------------------------------------------------------------------


def test_finetune_starts_from_stage1_weights_with_the_stage2_template(stage1_run, data, tmp_path):
    stage1, _ = stage1_run
    run = tmp_path / "stage2"
    result = invoke(
        "finetune", "--config", "micro_stage2", "--init", stage1, f"data.aligned={data['aligned']}",
        f"out={run}", "data.micro_batch_size=4", "train.max_steps=2", "train.log_every=1",
        "train.save_every=2", "train.plot=false", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    cfg = load_config(TrainRunConfig, run / "config.yaml")
    assert cfg.stage == 2 and cfg.init == str(stage1)
    assert (run / "checkpoints" / "step-2" / "trainable.safetensors").is_file()
    first_loss = metrics(run)[0]["loss"]

    # The first batch of the run, rebuilt: one alignment instruction in the stage-2 template, "###" ends.
    model = load_model_dir(stage1)
    model.max_txt_len = cfg.model.max_txt_len  # stage 2 keeps longer answers (160 vs 32 tokens)
    batch = make_batches(cfg, model.preset, rank=0, world_size=1).next_batch()
    assert len(set(batch["prompt"])) == 1
    templated = {stage2_prompt(i, model.preset.stage2_template) for i in ALIGNMENT_INSTRUCTIONS}
    assert batch["prompt"][0] in templated
    assert batch["prompt"][0].startswith("###Human: <Img><ImageHere></Img> ")
    assert all(text.endswith("###") for text in batch["text"])

    # Step 1's loss is the stage-1 model's loss on that batch (no dropout in the micro preset) ...
    with torch.no_grad():
        assert first_loss == pytest.approx(float(model(batch)), rel=1e-5)
        # ... and not what the same batch costs without the prompt, or from the random init.
        without_prompt = float(model({"image": batch["image"], "text": batch["text"]}))
        torch.manual_seed(cfg.train.seed)
        random_init = float(build_model(cfg.model)(batch))
    assert abs(first_loss - without_prompt) > 1e-3 and abs(first_loss - random_init) > 1e-3


# --------------------------------------------------------------------------------------------------
# errors: exit code 2, one line naming the key or path, before anything is written or launched
# --------------------------------------------------------------------------------------------------

ERRORS = {
    "missing-shards": (
        ["pretrain", "data.shards=[{path: /no/such/shards}]", "--gpus", "2"],
        ["/no/such/shards"],
    ),
    "unknown-preset": (["pretrain", "model.preset=mikro"], ["model.preset", "'micro'"]),
    "unknown-key": (["pretrain", "train.max_step=3"], ["'train.max_step'", "'train.max_steps'"]),
    "bad-value": (["pretrain", "data.micro_batch_size=0"], ["data.micro_batch_size"]),
    "stage2-no-aligned": (["finetune", "data.aligned=null"], ["data.aligned"]),
    "stage2-missing-aligned": (["finetune", "data.aligned=/no/such/aligned"], ["/no/such/aligned"]),
    "missing-init": (["finetune", "--init", "/no/such/run"], ["/no/such/run"]),
    "zero-gpus": (["pretrain", "--gpus", "0"], ["--gpus"]),
    "too-many-gpus": (["pretrain", "--gpus", "1000"], ["--gpus 1000", "lower --gpus"]),
}


@pytest.mark.parametrize(("args", "named"), list(ERRORS.values()), ids=list(ERRORS))
def test_errors_exit_2_naming_the_key_before_anything_starts(args, named, data, tmp_path):
    command, rest = args[0], args[1:]
    recipe = "micro_stage1" if command == "pretrain" else "micro_stage2"
    run = tmp_path / "run"
    if command == "pretrain" and not any(a.startswith("data.shards") for a in rest):
        rest = [*rest, f"data.shards=[{{path: {data['shards']}}}]"]
    if command == "finetune" and not any(a.startswith("data.aligned") for a in rest):
        rest = [*rest, f"data.aligned={data['aligned']}"]
    result = invoke(command, "--config", recipe, *rest, f"out={run}")
    assert result.exit_code == 2, result.stderr
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and all(word in line for word in named), line
    assert not run.exists()  # no config.yaml written, no process launched


# --------------------------------------------------------------------------------------------------
# real processes: exact resume after SIGKILL, clean --json stdout
# --------------------------------------------------------------------------------------------------


def kill_when(command: list[str], ready, timeout: float = 240) -> None:
    """Start ``command`` and SIGKILL it as soon as ``ready()`` holds (it must still be running)."""
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    with subprocess.Popen(command, env=child_env(), **pipes) as proc:
        deadline = time.monotonic() + timeout
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, stderr.decode()[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_resume_after_sigkills_is_exact(zero, data, tmp_path):
    """Killed before its first checkpoint, then after one: every step logged once, losses bitwise equal."""

    def command(run: Path) -> list[str]:
        settings = ["train.max_steps=40", "train.save_every=5", "train.keep_last=2",
                    "data.micro_batch_size=8", f"train.zero={zero}", "train.plot=false"]  # fmt: skip
        return [MGPT4, *stage1_args(data["shards"], run, *settings, "--json")]

    reference = tmp_path / "reference"
    result = invoke(*command(reference)[1:])
    assert result.exit_code == 0, result.stderr

    run = tmp_path / "killed"
    latest, lines = run / "checkpoints" / "latest", run / "metrics.jsonl"
    kill_when(command(run), lambda: lines.is_file() and lines.read_text().count("\n") >= 2)
    assert not latest.exists(), "the first checkpoint (step 5) came before the kill"
    kill_when(command(run), latest.exists)  # the rerun starts over, then is killed after a checkpoint
    killed_at = latest.read_text().strip()
    assert killed_at != "step-40", "the run finished before the kill"

    rerun = subprocess.run(command(run), env=child_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)  # stdout holds the summary only, though DeepSpeed logs a lot
    assert summary["resumed_from"] == int(killed_at.split("-")[1]) > 0

    expected, resumed = metrics(reference), metrics(run)
    assert [m["step"] for m in resumed] == list(range(1, 41))  # none lost, none twice
    assert [m["loss"] for m in resumed] == [m["loss"] for m in expected]  # bitwise equal floats
    assert [m["lr"] for m in resumed] == [m["lr"] for m in expected]


def test_finetune_init_of_another_preset_is_a_usage_error(micro_model_dir, data, tmp_path):
    run = tmp_path / "run"
    result = invoke("finetune", "--config", "micro_stage2", "--init", micro_model_dir,
                    f"data.aligned={data['aligned']}", f"out={run}")  # fmt: skip
    assert result.exit_code == 2
    assert "holds a micro model but model.preset is micro-patches; set model.preset=micro" in result.stderr
    assert not run.exists()
