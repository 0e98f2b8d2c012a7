"""Checkpoint manifests and the choice of the resume point, on hand-made step folders (no DeepSpeed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mgpt4.errors import CheckpointError
from mgpt4.model.build import resolve_model_dir
from mgpt4.train import manifest
from mgpt4.train.resume import apply_plan, plan_resume


def make_step(run: Path, step: int, world_size: int = 1) -> Path:
    folder = run / "checkpoints" / f"step-{step}"
    (folder / "deepspeed").mkdir(parents=True)
    save_file({"w": torch.ones(2)}, str(folder / "trainable.safetensors"))
    for rank in range(world_size):
        (folder / f"state_rank{rank}.json").write_text(json.dumps({"step": step}))
    torch.save({"exp_avg": torch.zeros(3)}, folder / "deepspeed" / "optim_states.pt")
    manifest.write_manifest(folder, step, world_size)
    return folder


def test_an_intact_folder_verifies(tmp_path):
    found = manifest.verify(make_step(tmp_path, 5, world_size=2))
    assert found["step"] == 5 and found["world_size"] == 2
    assert set(found["files"]) == {"trainable.safetensors", "state_rank0.json", "state_rank1.json",
                                   "deepspeed/optim_states.pt"}  # fmt: skip


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


DAMAGE = {
    "no-manifest": (lambda f: (f / "manifest.json").unlink(), "no manifest.json"),
    "torn-manifest": (lambda f: (f / "manifest.json").write_text('{"files"'), "manifest.json is unreadable"),
    "missing-file": (lambda f: (f / "state_rank0.json").unlink(), "state_rank0.json is missing"),
    "truncated": (lambda f: os.truncate(f / "deepspeed" / "optim_states.pt", 10), "has 10 bytes"),
    "altered": (lambda f: _flip_a_byte(f / "trainable.safetensors"), "does not match its SHA-256"),
    "renamed": (lambda f: f.rename(f.with_name("step-6")), "is for step 5, not step-6"),
}


@pytest.mark.parametrize(("damage", "reason"), list(DAMAGE.values()), ids=list(DAMAGE))
def test_damage_is_named(damage, reason, tmp_path):
    folder = make_step(tmp_path, 5)
    damage(folder)
    folder = folder if folder.exists() else folder.with_name("step-6")
    with pytest.raises(CheckpointError, match=reason):
        manifest.verify(folder)


def test_a_manifest_cannot_point_outside_its_folder(tmp_path):
    folder = make_step(tmp_path, 5)
    data = json.loads((folder / "manifest.json").read_text())
    data["files"]["../../secret"] = {"bytes": 1, "sha256": "0"}
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="outside the folder"):
        manifest.verify(folder)


class _Payload:
    def __reduce__(self):
        return os.system, ("true",)


def test_pickles_naming_code_are_refused_without_running_them(tmp_path):
    folder = make_step(tmp_path, 5)
    manifest.check_pickles(folder)  # tensors only: fine
    torch.save({"x": torch.zeros(1), "p": _Payload()}, folder / "deepspeed" / "optim_states.pt")
    assert manifest.unsafe_globals(folder / "deepspeed" / "optim_states.pt") == ["posix.system"]
    with pytest.raises(CheckpointError, match="names posix.system"):
        manifest.check_pickles(folder)


def test_the_newest_intact_step_wins_and_newer_damaged_ones_are_kept_aside(tmp_path):
    make_step(tmp_path, 5)
    make_step(tmp_path, 10)
    (make_step(tmp_path, 15) / "manifest.json").unlink()
    (tmp_path / "checkpoints" / "step-20.partial").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step-15\n")
    plan = plan_resume(tmp_path)
    assert (plan.folder.name, plan.step) == ("step-10", 10)
    assert [(p.name, why.split(" ")[0]) for p, why in plan.skipped] == [("step-15", "no")]
    apply_plan(plan)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-10", "step-15.skipped", "step-5"]
    assert resolve_model_dir(tmp_path).name == "step-10"  # describe/chat --model RUN agree with resume


def test_a_run_without_checkpoints_starts_at_zero_and_one_without_intact_ones_is_refused(tmp_path):
    assert plan_resume(tmp_path).folder is None
    (tmp_path / "checkpoints" / "step-5.partial").mkdir(parents=True)  # killed during the first save
    assert plan_resume(tmp_path).step == 0
    (make_step(tmp_path, 5) / "state_rank0.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no intact checkpoint.*step-5: state_rank0.json has 2 bytes"):
        plan_resume(tmp_path)
