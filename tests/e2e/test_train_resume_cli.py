"""Reruns of `mgpt4 pretrain`/`finetune` on a run directory that a kill, a bad disk or another person left
behind: what a resume trusts, what it refuses, and that no step is lost or logged twice.

Most tests copy one finished 10-step run (checkpoints step-5 and step-10), damage the copy, and rerun it
in this process; the tests about processes (SIGKILL of `--gpus 2`, the worker's own weights-only load)
start real ones.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.train_cli import (
    MGPT4,
    child_env,
    clean_process_state,
    free_port,
    invoke,
    metrics,
    stage1_args,
)
from helpers.train_data import write_shape_aligned, write_shape_shards

from mgpt4.config import load_config, save_config
from mgpt4.model.build import load_model_dir
from mgpt4.train import manifest
from mgpt4.train.checkpointing import WeightsOnlyLoads
from mgpt4.train.config import TrainRunConfig
from mgpt4.train.run_dir import RunLock

STEPS = 10
_clean_process_state = pytest.fixture(scope="module", autouse=True)(clean_process_state)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shape_shards(tmp_path_factory.mktemp("resume_data") / "shards", 32)


def run_args(shards: Path, run: Path, *extra: str) -> list[str]:
    settings = [f"train.max_steps={STEPS}", "train.save_every=5", "train.keep_last=3", "train.plot=false"]
    return stage1_args(shards, run, *settings, *extra)


@pytest.fixture(scope="module")
def finished_run(shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    result = invoke(*run_args(shards, run, "--json"))
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-10", "step-5"]
    return run


@pytest.fixture
def run(finished_run, tmp_path) -> Path:
    """A copy of the finished run to damage."""
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file of a run directory and its bytes (the lock file aside)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()
            and p.name != ".lock"}  # fmt: skip


def error_line(result) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    return line


def deepspeed_file(step_folder: Path, kind: str) -> Path:
    (path,) = (step_folder / "deepspeed").glob(f"*{kind}_states.pt")
    return path


# --------------------------------------------------------------------------------------------------
# what a resume trusts: the newest intact checkpoint, never `latest` alone
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hint", ["step-99\n", ""], ids=["latest-names-a-missing-step", "latest-empty"])
def test_resume_takes_the_newest_intact_step_whatever_latest_says(hint, run, shards, finished_run):
    (run / "checkpoints" / "latest").write_text(hint)
    unfinished = run / "checkpoints" / "step-15.partial"  # a kill in the middle of saving step 15
    (unfinished / "deepspeed").mkdir(parents=True)
    with (run / "metrics.jsonl").open("a") as file:
        file.write('{"step": 11, "loss": 2.5, "l')  # a line torn by the same kill
    result = invoke(*run_args(shards, run, "train.max_steps=12", "--json"))
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["resumed_from"] == STEPS
    assert "resuming from step-10" in result.stderr
    lines = metrics(run)
    assert [m["step"] for m in lines] == list(range(1, 13))  # none lost, none twice, no torn line
    assert lines[:STEPS] == metrics(finished_run)
    assert not unfinished.exists()
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["latest", "step-10", "step-12", "step-5"]


def test_a_damaged_newest_step_is_skipped_kept_and_training_resumes_exactly(run, shards, finished_run):
    state = deepspeed_file(run / "checkpoints" / "step-10", "optim")
    damaged = bytearray(state.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # one flipped byte: same size, still a zip, wrong content
    state.write_bytes(bytes(damaged))
    result = invoke(*run_args(shards, run, "--json"))
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["resumed_from"] == 5
    assert f"skipped {run / 'checkpoints' / 'step-10'}" in result.stderr
    assert state.name in result.stderr and "SHA-256" in result.stderr and "step-10.skipped" in result.stderr
    # Steps 6-10 trained again from step 5 give the very same losses; the damaged folder is kept aside.
    original, resumed = metrics(finished_run), metrics(run)
    assert len(resumed) == STEPS
    assert resumed == [{**m, **_timing(n)} for m, n in zip(original, resumed, strict=True)]
    assert (run / "checkpoints" / "step-10.skipped" / "deepspeed" / state.name).read_bytes() == damaged
    assert manifest.verify(run / "checkpoints" / "step-10")["step"] == STEPS


def _timing(record: dict) -> dict:
    """The fields of a metrics line that measure the machine, not the training."""
    return {k: record[k] for k in ("samples_per_s", "tokens_per_s", "peak_memory_mib")}


def test_checkpoints_without_an_intact_one_are_refused_and_nothing_changes(run, shards):
    (run / "checkpoints" / "step-10" / "manifest.json").unlink()  # as a kill mid-save (older layout)
    optim = deepspeed_file(run / "checkpoints" / "step-5", "optim")
    optim.write_bytes(optim.read_bytes()[:1000])  # truncated
    before = snapshot(run)
    result = invoke(*run_args(shards, run, "train.max_steps=12"))
    assert result.exit_code == 1, result.stderr
    line = error_line(result)
    assert f"{run / 'checkpoints'}: no intact checkpoint" in line
    assert "step-10: no manifest.json" in line and "step-5: deepspeed/" in line and "out=" in line
    assert snapshot(run) == before  # no restart from step 1 over the old checkpoints


def test_latest_without_any_step_folder_is_refused(run, shards):
    for folder in (run / "checkpoints").glob("step-*"):
        shutil.rmtree(folder)
    result = invoke(*run_args(shards, run))
    assert result.exit_code == 1
    assert "no intact checkpoint" in error_line(result) and "'step-10'" in error_line(result)


# --------------------------------------------------------------------------------------------------
# what is never unpickled
# --------------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def plant_payload(step_folder: Path, marker: Path) -> Path:
    """Put a payload into DeepSpeed's model state and re-sign the manifest, as a forger would."""
    target = deepspeed_file(step_folder, "model")
    state = WeightsOnlyLoads(None).load(str(target))
    torch.save({**state, "extra": Payload(marker)}, target)
    found = manifest.read_manifest(step_folder)
    manifest.write_manifest(step_folder, found["step"], found["world_size"])
    return target


def test_a_pickled_payload_in_deepspeed_state_is_refused_unrun(run, shards, tmp_path):
    marker = tmp_path / "payload-ran"
    target = plant_payload(run / "checkpoints" / "step-10", marker)
    before = snapshot(run)
    result = invoke(*run_args(shards, run, "train.max_steps=12"))
    assert result.exit_code == 1
    line = error_line(result)
    assert str(target) in line and "posix.system" in line and "refused" in line
    assert not marker.exists()
    assert snapshot(run) == before


@pytest.mark.slow
def test_the_worker_itself_loads_deepspeed_state_weights_only(run, tmp_path):
    """The second wall: a worker told to resume a forged folder (past the CLI's check) refuses too."""
    marker = tmp_path / "payload-ran"
    plant_payload(run / "checkpoints" / "step-10", marker)
    config = load_config(TrainRunConfig, run / "config.yaml", [f"out={run}"])
    save_config(config, run / "config.yaml")
    command = [sys.executable, "-m", "mgpt4.cli.worker", "--config", run / "config.yaml",
               "--resume", run / "checkpoints" / "step-10"]  # fmt: skip
    result = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "mp_rank_00_model_states.pt: refused — the pickle holds objects other than tensors" in line
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# reruns that must not train: finished, other settings, other process count, busy
# --------------------------------------------------------------------------------------------------


def test_rerunning_a_finished_run_reports_it(run, shards):
    before = snapshot(run)
    result = invoke(*run_args(shards, run))
    assert result.exit_code == 0, result.stderr
    assert f"pretrain: already finished at step {STEPS}" in result.stdout
    result = invoke(*run_args(shards, run, "--json"))
    summary = json.loads(result.stdout)
    assert summary["already_finished"] and summary["final_loss"] == metrics(run)[-1]["loss"]
    assert snapshot(run) == before


def test_a_resume_with_other_settings_changes_nothing(run, shards):
    before = snapshot(run)
    result = invoke(*run_args(shards, run, "model.preset=micro", "train.max_steps=12"))
    assert result.exit_code == 2
    line = error_line(result)
    assert "model.preset='micro-patches' (now 'micro')" in line and "new out=" in line
    assert snapshot(run) == before  # config.yaml keeps the settings the checkpoints were made with


def test_a_resume_with_another_process_count_is_refused(run, shards):
    result = invoke(*run_args(shards, run, "train.max_steps=12", "--gpus", "2"))
    assert result.exit_code == 2
    assert "saved by 1 processes" in error_line(result) and "--gpus 1" in error_line(result)


def test_a_run_directory_in_use_is_refused_naming_the_holder(run, shards):
    with RunLock(run):
        result = invoke(*run_args(shards, run, "train.max_steps=12"))
    assert result.exit_code == 1
    assert f"in use by another training run (pid {os.getpid()})" in error_line(result)


@pytest.mark.parametrize("kind", ["file", "under-a-file", "unwritable"])
def test_an_out_that_cannot_be_a_run_folder_is_a_usage_error(kind, shards, tmp_path):
    out = {"file": tmp_path / "taken", "under-a-file": tmp_path / "taken" / "run",
           "unwritable": Path("/proc/mgpt4-run")}[kind]  # fmt: skip
    (tmp_path / "taken").write_text("a file")
    result = invoke(*run_args(shards, out))
    assert result.exit_code == 2, result.stderr
    assert error_line(result).startswith("error: out: ") and str(out) in error_line(result)
    assert result.stdout == ""


def test_plot_leaves_out_a_torn_last_line(finished_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    text = (finished_run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text + text.splitlines()[0][:25])
    result = invoke("plot", run)
    assert result.exit_code == 0, result.stderr
    assert (run / "loss.png").is_file()
    for unwritable in (run / "no" / "such" / "folder.png", Path("/proc/loss.png")):
        result = invoke("plot", run, "--output", unwritable)
        assert result.exit_code == 2 and error_line(result).startswith(f"error: {unwritable}: cannot write")


# --------------------------------------------------------------------------------------------------
# stage 2: unreadable images are skipped and counted
# --------------------------------------------------------------------------------------------------


def _aligned_with_unreadable(folder: Path, unreadable: int) -> Path:
    aligned = write_shape_aligned(folder, 8)
    for image in sorted((aligned / "image").glob("*.jpg"))[:unreadable]:
        image.write_bytes(b"\xff\xd8 not really a jpeg")
    return aligned


def finetune_args(init: Path, aligned: Path, out: Path) -> list[str]:
    return ["finetune", "--config", "micro_stage2", "--init", init, f"data.aligned={aligned}", f"out={out}",
            "data.micro_batch_size=4", "train.max_steps=3", "train.log_every=1", "train.save_every=3",
            "train.plot=false"]  # fmt: skip


def test_finetune_skips_and_counts_unreadable_images(finished_run, tmp_path):
    aligned = _aligned_with_unreadable(tmp_path / "aligned", 4)
    result = invoke(*finetune_args(finished_run, aligned, tmp_path / "run"), "--json")
    assert result.exit_code == 0, result.stderr
    skipped = json.loads(result.stdout)["skipped_samples"]["bad_image"]
    assert skipped >= 4 and metrics(tmp_path / "run")[-1]["skipped"] == skipped
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1, 2, 3]


def test_finetune_on_a_set_without_one_readable_image_fails_in_one_line(finished_run, tmp_path):
    aligned = _aligned_with_unreadable(tmp_path / "aligned", 8)
    result = invoke(*finetune_args(finished_run, aligned, tmp_path / "run"))
    assert result.exit_code == 1
    assert f"{aligned}: none of its 8 images can be read" in error_line(result)


# --------------------------------------------------------------------------------------------------
# real processes: SIGKILL of `mgpt4 --gpus 2` leaves nothing running; the lock holds meanwhile
# --------------------------------------------------------------------------------------------------


def processes_naming(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text`` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc")
def test_sigkill_of_a_two_process_run_stops_every_worker(shards, tmp_path):
    """`--gpus 2` on ZeRO-3 (as the README shows it): killed, resumed, every step once on two ranks."""
    run = tmp_path / "run"
    # 1000 steps: left running, the workers would train for minutes; killed, they stop at once.
    settings = ["train.max_steps=1000", "train.save_every=2", "train.keep_last=2", "train.zero=zero3"]
    args = [*run_args(shards, run, *settings), "--gpus", "2", "--json"]
    latest, config = run / "checkpoints" / "latest", str(run / "config.yaml")
    command = [MGPT4, *args, "--master-port", str(free_port())]
    # Output to a file, not a pipe: waiting on a pipe would wait for any orphan that holds it open.
    with (tmp_path / "first.log").open("wb") as log, subprocess.Popen(command, env=child_env(), stdout=log,
                                                                      stderr=log) as proc:  # fmt: skip
        deadline = time.monotonic() + 240
        while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        busy = invoke(*args)  # a second command on the same folder while the first trains
        assert busy.exit_code == 1 and f"(pid {proc.pid})" in error_line(busy)
        assert len(processes_naming(config)) >= 3  # the launcher, its launch.py, two ranks
        os.kill(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while processes_naming(config) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_naming(config) == [], "training processes outlived the mgpt4 process"
    stopped_at = latest.read_text()
    time.sleep(2)
    assert latest.read_text() == stopped_at  # nothing moves it any more

    # The rerun may shorten the run (max_steps may change on resume): two more steps show the count.
    stopped_step = int(stopped_at.strip().split("-")[1])
    args[args.index("train.max_steps=1000")] = f"train.max_steps={stopped_step + 2}"
    rerun = subprocess.run([MGPT4, *args, "--master-port", str(free_port())], env=child_env(),
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout)  # the launcher's and workers' logs went to stderr
    lines = metrics(run)
    assert summary["resumed_from"] == stopped_step and summary["processes"] == 2
    assert summary["final_loss"] == lines[-1]["loss"]
    assert [m["step"] for m in lines] == list(range(1, stopped_step + 3))  # none lost, none twice
    assert all(m["world_size"] == 2 for m in lines)
    step = run / "checkpoints" / f"step-{stopped_step + 2}"
    states = [json.loads((step / f"state_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [state["data"]["mixture"]["rank"] for state in states] == [0, 1]
    # Saving gathered ZeRO-3's partitioned weights on both ranks: whole tensors, not shards.
    assert all(p.numel() > 0 for p in load_model_dir(run).parameters())
