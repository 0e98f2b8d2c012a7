"""The MiniGPT4 module: official input assembly, loss, greedy answers, trainable groups, checkpointing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mgpt4.config import GenerateConfig, ModelConfig
from mgpt4.conversation import ALIGNMENT_INSTRUCTIONS, ChatTurn, chat_prompt, stage2_prompt
from mgpt4.errors import UsageError
from mgpt4.model.build import build_model
from mgpt4.model.minigpt4 import MiniGPT4
from mgpt4.model.presets import PRESETS


def micro(**overrides) -> MiniGPT4:
    torch.manual_seed(0)
    cfg = ModelConfig(preset="micro", grad_checkpointing=False, **overrides)
    return build_model(cfg)


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(5))


def official_stage2_loss(model: MiniGPT4, imgs, instruction: str, answers: list[str]) -> torch.Tensor:
    """Stage-2 loss assembled the way MG does it (prompt_wrap + concat_emb_input_output), independently."""
    tok, embed = model.tokenizer, model.llama_model.get_input_embeddings()
    img = model.encode_images(imgs)  # (B, T, H)
    before, after = stage2_prompt(instruction).split("<ImageHere>")
    wrapped = [
        torch.cat(
            [
                embed(torch.tensor(tok(before, add_special_tokens=False).input_ids)),
                img[b],
                embed(torch.tensor(tok(after, add_special_tokens=False).input_ids)),
            ]
        )
        for b in range(len(img))
    ]
    ids = [
        tok(a, add_special_tokens=False, truncation=True, max_length=model.max_txt_len).input_ids
        for a in answers
    ]
    width = max(len(i) for i in ids)
    rows, masks, targets = [], [], []
    for b, prompt in enumerate(wrapped):
        # [prompt, answer, answer padding] then BOS in front; pads get attention 0 and label -100.
        pad = width - len(ids[b])
        ans = embed(torch.tensor(ids[b] + [tok.pad_token_id] * pad))
        bos = embed(torch.tensor([tok.bos_token_id]))
        rows.append(torch.cat([bos, prompt, ans]))
        masks.append(torch.tensor([1] * (1 + len(prompt) + len(ids[b])) + [0] * pad))
        targets.append(torch.tensor([-100] * (1 + len(prompt)) + ids[b] + [-100] * pad))
    out = model.llama_model(
        inputs_embeds=torch.stack(rows), attention_mask=torch.stack(masks), labels=torch.stack(targets)
    )
    return out.loss


def test_stage2_loss_matches_official_assembly():
    model = micro()
    answers = [
        "a red circle at the top left###",
        "two shapes: a blue square and a green star on the right###",
    ]
    ours = model(
        {"image": images(), "text": answers, "prompt": [stage2_prompt(ALIGNMENT_INSTRUCTIONS[1])] * 2}
    )
    reference = official_stage2_loss(model, images(), ALIGNMENT_INSTRUCTIONS[1], answers)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-6)


def test_stage1_sequence_is_bos_image_caption():
    model = micro()
    caption = "a red circle\n"
    ours = model({"image": images(1), "text": [caption]})
    embed = model.llama_model.get_input_embeddings()
    ids = model.tokenizer(caption, add_special_tokens=False).input_ids
    img = model.encode_images(images(1))[0]
    seq = torch.cat([embed(torch.tensor([model.tokenizer.bos_token_id])), img, embed(torch.tensor(ids))])
    labels = torch.tensor([-100] * (1 + len(img)) + ids)
    ref = model.llama_model(inputs_embeds=seq[None], labels=labels[None]).loss
    torch.testing.assert_close(ours, ref)


def test_targets_truncate_to_max_txt_len():
    model = micro(max_txt_len=4)
    long = "a red circle at the top left and a blue square at the bottom right\n"
    ids = model.tokenizer(long, add_special_tokens=False).input_ids
    assert len(ids) > 4
    short = model.tokenizer.decode(ids[:4])
    torch.testing.assert_close(
        model({"image": images(1), "text": [long]}),
        micro(max_txt_len=40)({"image": images(1), "text": [short]}),
    )


def greedy_reference(model: MiniGPT4, prompt: str, imgs: torch.Tensor, steps: int) -> list[int]:
    """Plain argmax loop without a KV cache on the official chat context embedding."""
    seq = model.embed_prompt(prompt, model.encode_images(imgs))
    out: list[int] = []
    embed = model.llama_model.get_input_embeddings()
    for _ in range(steps):
        logits = model.llama_model(inputs_embeds=seq[None]).logits[0, -1]
        token = int(logits.argmax())
        out.append(token)
        seq = torch.cat([seq, embed(torch.tensor([token]))])
    return out


def test_greedy_generation_matches_plain_argmax_loop():
    model = micro().eval()
    prompt = chat_prompt([ChatTurn("what is in the image?", image="x.png")])
    assert prompt.endswith(
        "Please answer my questions.###Human: <Img><ImageHere></Img> what is in the image?###Assistant: "
    )
    cfg = GenerateConfig(max_new_tokens=12, repetition_penalty=1.0)
    generated = model.generate([prompt], images(1), cfg)[0]
    expected = greedy_reference(model, prompt, images(1), 12)
    text = model.tokenizer.decode(expected, skip_special_tokens=True)
    assert generated.raw == text[: len(generated.raw)]
    assert generated.tokens <= 12


def test_batched_generation_equals_one_at_a_time():
    model = micro().eval()
    prompts = [stage2_prompt(ALIGNMENT_INSTRUCTIONS[0]), chat_prompt([ChatTurn("hi", image="a")])]
    cfg = GenerateConfig(max_new_tokens=10)
    together = model.generate(prompts, images(2), cfg)
    alone = [model.generate([p], images(2)[i : i + 1], cfg)[0] for i, p in enumerate(prompts)]
    assert [g.raw for g in together] == [g.raw for g in alone]


def test_only_projection_trains_by_default_with_checkpointing_and_grads_match():
    grads = {}
    for checkpointing in (True, False):
        torch.manual_seed(0)
        model = build_model(ModelConfig(preset="micro", grad_checkpointing=checkpointing))
        model.train()
        llm = model.llama_model
        assert any(getattr(m, "gradient_checkpointing", False) for m in llm.modules()) == checkpointing
        assert model.visual_encoder.grad_checkpointing == checkpointing
        loss = model({"image": images(), "text": ["a red circle\n", "a blue star\n"]})
        loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad == {"llama_proj.weight", "llama_proj.bias"}
        grads[checkpointing] = model.llama_proj.weight.grad.clone()
    assert grads[True].abs().sum() > 0
    torch.testing.assert_close(grads[True], grads[False])


def test_trainable_groups_are_configuration():
    model = micro(trainable=["proj", "qformer", "vision", "llm"])
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(UsageError, match="unknown group.*lora"):
        model.set_trainable(["lora"])


def test_llama2_variant_has_no_qformer_and_merges_patches():
    preset = dataclasses.replace(PRESETS["micro"], name="micro-llama2", qformer=None, merge_patches=4)
    llm = build_model(ModelConfig(preset="micro", grad_checkpointing=False)).llama_model
    model = MiniGPT4(preset, llm)
    assert model.Qformer is None and model.query_tokens is None
    assert model.llama_proj.in_features == preset.vision.width * 4
    tokens = model.encode_images(images(2))
    assert tokens.shape == (2, preset.vision.num_patches // 4, llm.config.hidden_size)
    features = model.ln_vision(model.visual_encoder.forward_features(images(2)))
    merged = torch.cat([features[:, 1 + 4 * j : 5 + 4 * j].flatten(1)[:, None] for j in range(16)], dim=1)
    torch.testing.assert_close(tokens, model.llama_proj(merged))


def test_official_presets_have_official_shapes():
    assert PRESETS["vicuna-7b"].vision.depth == 39 and PRESETS["vicuna-7b"].num_image_tokens == 32
    assert PRESETS["llama2-7b"].llm_input_width == 5632 and PRESETS["llama2-7b"].num_image_tokens == 64


def test_generation_stops_at_any_configured_stop_string():
    model = micro().eval()
    cfg = GenerateConfig(max_new_tokens=30, repetition_penalty=1.0, stop=[])
    free = model.generate([stage2_prompt(ALIGNMENT_INSTRUCTIONS[0])], images(1), cfg)[0]
    assert free.tokens == 30  # nothing stops a random model
    first_char = free.raw.strip()[0]
    stopped = model.generate(
        [stage2_prompt(ALIGNMENT_INSTRUCTIONS[0])],
        images(1),
        GenerateConfig(max_new_tokens=30, repetition_penalty=1.0, stop=[first_char]),
    )[0]
    assert stopped.tokens < 30 and first_char not in stopped.text


def test_repetition_penalty_covers_padded_rows_so_batched_equals_alone():
    # transformers' built-in penalty skips a left-padded row's first pad_len generated tokens when
    # generating from inputs_embeds; a padded row then repeats where it would not alone.
    model = micro().eval()
    short = chat_prompt([ChatTurn("hi")])
    long = chat_prompt([ChatTurn("hi " + "describe every shape and colour you see in detail " * 4)])
    cfg = GenerateConfig(max_new_tokens=24, repetition_penalty=1.5)
    no_images = [torch.zeros(0, 3, 64, 64)] * 2
    together = model.generate([short, long], no_images, cfg)
    alone = [model.generate([p], no_images[:1], cfg)[0] for p in (short, long)]
    assert [g.raw for g in together] == [g.raw for g in alone]
