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

import io
import json
import math
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
from mgpt4.config import GenerateConfig, ModelConfig
from mgpt4.conversation import ALIGNMENT_INSTRUCTIONS, ChatTurn, chat_prompt, stage2_prompt
from mgpt4.errors import CheckpointError
from mgpt4.model.build import build_model
from mgpt4.model.tokenizer import load_tokenizer

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


def next_logits(llm: LlamaForCausalLM, token: int) -> torch.Tensor:
    with torch.no_grad():
        return llm(input_ids=torch.tensor([[token]])).logits[0, -1].float()


def ends_with_stop(ids: list[int], stops: list[list[int]]) -> bool:
    return any(len(ids) > len(stop) and ids[-len(stop) :] == stop for stop in stops)


def official_greedy(llm, first: int, penalty: float, stops, max_new: int) -> list[int]:
    """4.30 ``greedy_search`` after ``generate(inputs_embeds=…)``: the output starts as ``[BOS]``."""
    ids = [BOS]
    logits = next_logits(llm, first)
    for _ in range(max_new):
        ids.append(int(penalised(logits, ids, penalty).argmax()))
        if ids[-1] == EOS or ends_with_stop(ids, stops):
            break
        logits = next_logits(llm, ids[-1])
    return ids[1:]


def official_beam_search(llm, first: int, beams: int, penalty: float, stops, max_new: int) -> list[int]:
    """4.30 ``beam_search`` + ``BeamSearchScorer`` (length_penalty 1, early_stopping False) + MG's stop."""
    running = [([BOS], 0.0)] + [([BOS], -1e9)] * (beams - 1)
    finished: list[tuple[float, list[int]]] = []

    def add(ids: list[int], total: float) -> None:  # BeamHypotheses.add: score over len incl. BOS
        finished.append((total / len(ids), ids))
        finished.sort(key=lambda item: item[0])
        del finished[: max(0, len(finished) - beams)]

    done = False
    for _ in range(max_new):
        candidates = []
        for ids, total in running:
            log_probs = torch.log_softmax(next_logits(llm, ids[-1] if len(ids) > 1 else first), dim=-1)
            log_probs = penalised(log_probs, ids, penalty) + total
            candidates += [(float(score), ids, token) for token, score in enumerate(log_probs)]
        candidates.sort(key=lambda c: -c[0])
        running = []
        for rank, (score, ids, token) in enumerate(candidates[: 2 * beams]):
            if token == EOS:
                if rank < beams:
                    add(ids, score)
            elif len(running) < beams:
                running.append((ids + [token], score))
        length = len(running[0][0])
        if len(finished) >= beams and finished[0][0] >= candidates[0][0] / length:
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


def test_stage2_loss_matches_official_assembly_with_sentencepiece_targets(model, sp, monkeypatch):
    """MG prompt_wrap + concat_emb_input_output; answers are encoded on their own, pad ids masked."""
    monkeypatch.setattr(model, "max_txt_len", 24)
    answers = [" The image shows a red circle at the top.###", "two <unk> squares###", "é " * 30 + "###"]
    prompt = stage2_prompt(ALIGNMENT_INSTRUCTIONS[2])
    imgs = images(3)
    ours = model({"image": imgs, "text": answers, "prompt": [prompt] * 3})

    embed = model.llama_model.get_input_embeddings()
    before, after = prompt.split("<ImageHere>")
    targets = [slow_llama_ids(sp, a)[:24] for a in answers]  # the literal <unk> is id 0, the pad id
    assert sp.id_to_piece(targets[0][0]) == "▁" and UNK in targets[1] and len(targets[2]) == 24
    width = max(map(len, targets))
    rows, masks, labels = [], [], []
    for index, image_tokens in enumerate(model.encode_images(imgs)):
        wrapped = torch.cat(
            [embed(torch.tensor(sp.encode(before))), image_tokens, embed(torch.tensor(sp.encode(after)))]
        )
        ids, pad = targets[index], width - len(targets[index])
        rows.append(torch.cat([embed(torch.tensor([BOS])), wrapped, embed(torch.tensor(ids + [UNK] * pad))]))
        masks.append(torch.tensor([1] * (1 + len(wrapped) + len(ids)) + [0] * pad))
        answer_labels = [-100 if i == UNK else i for i in ids]  # MG: pad ids (here <unk>) → -100
        labels.append(torch.tensor([-100] * (1 + len(wrapped)) + answer_labels + [-100] * pad))
    reference = model.llama_model(
        inputs_embeds=torch.stack(rows), attention_mask=torch.stack(masks), labels=torch.stack(labels)
    ).loss
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-6)


def test_invalid_byte_runs_decode_as_sentencepiece_does(model, sp):
    ids = [piece(sp, p) for p in ("<0xC3>", "<0x28>", "<0xE2>", "<0x82>", "▁x", "<0xF0>", "<0xE4>", "<0xB8>")]
    expected = sp.decode(ids)
    # One U+FFFD per invalid byte, and the valid '(' inside the run survives (transformers 5's fast
    # decoder turns a whole run of byte pieces that is not valid UTF-8 into one U+FFFD per piece).
    assert expected == "\ufffd(\ufffd\ufffd x\ufffd\ufffd\ufffd"
    assert model.tokenizer.decode(ids, skip_special_tokens=True) == expected
    assert model.tokenizer.decode([BOS, *ids, EOS, UNK], skip_special_tokens=True) == expected


def test_missing_sentencepiece_is_named_with_the_pip_command(llm_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # as if it were not installed
    with pytest.raises(CheckpointError, match=r"needs sentencepiece, which is not installed: pip install s"):
        load_tokenizer(llm_dir)


def test_folder_without_tokenizer_files_says_so(llm_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((llm_dir / "config.json").read_text())
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
    expected = official_greedy(model.llama_model, start, 1.0, stop_ids(sp), 8)
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
        expected = official_greedy(model.llama_model, start, penalty, stop_ids(sp), 8)
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
    expected = official_beam_search(model.llama_model, p["▁"], 2, 1.0, stop_ids(sp), 6)
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
    expected = official_beam_search(model.llama_model, p["▁"], 2, 1.0, stop_ids(sp), 8)
    assert expected[:4] == [p["▁the"], p["▁red"], p["##"], p["#"]] and len(expected) == 8
    answer = chat_answer(model, GenerateConfig(max_new_tokens=8, num_beams=2, repetition_penalty=1.0))
    assert answer.text == official_text(sp, expected) == "the red" and answer.tokens == 2


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
    expected = official_greedy(model.llama_model, start, 1.05, stop_ids(sp), 10)
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
