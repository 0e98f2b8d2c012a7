"""POPE: read a yes/no out of a free-form answer, and the paper's five numbers.

POPE's evaluation script (Li et al. 2023, "Evaluating Object Hallucination in Large Vision-Language
Models", github.com/AoiDragon/POPE ``evaluate.py``) keeps the first sentence and calls an answer "no"
when it holds the word no/not, else "yes". ``parse_yes_no`` keeps that rule, so numbers stay
comparable with published ones, and is more careful where the script is blunt: an answer that starts
with yes/no is taken at its word ("Yes, there is no doubt" is yes), and negations it misses ("there
isn't", "none", "nothing", "cannot") count as no.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_NEGATIONS = frozenset({"no", "not", "none", "nothing", "never", "neither", "nor", "cannot", "without"})
_AFFIRMATIONS = frozenset({"yes", "yeah", "yep", "correct", "true"})


def parse_yes_no(answer: str) -> str:
    """``"yes"`` or ``"no"`` for a model's answer (see the module doc for the rule)."""
    first = re.split(r"(?<=[a-z0-9])[.!?](?:\s|$)", answer.strip().lower(), maxsplit=1)[0]
    words = re.findall(r"[a-z]+(?:'[a-z]+)?", first.replace("\u2019", "'"))
    if words and words[0] in _AFFIRMATIONS:
        return "yes"
    if words and words[0] in _NEGATIONS:
        return "no"
    if any(w in _NEGATIONS or w.endswith("n't") for w in words):
        return "no"
    return "yes"


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float | int | None]:
    """Accuracy, precision, recall, F1 (positive class: yes) and the yes-ratio of the predictions.

    Args:
        predictions: parsed answers, ``"yes"``/``"no"``.
        labels: ground truth, ``"yes"``/``"no"``.
    """
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    pairs = list(zip(predictions, labels, strict=True))
    tp = sum(p == "yes" and t == "yes" for p, t in pairs)
    fp = sum(p == "yes" and t == "no" for p, t in pairs)
    tn = sum(p == "no" and t == "no" for p, t in pairs)
    fn = sum(p == "no" and t == "yes" for p, t in pairs)
    total = len(pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / total if total else None,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / total if total else None,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }
