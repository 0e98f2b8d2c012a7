"""Official weight files load by their real key names; every bad file is refused with a clear error."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from mgpt4.config import ModelConfig
from mgpt4.errors import CheckpointError
from mgpt4.model import checkpoints
from mgpt4.model.build import build_model, load_model_dir, save_model_dir


@pytest.fixture(scope="module")
def model():
    return build_model(ModelConfig(preset="micro", grad_checkpointing=False))


def lavis_blip2_state(model, with_text_branch: bool = True) -> dict[str, torch.Tensor]:
    """A BLIP-2 checkpoint under LAVIS names (OFFICIAL.md §2), scaled to the micro preset."""
    spec, width = model.preset.qformer, model.preset.vision.width
    h, i = spec.hidden_size, spec.intermediate_size
    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    state = {
        "query_tokens": r(1, spec.num_query_tokens, h),
        "ln_vision.weight": r(width),
        "ln_vision.bias": r(width),
        "Qformer.bert.embeddings.LayerNorm.weight": r(h),
        "Qformer.bert.embeddings.LayerNorm.bias": r(h),
        "t5_proj.weight": r(8, h),
        "t5_proj.bias": r(8),
        "Qformer.bert.embeddings.position_ids": torch.arange(16)[None],
    }
    for n in range(spec.num_layers):
        layer = f"Qformer.bert.encoder.layer.{n}."
        for name in ("query", "key", "value"):
            state[f"{layer}attention.self.{name}.weight"] = r(h, h)
            state[f"{layer}attention.self.{name}.bias"] = r(h)
        state |= {
            f"{layer}attention.output.dense.weight": r(h, h),
            f"{layer}attention.output.dense.bias": r(h),
            f"{layer}attention.output.LayerNorm.weight": r(h),
            f"{layer}attention.output.LayerNorm.bias": r(h),
            f"{layer}intermediate_query.dense.weight": r(i, h),
            f"{layer}intermediate_query.dense.bias": r(i),
            f"{layer}output_query.dense.weight": r(h, i),
            f"{layer}output_query.dense.bias": r(h),
            f"{layer}output_query.LayerNorm.weight": r(h),
            f"{layer}output_query.LayerNorm.bias": r(h),
        }
        if n % 2 == 0:
            state[f"{layer}crossattention.self.query.weight"] = r(h, h)
            state[f"{layer}crossattention.self.key.weight"] = r(h, width)
            state[f"{layer}crossattention.self.value.weight"] = r(h, width)
            for name in ("query", "key", "value"):
                state[f"{layer}crossattention.self.{name}.bias"] = r(h)
            state |= {
                f"{layer}crossattention.output.dense.weight": r(h, h),
                f"{layer}crossattention.output.dense.bias": r(h),
                f"{layer}crossattention.output.LayerNorm.weight": r(h),
                f"{layer}crossattention.output.LayerNorm.bias": r(h),
            }
        if with_text_branch:
            state[f"{layer}intermediate.dense.weight"] = r(i, h)
            state[f"{layer}output.dense.weight"] = r(h, i)
            state[f"{layer}output.LayerNorm.weight"] = r(h)
    if with_text_branch:
        state["Qformer.bert.embeddings.word_embeddings.weight"] = r(30, h)
        state["Qformer.cls.predictions.bias"] = r(30)
    return state


def expected_destination(model, key: str) -> torch.Tensor:
    """Where a LAVIS key must land, spelled out per OFFICIAL.md §2 (independent of the loader's map)."""
    if key == "query_tokens":
        return model.query_tokens
    if key.startswith("ln_vision."):
        return model.ln_vision.state_dict()[key[len("ln_vision.") :]]
    hf = key.replace("Qformer.bert.embeddings.LayerNorm", "layernorm").replace("Qformer.bert.", "")
    hf = hf.replace("attention.self.", "attention.attention.")
    return model.Qformer.state_dict()[hf]


def test_blip2_loads_every_used_tensor_and_ignores_text_branch(model, tmp_path):
    state = lavis_blip2_state(model)
    path = tmp_path / "blip2_pretrained_flant5xxl.pth"
    torch.save({"model": state}, path)
    checkpoints.load_blip2(model, path)
    unused = {k for k in state if k.startswith(("t5_proj", "Qformer.cls"))}
    unused |= {k for k in state if "word_embeddings" in k or "position_ids" in k}
    unused |= {
        k for k in state if ".intermediate.dense" in k or ".output.dense" in k.replace("attention.output", "")
    }
    unused |= {
        k for k in state if k.endswith(".output.LayerNorm.weight") and "attention" not in k
    }  # text FFN
    used = [k for k in state if k not in unused]
    assert len(used) == len(model.Qformer.state_dict()) + 3  # + query_tokens + ln_vision weight/bias
    for key in used:
        torch.testing.assert_close(expected_destination(model, key), state[key], msg=f"{key} did not arrive")


def test_blip2_unexpected_and_missing_keys_are_named(model, tmp_path):
    state = lavis_blip2_state(model, with_text_branch=False)
    bad = dict(state, **{"Qformer.bert.encoder.layer.0.attention.self.bogus.weight": torch.zeros(1)})
    torch.save({"model": bad}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"bad\.pth.*unexpected.*bogus"):
        checkpoints.load_blip2(model, tmp_path / "bad.pth")
    del state["Qformer.bert.encoder.layer.1.output_query.dense.weight"]
    torch.save({"model": state}, tmp_path / "missing.pth")
    with pytest.raises(
        CheckpointError, match=r"missing\.pth: missing 1 key.*layer\.1\.output_query\.dense\.weight"
    ):
        checkpoints.load_blip2(model, tmp_path / "missing.pth")


def test_official_projection_checkpoint_with_extra_buffers(model, tmp_path):
    proj = model.llama_proj
    state = {
        "llama_proj.weight": torch.randn_like(proj.weight),
        "llama_proj.bias": torch.randn_like(proj.bias),
        "llama_model.model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4),
    }
    torch.save({"model": state}, tmp_path / "pretrained_minigpt4_7b.pth")
    checkpoints.load_projection(model, tmp_path / "pretrained_minigpt4_7b.pth")
    torch.testing.assert_close(proj.weight, state["llama_proj.weight"])
    torch.testing.assert_close(proj.bias, state["llama_proj.bias"])


def test_wrong_shape_names_key_and_file(model, tmp_path):
    torch.save(
        {"model": {"llama_proj.weight": torch.zeros(5120, 96), "llama_proj.bias": torch.zeros(5120)}},
        tmp_path / "pretrained_minigpt4.pth",
    )
    match = r"pretrained_minigpt4\.pth: 'llama_proj\.weight' has shape \(5120, 96\)"
    with pytest.raises(CheckpointError, match=match):
        checkpoints.load_projection(model, tmp_path / "pretrained_minigpt4.pth")


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(model, tmp_path):
    marker = tmp_path / "pwned"
    payload = _RunsCode()
    payload.marker = marker
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": {"llama_proj.weight": payload}}, f)
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused to load"):
        checkpoints.load_projection(model, path)
    assert not marker.exists()


def test_truncated_and_missing_files(model, tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": {"llama_proj.weight": torch.zeros(3, 3)}}, good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth: not a readable checkpoint"):
        checkpoints.load_projection(model, cut)
    with pytest.raises(CheckpointError, match=r"nope\.pth: weight file not found \(official file: eva_vit_g"):
        checkpoints.load_eva_vit(model, tmp_path / "nope.pth")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: not a readable checkpoint"):
        checkpoints.load_projection(model, tmp_path / "cut.safetensors")


def test_saved_model_folder_round_trips(tmp_path):
    cfg = ModelConfig(preset="micro", trainable=["proj"], grad_checkpointing=False)
    original = build_model(cfg)
    save_model_dir(original, cfg, tmp_path / "step-1")
    restored = load_model_dir(tmp_path / "step-1")
    for key, value in original.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value, msg=key)
    assert len(restored.tokenizer) == len(original.tokenizer)


def test_package_paths_name_files_shipped_inside_the_installed_package(tmp_path):
    import mgpt4

    recipe = checkpoints.resolve_path("mgpt4:recipes/micro_stage1.yaml")
    assert recipe.is_file() and recipe.parent.parent == Path(mgpt4.__file__).parent
    assert checkpoints.resolve_path(tmp_path / "x.pth") == tmp_path / "x.pth"
    cfg = ModelConfig(preset="micro-patches", vision_weights="mgpt4:foundation/nowhere.safetensors")
    with pytest.raises(CheckpointError, match=r"mgpt4/foundation/nowhere.safetensors: weight file not found"):
        build_model(cfg)
