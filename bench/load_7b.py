"""Peak host memory of ``mgpt4 describe`` at the official 7B shape on CPU, vs the bytes of its weights.

Writes random official-format files at the vicuna-7b shape to a scratch folder (LLM as bf16 safetensors
shards written one at a time, ``eva_vit_g.pth`` in fp16 with its 40th block, a BLIP-2 ``.pth`` with the
text-branch keys, ``pretrained_minigpt4_7b.pth``), then runs, each in a fresh subprocess whose RSS is
polled (and read back from ``getrusage`` as the kernel's own peak):

- ``mgpt4 describe`` on one image in bf16 on CPU (a few new tokens) from the official files;
- with ``--import``: ``import_model`` into one folder, then load-only timings of the official files vs
  that folder (twice each, alternating), and with ``--describe-imported`` describe ``-m FOLDER`` too;
- the reference: plain ``LlamaForCausalLM.from_pretrained(dtype=bf16)`` of the same LLM folder and one
  forward pass (bf16 safetensors are memory-mapped: a weight counts in RSS once it is read).

    PYTHONPATH=. python bench/load_7b.py [--keep] [--import] [--json bench/results/load_7b_cpu.json]

Needs ~17 GB of disk and ~16 GiB of free RAM; it refuses to start with less than --min-free-gib.
Target (issue 14): describe's peak RSS ≤ 1.25× the bf16 bytes of all weights the model uses.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import psutil
from measure import GIB, run_measured

MARKER = ".complete"

REFERENCE = """
import sys, torch
from transformers import LlamaForCausalLM
model = LlamaForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
with torch.no_grad():  # one forward touches every weight: memory-mapped pages count once read
    print(model(torch.tensor([[1, 2, 3]])).logits.shape)
"""


def write_files(scratch: Path, preset: str) -> dict[str, str]:
    from mgpt4.model.synthetic import write_official_files

    index = scratch / "files.json"
    if (scratch / MARKER).exists():
        return json.loads(index.read_text())
    shutil.rmtree(scratch, ignore_errors=True)
    start = time.perf_counter()
    paths = {k: str(v) for k, v in write_official_files(preset, scratch).items()}
    index.write_text(json.dumps(paths))
    (scratch / MARKER).write_text(f"{time.perf_counter() - start:.0f} s\n")
    return paths


def write_image(scratch: Path) -> Path:
    from PIL import Image

    path = scratch / "photo.jpg"
    Image.new("RGB", (320, 240), (200, 120, 40)).save(path, quality=90)
    return path


def weight_bytes(preset: str) -> dict:
    from mgpt4.model.info import model_summary

    summary = model_summary(preset)
    return {"params": summary["total_params"], "bf16_gib": round(summary["total_params"] * 2 / GIB, 3)}


LOAD_ONLY = """
import sys, time, torch
from mgpt4.config import ModelConfig
from mgpt4.model.build import build_model, load_model_dir
start = time.perf_counter()
if sys.argv[1] == "folder":
    model = load_model_dir(sys.argv[2], dtype="bf16")
else:
    vision, qformer, proj, llm = sys.argv[3:7]
    cfg = ModelConfig(preset=sys.argv[2], vision_weights=vision, qformer_weights=qformer or None,
                      proj_weights=proj, llm_path=llm, dtype="bf16", grad_checkpointing=False)
    model = build_model(cfg)
print(f"load_s {time.perf_counter() - start:.2f}")
"""

IMPORT = """
import sys
from mgpt4.model.importer import import_model
import_model(*sys.argv[1:7])
"""


def measure(report: dict, name: str, command: list[str]) -> dict:
    """Run, print and record one measurement (peak RSS against the bf16 bytes of the weights)."""
    result = run_measured(command)
    peak = max(result["peak_rss_gib_kernel"], result["peak_rss_gib_polled"])
    result["peak_over_bf16_weights"] = round(peak / report["weights"]["bf16_gib"], 3)
    loaded = [line for line in result["stdout_tail"].splitlines() if line.startswith("load_s ")]
    if loaded:
        result["load_s"] = float(loaded[-1].split()[1])
    report[name] = result
    print(f"{name:28s} exit {result['exit_code']}  {result['seconds']:7.1f} s  peak RSS {peak:6.2f} GiB "
          f"= {result['peak_over_bf16_weights']:.3f}x the bf16 weights", flush=True)  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="vicuna-7b")
    parser.add_argument("--scratch", default="/tmp/mgpt4-load7b", help="where the ~17 GB of files go")
    parser.add_argument("--keep", action="store_true", help="keep the scratch files (reused next time)")
    parser.add_argument("--import", dest="do_import", action="store_true", help="also import, compare loads")
    parser.add_argument("--describe-imported", action="store_true", help="with --import: describe it too")
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--min-free-gib", type=float, default=18.0)
    parser.add_argument("--json", default="bench/results/load_7b_cpu.json")
    args = parser.parse_args()
    available = psutil.virtual_memory().available / GIB
    if available < args.min_free_gib:
        sys.exit(f"{available:.1f} GiB of RAM available < --min-free-gib {args.min_free_gib}: retry later")
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    paths = write_files(scratch, args.preset)
    memory = psutil.virtual_memory().total / GIB
    report: dict = {
        "machine": f"{platform.node()}: {psutil.cpu_count()} CPUs, {memory:.0f} GiB RAM",
        "preset": args.preset,
        "weights": weight_bytes(args.preset),
        "write_files_s": round(time.perf_counter() - start, 1),
        "note": "other agents share this machine's 2 cores: seconds are noisy; RSS is this process tree's",
    }
    image = write_image(scratch)
    python = sys.executable
    official = [paths["vision"], paths.get("qformer", ""), paths["proj"], paths["llm"]]
    official_flags = [
        "-m",
        args.preset,
        "--vision",
        paths["vision"],
        "--proj",
        paths["proj"],
        "--llm",
        paths["llm"],
    ]
    if "qformer" in paths:
        official_flags += ["--qformer", paths["qformer"]]
    describe = [python, "-m", "mgpt4", "describe", "--device", "cpu", "--dtype", "bf16",
                "--max-new-tokens", str(args.max_new_tokens), "--json", "--quiet", str(image)]  # fmt: skip
    measure(report, "reference_hf_llm_only", [python, "-c", REFERENCE, paths["llm"]])
    measure(report, "describe_official_files", describe + official_flags)
    if args.do_import:
        folder = scratch / "imported"
        shutil.rmtree(folder, ignore_errors=True)
        measure(report, "import", [python, "-c", IMPORT, args.preset, *official, str(folder)])
        if args.describe_imported:
            measure(report, "describe_imported_folder", describe + ["-m", str(folder)])
        # Load only (no forward: bf16 weights stay memory-mapped until used), twice each, alternating.
        for round_ in (1, 2):
            measure(
                report,
                f"load_official_files_{round_}",
                [python, "-c", LOAD_ONLY, "files", args.preset, *official],
            )
            measure(
                report, f"load_imported_folder_{round_}", [python, "-c", LOAD_ONLY, "folder", str(folder)]
            )
        files_s = min(report[f"load_official_files_{r}"]["load_s"] for r in (1, 2))
        folder_s = min(report[f"load_imported_folder_{r}"]["load_s"] for r in (1, 2))
        report["load_s_official_over_imported"] = round(files_s / folder_s, 2)
        print(f"load: official files {files_s:.1f} s, imported folder {folder_s:.1f} s "
              f"→ {files_s / folder_s:.2f}x", flush=True)  # fmt: skip
    ratio = report["describe_official_files"]["peak_over_bf16_weights"]
    print(f"describe peak RSS / bf16 weights: {ratio:.3f} (target <= 1.25)")
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {args.json}")


if __name__ == "__main__":
    main()
