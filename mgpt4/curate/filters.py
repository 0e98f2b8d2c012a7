"""Filters that reject failed descriptions, each a pure function returning a ``Verdict``.

The paper (MiniGPT-4 §3.3) fixed every description with an LLM and then removed the ones that were
still broken before a manual check. These filters are that removal step, made explicit so each
rejection has a name and a reason that the summary, ``curate.jsonl`` and ``report.html`` can show.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable

from mgpt4.config import field
from mgpt4.errors import ConfigError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[A-Za-z']+|\d+|[^\sA-Za-z\d]")
_LETTER_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
_KEY_TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)?")  # letters/digits of any script: "two", "2", "café"

# Characters an English paragraph may contain besides letters, digits and whitespace.
_ALLOWED_PUNCTUATION = set(".,;:!?'\"()-–—/&%$#@+*=[]’“”‘…°")

# The most frequent English function words: real English prose uses them every few words, random
# or foreign text almost never does.
ENGLISH_FUNCTION_WORDS = frozenset(
    """a an the is are was were be been being of in on at to for with by from and or but as it its
    this that these those there here has have had which who while into onto over under near between
    behind above below next some many several two three one his her their they he she we you i""".split()
)

# Phrases of a model that declined to describe or could not see the image.
REFUSAL_PATTERNS = (
    r"\bi(?:'m| am) sorry\b",
    r"\bi apologi[sz]e\b",
    r"\bas an ai\b",
    r"\bi (?:cannot|can't|can not|am unable to|am not able to)\b",
    r"\b(?:unable|not able) to (?:see|view|describe|determine|provide)\b",
    r"\bthere is no image\b",
    r"\bno image (?:was|is) (?:provided|given|attached)\b",
    r"\bcannot be determined\b",
)

# Openings and phrases of a fixer that talked about the paragraph instead of returning it.
COMMENTARY_PATTERNS = (
    r"^\s*(?:sure|certainly|of course|okay|ok)\b",
    r"^\s*here(?:'s| is| are)\b",
    r"^\s*(?:the )?(?:corrected|fixed|revised|rewritten|edited|updated) (?:paragraph|version|text)\b",
    r"\b(?:corrected|fixed|revised|given|input|original) paragraph\b",
    r"\bi (?:have|'ve) (?:removed|fixed|corrected|rewritten|revised)\b",
    r"\bwithout explanation\b",
    r"\bno (?:errors|changes) (?:were|are)? ?(?:found|needed|necessary)\b",
    r"\bexplanation:",
)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One filter's decision about one caption."""

    name: str
    passed: bool
    reason: str = ""


@dataclasses.dataclass
class FilterConfig:
    """Thresholds of the caption filters."""

    min_words: int = field(8, doc="too_short: fewer words than this is rejected")
    ngram: int = field(4, doc="repetition: n of the word n-grams checked for repeats")
    max_repeated_ngrams: float = field(0.3, doc="repetition: reject above this fraction of repeated n-grams")
    max_bad_chars: float = field(
        0.05, doc="non_english: reject above this fraction of non-English characters"
    )
    min_function_words: float = field(
        0.08, doc="non_english: reject below this fraction of English function words (the, of, a, is, …)"
    )
    min_fix_overlap: float = field(
        0.5, doc="fixer_commentary: reject when fewer of the fixed words come from the generated text"
    )
    max_fix_growth: float = field(1.5, doc="fixer_commentary: reject when the fix is this many times longer")
    skip: list[str] = field(
        default_factory=list, doc="filters to turn off, e.g. [duplicate] for templated synthetic captions"
    )

    def validate(self) -> None:
        unknown = sorted(set(self.skip) - set(FILTER_NAMES))
        if unknown:
            raise ConfigError(
                f"filters.skip: unknown filter(s) {', '.join(unknown)}; choose from {', '.join(FILTER_NAMES)}"
            )


FILTER_NAMES = ("too_short", "repetition", "non_english", "refusal", "fixer_commentary", "duplicate")


def words(text: str) -> list[str]:
    """Lower-cased words (letters, apostrophes, hyphens) of ``text``."""
    return [w.lower() for w in _LETTER_WORD.findall(text)]


def sentences(text: str) -> list[str]:
    """Sentences split after ``.``, ``!`` or ``?`` followed by whitespace."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def normalize(text: str) -> str:
    """Lower-case words and numbers joined by single spaces: the key for duplicate checks."""
    return " ".join(_KEY_TOKEN.findall(text.lower()))


def too_short(text: str, cfg: FilterConfig) -> Verdict:
    """Reject captions with fewer than ``min_words`` words."""
    count = len(words(text))
    if count < cfg.min_words:
        return Verdict("too_short", False, f"{count} words < {cfg.min_words}")
    return Verdict("too_short", True)


def repetition(text: str, cfg: FilterConfig) -> Verdict:
    """Reject a repeated sentence, or too many repeated word n-grams (a looping model)."""
    counts = Counter(normalize(s) for s in sentences(text) if normalize(s))
    repeated = [s for s, n in counts.items() if n > 1]
    if repeated:
        return Verdict("repetition", False, f"sentence repeated {counts[repeated[0]]}×: '{repeated[0][:60]}'")
    tokens = words(text)
    grams = [tuple(tokens[i : i + cfg.ngram]) for i in range(len(tokens) - cfg.ngram + 1)]
    if grams:
        gram_counts = Counter(grams)
        extra = sum(n - 1 for n in gram_counts.values())
        fraction = extra / len(grams)
        if fraction > cfg.max_repeated_ngrams:
            return Verdict(
                "repetition",
                False,
                f"{fraction:.0%} of {cfg.ngram}-grams repeated > {cfg.max_repeated_ngrams:.0%}",
            )
    return Verdict("repetition", True)


def _is_bad_char(char: str) -> bool:
    if char.isascii():
        return not (char.isalnum() or char.isspace() or char in _ALLOWED_PUNCTUATION)
    if char in _ALLOWED_PUNCTUATION:
        return False
    # Accented Latin letters (café, naïve) are English enough; other scripts and symbols are not.
    return not (unicodedata.category(char).startswith("L") and "LATIN" in unicodedata.name(char, ""))


def non_english(text: str, cfg: FilterConfig) -> Verdict:
    """Reject meaningless characters (control, symbols, other scripts) and text without English words."""
    stripped = text.strip()
    if not stripped:
        return Verdict("non_english", False, "empty")
    bad = sum(_is_bad_char(c) for c in stripped)
    if bad / len(stripped) > cfg.max_bad_chars:
        return Verdict("non_english", False, f"{bad / len(stripped):.0%} meaningless or non-Latin characters")
    tokens = words(stripped)
    if tokens:
        function = sum(t in ENGLISH_FUNCTION_WORDS for t in tokens) / len(tokens)
        if function < cfg.min_function_words:
            return Verdict(
                "non_english", False, f"{function:.0%} English function words < {cfg.min_function_words:.0%}"
            )
    return Verdict("non_english", True)


def refusal(text: str, cfg: FilterConfig | None = None) -> Verdict:
    """Reject apologies and refusals ("I'm sorry", "as an AI", "I cannot see the image")."""
    lowered = text.lower().replace("’", "'")
    for pattern in REFUSAL_PATTERNS:
        match = re.search(pattern, lowered)
        if match:
            return Verdict("refusal", False, f"refusal phrase '{match.group(0)}'")
    return Verdict("refusal", True)


def fixer_commentary(fixed: str, generated: str, cfg: FilterConfig, fixer_ran: bool = True) -> Verdict:
    """Reject a fixer answer that comments on the paragraph or is not a rewrite of it.

    A fix must mostly reuse the generated words (the paper's prompt asks for the paragraph "directly
    without explanation"); an unrelated answer or a much longer one is commentary or garbage.
    """
    if not fixer_ran:
        return Verdict("fixer_commentary", True, "no LLM fixer")
    lowered = fixed.lower().replace("’", "'")
    for pattern in COMMENTARY_PATTERNS:
        match = re.search(pattern, lowered)
        if match:
            return Verdict("fixer_commentary", False, f"commentary '{match.group(0).strip()}'")
    fixed_words, source_words = words(fixed), set(words(generated))
    if not fixed_words:
        return Verdict("fixer_commentary", False, "fixer returned no words")
    overlap = sum(w in source_words for w in fixed_words) / len(fixed_words)
    if overlap < cfg.min_fix_overlap:
        return Verdict(
            "fixer_commentary", False, f"only {overlap:.0%} of the fixed words come from the description"
        )
    growth = len(fixed_words) / max(1, len(words(generated)))
    if growth > cfg.max_fix_growth:
        return Verdict("fixer_commentary", False, f"fix is {growth:.1f}× longer than the description")
    return Verdict("fixer_commentary", True)


def duplicate(text: str, seen: Iterable[str]) -> Verdict:
    """Reject a caption equal to one already accepted; ``seen`` holds ``normalize``d captions."""
    if normalize(text) in seen:
        return Verdict("duplicate", False, "same caption as an earlier image")
    return Verdict("duplicate", True)


def run_filters(
    fixed: str, generated: str, seen: set[str], cfg: FilterConfig, fixer_ran: bool
) -> list[Verdict]:
    """All filters on one caption, in ``FILTER_NAMES`` order (every verdict is kept, not just the first)."""
    verdicts = [
        too_short(fixed, cfg),
        repetition(fixed, cfg),
        non_english(fixed, cfg),
        refusal(fixed, cfg),
        fixer_commentary(fixed, generated, cfg, fixer_ran),
        duplicate(fixed, seen),
    ]
    return [v if v.name not in cfg.skip else Verdict(v.name, True, "skipped") for v in verdicts]
