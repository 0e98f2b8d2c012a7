"""Write the README's `mgpt4 demo` results from measured runs' ``score.json`` (never typed by hand).

    mgpt4 demo --out runs/demo && mgpt4 demo --quick --out runs/demo-quick
    python bench/demo_readme.py runs/demo/score.json runs/demo-quick/score.json

copies both files to ``bench/results/demo_{full,quick}.json`` and rewrites the block between the
README's ``<!-- demo-results -->`` markers from them; ``--check`` only compares (the test suite runs it,
so README and the recorded runs cannot drift apart).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
from pathlib import Path

from rich.console import Console

from mgpt4.cli.demo import render_demo
from mgpt4.data.synthetic import ATTRIBUTES

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BEGIN, END = "<!-- demo-results -->", "<!-- /demo-results -->"


def _sizes(summary: dict) -> str:
    sizes = summary["sizes"]
    return (
        f"{sizes['train_images']:,} training images, {sizes['stage1_steps']:,} stage-1 steps, "
        f"{sizes['curate_images']:,} curated images, {sizes['stage2_steps']:,} stage-2 steps, "
        f"{sizes['test_images']:,} test images"
    )


def _machine(summary: dict) -> str:
    start, end = summary["load_average"]
    return f"1-minute load average {start:.1f} at the start, {end:.1f} at the end"


def _scores(summary: dict) -> str:
    score = summary["score"]
    return ", ".join(f"{name} {score[name]:.2f}" for name in ATTRIBUTES)


def section(full: dict, quick: dict) -> str:
    """The generated README block (markers included)."""
    console = Console(file=io.StringIO(), width=110, color_system=None, record=True)
    render_demo(_portable(full), console)
    printed = "\n".join(line.rstrip() for line in console.export_text().splitlines())
    seconds = {s["name"]: round(s["seconds"]) for s in quick["stages"]}
    return "\n".join([
        BEGIN,
        f"The full run ({_sizes(full)}) took {full['total_seconds']:.0f} s of stages ({_machine(full)}) "
        "and printed:",
        "",
        "```",
        printed,
        "```",
        "",
        f"`--quick` ({_sizes(quick)}) took {quick['total_seconds']:.0f} s of stages "
        f"(stage 1 {seconds['pretrain']} s, stage 2 {seconds['finetune']} s; {_machine(quick)}): "
        f"{_scores(quick)}.",
        END,
    ])  # fmt: skip


def _portable(summary: dict) -> dict:
    """Paths as the default run folder would print them, not the measuring machine's."""
    image = summary["example_image"].replace(summary["out"], "runs/demo", 1)
    return {**summary, "out": "runs/demo", "example_image": image}


def _replace(readme: str, block: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"README.md: no {BEGIN} … {END} block to replace")
    head, rest = readme.split(BEGIN, 1)
    return head + block + rest.split(END, 1)[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("full", nargs="?", help="score.json of a full run (default: the recorded one)")
    parser.add_argument("quick", nargs="?", help="score.json of a --quick run (default: the recorded one)")
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md differs, change nothing")
    args = parser.parse_args(argv)
    recorded = {"full": RESULTS / "demo_full.json", "quick": RESULTS / "demo_quick.json"}
    if not args.check:
        for name in ("full", "quick"):
            if getattr(args, name):
                shutil.copyfile(getattr(args, name), recorded[name])
    runs = {name: json.loads(path.read_text()) for name, path in recorded.items()}
    readme = (ROOT / "README.md").read_text()
    updated = _replace(readme, section(runs["full"], runs["quick"]))
    if args.check:
        if updated != readme:
            print("README.md: demo results differ from bench/results/demo_*.json; run bench/demo_readme.py")
            return 1
        return 0
    (ROOT / "README.md").write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
