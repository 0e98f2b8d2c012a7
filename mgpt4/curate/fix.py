"""Fixers: turn a generated description into a clean paragraph (MiniGPT-4 paper §3.3, "post-processing").

Backends share one small protocol, ``fix(text) -> FixResult``:

- ``none``: identity.
- ``rules``: deterministic cleanup without an LLM (repeated sentences and words, meaningless
  characters, an unfinished last sentence).
- ``openai``: any OpenAI-compatible ``/chat/completions`` endpoint, with the paper's fix prompt,
  timeouts and exponential backoff. Standard library HTTP only.
- ``hf:PATH``: a local transformers causal LM, greedy decoding of the same prompt.

A fixer never loses the generated text: on failure it returns the input with ``ok=False`` and the error.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import re
import time
import unicodedata
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from mgpt4.config import field
from mgpt4.conversation import FIX_PROMPT
from mgpt4.curate.filters import normalize, sentences
from mgpt4.errors import CheckpointError, UsageError

log = logging.getLogger("mgpt4.curate")

DEFAULT_OPENAI_URL = "https://api.openai.com/v1"
_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


@dataclasses.dataclass
class FixerConfig:
    """Which LLM fixes the generated descriptions, and how it is called."""

    backend: str = field(
        "rules", doc="none, rules (no LLM), openai (chat-completions API) or hf:PATH (local LM)"
    )
    url: str | None = field(
        None, doc="openai: base URL (…/v1); default env OPENAI_BASE_URL, else api.openai.com"
    )
    model: str = field("gpt-3.5-turbo", doc="openai: model name sent to the endpoint")
    key: str | None = field(None, doc="openai: API key; default env OPENAI_API_KEY (never saved to disk)")
    system: str | None = field(None, doc="openai/hf: optional system message before the fix prompt")
    timeout: float = field(60.0, doc="openai: seconds per HTTP request")
    retries: int = field(4, doc="openai: retries after a 429/5xx/connection error")
    backoff: float = field(1.0, doc="openai: first retry delay in seconds, doubled each retry")
    workers: int = field(4, doc="openai: concurrent requests")
    max_new_tokens: int = field(400, doc="openai/hf: longest fixed paragraph, in tokens")

    def validate(self) -> None:
        backend = self.backend.strip()
        if backend not in ("none", "rules", "openai") and not (backend.startswith("hf:") and backend[3:]):
            raise UsageError(f"fixer.backend: '{backend}' is not one of none, rules, openai, hf:PATH")
        if self.retries < 0 or self.workers < 1 or self.timeout <= 0:
            raise UsageError("fixer: retries must be ≥ 0, workers ≥ 1 and timeout > 0")


@dataclasses.dataclass
class FixResult:
    """A fixed paragraph, or the unchanged input with ``ok=False`` and why."""

    text: str
    ok: bool = True
    error: str | None = None
    seconds: float = 0.0


class Fixer(Protocol):
    """Anything with ``fix``; ``uses_llm`` says whether the fixer-commentary filter applies."""

    name: str
    uses_llm: bool

    def fix(self, text: str) -> FixResult: ...


def fix_prompt(paragraph: str) -> str:
    """The user message: the paper's instruction, a blank line, the paragraph."""
    return f"{FIX_PROMPT}\n\n{paragraph}"


def fix_many(fixer: Fixer, texts: Sequence[str], workers: int = 1) -> list[FixResult]:
    """Fix several texts, concurrently when ``workers`` > 1 (HTTP backends), keeping input order."""
    if workers <= 1 or len(texts) <= 1:
        return [fixer.fix(t) for t in texts]
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(workers, len(texts))) as pool:
        return list(pool.map(fixer.fix, texts))


# --------------------------------------------------------------------------------------------------
# none / rules
# --------------------------------------------------------------------------------------------------


class NoneFixer:
    """Keeps the generated text as it is."""

    name = "none"
    uses_llm = False

    def fix(self, text: str) -> FixResult:
        return FixResult(text.strip())


# A run of three or more symbols that are not sentence punctuation ("@@#", "^^^", "~~~").
_SYMBOL_RUN = re.compile(r"[^\w\s.,;:!?'\"()\-]{3,}")
_REPEATED_WORD = re.compile(r"\b(\w+)(?:\s+\1\b)+", re.IGNORECASE)


def _printable(text: str) -> str:
    # Control/format/private/unassigned characters and U+FFFD (undecodable bytes) carry no meaning.
    kept = []
    for char in text:
        category = unicodedata.category(char)
        if char == "\ufffd" or (category[0] == "C" and char not in "\n\t"):
            kept.append(" ")
        else:
            kept.append(char)
    return "".join(kept)


def rules_fix(text: str) -> str:
    """Deterministic cleanup the fix prompt asks for, where no LLM is needed.

    Strips non-printable characters and symbol runs, collapses immediately repeated words and
    whitespace, drops repeated sentences (first one kept) and an unfinished last sentence.
    """
    text = _SYMBOL_RUN.sub(" ", _printable(text))
    text = _REPEATED_WORD.sub(r"\1", text)
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([.,;:!?])", r"\1", text)
    kept, seen = [], set()
    for sentence in sentences(text):
        key = normalize(sentence)
        if key and key not in seen:
            seen.add(key)
            kept.append(sentence)
    if len(kept) > 1 and not kept[-1].endswith((".", "!", "?", '"')):
        kept.pop()  # the model ran out of tokens mid-sentence
    return " ".join(kept)


class RulesFixer:
    """``rules_fix`` as a fixer (the demo's "rules-only fixer")."""

    name = "rules"
    uses_llm = False

    def fix(self, text: str) -> FixResult:
        start = time.perf_counter()
        return FixResult(rules_fix(text), seconds=time.perf_counter() - start)


# --------------------------------------------------------------------------------------------------
# openai-compatible HTTP
# --------------------------------------------------------------------------------------------------


class FixerHTTPError(Exception):
    """One failed request; ``retry`` says whether backing off may help."""

    def __init__(self, message: str, retry: bool, delay: float | None = None) -> None:
        super().__init__(message)
        self.retry = retry
        self.delay = delay


class OpenAIFixer:
    """POST ``{url}/chat/completions`` with the fix prompt; retries 429/5xx/connection errors."""

    name = "openai"
    uses_llm = True

    def __init__(self, cfg: FixerConfig, sleep: Callable[[float], None] = time.sleep) -> None:
        self.cfg = cfg
        self.url = (cfg.url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_OPENAI_URL).rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise UsageError(f"fixer.url: '{self.url}' is not an http(s) URL")
        self.key = cfg.key or os.environ.get("OPENAI_API_KEY")
        self.sleep = sleep

    def request_body(self, text: str) -> dict:
        messages = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []
        messages.append({"role": "user", "content": fix_prompt(text)})
        return {
            "model": self.cfg.model,
            "messages": messages,
            "temperature": 0,
            "max_tokens": self.cfg.max_new_tokens,
        }

    def fix(self, text: str) -> FixResult:
        start = time.perf_counter()
        error = "no attempt"
        for attempt in range(self.cfg.retries + 1):
            try:
                fixed = self._post(self.request_body(text))
                return FixResult(fixed.strip(), seconds=time.perf_counter() - start)
            except FixerHTTPError as exc:
                error = str(exc)
                if not exc.retry or attempt == self.cfg.retries:
                    break
                delay = exc.delay if exc.delay is not None else self.cfg.backoff * 2**attempt
                log.warning("fixer: %s; retry %d/%d in %.1fs", error, attempt + 1, self.cfg.retries, delay)
                self.sleep(delay)
        return FixResult(text, ok=False, error=error, seconds=time.perf_counter() - start)

    def _post(self, body: dict) -> str:
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        request = urllib.request.Request(
            f"{self.url}/chat/completions", data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.cfg.timeout) as response:
                payload = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            delay = _retry_after(exc.headers.get("Retry-After") if exc.headers else None)
            detail = exc.read().decode("utf-8", "replace")[:200].strip()
            raise FixerHTTPError(
                f"HTTP {exc.code} {detail}".strip(), exc.code in _RETRY_STATUS, delay
            ) from exc
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            raise FixerHTTPError(f"connection failed: {getattr(exc, 'reason', exc)}", True) from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FixerHTTPError(f"response is not JSON: {exc}", True) from exc
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise FixerHTTPError("response has no choices[0].message.content", False) from exc
        if not isinstance(content, str):
            raise FixerHTTPError("choices[0].message.content is not text", False)
        return content


def _retry_after(value: str | None) -> float | None:
    try:
        return min(60.0, max(0.0, float(value))) if value else None
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------------
# local HF causal LM
# --------------------------------------------------------------------------------------------------


class HFFixer:
    """A local transformers causal LM directory, decoding the fix prompt greedily."""

    name = "hf"
    uses_llm = True

    def __init__(self, path: str, cfg: FixerConfig, device: str = "cpu") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise UsageError(f"fixer hf:{path}: no config.json — pass a local transformers model directory")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"fixer hf:{path}: cannot load ({str(exc).splitlines()[0]})") from exc
        self.model.to(device).eval()
        self.cfg = cfg
        self.torch = torch

    def prompt_ids(self, text: str) -> list[int]:
        messages = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []
        messages.append({"role": "user", "content": fix_prompt(text)})
        if getattr(self.tokenizer, "chat_template", None):
            # return_dict: transformers 5 returns a BatchEncoding here either way; 4.x a bare list.
            encoded = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )
            return list(encoded["input_ids"])
        plain = "\n\n".join(m["content"] for m in messages) + "\n\n"
        return self.tokenizer(plain).input_ids

    def fix(self, text: str) -> FixResult:
        start = time.perf_counter()
        try:
            ids = self.torch.tensor([self.prompt_ids(text)], device=self.model.device)
            pad = (
                self.tokenizer.pad_token_id
                if self.tokenizer.pad_token_id is not None
                else self.tokenizer.eos_token_id
            )
            with self.torch.no_grad():
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=self.torch.ones_like(ids),
                    max_new_tokens=self.cfg.max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                )
            fixed = self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        except (RuntimeError, ValueError) as exc:
            return FixResult(
                text, ok=False, error=f"hf generate failed: {exc}", seconds=time.perf_counter() - start
            )
        return FixResult(fixed, seconds=time.perf_counter() - start)


def make_fixer(cfg: FixerConfig, device: str = "cpu") -> Fixer:
    """The fixer named by ``cfg.backend``.

    Raises:
        UsageError: unknown backend or missing model directory.
    """
    backend = cfg.backend.strip()
    if backend == "none":
        return NoneFixer()
    if backend == "rules":
        return RulesFixer()
    if backend == "openai":
        return OpenAIFixer(cfg)
    if backend.startswith("hf:") and backend[3:]:
        return HFFixer(backend[3:], cfg, device)
    raise UsageError(f"fixer.backend: '{backend}' is not one of none, rules, openai, hf:PATH")
