"""Dynamic batching: requests that arrive together are decoded together by ``MiniGPT4.generate``.

One worker thread owns the model. A request becomes a ``Job``; the worker takes the oldest waiting
job, waits up to ``batch_wait_ms`` for others with the same decoding settings (``Decoding.batch_key``),
and decodes up to ``max_batch_size`` of them in one left-padded ``generate`` call (the window also
reopens when a batch ends, for the clients that batch just answered). While a batch runs,
new jobs wait for the next one (static batches, rows leave early — no continuous batching).

Every decoding step, ``_Rows`` (a transformers ``StoppingCriteria``, which sees each row's newest
token) advances each row's ``RowText``: incremental decoding, the row's own stop strings and
``max_tokens``, and whether its client went away. A finished or cancelled row is marked done, so
``generate`` stops computing it and returns as soon as the live rows are done. New text is sent to
each job's asyncio queue as it appears — that is the streaming fan-out.

A row's answer does not depend on its batch: each row sees only its own tokens (left padding + mask),
and its stop rules are its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import threading
import time
from collections.abc import Sequence

import torch
from transformers import StoppingCriteria

from mgpt4.model.minigpt4 import MiniGPT4
from mgpt4.serve.messages import Decoding

log = logging.getLogger("mgpt4.serve")

SHUTDOWN = "the server is shutting down"
WINDOW_SHARE = 0.1  # under load, a batch may wait up to this share of the last batch's time
REPLACEMENT_CHAR = "\ufffd"  # what a multi-byte character decodes to until its last byte arrives


@dataclasses.dataclass
class Event:
    """What a job's queue receives: ``delta`` text, then one ``done`` (or ``error``)."""

    kind: str  # "delta" | "done" | "error"
    text: str = ""  # delta: the new text; done: the whole answer; error: the message
    finish_reason: str | None = None  # "stop" | "length"
    completion_tokens: int = 0


@dataclasses.dataclass(eq=False)
class Job:
    """One request waiting for, or inside, a batch."""

    request_id: str
    prompt: str
    images: torch.Tensor  # (k, 3, H, W), k >= 0
    prompt_tokens: int
    decoding: Decoding
    loop: asyncio.AbstractEventLoop
    stream: bool = False
    queue: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)
    enqueued: float = dataclasses.field(default_factory=time.monotonic)
    started: float | None = None  # when its batch began
    batch_size: int = 0
    cancelled: bool = False  # set from the event loop when the client goes away
    shutdown: bool = False  # cancelled because the server stops: its client gets an error

    @property
    def key(self) -> tuple:
        return self.decoding.batch_key(self.request_id)

    def emit(self, event: Event) -> None:
        """Called from the worker thread: hand an event to the job's queue on the event loop."""
        _post([(self, event)])


def _post(events: list[tuple[Job, Event]]) -> None:
    """Deliver events to their jobs' queues with one wake-up of the event loop (all jobs share it)."""
    if not events:
        return
    try:
        events[0][0].loop.call_soon_threadsafe(_deliver, events)
    except RuntimeError:  # the loop is closed: the server is shutting down
        pass


def _deliver(events: list[tuple[Job, Event]]) -> None:
    for job, event in events:
        job.queue.put_nowait(event)


class RowText:
    """One row's answer while tokens arrive: what may be shown yet, and whether the row is done.

    The answer is the text before the first stop string, without surrounding whitespace (as
    ``conversation.clean_answer`` strips it). Shown text never has to be taken back, so three
    things are held back until the next token decides them: a trailing partial multi-byte
    character, a tail that could begin a stop string, and trailing whitespace.
    """

    def __init__(self, tokenizer, stops: Sequence[str], max_tokens: int, eos_token_id: int | None) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.max_tokens = max_tokens
        self.eos_token_id = eos_token_id
        self.ids: list[int] = []
        self.shown = ""
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int) -> str:
        """Take the row's next token; returns newly showable text (the rest of it once done)."""
        if self.done:
            return ""
        if token == self.eos_token_id:
            return self.finish("stop")
        self.ids.append(token)
        text, stopped = self._answer()
        if stopped:
            return self.finish("stop")
        if len(self.ids) >= self.max_tokens:
            return self.finish("length")
        safe = text.rstrip(REPLACEMENT_CHAR)
        return self._show(safe[: len(safe) - _stop_prefix_length(safe, self.stops)].rstrip())

    def finish(self, reason: str) -> str:
        """End the row; returns the text still held back."""
        self.finish_reason = reason
        return self._show(self._answer()[0].rstrip())

    def _answer(self) -> tuple[str, bool]:
        """Decoded text cut before the first stop string, leading whitespace dropped; whether one was hit."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cuts = [index for index in (text.find(stop) for stop in self.stops) if index >= 0]
        return (text[: min(cuts)] if cuts else text).lstrip(), bool(cuts)

    def _show(self, text: str) -> str:
        # Decoding is prefix-stable once held-back text is excluded; should a tokenizer ever rewrite
        # earlier text, nothing more is shown until it agrees again with what was sent.
        if len(text) <= len(self.shown) or not text.startswith(self.shown):
            return ""
        delta, self.shown = text[len(self.shown) :], text
        return delta


def _stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:size]):
                best = size
                break
    return best


class _Rows(StoppingCriteria):
    """Advances every row's ``RowText`` with its newest token and tells ``generate`` which rows are done.

    transformers calls stopping criteria once per step with all ids so far (with ``inputs_embeds``
    those are the generated tokens only), so this sees every token of every row exactly once.
    """

    def __init__(self, jobs: Sequence[Job], rows: Sequence[RowText]) -> None:
        self.jobs = jobs
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done, events = [], []
        for job, row, token in zip(self.jobs, self.rows, input_ids[:, -1].tolist(), strict=True):
            if job.cancelled and not row.done:
                row.finish_reason = "cancelled"  # its client left: the last event says how far it got
                events += [(job, Event("error", SHUTDOWN))] if job.shutdown else _events(job, row, "")
            if not row.done:
                events += _events(job, row, row.add(token))
            done.append(row.done)
        _post(events)  # one event-loop wake-up per step, not one per row
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _events(job: Job, row: RowText, delta: str) -> list[tuple[Job, Event]]:
    """New text for a streaming job; every job gets a last ``done`` event with the whole answer.

    A non-streaming job gets no deltas: each would wake the event loop, which competes with the
    decoding loop for the GIL.
    """
    events = [(job, Event("delta", delta))] if delta and job.stream else []
    if row.done:
        events.append((job, Event("done", row.shown, row.finish_reason, len(row.ids))))
    return events


class Batcher:
    """Collects jobs into batches and decodes them on one worker thread."""

    def __init__(
        self,
        model: MiniGPT4,
        max_batch_size: int,
        batch_wait_ms: float,
        repetition_penalty: float,
        max_queue: int,
    ) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait_ms / 1000
        self.repetition_penalty = repetition_penalty
        self.max_queue = max_queue
        self._pending: list[Job] = []
        self._running = 0
        self._batch: list[Job] = []  # the jobs being decoded
        self._cond = threading.Condition()
        self._stopping = False
        self._last_batch_end = 0.0
        self._last_batch_size = 0
        self._last_batch_seconds = 0.0
        self._thread = threading.Thread(target=self._work, name="mgpt4-serve-batcher", daemon=True)
        self.batches = 0  # how many generate calls ran (for tests and logs)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the running batch's rows at their next step, drop waiting jobs, end the worker."""
        with self._cond:
            self._stopping = True
            for job in self._pending:
                job.emit(Event("error", SHUTDOWN))
            for job in self._batch:
                job.shutdown = job.cancelled = True
            self._pending.clear()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the server already holds ``max_queue`` requests."""
        with self._cond:
            if self._stopping or len(self._pending) + self._running >= self.max_queue:
                return False
            self._pending.append(job)
            self._cond.notify_all()
            return True

    def cancel(self, job: Job) -> bool:
        """The client went away: drop the job if it waits (True), or stop its row at the next step.

        A job already in a batch (False) still gets its last ``done`` event, with finish reason
        ``cancelled`` and the tokens it had generated.
        """
        with self._cond:
            job.cancelled = True
            if job in self._pending:
                self._pending.remove(job)
                return True
            return False

    # ----------------------------------------------------------------------------------------------
    # worker thread
    # ----------------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            started = time.monotonic()
            try:
                self._decode(batch)
            except Exception as exc:  # noqa: BLE001 - one bad batch must not kill the server
                log.exception("batch of %d failed", len(batch))
                for job in batch:
                    job.emit(Event("error", f"generation failed: {type(exc).__name__}: {exc}"))
            finally:
                with self._cond:
                    self._running, self._batch = 0, []
                    self._last_batch_end = time.monotonic()
                    self._last_batch_seconds = self._last_batch_end - started

    def _next_batch(self) -> list[Job] | None:
        """The oldest waiting job and up to ``max_batch_size - 1`` compatible others, once the window ends.

        The window is spent only under concurrent load (the last batch had company, or jobs already
        wait together), so a lone client never waits. It opens when the oldest job arrived or the
        last batch ended, whichever is later: the clients that batch answered get the window to send
        their next request, so that steady load does not lock into alternating part-full batches
        (3, 5, 3, 5 … under 8 clients). It lasts ``batch_wait_ms`` or a tenth of the last batch's
        time, whichever is longer: slow clients (a loaded CPU) still make it back, and waiting
        costs at most ~10% of decoding time.
        """
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:  # stop() already answered every waiting job
                return None
            key = self._pending[0].key
            window = max(self.batch_wait, WINDOW_SHARE * self._last_batch_seconds)
            deadline = max(self._pending[0].enqueued, self._last_batch_end) + window
            while True:
                same = [job for job in self._pending if job.key == key]
                company = self._last_batch_size > 1 or len(same) > 1
                left = deadline - time.monotonic()
                if len(same) >= self.max_batch_size or left <= 0 or not same or not company:
                    break
                self._cond.wait(left)
                if self._stopping:
                    return None
            batch = [job for job in self._pending if job.key == key][: self.max_batch_size]
            started = time.monotonic()
            for job in batch:
                self._pending.remove(job)
                job.started, job.batch_size = started, len(batch)
            self._running = self._last_batch_size = len(batch)
            self._batch = batch
            return batch

    def _decode(self, jobs: list[Job]) -> None:
        for job in [job for job in jobs if job.cancelled]:  # left while the window was open
            job.emit(Event("done", finish_reason="cancelled"))
        jobs = [job for job in jobs if not job.cancelled]
        if not jobs:
            return
        tokenizer = self.model.tokenizer
        rows = [
            RowText(tokenizer, job.decoding.stops, job.decoding.max_tokens, tokenizer.eos_token_id)
            for job in jobs
        ]
        max_new = max(job.decoding.max_tokens for job in jobs)
        # Room for the longest prompt plus the longest answer, so that generate cuts no row's prompt
        # (the API refuses prompts that do not fit instead of cutting them).
        max_length = max(job.prompt_tokens for job in jobs) + max_new
        config = jobs[0].decoding.generate_config(
            max_new, max_length, self.repetition_penalty, seed=random.randrange(2**31)
        )
        self.batches += 1
        self.model.generate(
            [job.prompt for job in jobs],
            [job.images for job in jobs],
            config,
            stopping_criteria=[_Rows(jobs, rows)],
        )
        for job, row in zip(jobs, rows, strict=True):
            if not row.done:  # generate stopped first (its max_new_tokens is every row's largest)
                _post(_events(job, row, row.finish("length")))
