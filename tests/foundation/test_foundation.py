"""The shipped micro foundation models: what this code builds, loadable like official files, pretrained
on what the package says (pixels for the ViT, text for the LLM, in MiniGPT4's exact sequence format)."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from mgpt4 import conversation
from mgpt4.config import load_config
from mgpt4.data import synthetic
from mgpt4.foundation import LLM_PATH, PRESET, SHIPPED_DIR, VISION_WEIGHTS
from mgpt4.foundation.build import (
    FoundationConfig,
    build_foundation,
    read_manifest,
    shipped_digests,
    tensor_digest,
)
from mgpt4.foundation.language import (
    LanguagePretrainConfig,
    SlotWriter,
    build_llm,
    make_example,
    slot_tokens,
    text_loss,
)
from mgpt4.foundation.vision import COLOUR_IDS, POSITION_IDS, SHAPE_IDS, VisionPretrainConfig, token_labels
from mgpt4.model.build import build_model
from mgpt4.model.checkpoints import resolve_path
from mgpt4.model.minigpt4 import MiniGPT4
from mgpt4.model.presets import get_preset
from mgpt4.train.config import TrainRunConfig

TINY = FoundationConfig(
    VisionPretrainConfig(images=96, steps=3, batch_size=8), LanguagePretrainConfig(steps=3, batch_size=4)
)


def test_shipped_files_hold_what_their_manifest_records():
    manifest = read_manifest(SHIPPED_DIR)
    assert shipped_digests(SHIPPED_DIR) == {
        "vision": manifest["vision"]["digest"],
        "language": manifest["language"]["digest"],
    }
    # A few MB in all, as package data should be.
    files = [p for p in resolve_path(SHIPPED_DIR).rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 6_000_000


@pytest.mark.slow
def test_check_rebuilds_the_first_steps_bitwise_and_catches_a_changed_file(tmp_path):
    """`python -m mgpt4.foundation check` reruns the recorded first steps of both pretrainings."""
    result = subprocess.run([sys.executable, "-m", "mgpt4.foundation", "check"],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "OK" in result.stdout

    changed = tmp_path / "micro"
    shutil.copytree(resolve_path(SHIPPED_DIR), changed)
    weights = load_file(changed / "vision.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] += 1e-6
    save_file(weights, changed / "vision.safetensors")
    manifest = json.loads((changed / "manifest.json").read_text())
    manifest["config"]["language"]["lr"] *= 2  # the recorded settings no longer give the recorded steps
    (changed / "manifest.json").write_text(json.dumps(manifest))
    result = subprocess.run([sys.executable, "-m", "mgpt4.foundation", "check", str(changed)],
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 1
    assert "vision: the files' tensors differ" in result.stderr
    assert "language: rebuilding steps" in result.stderr
    assert "vision: rebuilding" not in result.stderr


def test_a_build_writes_loadable_files_with_a_truthful_manifest(tmp_path):
    manifest = build_foundation(tmp_path, TINY)
    assert shipped_digests(tmp_path) == {"vision": manifest["vision"]["digest"],
                                         "language": manifest["language"]["digest"]}  # fmt: skip
    assert set(manifest["vision"]["trajectory"]) == {"1"}  # 3 steps: only step 1 of (1, 10) recorded
    model = build_model(
        load_config(TrainRunConfig, "micro_foundation_stage1", [
            f"model.vision_weights={tmp_path / 'vision.safetensors'}", f"model.llm_path={tmp_path / 'llm'}",
        ]).model
    )  # fmt: skip
    assert tensor_digest(model.visual_encoder.state_dict()) == manifest["vision"]["digest"]
    assert tensor_digest(model.llama_model.state_dict()) == manifest["language"]["digest"]
    again = build_foundation(tmp_path / "again", TINY)
    assert again["vision"]["digest"] == manifest["vision"]["digest"]
    assert again["language"]["digest"] == manifest["language"]["digest"]


def test_the_recipes_load_the_shipped_models_frozen_with_only_the_projection_trainable():
    for recipe in ("micro_foundation_stage1", "micro_foundation_stage2"):
        cfg = load_config(TrainRunConfig, recipe).model
        assert (cfg.preset, cfg.vision_weights, cfg.llm_path) == (PRESET, VISION_WEIGHTS, LLM_PATH)
        assert cfg.trainable == ["proj"]
    model = build_model(cfg)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"llama_proj.weight", "llama_proj.bias"}
    shipped = load_file(resolve_path(VISION_WEIGHTS))
    assert all(torch.equal(model.visual_encoder.state_dict()[k], v) for k, v in shipped.items())
    assert len(shipped) == len(model.visual_encoder.state_dict())
    # ln_vision stays at its identity init (nothing to ship), as in the official Llama-2 MiniGPT-4.
    assert torch.equal(model.ln_vision.weight, torch.ones_like(model.ln_vision.weight))
    assert model.llama_model.get_input_embeddings().num_embeddings == len(model.tokenizer)


def test_token_labels_come_from_the_pixels():
    samples = synthetic.make_samples(60, seed=3)
    one = next(
        s
        for s in samples
        if s.attributes["count"] == 1 and s.attributes["shapes"][0]["position"] == "top left"
    )
    labels = token_labels(one.image, one.attributes, patch_size=8, merge=4)  # (3, 16): 8 rows × 2 halves
    shape = one.attributes["shapes"][0]
    covered = (labels[0] > 0).nonzero().flatten().tolist()
    assert covered and all(t % 2 == 0 and t // 2 <= 3 for t in covered)  # left half, top rows only
    assert set(labels[0, covered].tolist()) == {COLOUR_IDS[shape["colour"]]}
    assert set(labels[1, covered].tolist()) == {SHAPE_IDS[shape["shape"]]}
    assert set(labels[2, covered].tolist()) == {POSITION_IDS["top left"]}
    pair = next(
        s for s in samples if s.attributes["count"] == 2 and s.attributes["shapes"][0]["position"] == "left"
    )
    labels = token_labels(pair.image, pair.attributes, patch_size=8, merge=4)
    left, right = pair.attributes["shapes"]
    assert set(labels[1, 0::2].tolist()) - {0} == {SHAPE_IDS[left["shape"]]}
    assert set(labels[1, 1::2].tolist()) - {0} == {SHAPE_IDS[right["shape"]]}


def test_language_pretraining_builds_sequences_exactly_as_minigpt4_forward(monkeypatch):
    """Same loss on the same texts and slot tokens: the corpus format is the model's own format."""
    preset = get_preset(PRESET)
    llm, tokenizer = build_llm(preset)
    rng = random.Random(5)
    examples = [make_example(rng, chat_fraction=0.5, end_sym=preset.stage2_end_sym) for _ in range(12)]
    assert {e.prompt for e in examples} >= {conversation.stage1_prompt()}
    assert any(e.prompt.startswith("###Human: <Img>") for e in examples)
    writer = SlotWriter(tokenizer, preset.num_image_tokens)
    slots = slot_tokens(llm, writer.weights([e.scene for e in examples], rng), 0.3, torch.Generator())
    ours = text_loss(llm, tokenizer, examples, slots, max_txt_len=160)

    model = MiniGPT4(preset, llm, tokenizer, max_txt_len=160)
    monkeypatch.setattr(model, "encode_images", lambda images: slots)
    prompts = [e.prompt for e in examples]
    reference = model(
        {"image": torch.zeros(len(examples)), "text": [e.target for e in examples], "prompt": prompts}
    )
    torch.testing.assert_close(ours, reference)


def test_slot_tokens_say_each_shape_in_its_words():
    tokenizer = build_llm(get_preset(PRESET))[1]
    writer = SlotWriter(tokenizer, 16)
    scene = {"count": 2, "shapes": [{"shape": "star", "colour": "red", "position": "left"},
                                    {"shape": "circle", "colour": "blue", "position": "right"}]}  # fmt: skip
    mix = writer.weights([scene], random.Random(0))[0]  # (16, V)
    words = {tokenizer.decode([i]).strip() for i in mix.nonzero()[:, 1].tolist()}
    assert words == {"red", "star", "left", "blue", "circle", "right", "background"}
    shown = (mix[:, writer.ids["star"]] > 0).sum() + (mix[:, writer.ids["circle"]] > 0).sum()
    assert 4 <= shown <= 12  # each shape on 2-6 positions
    assert not ((mix[:, writer.ids["star"]] > 0) & (mix[:, writer.ids["circle"]] > 0)).any()
    star = mix[:, writer.ids["star"]] > 0
    strength = mix[star, writer.ids["star"]]  # a partly covered patch: its words blend with "background"
    assert torch.equal(mix[star, writer.ids["red"]], strength) and torch.equal(
        mix[star, writer.ids["left"]], strength
    )
    torch.testing.assert_close(mix[star, writer.ids["background"]], 1 - strength)
    assert ((strength >= 0.3) & (strength <= 1.0)).all()
    assert (mix[~star & (mix[:, writer.ids["circle"]] == 0), writer.ids["background"]] == 1).all()
