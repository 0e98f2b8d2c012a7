"""Caption metrics with the COCO caption evaluation's own scorers (pycocoevalcap).

BLEU-1..4 (corpus level, "closest" reference length), CIDEr-D (pycocoevalcap's ``Cider``: n = 4,
σ = 6, clipped counts and a length penalty — what COCO reports as CIDEr), ROUGE-L (β = 1.2) and, when
``java`` is on PATH, METEOR 1.5. The scorers are the reference implementation; only its tokenizer,
which needs Java, is replaced by ``coco_tokenize``. CIDEr-D's idf comes from the references of the
scored set, so a subset (``limit``) scores differently from the full set — as in the reference.

pycocoevalcap ships ~100 MB of jars (METEOR, SPICE, CoreNLP), so it is the optional extra
``mgpt4[eval]``.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Mapping, Sequence

from mgpt4.errors import UsageError
from mgpt4.eval.metrics.tokenize import coco_tokenize

log = logging.getLogger("mgpt4.eval")

BLEU_ORDERS = 4
METRIC_NAMES = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider_d", "rouge_l", "meteor")


@dataclasses.dataclass
class CaptionScores:
    """Corpus scores (``METRIC_NAMES``; ``meteor`` None when it did not run), per-item scores, notes."""

    corpus: dict[str, float | None]
    per_item: dict[str, dict[str, float]]
    notes: list[str]


def score_captions(
    answers: Mapping[str, str], references: Mapping[str, Sequence[str]], meteor: bool = True
) -> CaptionScores:
    """Score one generated caption per id against that id's reference captions.

    Args:
        answers: id → generated caption.
        references: id → one or more reference captions (same ids as ``answers``).
        meteor: also run METEOR (needs ``java``; skipped with a note when it is missing).

    Raises:
        UsageError: pycocoevalcap is not installed, or an id has no reference.
    """
    bleu_scorer, cider, rouge = _scorers()
    ids = list(answers)
    if set(ids) != set(references):
        raise UsageError("captions: answers and references must cover the same ids")
    if not ids:
        return CaptionScores({name: None for name in METRIC_NAMES}, {}, ["no answered items to score"])
    empty = [i for i in ids if not references[i]]
    if empty:
        raise UsageError(f"captions: item {empty[0]} has no reference caption")
    res = {i: [coco_tokenize(answers[i])] for i in ids}
    gts = {i: [coco_tokenize(r) for r in references[i]] for i in ids}

    scorer = bleu_scorer(n=BLEU_ORDERS)
    for i in ids:
        scorer += (res[i][0], gts[i])
    bleu, bleu_per_item = scorer.compute_score(option="closest", verbose=0)
    cider_score, cider_per_item = cider().compute_score(gts, res)
    rouge_score, rouge_per_item = rouge().compute_score(gts, res)
    corpus: dict[str, float | None] = {f"bleu_{k + 1}": float(bleu[k]) for k in range(BLEU_ORDERS)}
    corpus.update(cider_d=float(cider_score), rouge_l=float(rouge_score), meteor=None)
    per_item = {
        i: {
            "cider_d": float(cider_per_item[n]),
            "bleu_4": float(bleu_per_item[BLEU_ORDERS - 1][n]),
            "rouge_l": float(rouge_per_item[n]),
        }
        for n, i in enumerate(ids)
    }
    notes = []
    if not meteor:
        notes.append("METEOR not computed (meteor=false)")
    elif shutil.which("java") is None:
        notes.append("METEOR not computed: it needs `java` on PATH (METEOR 1.5 is a Java program)")
    else:
        corpus["meteor"], meteor_per_item = _meteor(gts, res)
        for n, i in enumerate(ids):
            per_item[i]["meteor"] = meteor_per_item[n]
    return CaptionScores(corpus, per_item, notes)


def _scorers():
    try:
        from pycocoevalcap.bleu.bleu_scorer import BleuScorer
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as exc:
        raise UsageError(
            "captions scoring needs pycocoevalcap (the COCO caption scorers): pip install 'mgpt4[eval]'"
        ) from exc
    return BleuScorer, Cider, Rouge


def _meteor(gts: dict[str, list[str]], res: dict[str, list[str]]) -> tuple[float, list[float]]:
    """METEOR 1.5 through pycocoevalcap's wrapper (one JVM for the whole set, stopped afterwards)."""
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        # The wrapper joins references with ' ||| ': strip that separator out of the texts first.
        clean = {i: [r.replace("|||", " ") for r in refs] for i, refs in gts.items()}
        score, per_item = scorer.compute_score(clean, res)
    finally:
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
    return float(score), [float(s) for s in per_item]
