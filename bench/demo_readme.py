"""Write the README's `mgpt4 demo` and `mgpt4 eval` results from measured runs (never typed by hand).

    mgpt4 demo --out runs/demo && mgpt4 demo --quick --out runs/demo-quick
    mgpt4 eval -m runs/demo/stage1 shapes runs/demo/data/test --out evals/stage1
    mgpt4 eval -m runs/demo/stage2 shapes runs/demo/data/test --out evals/stage2
    python bench/demo_readme.py runs/demo/score.json runs/demo-quick/score.json \
        --eval evals/stage1 evals/stage2

copies the demo summaries to ``bench/results/demo_{full,quick}.json`` and the eval runs' ``scores.json``
to ``bench/results/eval_demo/{stage1,stage2}/``, and rewrites the blocks between the README's
``<!-- demo-results -->`` and ``<!-- eval-results -->`` markers from them; ``--check`` only compares
(the test suite runs it, so README and the recorded runs cannot drift apart).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from mgpt4.cli.demo import render_demo
from mgpt4.cli.eval import render_comparison
from mgpt4.data.synthetic import ATTRIBUTES
from mgpt4.eval.compare import SCORES, compare

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BEGIN, END = "<!-- demo-results -->", "<!-- /demo-results -->"
EVAL_BEGIN, EVAL_END = "<!-- eval-results -->", "<!-- /eval-results -->"
EVAL_RUNS = RESULTS / "eval_demo"  # stage1/scores.json, stage2/scores.json


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


def _text(render: Callable[[Console], None]) -> str:
    """What ``render`` prints on a plain 110-column console, trailing spaces stripped."""
    console = Console(file=io.StringIO(), width=110, color_system=None, record=True)
    render(console)
    return "\n".join(line.rstrip() for line in console.export_text().splitlines())


def section(full: dict, quick: dict) -> str:
    """The generated README block (markers included)."""
    printed = _text(lambda console: render_demo(_portable(full), console))
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


def eval_section(runs: Path) -> str:
    """The generated eval block: the commands and ``mgpt4 eval compare``'s table of the two models."""
    first, second = (json.loads((runs / stage / SCORES).read_text()) for stage in ("stage1", "stage2"))
    comparison = compare(runs / "stage1", runs / "stage2")
    comparison.a, comparison.b = "evals/stage1", "evals/stage2"
    settings = second["settings"]
    return "\n".join([
        EVAL_BEGIN,
        f"On the full demo's two models, over its {first['items']} test images "
        f"(`bench/results/eval_demo/`, mgpt4 {second['mgpt4_version']}):",
        "",
        "```console",
        *(f"$ mgpt4 eval -m runs/demo/{stage} shapes runs/demo/data/test --out evals/{stage}"
          for stage in ("stage1", "stage2")),
        "$ mgpt4 eval compare evals/stage1 evals/stage2",
        _text(lambda console: render_comparison(comparison, console)),
        "```",
        "",
        "Both models answer `describe`'s prompt for each image in a fresh conversation, greedy with",
        f"repetition penalty {settings['generate']['repetition_penalty']}. The stage-1 model already names "
        "what it sees; stage 2, trained on the",
        "curated descriptions, states it more accurately and in the chat grammar.",
        EVAL_END,
    ])  # fmt: skip


def _portable(summary: dict) -> dict:
    """Paths as the default run folder would print them, not the measuring machine's."""
    image = summary["example_image"].replace(summary["out"], "runs/demo", 1)
    return {**summary, "out": "runs/demo", "example_image": image}


def _replace(readme: str, block: str, begin: str = BEGIN, end: str = END) -> str:
    if begin not in readme or end not in readme:
        raise SystemExit(f"README.md: no {begin} … {end} block to replace")
    head, rest = readme.split(begin, 1)
    return head + block + rest.split(end, 1)[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("full", nargs="?", help="score.json of a full run (default: the recorded one)")
    parser.add_argument("quick", nargs="?", help="score.json of a --quick run (default: the recorded one)")
    parser.add_argument(
        "--eval", nargs=2, metavar=("STAGE1_DIR", "STAGE2_DIR"), help="`mgpt4 eval shapes` output folders"
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md differs, change nothing")
    args = parser.parse_args(argv)
    recorded = {"full": RESULTS / "demo_full.json", "quick": RESULTS / "demo_quick.json"}
    if not args.check:
        for name in ("full", "quick"):
            if getattr(args, name):
                shutil.copyfile(getattr(args, name), recorded[name])
        for stage, folder in zip(("stage1", "stage2"), args.eval or (), strict=False):
            (EVAL_RUNS / stage).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(folder) / SCORES, EVAL_RUNS / stage / SCORES)
    runs = {name: json.loads(path.read_text()) for name, path in recorded.items()}
    readme = (ROOT / "README.md").read_text()
    updated = _replace(readme, section(runs["full"], runs["quick"]))
    updated = _replace(updated, eval_section(EVAL_RUNS), EVAL_BEGIN, EVAL_END)
    if args.check:
        if updated != readme:
            print("README.md: demo/eval results differ from bench/results/; run bench/demo_readme.py")
            return 1
        return 0
    (ROOT / "README.md").write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
