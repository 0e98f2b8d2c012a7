"""An official-format LLM folder loads, and tokens, losses and answers follow the official stack.

The folder is what FastChat's ``apply_delta`` leaves for Vicuna v0: ``config.json``, safetensors
weights and, as its only tokenizer file, a sentencepiece ``tokenizer.model`` (trained here with byte
fallback, unk/bos/eos = 0/1/2, and ``###`` spelled like Llama's: ``▁###`` on its own, ``##`` ``#``
after other text). Expected values come from the official definitions (shared/OFFICIAL.md §4, §5,
§11), written out here without mgpt4: the slow ``LlamaTokenizer`` of transformers 4.30 encodes each
non-special text chunk with ``sp.encode`` and decodes with ``sp.decode``; MG assembles the stage-2
input; 4.30's ``generate`` seeds its output with BOS and runs ``greedy_search`` / ``beam_search`` with
MG's ``StoppingCriteriaSub``. Answers are checked on a "bigram" Llama whose next-token logits depend
only on the current token, so every expected answer can be worked out from a small table.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import random
import re
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from click.testing import CliRunner
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM

from mgpt4.cli import cli
from mgpt4.config import GenerateConfig, ModelConfig, load_config
from mgpt4.conversation import ALIGNMENT_INSTRUCTIONS, ChatTurn, chat_prompt, stage2_prompt
from mgpt4.data.aligned import write_aligned
from mgpt4.data.synthetic import make_samples
from mgpt4.errors import CheckpointError
from mgpt4.model.build import build_model, load_model_dir
from mgpt4.model.presets import get_preset
from mgpt4.model.tokenizer import load_tokenizer
from mgpt4.train.config import TrainRunConfig
from mgpt4.train.data import make_batches

BOS, EOS, UNK = 1, 2, 0
SPECIAL_TEXT = {"<unk>": UNK, "<s>": BOS, "</s>": EOS}
WORDS = (
    "a an the image picture photo shows there is are one two three red green blue circle square "
    "triangle describe this detail please answer questions give following you will be able to see it"
).split()


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead on a shared CPU
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# the official-format folder
# --------------------------------------------------------------------------------------------------


def train_sentencepiece() -> bytes:
    """A Llama-like BPE model: byte fallback, no normalization, ``###`` only as ``▁###`` or ``##`` ``#``."""
    rng = random.Random(0)
    lines = []
    for _ in range(300):
        words = " ".join(rng.choice(WORDS) for _ in range(6))
        lines += [f"Human: {words} ### Assistant: {words} ##", f"{words} ## x## y#"]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=420, model_type="bpe",
        byte_fallback=True, unk_id=UNK, bos_id=BOS, eos_id=EOS, pad_id=-1, character_coverage=1.0,
        remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2,
    )  # fmt: skip
    return model.getvalue()


@pytest.fixture(scope="module")
def sp_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sentencepiece") / "tokenizer.model"
    path.write_bytes(train_sentencepiece())
    return path


@pytest.fixture(scope="module")
def sp(sp_file) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(sp_file))


def piece(sp: spm.SentencePieceProcessor, name: str) -> int:
    index = sp.piece_to_id(name)
    assert sp.id_to_piece(index) == name, f"{name!r} is not in the test vocabulary"
    return index


def llama_config(vocab: int, hidden: int = 64, layers: int = 2, intermediate: int = 128) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=512, rms_norm_eps=1e-6,
        bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False,
    )  # fmt: skip


def write_llm_folder(folder: Path, sp_file: Path, llm: LlamaForCausalLM, layout: str = "vicuna0") -> Path:
    """config.json + model.safetensors + tokenizer.model (``vicuna0``), plus, for ``llama2``, the
    tokenizer_config.json of the Llama-2-chat HF release, which asks transformers 5 for ``legacy: false``."""
    llm.save_pretrained(str(folder), safe_serialization=True)
    (folder / "generation_config.json").unlink(missing_ok=True)
    (folder / "tokenizer.model").write_bytes(sp_file.read_bytes())
    if layout == "llama2":
        (folder / "tokenizer_config.json").write_text(json.dumps(LLAMA2_TOKENIZER_CONFIG))
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["config.json", "model.safetensors", "tokenizer.model"] + ["tokenizer_config.json"] * (
        layout == "llama2"
    )
    return folder


def _special(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False}  # fmt: skip


LLAMA2_TOKENIZER_CONFIG = {
    "add_bos_token": True, "add_eos_token": False, "bos_token": _special("<s>"),
    "clean_up_tokenization_spaces": False, "eos_token": _special("</s>"), "legacy": False,
    "pad_token": None, "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
    "unk_token": _special("<unk>"),
}  # fmt: skip


def bigram_llm(vocab: int, table: dict[int, dict[int, float]], floor: float = -20.0) -> LlamaForCausalLM:
    """A real Llama whose logits after token t are ``table[t]`` (``floor`` elsewhere), whatever came before.

    Attention and MLP outputs are zeroed, so each position's hidden state stays its one-hot embedding;
    the final RMSNorm scales it by sqrt(hidden), which the LM head divides out.
    """
    torch.manual_seed(0)
    hidden = -(-vocab // 8) * 8
    llm = LlamaForCausalLM(llama_config(vocab, hidden=hidden, layers=1, intermediate=8))
    logits = torch.full((vocab, vocab), floor)
    for token, row in table.items():
        for following, value in row.items():
            logits[token, following] = value
    with torch.no_grad():
        for layer in llm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        llm.model.embed_tokens.weight.copy_(torch.eye(vocab, hidden))
        llm.lm_head.weight.zero_()
        llm.lm_head.weight[:, :vocab] = logits.T / math.sqrt(hidden)
    return llm.eval()


@pytest.fixture(scope="module", params=["vicuna0", "llama2"])
def llm_dir(request, sp_file, sp, tmp_path_factory) -> Path:
    torch.manual_seed(7)
    llm = LlamaForCausalLM(llama_config(sp.get_piece_size()))
    return write_llm_folder(tmp_path_factory.mktemp(request.param), sp_file, llm, layout=request.param)


@pytest.fixture(scope="module")
def llama2_dir(sp_file, sp, tmp_path_factory) -> Path:
    """One layout for the slower tests: the one transformers 5 alone would tokenize differently."""
    torch.manual_seed(7)
    llm = LlamaForCausalLM(llama_config(sp.get_piece_size()))
    return write_llm_folder(tmp_path_factory.mktemp("llama2"), sp_file, llm, layout="llama2")


@pytest.fixture(scope="module")
def model(llm_dir):
    torch.manual_seed(0)
    return build_model(ModelConfig(preset="micro", llm_path=str(llm_dir), grad_checkpointing=False)).eval()


def scripted_model(tmp_path: Path, sp_file: Path, vocab: int, table: dict[int, dict[int, float]]):
    folder = write_llm_folder(tmp_path / "scripted", sp_file, bigram_llm(vocab, table))
    torch.manual_seed(0)
    cfg = ModelConfig(preset="micro", llm_path=str(folder), grad_checkpointing=False)
    return folder, build_model(cfg).eval()


def images(n: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(5))


# --------------------------------------------------------------------------------------------------
# the official definitions, written out
# --------------------------------------------------------------------------------------------------


def slow_llama_ids(sp: spm.SentencePieceProcessor, text: str) -> list[int]:
    """4.30 ``LlamaTokenizer``: special tokens split out, nothing stripped, other chunks ``sp.encode``d."""
    ids = []
    for chunk in re.split("(<unk>|<s>|</s>)", text):
        ids += [SPECIAL_TEXT[chunk]] if chunk in SPECIAL_TEXT else sp.encode(chunk) if chunk else []
    return ids


def official_text(sp: spm.SentencePieceProcessor, ids: list[int]) -> str:
    """MG Chat.answer: ``decode(skip_special_tokens=True)``, cut at ``###``, drop a role prefix."""
    text = sp.decode([i for i in ids if i not in (UNK, BOS, EOS)])
    return text.split("###")[0].split("Assistant:")[-1].strip()


def penalised(scores: torch.Tensor, ids: list[int], penalty: float) -> torch.Tensor:
    """4.30 ``RepetitionPenaltyLogitsProcessor`` on one row."""
    scores = scores.clone()
    for token in set(ids):
        scores[token] = scores[token] / penalty if scores[token] > 0 else scores[token] * penalty
    return scores


def bigram_logits(llm: LlamaForCausalLM, first: int):
    """``logits_after(generated)`` of a bigram LLM whose prompt ends with token ``first``."""

    def logits_after(generated: list[int]) -> torch.Tensor:
        with torch.no_grad():
            token = generated[-1] if generated else first
            return llm(input_ids=torch.tensor([[token]])).logits[0, -1].float()

    return logits_after


def prompt_logits(model, prompt: str, imgs: torch.Tensor):
    """``logits_after(generated)`` of any LLM: a full forward pass over the prompt and the answer so far."""
    with torch.no_grad():
        context = model.embed_prompt(prompt, model.encode_images(imgs))  # (L, H)
    embed = model.llama_model.get_input_embeddings()

    def logits_after(generated: list[int]) -> torch.Tensor:
        with torch.no_grad():
            sequence = torch.cat([context, embed(torch.tensor(generated, dtype=torch.long))])
            return model.llama_model(inputs_embeds=sequence[None]).logits[0, -1].float()

    return logits_after


def ends_with_stop(ids: list[int], stops: list[list[int]]) -> bool:
    return any(len(ids) > len(stop) and ids[-len(stop) :] == stop for stop in stops)


def official_greedy(logits_after, penalty: float, stops, max_new: int) -> list[int]:
    """4.30 ``greedy_search`` after ``generate(inputs_embeds=…)``: the output starts as ``[BOS]``."""
    ids = [BOS]
    for _ in range(max_new):
        ids.append(int(penalised(logits_after(ids[1:]), ids, penalty).argmax()))
        if ids[-1] == EOS or ends_with_stop(ids, stops):
            break
    return ids[1:]


def top_p_filtered(scores: torch.Tensor, top_p: float, keep: int = 2) -> torch.Tensor:
    """4.30 ``TopPLogitsWarper`` (beams keep at least 2 tokens): drop the low tail holding 1 - top_p."""
    ordered, order = scores.sort(dim=-1)
    drop = ordered.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
    drop[..., -keep:] = False
    return scores.masked_fill(drop.scatter(-1, order, drop), -float("inf"))


def official_beam_search(
    logits_after, beams: int, penalty: float, stops, max_new: int, top_p: float | None = None
) -> list[int]:
    """4.30 ``beam_search`` (``beam_sample`` when ``top_p`` is given) + ``BeamSearchScorer``
    (length_penalty 1, early_stopping False) + MG's stop; a batch of one, as the chat runs it."""
    sample = top_p is not None
    running = [([BOS], 0.0)] + [([BOS], 0.0 if sample else -1e9)] * (beams - 1)
    finished: list[tuple[float, list[int]]] = []

    def add(ids: list[int], total: float) -> None:  # BeamHypotheses.add: score over len incl. BOS
        finished.append((total / len(ids), ids))
        finished.sort(key=lambda item: item[0])
        del finished[: max(0, len(finished) - beams)]

    done = False
    for _ in range(max_new):
        scores = torch.stack(
            [
                penalised(torch.log_softmax(logits_after(ids[1:]), dim=-1), ids, penalty) + total
                for ids, total in running
            ]
        )  # (k, V)
        vocab = scores.shape[-1]
        if sample:  # warp the running totals, sample 2k of the k·V continuations, best first
            flat = top_p_filtered(scores, top_p).view(1, -1)
            picks = torch.multinomial(flat.softmax(dim=-1), num_samples=2 * beams)[0].tolist()
            picks.sort(key=lambda i: -float(flat[0, i]))
            candidates = [(float(flat[0, i]), running[i // vocab][0], i % vocab) for i in picks]
        else:
            candidates = sorted(
                ((float(scores[b, t]), running[b][0], t) for b in range(beams) for t in range(vocab)),
                key=lambda c: -c[0],
            )[: 2 * beams]
        running = []
        for rank, (score, ids, token) in enumerate(candidates):
            if token == EOS:
                if rank < beams:
                    add(ids, score)
            elif len(running) < beams:
                running.append((ids + [token], score))
        if len(finished) >= beams and finished[0][0] >= candidates[0][0] / len(running[0][0]):
            done = True  # no running beam can beat the kept hypotheses: they alone compete
            break
        if any(all(ids[-len(s) :] == s for ids, _ in running) for s in stops):
            break  # StoppingCriteriaSub: every beam ends with the same stop ids
    if not done:
        for ids, total in running:
            add(ids, total)
    return max(finished, key=lambda item: item[0])[1][1:]


# --------------------------------------------------------------------------------------------------
# loading and tokenizing
# --------------------------------------------------------------------------------------------------


def test_folder_with_only_tokenizer_model_loads_with_the_official_tokenizer(model, sp):
    assert model.follows_official_stack
    tok = model.tokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (BOS, EOS, UNK)
    assert len(tok) == sp.get_piece_size()
    # MG sets pad_token = "$$", which Vicuna's vocabulary maps to <unk>; in text it stays text.
    assert tok.pad_token == "$$" and tok.pad_token_id == UNK
    assert tok("x $$ y", add_special_tokens=False).input_ids == sp.encode("x $$ y")


TEXTS = [
    " The image shows a red circle.",  # leading space: ['▁', '▁', …]
    "<s>[INST] what is it? [/INST] ",  # Llama-2 chat: text after a literal <s> gets its own ▁
    "Give the following image.<s>[INST] <Img>",
    "a </s> b<unk>c  two  spaces\n###Human: hi###Assistant: ",
    "</Img> Describe this image in detail. ###Assistant: ",
    "é ü ✓ 猫",  # byte fallback
]


@pytest.mark.parametrize("text", TEXTS)
def test_text_encodes_like_the_slow_llama_tokenizer(model, sp, text):
    assert model.tokenizer(text, add_special_tokens=False).input_ids == slow_llama_ids(sp, text)


def test_every_separately_encoded_piece_gets_the_dummy_prefix(model, sp):
    tok = model.tokenizer
    pieces = tok.convert_ids_to_tokens(tok(" The", add_special_tokens=False).input_ids)
    assert pieces[:2] == ["▁", "▁"]
    ids = tok("<s>[INST]", add_special_tokens=False).input_ids
    assert ids[:3] == [BOS, piece(sp, "▁"), piece(sp, "<0x5B>")]
    assert tok("hi").input_ids == [BOS, *sp.encode("hi")]  # add_bos_token, as 4.30


@pytest.mark.parametrize("style", ["vicuna0", "llama2"])
def test_prompt_segments_are_encoded_separately(model, sp, style):
    """MG get_context_emb: BOS + each text segment encoded on its own, image embeddings in between."""
    turns = [ChatTurn("what is it?", answer=" A red circle.", image="x"), ChatTurn("and?")]
    prompt = chat_prompt(turns, style)
    image_tokens = model.encode_images(images(1))
    before, after = prompt.split("<ImageHere>")
    embed = model.llama_model.get_input_embeddings()
    expected = torch.cat(
        [
            embed(torch.tensor([BOS, *slow_llama_ids(sp, before)])),
            image_tokens[0],
            embed(torch.tensor(slow_llama_ids(sp, after))),
        ]
    )
    torch.testing.assert_close(model.embed_prompt(prompt, image_tokens), expected)


def official_stage2_loss(model, sp, imgs, prompts: list[str], texts: list[str], max_txt_len: int):
    """MG prompt_wrap + concat_emb_input_output with slow-tokenizer ids; pad ids (<unk>) → -100."""
    embed = model.llama_model.get_input_embeddings()
    targets = [slow_llama_ids(sp, text)[:max_txt_len] for text in texts]
    width = max(map(len, targets))
    rows, masks, labels = [], [], []
    for prompt, image_tokens, ids in zip(prompts, model.encode_images(imgs), targets, strict=True):
        before, after = prompt.split("<ImageHere>")
        wrapped = torch.cat(
            [embed(torch.tensor(sp.encode(before))), image_tokens, embed(torch.tensor(sp.encode(after)))]
        )
        pad = width - len(ids)
        rows.append(torch.cat([embed(torch.tensor([BOS])), wrapped, embed(torch.tensor(ids + [UNK] * pad))]))
        masks.append(torch.tensor([1] * (1 + len(wrapped) + len(ids)) + [0] * pad))
        answer_labels = [-100 if i == UNK else i for i in ids]
        labels.append(torch.tensor([-100] * (1 + len(wrapped)) + answer_labels + [-100] * pad))
    return model.llama_model(
        inputs_embeds=torch.stack(rows), attention_mask=torch.stack(masks), labels=torch.stack(labels)
    ).loss


def test_stage2_loss_matches_official_assembly_with_sentencepiece_targets(model, sp, monkeypatch):
    """Answers are encoded on their own (leading ▁), truncated to max_txt_len, a literal <unk> masked."""
    monkeypatch.setattr(model, "max_txt_len", 24)
    texts = [" The image shows a red circle at the top.###", "two <unk> squares###", "é " * 30 + "###"]
    assert sp.id_to_piece(sp.encode(texts[0])[0]) == "▁" and UNK in slow_llama_ids(sp, texts[1])
    prompts = [stage2_prompt(ALIGNMENT_INSTRUCTIONS[2])] * 3
    ours = model({"image": images(3), "text": texts, "prompt": prompts})
    reference = official_stage2_loss(model, sp, images(3), prompts, texts, max_txt_len=24)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-6)


def test_invalid_byte_runs_decode_as_sentencepiece_does(model, sp):
    ids = [piece(sp, p) for p in ("<0xC3>", "<0x28>", "<0xE2>", "<0x82>", "▁x", "<0xF0>", "<0xE4>", "<0xB8>")]
    expected = sp.decode(ids)
    # One U+FFFD per invalid byte, and the valid '(' inside the run survives (transformers 5's fast
    # decoder turns a whole run of byte pieces that is not valid UTF-8 into one U+FFFD per piece).
    assert expected == "\ufffd(\ufffd\ufffd x\ufffd\ufffd\ufffd"
    assert model.tokenizer.decode(ids, skip_special_tokens=True) == expected
    assert model.tokenizer.decode([BOS, *ids, EOS, UNK], skip_special_tokens=True) == expected


def test_missing_sentencepiece_is_named_with_the_pip_command(llama2_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # as if it were not installed
    with pytest.raises(CheckpointError, match=r"needs sentencepiece, which is not installed: pip install s"):
        load_tokenizer(llama2_dir)


def test_folder_without_tokenizer_files_says_so(llama2_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((llama2_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"no tokenizer files \(tokenizer.model or tokenizer.json\)"):
        load_tokenizer(bare)


# --------------------------------------------------------------------------------------------------
# generation on a scripted LLM
# --------------------------------------------------------------------------------------------------


def stop_ids(sp) -> list[list[int]]:
    """MG's [[835], [2277, 29937]] in this vocabulary: '▁###', and '##' '#'."""
    return [[piece(sp, "▁###")], [piece(sp, "##"), piece(sp, "#")]]


def answer_start(sp) -> int:
    """Every chat and stage-2 prompt ends with 'Assistant: ', whose last piece is '▁'."""
    assert sp.encode("</Img> Describe this image in detail. ###Assistant: ")[-1] == piece(sp, "▁")
    return piece(sp, "▁")


def chat_answer(model, config: GenerateConfig):
    prompt = chat_prompt([ChatTurn("what is in the image?", image="x")])
    return model.generate([prompt], images(1), config)[0]


def test_generated_unk_does_not_end_the_answer(sp, sp_file, tmp_path):
    start, x, stop = answer_start(sp), piece(sp, "▁x"), piece(sp, "▁###")
    table = {start: {UNK: 5.0}, UNK: {x: 5.0}, x: {stop: 5.0}}
    folder, model = scripted_model(tmp_path, sp_file, sp.get_piece_size(), table)
    config = GenerateConfig(max_new_tokens=8, repetition_penalty=1.0)
    expected = official_greedy(bigram_logits(model.llama_model, start), 1.0, stop_ids(sp), 8)
    assert expected == [UNK, x, stop]
    answer = chat_answer(model, config)
    assert answer.text == official_text(sp, expected) == "x"
    assert answer.tokens == 2  # <unk> and x; the stop token is not counted


def test_repetition_penalty_covers_bos_from_the_first_step(sp, sp_file, tmp_path):
    """4.30 seeds the output with BOS: at 1.05 BOS (logit 5.0 → 4.76) loses to 'a' (4.9)."""
    start, a, the, stop = answer_start(sp), piece(sp, "▁a"), piece(sp, "▁the"), piece(sp, "▁###")
    table = {start: {BOS: 5.0, a: 4.9}, a: {stop: 5.0}, BOS: {the: 5.0}, the: {stop: 5.0}}
    _, model = scripted_model(tmp_path, sp_file, sp.get_piece_size(), table)
    for penalty, expected_text in ((1.05, "a"), (1.0, "the")):
        expected = official_greedy(bigram_logits(model.llama_model, start), penalty, stop_ids(sp), 8)
        answer = chat_answer(model, GenerateConfig(max_new_tokens=8, repetition_penalty=penalty))
        assert answer.text == official_text(sp, expected) == expected_text, penalty


def beam_pieces(sp) -> dict[str, int]:
    names = ["▁", "▁a", "▁the", "▁red", "▁blue", "▁green", "▁###", "##", "#"]
    names += ["▁circle", "▁square", "▁triangle", "▁photo"]
    return {name: piece(sp, name) for name in names}


def test_beam_search_runs_on_until_every_beam_ends_with_the_stop(sp, sp_file, tmp_path):
    """Beam 'a' reaches ### at step 2 and then wanders; beam 'the red red …' never stops but is sure.

    Stopping each beam at its own ### (transformers 5 with a per-row stop) keeps 'a' (-0.26 over 2
    tokens); the official search runs both beams to max_new_tokens, where 'the red …' wins.
    """
    p = beam_pieces(sp)
    wander = {p[w]: 0.0 for w in ("▁circle", "▁square", "▁triangle", "▁photo")}
    table = {p["▁"]: {p["▁a"]: 0.0, p["▁the"]: -1.2}, p["▁a"]: {p["▁###"]: 0.0}, p["▁###"]: wander}
    table |= {token: wander for token in wander}
    table |= {p["▁the"]: {p["▁red"]: 0.0}, p["▁red"]: {p["▁red"]: 0.0, p["▁green"]: -4.0}}
    _, model = scripted_model(tmp_path, sp_file, sp.get_piece_size(), table)
    expected = official_beam_search(bigram_logits(model.llama_model, p["▁"]), 2, 1.0, stop_ids(sp), 6)
    assert official_text(sp, expected) == "the red red red red red"  # not "a"
    answer = chat_answer(model, GenerateConfig(max_new_tokens=6, num_beams=2, repetition_penalty=1.0))
    assert answer.raw == sp.decode(expected) and answer.text == "the red red red red red"


def test_beam_search_needs_the_same_stop_ids_on_every_beam(sp, sp_file, tmp_path):
    """At step 4 one beam ends with '▁###', the other with '##' '#': MG's criterion does not fire
    (each stop sequence is checked against all beams), so the search runs on and the sure beam wins.
    Stopping there would have returned 'a blue green'.
    """
    p = beam_pieces(sp)
    wander = {p[w]: 0.0 for w in ("▁circle", "▁square", "▁triangle", "▁photo")}
    table = {p["▁"]: {p["▁a"]: 0.0, p["▁the"]: -0.3}, p["▁a"]: {p["▁blue"]: 0.0}}
    table |= {p["▁blue"]: {p["▁green"]: 0.0}, p["▁green"]: {p["▁###"]: 0.0}, p["▁###"]: wander}
    table |= {token: wander for token in wander}
    table |= {p["▁the"]: {p["▁red"]: 0.0}, p["▁red"]: {p["##"]: 0.0}, p["##"]: {p["#"]: 0.0}}
    table |= {p["#"]: {p["▁red"]: 0.0}}
    _, model = scripted_model(tmp_path, sp_file, sp.get_piece_size(), table)
    expected = official_beam_search(bigram_logits(model.llama_model, p["▁"]), 2, 1.0, stop_ids(sp), 8)
    assert expected[:4] == [p["▁the"], p["▁red"], p["##"], p["#"]] and len(expected) == 8
    answer = chat_answer(model, GenerateConfig(max_new_tokens=8, num_beams=2, repetition_penalty=1.0))
    assert answer.text == official_text(sp, expected) == "the red" and answer.tokens == 2


def test_beam_scores_count_the_bos_seed_in_the_length(sp, sp_file, tmp_path):
    """4.30 divides a hypothesis' log-probability by its length with BOS: 'a' + EOS scores -0.79 / 2
    and beats the running 'a blue blue blue blue' (-2.71 / 6); over generated tokens only it would lose
    (-0.79 / 1 against -2.71 / 5).
    """
    p = beam_pieces(sp)
    table = {p["▁"]: {p["▁a"]: 0.0, p["▁the"]: -1.0}, p["▁a"]: {EOS: 0.0, p["▁blue"]: -0.5}}
    table |= {p["▁blue"]: {p["▁blue"]: 0.0, p["▁green"]: -0.5}, p["▁the"]: {p["▁red"]: 0.0}}
    table |= {p["▁red"]: {p["▁red"]: 0.0, p["▁green"]: -0.5}}
    _, model = scripted_model(tmp_path, sp_file, sp.get_piece_size(), table)
    expected = official_beam_search(bigram_logits(model.llama_model, p["▁"]), 2, 1.0, stop_ids(sp), 5)
    assert expected == [p["▁a"]]
    answer = chat_answer(model, GenerateConfig(max_new_tokens=5, num_beams=2, repetition_penalty=1.0))
    assert answer.text == "a" and answer.tokens == 1


def test_beam_search_on_a_real_llm_matches_the_reference(model, sp):
    """Random weights (no bigram shortcut): KV cache, BOS seed, penalty and beam bookkeeping together."""
    prompt = chat_prompt([ChatTurn("what is in the image?", image="x")])
    config = GenerateConfig(max_new_tokens=6, num_beams=3, repetition_penalty=1.05)
    expected = official_beam_search(prompt_logits(model, prompt, images(1)), 3, 1.05, stop_ids(sp), 6)
    answer = model.generate([prompt], images(1), config)[0]
    full = sp.decode([i for i in expected if i not in (UNK, BOS, EOS)])
    assert answer.text == official_text(sp, expected) and full.startswith(answer.raw)


def test_batched_beams_equal_one_prompt_at_a_time(model):
    """Prompts of different lengths are left-padded; each prompt's beams stop on their own."""
    prompts = [
        chat_prompt([ChatTurn("what is in the image?", image="x")]),
        stage2_prompt(ALIGNMENT_INSTRUCTIONS[0]),
    ]
    config = GenerateConfig(max_new_tokens=5, num_beams=2)
    together = model.generate(prompts, images(2), config)
    alone = [model.generate([p], images(2)[i : i + 1], config)[0] for i, p in enumerate(prompts)]
    assert [g.raw for g in together] == [g.raw for g in alone]


def test_beam_sampling_follows_4_30_beam_sample(sp, sp_file, tmp_path):
    """The chat samples (MG hard-codes do_sample=True): with beams that is 4.30's beam_sample."""
    p = beam_pieces(sp)
    words = [p[w] for w in ("▁a", "▁the", "▁red", "▁blue", "▁green", "▁circle", "▁square")]
    table = {
        token: {w: -0.3 * ((i * 5 + j) % 7) for j, w in enumerate(words)} for i, token in enumerate(words)
    }
    for token in words:
        table[token][p["▁###"]] = -1.5
    table[p["▁"]] = {w: -0.2 * j for j, w in enumerate(words)}
    _, model = scripted_model(tmp_path, sp_file, sp.get_piece_size(), table)
    config = GenerateConfig(max_new_tokens=8, num_beams=2, do_sample=True, top_p=0.9, seed=3)
    answers = set()
    for seed in (3, 4, 5):
        torch.manual_seed(seed)
        expected = official_beam_search(
            bigram_logits(model.llama_model, p["▁"]), 2, 1.05, stop_ids(sp), 8, 0.9
        )
        answer = chat_answer(model, dataclasses.replace(config, seed=seed))
        assert answer.text == official_text(sp, expected), seed
        answers.add(answer.text)
    assert len(answers) > 1  # the draws matter


# --------------------------------------------------------------------------------------------------
# the CLI on an official-format folder
# --------------------------------------------------------------------------------------------------


def cli_table(sp) -> tuple[int, dict[int, dict[int, float]], list[int]]:
    """BOS narrowly first (penalised away at 1.05), then <unk>, an invalid byte run, 'x', ###."""
    start, x, stop = answer_start(sp), piece(sp, "▁x"), piece(sp, "▁###")
    c3, paren = piece(sp, "<0xC3>"), piece(sp, "<0x28>")
    table = {start: {BOS: 5.0, UNK: 4.9}, BOS: {EOS: 5.0}, UNK: {c3: 5.0}, c3: {paren: 5.0}}
    table |= {paren: {x: 5.0}, x: {stop: 5.0}}
    return start, table, [UNK, c3, paren, x, stop]


@pytest.fixture
def scripted_cli(sp, sp_file, tmp_path) -> dict:
    start, table, chain = cli_table(sp)
    folder, model = scripted_model(tmp_path, sp_file, sp.get_piece_size(), table)
    expected = official_greedy(bigram_logits(model.llama_model, start), 1.05, stop_ids(sp), 10)
    assert expected == chain
    proj = tmp_path / "pretrained_minigpt4.pth"
    torch.save({"model": {f"llama_proj.{k}": v for k, v in model.llama_proj.state_dict().items()}}, proj)
    picture = tmp_path / "red.png"
    Image.new("RGB", (48, 32), "red").save(picture)
    answer = official_text(sp, expected)
    assert answer == "\ufffd( x"  # the valid byte '(' survives the invalid run
    return {"llm": str(folder), "proj": str(proj), "image": str(picture), "answer": answer, "tmp": tmp_path}


def test_describe_cli_loads_the_folder_and_answers_officially(scripted_cli):
    args = ["describe", "-m", "micro", "--llm", scripted_cli["llm"], "--proj", scripted_cli["proj"]]
    result = CliRunner().invoke(cli, [*args, scripted_cli["image"], "--json", "--max-new-tokens", "10"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["text"] == scripted_cli["answer"]


def test_chat_cli_feeds_the_sentencepiece_decoded_answer_back(scripted_cli):
    transcript = scripted_cli["tmp"] / "chat.json"
    args = ["chat", "-m", "micro", "--llm", scripted_cli["llm"], scripted_cli["image"], "--greedy", "--json"]
    stdin = f"what is it?\nand now?\n/save {transcript}\n"
    result = CliRunner().invoke(cli, [*args, "--max-new-tokens", "10"], input=stdin)
    assert result.exit_code == 0, result.stderr
    answers = [json.loads(line)["answer"] for line in result.stdout.splitlines()]
    assert answers == [scripted_cli["answer"]] * 2
    turns = json.loads(transcript.read_text())["turns"]
    assert [t["answer"] for t in turns] == answers  # what the next turn's prompt is built from


def test_missing_sentencepiece_through_the_cli_is_one_line(scripted_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    args = ["describe", "-m", "micro", "--llm", scripted_cli["llm"], scripted_cli["image"]]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert "sentencepiece" in line and "pip install sentencepiece" in line and "tiktoken" not in line


def test_curate_describes_with_the_folder(scripted_cli):
    folder = scripted_cli["tmp"] / "images"
    folder.mkdir()
    Image.open(scripted_cli["image"]).save(folder / "0001.jpg")
    out = scripted_cli["tmp"] / "curated"
    args = ["curate", "--model", "micro", f"model.llm_path={scripted_cli['llm']}", "--images", str(folder)]
    args += ["--out", str(out), "--num", "1", "--fixer", "none", "--max-new-tokens", "10", "--quiet"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in (out / "curate.jsonl").read_text().splitlines()]
    assert record["first"] == scripted_cli["answer"] and record["tokens"]["first"] == 4


@pytest.fixture
def _restore_process_env():
    """finetune runs DeepSpeed in this process; leave no rendezvous variables for later subprocesses."""
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {name: os.environ.get(name) for name in names}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def test_finetune_trains_on_official_targets_from_the_folder(llama2_dir, sp, tmp_path, _restore_process_env):
    samples = make_samples(4, seed=1)
    captions = [" The image shows " + s.detailed for s in samples]  # a leading space, as raw captions have
    write_aligned(tmp_path / "aligned", [(s.key, s.image, c) for s, c in zip(samples, captions, strict=True)])
    run = tmp_path / "run"
    args = ["finetune", "--config", "micro_stage2", "model.preset=micro", f"model.llm_path={llama2_dir}"]
    args += ["model.trainable=[proj]", f"data.aligned={tmp_path / 'aligned'}", f"out={run}"]
    args += ["data.micro_batch_size=2", "train.max_steps=1", "train.log_every=1", "train.plot=false"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    first_loss = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["loss"]

    cfg = load_config(TrainRunConfig, run / "config.yaml")
    batch = make_batches(cfg, get_preset("micro"), rank=0, world_size=1).next_batch()
    assert all(text.startswith(" The image shows") and text.endswith("###") for text in batch["text"])
    torch.manual_seed(cfg.train.seed)  # the run's random init of the micro vision tower
    model = build_model(cfg.model)
    with torch.no_grad():
        reference = official_stage2_loss(
            model, sp, batch["image"], batch["prompt"], batch["text"], cfg.model.max_txt_len
        )
    assert first_loss == pytest.approx(float(reference), rel=1e-5)
    assert load_model_dir(run).follows_official_stack
