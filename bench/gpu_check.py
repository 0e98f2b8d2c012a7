"""GPU check through the path a user takes: official-format files on disk → mgpt4 loading → DeepSpeed.

Phases, each a subprocess (its host peak RSS is its own), results in one JSON file:

1. ``files``: random weights in the official formats at the preset's shape (``mgpt4.model.synthetic``:
   bf16 safetensors LLM shards, fp16 ``eva_vit_g.pth`` with its 40th block, BLIP-2 ``.pth``,
   ``pretrained_minigpt4*.pth``) and shape-image training data (stage-1 shards, a stage-2 aligned set);
2. ``stage1``: ``mgpt4 pretrain --config stage1_pretrain`` on those files — frozen ViT/Q-Former/LLM loaded
   straight to the GPU in bf16, SDPA, gradient checkpointing, DeepSpeed ZeRO-2 — for ``--steps`` steps;
3. ``stage2``: ``mgpt4 finetune --config stage2_finetune --init`` the stage-1 run;
4. ``describe``: the stage-2 run loaded by ``mgpt4.infer.loading.load_model`` in bf16, int8 and nf4
   (bitsandbytes): load seconds, peak GPU memory, decode tokens/s (bf16 also against a plain
   ``LlamaForCausalLM.generate`` on the same ``inputs_embeds``).

    PYTHONPATH=. python bench/gpu_check.py [--preset vicuna-7b] [--steps 6] [--phases stage1,describe]
    PYTHONPATH=. python bench/gpu_check.py --tiny     # micro preset: a dry run that also works on a CPU

Files and runs go to ``--scratch`` (reused when present: phases can run in separate calls).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import psutil
from measure import GIB, run_measured

PHASES = ("files", "stage1", "stage2", "describe")
QUANTIZE = ("none", "int8", "nf4")
# (micro batch, steps) per stage at the official shape: the official per-GPU batches (64 / 12).
OFFICIAL_BATCH = {1: 64, 2: 12}
TINY_BATCH = {1: 4, 2: 2}


# --------------------------------------------------------------------------------------------------
# phase 1: files
# --------------------------------------------------------------------------------------------------


def write_inputs(scratch: Path, preset: str, samples: int) -> dict:
    """Official-format weights + stage-1 shards + a stage-2 aligned set (reused when complete)."""
    import webdataset as wds

    from mgpt4.data.aligned import write_aligned
    from mgpt4.data.synthetic import make_samples
    from mgpt4.model.synthetic import write_official_files

    index = scratch / "inputs.json"
    if index.is_file():
        return json.loads(index.read_text())
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    start = time.perf_counter()
    paths = {k: str(v) for k, v in write_official_files(preset, scratch / "weights").items()}
    weights_s = time.perf_counter() - start
    shapes = make_samples(samples, image_size=224)
    shards = scratch / "shards"
    shards.mkdir()
    with wds.TarWriter(str(shards / "00000.tar")) as sink:
        for sample in shapes:
            sink.write({"__key__": sample.key, "jpg": sample.image, "txt": sample.caption})
    (shards / "00000_stats.json").write_text(json.dumps({"count": len(shapes)}))
    write_aligned(scratch / "aligned", [(s.key, s.image, s.detailed) for s in shapes])
    inputs = {"weights": paths, "shards": str(shards), "aligned": str(scratch / "aligned"),
              "write_weights_s": round(weights_s, 1)}  # fmt: skip
    index.write_text(json.dumps(inputs))
    return inputs


# --------------------------------------------------------------------------------------------------
# phases 2-3: training through the CLI
# --------------------------------------------------------------------------------------------------


def weight_overrides(preset: str, weights: dict[str, str]) -> list[str]:
    overrides = [f"model.preset={preset}", f"model.vision_weights={weights['vision']}",
                 f"model.llm_path={weights['llm']}"]  # fmt: skip
    if "qformer" in weights:
        overrides.append(f"model.qformer_weights={weights['qformer']}")
    return overrides


def train(stage: int, args, inputs: dict, scratch: Path) -> dict:
    run = scratch / f"stage{stage}"
    shutil.rmtree(run, ignore_errors=True)
    batch = (TINY_BATCH if args.tiny else OFFICIAL_BATCH)[stage]
    command = [sys.executable, "-m", "mgpt4", "pretrain" if stage == 1 else "finetune",
               "--config", "stage1_pretrain" if stage == 1 else "stage2_finetune", f"out={run}",
               *weight_overrides(args.preset, inputs["weights"]), "model.grad_checkpointing=true",
               "model.attn_implementation=sdpa", f"data.micro_batch_size={batch}",
               f"train.max_steps={args.steps}", "train.log_every=1", f"train.save_every={args.steps}",
               "train.plot=false", "train.zero=zero2", "--json"]  # fmt: skip
    if stage == 1:
        command.append(f"data.shards=[{{path: {inputs['shards']}}}]")
    else:
        command += ["--init", str(scratch / "stage1"), f"data.aligned={inputs['aligned']}"]
    result = run_measured(command)
    report = {"batch": batch, "exit_code": result["exit_code"], "seconds": result["seconds"],
              "peak_host_rss_gib": result["peak_rss_gib_kernel"]}  # fmt: skip
    if result["exit_code"] != 0:
        report["stderr_tail"] = result["stderr_tail"]
        return report
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steady = lines[1:] or lines  # step 1 includes compilation / allocator warm-up
    report |= {
        "steps": len(lines),
        "step_s": round(batch / statistics.median(m["samples_per_s"] for m in steady), 3),
        "samples_per_s": round(statistics.median(m["samples_per_s"] for m in steady), 1),
        # metrics.jsonl: peak allocated GPU memory on CUDA, the rank's peak RSS on a CPU
        "peak_memory_gib": round(max(m["peak_memory_mib"] for m in lines) / 1024, 2),
        "losses": [round(m["loss"], 4) for m in lines],
    }
    return report


# --------------------------------------------------------------------------------------------------
# phase 4: describe (run in its own process per quantize mode)
# --------------------------------------------------------------------------------------------------


def describe_in_process(run: str, quantize: str, batch: int, new_tokens: int) -> dict:
    """Load ``run`` with mgpt4's loader and time one batch of answers; JSON-able numbers."""
    import torch

    from mgpt4.config import GenerateConfig, ModelConfig
    from mgpt4.conversation import ALIGNMENT_INSTRUCTIONS, stage2_prompt
    from mgpt4.infer.loading import load_model

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    start = time.perf_counter()
    model = load_model(ModelConfig(dtype="bf16", quantize=quantize), checkpoint=run, device="auto")
    sync()
    report = {"quantize": quantize, "load_s": round(time.perf_counter() - start, 2)}
    if cuda:
        report["gpu_gib_after_load"] = round(torch.cuda.memory_allocated() / GIB, 2)
        torch.cuda.reset_peak_memory_stats()
    size = model.preset.vision.image_size
    images = torch.randn(batch, 3, size, size)
    prompts = [stage2_prompt(ALIGNMENT_INSTRUCTIONS[0], model.preset.stage2_template)] * batch
    # Random weights: no stop string fires reliably, so both sides below run all new tokens.
    config = GenerateConfig(max_new_tokens=new_tokens, repetition_penalty=1.0, stop=[])
    model.generate(prompts[:1], images[:1], GenerateConfig(max_new_tokens=2))  # warm-up
    sync()
    start = time.perf_counter()
    answers = model.generate(prompts, images, config)
    sync()
    seconds = time.perf_counter() - start
    tokens = sum(answer.tokens for answer in answers)
    report |= {"batch": batch, "seconds": round(seconds, 3), "tokens": tokens,
               "tokens_per_s": round(tokens / seconds, 1)}  # fmt: skip
    if cuda:
        report["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
    if quantize == "none":  # the same decode through plain transformers, on the same embeddings
        with torch.no_grad():
            rows = [
                model.embed_prompt(p, model.encode_images(images[i : i + 1])) for i, p in enumerate(prompts)
            ]
            embeds = torch.stack(rows)
            sync()
            start = time.perf_counter()
            model.llama_model.generate(
                inputs_embeds=embeds,
                attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                pad_token_id=model.tokenizer.pad_token_id,
            )  # fmt: skip
            sync()
        plain = time.perf_counter() - start
        report["plain_hf_s"] = round(plain, 3)
        report["ratio_plain_over_ours"] = round(plain / seconds, 3)
    return report


def describe(args, scratch: Path) -> dict:
    results = {}
    batch = 2 if args.tiny else 8
    for quantize in QUANTIZE:
        command = [sys.executable, __file__, "--describe-run", str(scratch / "stage2"), "--quantize",
                   quantize, "--batch", str(batch), "--new-tokens", str(args.new_tokens)]  # fmt: skip
        result = run_measured(command)
        lines = [line for line in result["stdout_tail"].splitlines() if line.startswith("{")]
        report = json.loads(lines[-1]) if result["exit_code"] == 0 and lines else {}
        report |= {"exit_code": result["exit_code"], "process_s": result["seconds"],
                   "peak_host_rss_gib": result["peak_rss_gib_kernel"]}  # fmt: skip
        if result["exit_code"] != 0:
            report["stderr_tail"] = result["stderr_tail"]
        results[quantize] = report
        print("describe", quantize, report, flush=True)
    return results


# --------------------------------------------------------------------------------------------------


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {psutil.cpu_count()} cores)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="vicuna-7b")
    parser.add_argument("--tiny", action="store_true", help="the micro preset, small batches: a dry run")
    parser.add_argument("--steps", type=int, default=6, help="training steps per stage")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per answer in the describe phase")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {PHASES}")
    parser.add_argument("--scratch", default="/tmp/mgpt4-gpu-check")
    parser.add_argument("--json", default=None, help="default: bench/results/gpu_check_<preset>.json")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    # Internal: one describe measurement, in its own process.
    parser.add_argument("--describe-run", help=argparse.SUPPRESS)
    parser.add_argument("--quantize", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.describe_run:
        print(json.dumps(describe_in_process(args.describe_run, args.quantize, args.batch, args.new_tokens)))
        return
    if args.tiny:
        args.preset, args.steps, args.new_tokens = "micro", min(args.steps, 2), min(args.new_tokens, 8)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        parser.error(f"--phases: unknown {unknown}; choose from {PHASES}")
    scratch = Path(args.scratch)
    out = Path(args.json or f"bench/results/gpu_check_{args.preset}{'_tiny' if args.tiny else ''}.json")
    report = json.loads(out.read_text()) if out.is_file() else {}
    import torch

    report |= {"device": device_name(), "torch": torch.__version__, "preset": args.preset,
               "host_ram_gib": round(psutil.virtual_memory().total / GIB)}  # fmt: skip
    samples = max(OFFICIAL_BATCH.values() if not args.tiny else TINY_BATCH.values()) * args.steps
    inputs = write_inputs(scratch, args.preset, samples)  # every phase needs the files
    report["files"] = {"write_weights_s": inputs["write_weights_s"], "samples": samples}
    for stage in (1, 2):
        if f"stage{stage}" in phases:
            report[f"stage{stage}"] = train(stage, args, inputs, scratch)
            print(f"stage{stage}", report[f"stage{stage}"], flush=True)
    if "describe" in phases:
        report["describe"] = describe(args, scratch)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {out}")
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
