"""Decoding as the official stack does it: transformers 4.30 ``generate`` + MG's ``StoppingCriteriaSub``.

The official chat calls ``llama_model.generate(inputs_embeds=…)`` under transformers 4.30 with the stop
ids ``[[835], [2277, 29937]]`` (shared/OFFICIAL.md §5, §11). Three of its rules are not what
transformers 5 does, so models whose LLM comes from an official folder decode with the rules here:

* 4.30 seeds the output ids with BOS when only ``inputs_embeds`` is given, so a repetition penalty
  covers BOS from the first step (``SeededRepetitionPenalty`` with ``seed=[BOS]``). transformers 5
  starts from no ids; it also skips the first *generated* tokens of a left-padded row (it takes the
  prompt's padding length as a count of ids to ignore), which the processor here does not.
* Beam search ends only when every beam ends with the same stop-id sequence (MG checks
  ``input_ids[:, -len(stop):] == stop`` over all rows), or at EOS/length as 4.30's ``BeamSearchScorer``
  decides; the best hypothesis is then cut at the stop string by the caller. 4.30 scores a hypothesis
  by ``sum(logprobs) / len**length_penalty`` with BOS counted in ``len``; transformers 5 ends each beam
  at its own stop and counts only generated tokens. ``beam_search`` reproduces 4.30 (and 4.30's
  ``beam_sample`` when sampling), run per prompt as the batch-of-one chat does.
* Only EOS and the stop strings end an answer; the pad id (MG's ``$$`` is ``<unk>``, id 0, in Vicuna's
  vocabulary) never does (handled in ``MiniGPT4._finish``).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence

import torch
from torch import nn
from transformers import (
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from mgpt4.config import GenerateConfig
from mgpt4.model.tokenizer import OfficialLlamaTokenizer

# 4.30 BeamSearchScorer defaults the official code does not change (MG answer_prepare: length_penalty=1).
LENGTH_PENALTY = 1.0


class SeededRepetitionPenalty(LogitsProcessor):
    """4.30's ``RepetitionPenaltyLogitsProcessor`` over ``seed + generated`` ids.

    A penalised score is divided by ``penalty`` when positive and multiplied when negative.
    """

    def __init__(self, penalty: float, seed: Sequence[int] = ()) -> None:
        self.penalty = penalty
        self.seed = list(seed)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.penalty == 1.0:
            return scores
        seed = torch.tensor(self.seed, dtype=torch.long, device=scores.device).expand(len(scores), -1)
        ids = torch.cat([seed, input_ids.to(scores.device)], dim=1)  # (B, S + T)
        if ids.shape[1] == 0:
            return scores
        picked = scores.gather(1, ids)
        picked = torch.where(picked < 0, picked * self.penalty, picked / self.penalty)
        return scores.scatter(1, ids, picked)


def stop_id_sequences(tokenizer: OfficialLlamaTokenizer, stops: Sequence[str]) -> list[list[int]]:
    """The token spellings of each stop string that end a beam search, like MG's ``[[835], [2277, 29937]]``.

    Those are Llama's two encodings of ``###``: as a piece of text of its own (``▁###``, dummy prefix)
    and glued to the text before it (``##`` ``#``). Both come from the tokenizer, so any stop string
    and any sentencepiece vocabulary get their own pair.
    """
    sequences: list[list[int]] = []
    for stop in stops:
        for ids in (tokenizer(stop, add_special_tokens=False).input_ids, tokenizer.encode_inside_text(stop)):
            if ids and ids not in sequences:
                sequences.append(ids)
    return sequences


@dataclasses.dataclass
class _Hypotheses:
    """4.30 ``BeamHypotheses``: the best ``size`` finished sequences of one prompt (early_stopping=False)."""

    size: int
    items: list[tuple[float, list[int]]] = dataclasses.field(default_factory=list)
    worst: float = 1e9

    def add(self, ids: list[int], sum_logprobs: float) -> None:
        score = sum_logprobs / len(ids) ** LENGTH_PENALTY  # len counts the BOS seed
        if len(self.items) < self.size or score > self.worst:
            self.items.append((score, ids))
            if len(self.items) > self.size:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.items))
                del self.items[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_sum_logprobs: float, length: int) -> bool:
        """No running beam can still beat the worst kept hypothesis (4.30's heuristic)."""
        return len(self.items) >= self.size and self.worst >= best_sum_logprobs / length**LENGTH_PENALTY

    def best(self) -> list[int]:
        # sorted(by score) then pop(): among equal scores the one added last wins.
        return max(enumerate(self.items), key=lambda item: (item[1][0], item[0]))[1][1]


@torch.no_grad()
def beam_search(
    llm: PreTrainedModel,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    config: GenerateConfig,
    bos_id: int,
    eos_id: int,
    stops: Sequence[Sequence[int]],
) -> list[list[int]]:
    """4.30 beam search (or beam sampling) from left-padded prompt embeddings; the best ids per prompt.

    Args:
        inputs_embeds: (B, L, H) prompts, left-padded; attention_mask: (B, L).
        config: ``num_beams`` ≥ 2, ``max_new_tokens``, ``repetition_penalty`` and the sampling settings.
        stops: stop-id sequences (``stop_id_sequences``); a prompt ends when all its beams end with one.

    Returns:
        B lists of generated ids (no BOS seed, no EOS).
    """
    batch, beams = inputs_embeds.shape[0], config.num_beams
    embeds = inputs_embeds.repeat_interleave(beams, dim=0)  # (B·k, L, H)
    mask = attention_mask.repeat_interleave(beams, dim=0)  # (B·k, L)
    device = embeds.device
    sequences = torch.full((batch * beams, 1), bos_id, dtype=torch.long, device=device)  # 4.30's BOS seed
    scores = torch.zeros(batch, beams, device=device)
    if not config.do_sample:
        scores[:, 1:] = -1e9  # beam_search starts from beam 0 only; beam_sample from all k (4.30)
    beam_scores = scores.view(-1)
    penalty = SeededRepetitionPenalty(config.repetition_penalty)  # the sequences already hold BOS
    warpers = _sampling_warpers(config)
    hypotheses = [_Hypotheses(beams) for _ in range(batch)]
    finished = [False] * batch
    tokens = sequences[:, -1]
    cache = {_cache_argument(llm): DynamicCache()}
    output = llm(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=_positions(mask),
        use_cache=True,
        logits_to_keep=1,
        **cache,
    )
    for step in range(config.max_new_tokens):
        if step:
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
            output = llm(
                input_ids=tokens[:, None],
                attention_mask=mask,
                position_ids=_positions(mask)[:, -1:],
                use_cache=True,
                **cache,
            )
        log_probs = nn.functional.log_softmax(output.logits[:, -1, :].float(), dim=-1)  # (B·k, V)
        log_probs = penalty(sequences, log_probs) + beam_scores[:, None]
        if warpers is not None:
            log_probs = warpers(sequences, log_probs)  # 4.30 beam_sample warps the running totals
        candidates = _candidates(log_probs.view(batch, -1), 2 * beams, config.do_sample)
        beam_scores, tokens, sources = _advance(
            candidates, log_probs.shape[-1], sequences, hypotheses, finished, eos_id, beams
        )
        sequences = torch.cat([sequences[sources], tokens[:, None]], dim=1)  # (B·k, 1 + t)
        next(iter(cache.values())).reorder_cache(sources)
        for item in range(batch):
            rows = sequences[item * beams : (item + 1) * beams]
            if not finished[item] and _all_end_with_one_stop(rows, stops):
                _add_running(hypotheses[item], rows, beam_scores[item * beams : (item + 1) * beams])
                finished[item] = True
        if all(finished):
            break
    for item in range(batch):  # 4.30 finalize: still-running beams compete with the finished ones
        if not finished[item]:
            rows = sequences[item * beams : (item + 1) * beams]
            _add_running(hypotheses[item], rows, beam_scores[item * beams : (item + 1) * beams])
    return [hyp.best()[1:] for hyp in hypotheses]


def _cache_argument(llm: PreTrainedModel) -> str:
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns until 5.40)."""
    return "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"


def _sampling_warpers(config: GenerateConfig) -> LogitsProcessorList | None:
    """4.30 ``_get_logits_warper`` for beams: temperature, then top-p keeping at least 2 tokens."""
    if not config.do_sample:
        return None
    warpers = LogitsProcessorList()
    if config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    if config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(config.top_p, min_tokens_to_keep=2))
    return warpers


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: count real tokens only (as ``generate`` does)."""
    return (mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def _candidates(flat: torch.Tensor, count: int, sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top (or sampled) ``count`` of (B, k·V) running scores, best first: (scores, flat indices)."""
    if not sample:
        return flat.topk(count, dim=1, largest=True, sorted=True)
    picks = torch.multinomial(nn.functional.softmax(flat, dim=-1), num_samples=count)
    picked = flat.gather(1, picks)
    picked, order = picked.sort(dim=1, descending=True)
    return picked, picks.gather(1, order)


def _advance(
    candidates: tuple[torch.Tensor, torch.Tensor],
    vocab: int,
    sequences: torch.Tensor,
    hypotheses: list[_Hypotheses],
    finished: list[bool],
    eos_id: int,
    beams: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4.30 ``BeamSearchScorer.process``: EOS candidates among the top k finish, the rest fill k beams.

    Returns the new beam scores, tokens and source rows, each (B·k,).
    """
    top_scores, top_indices = candidates
    batch = len(hypotheses)
    next_scores = torch.zeros(batch, beams, device=sequences.device)
    next_tokens = torch.full((batch, beams), eos_id, dtype=torch.long, device=sequences.device)
    next_sources = torch.arange(batch * beams, device=sequences.device).view(batch, beams)
    length = sequences.shape[1] + 1  # what the new scores are over (BOS included), per prompt of one
    for item in range(batch):
        if finished[item]:
            continue
        filled = 0
        ranked = zip(top_scores[item].tolist(), top_indices[item].tolist(), strict=True)
        for rank, (score, flat_index) in enumerate(ranked):
            token, source = flat_index % vocab, item * beams + flat_index // vocab
            if token == eos_id:
                if rank < beams:  # an EOS outside the top k is dropped
                    hypotheses[item].add(sequences[source].tolist(), score)
            else:
                next_scores[item, filled], next_tokens[item, filled] = score, token
                next_sources[item, filled] = source
                filled += 1
            if filled == beams:
                break
        finished[item] = hypotheses[item].is_done(max(top_scores[item].tolist()), length)
    return next_scores.view(-1), next_tokens.view(-1), next_sources.view(-1)


def _all_end_with_one_stop(rows: torch.Tensor, stops: Sequence[Sequence[int]]) -> bool:
    """MG ``StoppingCriteriaSub``: every row ends with the same stop sequence."""
    for stop in stops:
        if len(stop) < rows.shape[1]:
            tail = rows[:, -len(stop) :]
            if bool((tail == torch.tensor(stop, device=rows.device)).all()):
                return True
    return False


def _add_running(hypotheses: _Hypotheses, rows: torch.Tensor, scores: torch.Tensor) -> None:
    for ids, score in zip(rows.tolist(), scores.tolist(), strict=True):
        hypotheses.add(ids, score)
