"""The MiniGPT-4 module: frozen vision tower → ``llama_proj`` → frozen LLM.

Module names follow the official checkpoints (``visual_encoder``, ``ln_vision``, ``Qformer``,
``query_tokens``, ``llama_proj``, ``llama_model``) so that weight conversion is a short key map.

API: ``encode_images``, ``embed_prompt``, ``forward(batch) -> loss``, ``generate``,
``set_trainable``, ``set_grad_checkpointing``, ``trainable_state_dict``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers import (
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from mgpt4.config import GenerateConfig
from mgpt4.conversation import IMAGE_PLACEHOLDER, clean_answer, split_at_images
from mgpt4.errors import UsageError
from mgpt4.model import official_decoding
from mgpt4.model.presets import Preset
from mgpt4.model.qformer import build_qformer
from mgpt4.model.tokenizer import OfficialLlamaTokenizer
from mgpt4.model.vision import build_ln_vision, build_vision_encoder

IGNORE_INDEX = -100  # HF cross-entropy ignore label

# Trainable groups → top-level submodules. ln_vision is frozen with the ViT in MG (freeze_vit).
TRAINABLE_GROUPS = {
    "vision": ("visual_encoder", "ln_vision"),
    "qformer": ("Qformer", "query_tokens"),
    "proj": ("llama_proj",),
    "llm": ("llama_model",),
}


@dataclasses.dataclass
class Generation:
    """One generated answer: cleaned text and how many tokens it took (stop string excluded)."""

    text: str
    tokens: int
    raw: str


class MiniGPT4(nn.Module):
    """EVA ViT + ln_vision + (Q-Former + query tokens | patch merging) + llama_proj + LLM."""

    def __init__(
        self,
        preset: Preset,
        llama_model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        max_txt_len: int = 32,
        part_init: Callable[[str], contextlib.AbstractContextManager] | None = None,
    ) -> None:
        """``part_init(name)``: a context each top-level part is created in (e.g. without memory when
        a weight file fills it next, or on the target device and dtype); default: CPU, fp32."""
        super().__init__()
        self.preset = preset
        self.tokenizer = tokenizer
        self.max_txt_len = max_txt_len
        part = part_init or (lambda name: contextlib.nullcontext())
        with part("visual_encoder"):
            self.visual_encoder = build_vision_encoder(preset.vision)
        with part("ln_vision"):
            self.ln_vision = build_ln_vision(preset.vision.width)
        if preset.qformer is not None:
            with part("Qformer"):
                self.Qformer = build_qformer(preset.qformer, preset.vision.width)
            with part("query_tokens"):
                # LAVIS blip2.py init_Qformer: query tokens ~ N(0, 0.02).
                self.query_tokens = nn.Parameter(
                    torch.zeros(1, preset.qformer.num_query_tokens, preset.qformer.hidden_size)
                )
                nn.init.normal_(self.query_tokens, std=0.02)
        else:
            self.Qformer = None
            self.register_parameter("query_tokens", None)
        self.llama_model = llama_model
        with part("llama_proj"):
            self.llama_proj = nn.Linear(preset.llm_input_width, llama_model.config.hidden_size)
        self.trainable_groups: tuple[str, ...] = ()
        self.set_trainable(["proj"])

    # ----------------------------------------------------------------------------------------------
    # configuration
    # ----------------------------------------------------------------------------------------------

    def set_trainable(self, groups: Sequence[str]) -> None:
        """Freeze everything except the named groups (``proj``, ``qformer``, ``vision``, ``llm``)."""
        unknown = sorted(set(groups) - set(TRAINABLE_GROUPS))
        if unknown:
            raise UsageError(
                f"model.trainable: unknown group(s) {', '.join(unknown)}; "
                f"choose from {', '.join(TRAINABLE_GROUPS)}"
            )
        self.trainable_groups = tuple(g for g in TRAINABLE_GROUPS if g in groups)
        for group, names in TRAINABLE_GROUPS.items():
            for name in names:
                part = getattr(self, name)
                if part is None:
                    continue
                params = [part] if isinstance(part, nn.Parameter) else list(part.parameters())
                for param in params:
                    param.requires_grad_(group in self.trainable_groups)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute ViT and LLM activations in backward (non-reentrant, so frozen inputs still work)."""
        self.visual_encoder.set_grad_checkpointing(enable)  # timm: use_reentrant=False by default
        llm = self.llama_model
        if not enable:
            disable = (
                getattr(llm, "activation_checkpointing_disable", None) or llm.gradient_checkpointing_disable
            )
            disable()
        elif hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5 name
            llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the parameters that train: what our tiny ``trainable.safetensors`` holds."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    @property
    def device(self) -> torch.device:
        return self.llama_proj.weight.device

    @property
    def follows_official_stack(self) -> bool:
        """The LLM came from an official folder (sentencepiece ``tokenizer.model``), so tokenizing and
        decoding follow the official code's transformers 4.30 stack (``model.official_decoding``)."""
        return isinstance(self.tokenizer, OfficialLlamaTokenizer)

    # ----------------------------------------------------------------------------------------------
    # encoding
    # ----------------------------------------------------------------------------------------------

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) → LLM-space image tokens (B, num_image_tokens, llm_hidden)."""
        tower_trains = bool({"vision", "qformer"} & set(self.trainable_groups))
        with torch.set_grad_enabled(torch.is_grad_enabled() and tower_trains):
            dtype = self.visual_encoder.patch_embed.proj.weight.dtype
            features = self.visual_encoder.forward_features(images.to(self.device, dtype))  # (B, 1+P, Wv)
            features = self.ln_vision(features)
            if self.Qformer is not None:
                queries = self.query_tokens.expand(features.shape[0], -1, -1)  # (B, Q, Hq)
                mask = torch.ones(features.shape[:2], dtype=torch.long, device=features.device)
                tokens = self.Qformer(
                    query_embeds=queries, encoder_hidden_states=features, encoder_attention_mask=mask
                ).last_hidden_state  # (B, Q, Hq)
            else:
                # Llama-2 variant: drop CLS, concatenate each run of `merge` patch tokens.
                patches = features[:, 1:, :]  # (B, P, Wv)
                batch, count, width = patches.shape
                merge = self.preset.merge_patches
                tokens = patches.reshape(batch, count // merge, width * merge)  # (B, P/m, m·Wv)
        return self.llama_proj(tokens.to(self.llama_proj.weight.dtype))  # (B, T, H)

    def _token_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids if text else []

    def _embed_ids(self, ids: Sequence[int]) -> torch.Tensor:
        ids_tensor = torch.tensor(list(ids), dtype=torch.long, device=self.device)
        return self.llama_model.get_input_embeddings()(ids_tensor)  # (L, H)

    def embed_prompt(self, prompt: str, image_tokens: torch.Tensor) -> torch.Tensor:
        """``[BOS] seg0 img0 seg1 img1 …`` as embeddings (L, H); one image per ``<ImageHere>``.

        Each text segment is tokenized on its own with no special tokens and BOS goes first only,
        matching MG ``get_context_emb`` / ``prompt_wrap``.
        """
        segments = split_at_images(prompt)
        if len(segments) - 1 != len(image_tokens):
            raise UsageError(
                f"prompt has {len(segments) - 1} {IMAGE_PLACEHOLDER} but "
                f"{len(image_tokens)} image(s) were given"
            )
        pieces = []
        for index, segment in enumerate(segments):
            ids = ([self.tokenizer.bos_token_id] if index == 0 else []) + self._token_ids(segment)
            if ids:
                pieces.append(self._embed_ids(ids))
            if index < len(image_tokens):
                pieces.append(image_tokens[index])
        return torch.cat(pieces, dim=0)

    # ----------------------------------------------------------------------------------------------
    # training
    # ----------------------------------------------------------------------------------------------

    def forward(self, batch: dict) -> torch.Tensor:
        """Mean cross-entropy over target tokens.

        Args:
            batch: ``image`` (B, 3, H, W); ``text``: B target strings, end symbol included
                (stage 1: caption + "\\n", stage 2: answer + "###"); optional ``prompt``: B prompt
                strings with one ``<ImageHere>`` each (default: the image alone, as in stage 1).
        """
        image_tokens = self.encode_images(batch["image"])  # (B, T, H)
        batch_size = image_tokens.shape[0]
        prompts = batch.get("prompt") or [IMAGE_PLACEHOLDER] * batch_size
        targets = self.tokenizer(
            list(batch["text"]), add_special_tokens=False, truncation=True, max_length=self.max_txt_len
        ).input_ids
        rows, labels = [], []
        for index in range(batch_size):
            prompt_embeds = self.embed_prompt(prompts[index], image_tokens[index : index + 1])  # (Lp, H)
            target_ids = torch.tensor(targets[index], dtype=torch.long, device=self.device)
            # MG masks pad ids out of the targets; Vicuna's pad `$$` is <unk>, so a literal "<unk>" is too.
            target_labels = target_ids.masked_fill(target_ids == self.tokenizer.pad_token_id, IGNORE_INDEX)
            rows.append(torch.cat([prompt_embeds, self._embed_ids(targets[index])], dim=0))
            prompt_labels = torch.full((len(prompt_embeds),), IGNORE_INDEX, device=self.device)
            labels.append(torch.cat([prompt_labels, target_labels]))
        inputs_embeds, attention_mask = _pad_rows(rows, side="right")
        label_tensor = torch.full(attention_mask.shape, IGNORE_INDEX, dtype=torch.long, device=self.device)
        for index, row_labels in enumerate(labels):
            label_tensor[index, : len(row_labels)] = row_labels
        output = self.llama_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=label_tensor, use_cache=False
        )
        return output.loss

    # ----------------------------------------------------------------------------------------------
    # generation
    # ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        images: torch.Tensor | Sequence[torch.Tensor],
        config: GenerateConfig | None = None,
        streamer=None,
        stopping_criteria: Sequence[StoppingCriteria] = (),
    ) -> list[Generation]:
        """Answer each prompt; a row stops at its own ``###`` (or EOS) while the others go on.

        With an official LLM folder (``follows_official_stack``) decoding follows the official stack:
        the repetition penalty also covers BOS, and beam search stops only when all of a prompt's beams
        end with a stop string (``model.official_decoding``).

        Args:
            prompts: B prompts; prompt i has as many ``<ImageHere>`` as images i has.
            images: (B, 3, H, W) — one image per prompt — or B tensors (k_i, 3, H, W).
            config: decoding settings (greedy by default).
            streamer: optional transformers streamer (``put``/``end``), for chat's live output.
            stopping_criteria: more per-row criteria, checked with the stop strings each step (the
                server's: a row whose client left, or that reached its own limit, stops early).
        """
        config = config or GenerateConfig()
        groups = [images[i : i + 1] for i in range(len(images))] if torch.is_tensor(images) else list(images)
        counts = [len(group) for group in groups]
        if sum(counts):
            per_row = torch.split(self.encode_images(torch.cat(groups, dim=0)), counts)  # B × (k_i, T, H)
        else:
            per_row = [[] for _ in prompts]
        rows = [self.embed_prompt(prompt, tokens) for prompt, tokens in zip(prompts, per_row, strict=True)]
        # MG answer_prepare: keep the last (max_length - max_new_tokens) positions of the context.
        keep = max(1, config.max_length - config.max_new_tokens)
        inputs_embeds, attention_mask = _pad_rows([row[-keep:] for row in rows], side="left")
        stops = tuple(config.stop)
        if config.do_sample:
            torch.manual_seed(config.seed)
        tok = self.tokenizer
        if self.follows_official_stack and config.num_beams > 1:
            stop_ids = official_decoding.stop_id_sequences(tok, stops)
            ends = {"bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id, "stops": stop_ids}
            output_ids = official_decoding.beam_search(
                self.llama_model, inputs_embeds, attention_mask, config, **ends
            )
        else:
            criteria = StoppingCriteriaList(
                [_StopOnString(tok, stops, self._vocab_size(), self.device), *stopping_criteria]
            )
            output_ids = self._hf_generate(inputs_embeds, attention_mask, config, criteria, streamer).tolist()
        return [self._finish(row_ids, stops) for row_ids in output_ids]

    def _hf_generate(
        self, inputs_embeds, attention_mask, config: GenerateConfig, criteria: StoppingCriteriaList, streamer
    ) -> torch.Tensor:
        # transformers 4.30 (the official stack) seeds the output with BOS when given only inputs_embeds,
        # so its repetition penalty covers BOS from the first step; transformers 5 starts from no ids.
        # The penalty is ours either way: transformers 5's skips the first generated ids of left-padded rows.
        seed = [self.tokenizer.bos_token_id] if self.follows_official_stack else []
        penalty = official_decoding.SeededRepetitionPenalty(config.repetition_penalty, seed)
        return self.llama_model.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            max_new_tokens=config.max_new_tokens,
            do_sample=config.do_sample,
            num_beams=config.num_beams,
            temperature=config.temperature if config.do_sample else None,
            top_p=config.top_p if config.do_sample else None,
            top_k=None,
            repetition_penalty=1.0,
            logits_processor=LogitsProcessorList([penalty]),
            stopping_criteria=criteria,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
            streamer=streamer,
        )

    def _vocab_size(self) -> int:
        return max(len(self.tokenizer), self.llama_model.get_input_embeddings().num_embeddings)

    def _finish(self, ids: Sequence[int], stops: tuple[str, ...]) -> Generation:
        """Cut a row at EOS or at the end of its first stop string; count the answer's tokens.

        The pad id never ends an answer: a finished row is padded only after its EOS or stop string,
        and MG's pad ``$$`` is ``<unk>`` (id 0) in Vicuna's vocabulary, which the LLM may generate.
        """
        can_end = _tokens_containing(self.tokenizer, _last_chars(stops), self._vocab_size())
        kept: list[int] = []
        stop_tokens = 0
        for token in ids:
            if token == self.tokenizer.eos_token_id:
                break
            kept.append(token)
            if can_end[token]:
                stop_tokens = _tail_containing(self.tokenizer, kept, stops)
                if stop_tokens:
                    break
        raw = self.tokenizer.decode(kept, skip_special_tokens=True)
        return Generation(text=clean_answer(raw, stops), tokens=len(kept) - stop_tokens, raw=raw)


def _last_chars(stops: tuple[str, ...]) -> str:
    return "".join(sorted({stop[-1] for stop in stops if stop}))


def _tail_containing(
    tokenizer: PreTrainedTokenizerBase, ids: list[int], stops: tuple[str, ...], window: int = 8
) -> int:
    """Fewest trailing tokens whose text contains one of ``stops`` (0 if none within ``window``)."""
    for count in range(1, min(window, len(ids)) + 1):
        tail = tokenizer.decode(ids[-count:], skip_special_tokens=True)
        if any(stop in tail for stop in stops):
            return count
    return 0


class _StopOnString(StoppingCriteria):
    """Per-row stop once the generated text of that row contains a stop string (e.g. ``###``).

    Checking decoded text instead of token ids handles every way the LLM may spell ``###``
    (MG lists two Llama encodings, [835] and [2277, 29937]). Decoding every row at every step
    cost ~20% of batch-8 decode time on an H100, so a row's tail is decoded only when its newest
    token holds a stop string's last character.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stops: tuple[str, ...],
        vocab_size: int,
        device: torch.device,
    ) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.window = 8
        self.can_end = _tokens_containing(tokenizer, _last_chars(stops), vocab_size).to(device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
        if input_ids.shape[1] == 0 or not self.stops:
            return done
        for row in self.can_end[input_ids[:, -1]].nonzero().flatten().tolist():
            tail = self.tokenizer.decode(input_ids[row, -self.window :], skip_special_tokens=True)
            done[row] = any(stop in tail for stop in self.stops)
        return done


@functools.lru_cache(maxsize=8)
def _tokens_containing(tokenizer: PreTrainedTokenizerBase, chars: str, vocab_size: int) -> torch.Tensor:
    """Boolean mask over the model's vocabulary: tokens whose text holds one of ``chars`` (computed once).

    Ids past the tokenizer's length (a padded embedding table) decode to nothing: False.
    """
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        mask[token_id] = any(char in text for char in chars)
    return mask


def _pad_rows(rows: Sequence[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (L_i, H) rows into (B, L, H) with zeros on ``side`` and a matching attention mask."""
    length = max(len(row) for row in rows)
    hidden = rows[0].shape[-1]
    embeds = rows[0].new_zeros((len(rows), length, hidden))
    mask = torch.zeros((len(rows), length), dtype=torch.long, device=rows[0].device)
    for index, row in enumerate(rows):
        span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        embeds[index, span] = row
        mask[index, span] = 1
    return embeds, mask
