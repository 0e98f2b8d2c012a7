"""GPU check on a lent CUDA machine: the official 7B shape with random weights, bf16.

Measures what the CPU machine cannot: image encoding, stage-1 / stage-2 train steps with gradient
checkpointing on and off (SDPA vs eager attention), peak memory, and decode tokens/s of
``MiniGPT4.generate`` against a plain ``LlamaForCausalLM.generate`` on the same inputs_embeds.

    PYTHONPATH=. python bench/gpu_check.py [--preset vicuna-7b] [--json OUT.json]

Random weights: the LLM's vocabulary is cut to the built tokenizer's size (the 32000-row embedding
and head are <2% of the 7B FLOPs), everything else has the official shapes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time

import torch
from transformers import LlamaForCausalLM

from mgpt4.config import GenerateConfig
from mgpt4.conversation import ALIGNMENT_INSTRUCTIONS, stage2_prompt
from mgpt4.model.build import llama_config
from mgpt4.model.minigpt4 import MiniGPT4
from mgpt4.model.presets import get_preset
from mgpt4.model.tokenizer import build_micro_tokenizer


def build(preset_name: str, attn: str) -> MiniGPT4:
    preset = get_preset(preset_name)
    tokenizer = build_micro_tokenizer(1024)
    spec = dataclasses.replace(preset.llm, vocab_size=len(tokenizer))
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEVICE):
        llm = LlamaForCausalLM(llama_config(spec, len(tokenizer), attn))
        model = MiniGPT4(preset, llm, tokenizer, max_txt_len=32)
    torch.set_default_dtype(torch.float32)
    return model


DEVICE = "cuda"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeat: int = 3) -> float:
    fn()
    _sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync()
    return (time.perf_counter() - start) / repeat


def train_step(model: MiniGPT4, batch_size: int, stage: int) -> dict:
    images = torch.randn(
        batch_size,
        3,
        model.preset.vision.image_size,
        model.preset.vision.image_size,
        device=DEVICE,
        dtype=torch.bfloat16,
    )
    if stage == 1:
        batch = {
            "image": images,
            "text": ["a photo of a dog running on the grass near a red house\n"] * batch_size,
        }
    else:
        answer = "The image shows a dog running across a green lawn in front of a red house. " * 6 + "###"
        batch = {
            "image": images,
            "text": [answer] * batch_size,
            "prompt": [stage2_prompt(ALIGNMENT_INSTRUCTIONS[0])] * batch_size,
        }
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = model(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    seconds = timed(step)
    return {
        "stage": stage,
        "batch": batch_size,
        "step_s": round(seconds, 3),
        "samples_per_s": round(batch_size / seconds, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }


def decode_speed(model: MiniGPT4, batch_size: int, new_tokens: int = 64) -> dict:
    images = torch.randn(
        batch_size,
        3,
        model.preset.vision.image_size,
        model.preset.vision.image_size,
        device=DEVICE,
        dtype=torch.bfloat16,
    )
    prompts = [stage2_prompt(ALIGNMENT_INSTRUCTIONS[0])] * batch_size
    cfg = GenerateConfig(max_new_tokens=new_tokens, repetition_penalty=1.0)
    # No stop string can fire on random weights reliably, so both sides run all new_tokens.
    ours = timed(lambda: model.generate(prompts, images, cfg), repeat=2)
    rows = [model.embed_prompt(p, model.encode_images(images[i : i + 1])) for i, p in enumerate(prompts)]
    embeds = torch.stack(rows)
    plain = timed(
        lambda: model.llama_model.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones(embeds.shape[:2], device=DEVICE, dtype=torch.long),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=model.tokenizer.pad_token_id,
        ),
        repeat=2,
    )
    return {
        "batch": batch_size,
        "mgpt4_s": round(ours, 3),
        "plain_hf_s": round(plain, 3),
        "plain_tokens_per_s": round(batch_size * new_tokens / plain, 1),
        "ratio_plain_over_ours": round(plain / ours, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="vicuna-7b")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--device", default="cuda", help="cpu = a dry run of this script (use --preset micro)"
    )
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cpu":
        torch.cuda.reset_peak_memory_stats = lambda: None
        torch.cuda.max_memory_allocated = lambda: 0
        torch.cuda.empty_cache = lambda: None
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    report: dict = {"device": name, "torch": torch.__version__, "preset": args.preset}
    for attn in ("sdpa",) if args.only_decode else ("sdpa", "eager"):
        start = time.perf_counter()
        model = build(args.preset, attn)
        report[f"{attn}_build_s"] = round(time.perf_counter() - start, 1)
        with torch.no_grad():
            size = model.preset.vision.image_size
            images = torch.randn(32, 3, size, size, device=DEVICE, dtype=torch.bfloat16)
            seconds = timed(functools.partial(model.encode_images, images))
            report[f"{attn}_encode_images_per_s"] = round(32 / seconds, 1)
        for checkpointing in () if args.only_decode else (True, False):
            model.set_grad_checkpointing(checkpointing)
            model.train()
            for stage, batch in ((1, 64), (2, 12)):
                key = f"{attn}_stage{stage}_ckpt{int(checkpointing)}"
                try:
                    report[key] = train_step(model, batch, stage)
                except torch.OutOfMemoryError:
                    report[key] = "out of memory"
                    torch.cuda.empty_cache()
                print(key, report[key], flush=True)
        model.eval()
        if attn == "sdpa":
            report["decode"] = [decode_speed(model, b) for b in (1, 8)]
            print("decode", report["decode"], flush=True)
        del model
        torch.cuda.empty_cache()
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
