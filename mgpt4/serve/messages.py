"""OpenAI messages → the model's official chat prompt, and OpenAI sampling parameters → decoding.

Conversation mapping (the same ``conversation.chat_prompt`` that ``mgpt4 chat`` uses):

- Each user message opens a turn (``ChatTurn``); consecutive user messages are one turn, their texts
  joined by a space — the official demo appends the question to the image message the same way.
- A user message's images go where the official template puts the image: ``<Img><ImageHere></Img>``
  before the turn's text, one slot per image in the order given (text parts keep their order).
- An assistant message answers the open turn (consecutive ones are joined by a space); one before any
  user message, or a conversation that does not end with a user message, is a 400.
- System (and ``developer``) messages: their text, joined by newlines, *replaces* the template's system
  text ("Give the following image: …"); without one the official text is used. Tools such as
  evaluation harnesses set a system message on purpose, and the official text is only a demo default.
- Images are sent again with every request (the API is stateless), so history images are seen again.

Decoding mapping (``GenerateConfig`` fields in brackets):

- ``temperature`` 0 → greedy [``do_sample=False``]; (0, 2] → sampling at that temperature; omitted →
  the server default (official demo: sampling at 1.0). Outside [0, 2] → 400.
- ``top_p`` in (0, 1] [``top_p``], only when sampling; omitted → 0.9 (official demo).
- ``seed`` [``seed``]: a sampled request with a seed is decoded in a batch of its own, so the same
  request and seed give the same answer; without one each batch draws a fresh seed.
- ``max_tokens`` / ``max_completion_tokens`` [``max_new_tokens``]: 1 … the server cap; omitted → the
  server default (official 300), lowered to what the context still holds.
- ``stop``: up to 4 strings, added to the template's own stop ``###``; the answer ends before the
  first one, which is not returned (as at OpenAI).
- ``repetition_penalty`` is the server's (official 1.05): OpenAI has no such parameter.
- ``n`` must be 1 and ``logprobs`` is not supported (400); ``presence_penalty``, ``frequency_penalty``,
  ``logit_bias`` and other fields are ignored.
"""

from __future__ import annotations

import dataclasses

from mgpt4.config import GenerateConfig
from mgpt4.conversation import (
    CHAT_SYSTEM,
    IMAGE_PLACEHOLDER,
    IMAGE_SLOT,
    ChatTurn,
    chat_prompt,
    split_at_images,
)
from mgpt4.serve.config import ServeConfig
from mgpt4.serve.protocol import ChatCompletionRequest, ImagePart, Message, TextPart, bad_request

MAX_STOPS = 4  # OpenAI accepts up to 4 stop sequences
MAX_SEED = 2**63 - 1


@dataclasses.dataclass(frozen=True)
class Decoding:
    """How one request is decoded; requests with equal ``batch_key`` may share a generate call."""

    greedy: bool
    temperature: float
    top_p: float
    seed: int | None
    max_tokens: int | None  # None until the prompt length is known (``with_max_tokens``)
    stops: tuple[str, ...]

    def batch_key(self, request_id: str) -> tuple:
        """Greedy rows batch with any greedy row; sampled rows with the same temperature and top_p.

        A seeded sampled request gets a key of its own: the sampling RNG is one per batch, so only a
        batch of one gives the seed a reproducible meaning.
        """
        if self.greedy:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", request_id)
        return ("sample", self.temperature, self.top_p)

    def generate_config(self, max_new_tokens: int, max_length: int, repetition_penalty: float, seed: int):
        """The ``GenerateConfig`` a batch of such rows runs with (rows stop on their own, see batcher)."""
        return GenerateConfig(
            max_new_tokens=max_new_tokens,
            do_sample=not self.greedy,
            num_beams=1,
            temperature=self.temperature,
            top_p=self.top_p,
            repetition_penalty=repetition_penalty,
            max_length=max_length,
            seed=self.seed if self.seed is not None else seed,
        )


@dataclasses.dataclass
class ChatPrompt:
    """A conversation in the model's template: ``prompt`` holds one ``<ImageHere>`` per image URL."""

    prompt: str
    image_urls: list[str]
    image_params: list[str]  # where each URL was in the request: messages[i].content[j].image_url.url


def build_chat_prompt(messages: list[Message], style: str, max_images: int) -> ChatPrompt:
    """Map OpenAI messages onto the official chat template (see the module docstring).

    Raises:
        ApiError: 400 for an image in a non-user message, a conversation that does not end with a
            user message, an assistant message with no question before it, or too many images.
    """
    system: list[str] = []
    turns: list[tuple[list[str], list[str], list[str]]] = []  # (question texts, image urls, answers)
    image_params: list[str] = []
    for index, message in enumerate(messages):
        texts, urls, params = _parts(message, f"messages[{index}]")
        if message.role in ("system", "developer"):
            if urls:
                raise bad_request("images are only allowed in user messages", f"messages[{index}].content")
            system += texts
        elif message.role == "user":
            if not turns or turns[-1][2]:
                turns.append(([], [], []))
            turns[-1][0].extend(texts)
            turns[-1][1].extend(urls)
            image_params.extend(params)
        else:
            if urls:
                raise bad_request("images are only allowed in user messages", f"messages[{index}].content")
            if not turns:
                raise bad_request("an assistant message must follow a user message", f"messages[{index}]")
            turns[-1][2].extend(texts or [""])
    if not turns or turns[-1][2]:
        raise bad_request("the last message must be a user message (the question to answer)", "messages")
    image_urls = [url for _, urls, _ in turns for url in urls]
    if len(image_urls) > max_images:
        raise bad_request(
            f"{len(image_urls)} images in this conversation; this server accepts at most {max_images}",
            "messages",
            "too_many_images",
        )
    chat_turns = [
        ChatTurn(
            question=(IMAGE_SLOT + " ") * max(0, len(urls) - 1) + " ".join(t for t in texts if t),
            answer=" ".join(answers) if answers else None,
            image=f"{len(urls)} image(s)" if urls else None,
        )
        for texts, urls, answers in turns
    ]
    prompt = chat_prompt(chat_turns, style)
    if system:
        assert prompt.startswith(CHAT_SYSTEM)  # chat_prompt starts every style with the system text
        prompt = "\n".join(system) + prompt[len(CHAT_SYSTEM) :]
    return ChatPrompt(prompt, image_urls, image_params)


def _parts(message: Message, where: str) -> tuple[list[str], list[str], list[str]]:
    """A message's text pieces, image URLs and the URLs' parameter names, in order."""
    if message.content is None:
        return [], [], []
    if isinstance(message.content, str):
        return [_text(message.content, f"{where}.content")], [], []
    texts, urls, params = [], [], []
    for index, part in enumerate(message.content):
        if isinstance(part, TextPart):
            texts.append(_text(part.text, f"{where}.content[{index}].text"))
        elif isinstance(part, ImagePart):
            urls.append(part.image_url.url)
            params.append(f"{where}.content[{index}].image_url.url")
    return texts, urls, params


def _text(text: str, param: str) -> str:
    """Message text; the image placeholder is refused, since the model splices an image at each one."""
    if IMAGE_PLACEHOLDER in text:
        raise bad_request(
            f"{param}: text may not contain {IMAGE_PLACEHOLDER}; send images as image_url parts", param
        )
    return text


def prompt_length(tokenizer, prompt: str, num_image_tokens: int) -> int:
    """LLM positions the prompt takes, as ``MiniGPT4.embed_prompt`` builds it: BOS + text + images."""
    segments = split_at_images(prompt)
    text = sum(len(tokenizer(s, add_special_tokens=False).input_ids) for s in segments if s)
    return 1 + text + (len(segments) - 1) * num_image_tokens


def decoding_from_request(request: ChatCompletionRequest, cfg: ServeConfig) -> Decoding:
    """Validate and map the sampling parameters (see the module docstring).

    Raises:
        ApiError: 400 naming the parameter when a value is out of range or unsupported.
    """
    if request.n != 1:
        raise bad_request("n: this server returns one choice per request; use n=1", "n")
    if request.logprobs:
        raise bad_request("logprobs: not supported by this server", "logprobs")
    temperature = cfg.default_temperature if request.temperature is None else request.temperature
    if not 0 <= temperature <= 2:
        raise bad_request(f"temperature: {temperature} is not in [0, 2]", "temperature")
    top_p = cfg.default_top_p if request.top_p is None else request.top_p
    if not 0 < top_p <= 1:
        raise bad_request(f"top_p: {top_p} is not in (0, 1]", "top_p")
    if request.seed is not None and not 0 <= request.seed <= MAX_SEED:
        raise bad_request(f"seed: must be in [0, 2**63 - 1], got {request.seed}", "seed")
    name = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    max_tokens = request.max_completion_tokens if name == "max_completion_tokens" else request.max_tokens
    if max_tokens is not None and not 1 <= max_tokens <= cfg.max_tokens:
        raise bad_request(f"{name}: must be in [1, {cfg.max_tokens}] on this server, got {max_tokens}", name)
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > MAX_STOPS or not all(stops):
        raise bad_request(f"stop: up to {MAX_STOPS} non-empty strings", "stop")
    template_stops = GenerateConfig().stop  # the template's own end marker, "###"
    greedy = temperature == 0
    return Decoding(
        greedy=greedy,
        temperature=1.0 if greedy else temperature,
        top_p=1.0 if greedy else top_p,
        seed=None if greedy else request.seed,
        max_tokens=max_tokens,
        stops=tuple(dict.fromkeys([*template_stops, *stops])),
    )
