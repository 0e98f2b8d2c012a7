"""Typed dataclass configs: YAML recipe → dotted overrides → coercion → validation → saved YAML.

Every command has one top-level dataclass (nested by concern). Each field carries a one-line ``doc``
in its metadata; ``mgpt4.cli.options`` turns fields into flags whose help is that doc and the default.

    cfg = load_config(TrainRunConfig, "recipes/micro_stage1.yaml", ["train.lr=3e-4"])
    save_config(cfg, run_dir / "config.yaml")
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from mgpt4.errors import ConfigError

T = TypeVar("T")


class _Yaml12Loader(yaml.SafeLoader):
    """Safe YAML with YAML 1.2 booleans: only true/false, so ``resize_mode: no`` stays the string "no"."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def parse_yaml(text: str, source: str | None = None) -> Any:
    """Parse YAML text safely (no code, YAML 1.2 booleans).

    Args:
        text: the YAML.
        source: what the text is (a file, ``/set KEY``); when given, bad YAML — including a tag such
            as ``!!python/object``, which the safe loader refuses — raises ``ConfigError`` naming it.
            Without it the ``yaml.YAMLError`` propagates.
    """
    try:
        return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        if source is None:
            raise
        raise ConfigError(f"{source}: not valid YAML ({yaml_problem(exc)})") from exc


def yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: what is wrong and where (``line 2, column 5: …``)."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem is None:
        lines = str(exc).strip().splitlines()
        return lines[0] if lines else type(exc).__name__
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def read_yaml_file(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML file holding a mapping (a recipe, a saved ``config.yaml``); every failure names the file.

    Raises:
        ConfigError: unreadable, not UTF-8, not valid (safe) YAML, or not a mapping.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else f"not UTF-8 text: {exc.reason}"
        raise ConfigError(f"{file}: cannot read ({reason})") from exc
    data = parse_yaml(text, source=str(file))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def field(default: Any = dataclasses.MISSING, *, doc: str, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with a one-line ``doc`` used by help output and saved recipes."""
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


# --------------------------------------------------------------------------------------------------
# Shared sub-configs (used by several commands)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModelConfig:
    """Which MiniGPT-4 to build and where its weights come from."""

    preset: str = field(
        "micro", doc="model size: micro, micro-patches, vicuna-7b, vicuna-13b, llama2-7b (`mgpt4 model info`)"
    )
    vision_weights: str | None = field(
        None, doc="LAVIS eva_vit_g.pth (EVA ViT-g/14), or mgpt4:PATH (shipped in the package); None = random"
    )
    qformer_weights: str | None = field(
        None, doc="BLIP-2 blip2_pretrained_flant5xxl.pth (Q-Former, query tokens, ln_vision); None = random"
    )
    proj_weights: str | None = field(
        None, doc="MiniGPT-4 pretrained_minigpt4*.pth or our trainable.safetensors for llama_proj"
    )
    llm_path: str | None = field(
        None, doc="local HF directory of Vicuna / Llama-2-chat (or mgpt4:PATH, shipped); None = random init"
    )
    trainable: list[str] = field(
        default_factory=lambda: ["proj"], doc="modules that train: any of proj, qformer, vision, llm"
    )
    grad_checkpointing: bool = field(True, doc="recompute frozen ViT and LLM activations in backward")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = field(
        "sdpa", doc="LLM attention kernel: sdpa, eager or flash_attention_2"
    )
    max_txt_len: int = field(32, doc="max target tokens per sample (official: 32 stage 1, 160 stage 2)")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = field(
        "auto", doc="weights dtype: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16"
    )
    quantize: Literal["none", "int8", "nf4"] = field(
        "none",
        doc="load the frozen LLM quantized by bitsandbytes (int8 = official low_resource, nf4 = 4-bit); "
        "needs pip install -e '.[quant]'",
    )


@dataclasses.dataclass
class GenerateConfig:
    """Decoding settings for describe, chat and curate."""

    max_new_tokens: int = field(300, doc="tokens to generate at most (official 300)")
    do_sample: bool = field(False, doc="sample instead of greedy decoding")
    num_beams: int = field(1, doc="beam search width (1 = off)")
    temperature: float = field(1.0, doc="softmax temperature when sampling")
    top_p: float = field(0.9, doc="nucleus sampling mass when sampling")
    repetition_penalty: float = field(1.05, doc="penalty on already generated tokens (official demo 1.05)")
    max_length: int = field(2000, doc="context limit; older embeddings are cut past it (official 2000)")
    stop: list[str] = field(
        default_factory=lambda: ["###"], doc="a row ends at the first of these strings (official: ###)"
    )
    seed: int = field(42, doc="random seed for sampling")

    def validate(self) -> None:
        """Refuse settings generation would fail on (or silently misuse), naming the key.

        Runs whenever a config embedding this is loaded, and on chat's ``/set``.

        Raises:
            ConfigError: a value out of range.
        """
        numbers = {"temperature": self.temperature, "top_p": self.top_p,
                   "repetition_penalty": self.repetition_penalty}  # fmt: skip
        for key, value in numbers.items():
            if not math.isfinite(value):
                raise ConfigError(f"generate.{key}: must be a finite number, got {value}")
        problems = {
            "max_new_tokens": (self.max_new_tokens >= 1, "at least 1"),
            "num_beams": (self.num_beams >= 1, "at least 1 (1 = no beam search)"),
            "max_length": (self.max_length >= 1, "at least 1"),
            # HF refuses temperature <= 0 when sampling; greedy decoding is do_sample=false (--greedy).
            "temperature": (self.temperature > 0, "above 0 (for greedy decoding set do_sample=false)"),
            "top_p": (0 < self.top_p <= 1, "in (0, 1]"),
            "repetition_penalty": (self.repetition_penalty > 0, "above 0 (1.0 = no penalty)"),
            "seed": (-(2**63) <= self.seed < 2**64, "within torch.manual_seed's range [-2^63, 2^64)"),
        }
        for key, (ok, wanted) in problems.items():
            if not ok:
                raise ConfigError(f"generate.{key}: must be {wanted}, got {getattr(self, key)}")
        if not all(self.stop):
            raise ConfigError(f"generate.stop: every stop string must be non-empty, got {self.stop}")


# --------------------------------------------------------------------------------------------------
# Loading: YAML → overrides → coercion → validation
# --------------------------------------------------------------------------------------------------


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from an optional YAML recipe plus ``key.sub=value`` overrides.

    Raises:
        ConfigError: unknown key (names the nearest valid one), wrong type, unreadable YAML.
    """
    data: dict[str, Any] = read_recipe(path) if path else {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not key=value (e.g. train.lr=3e-5)")
        try:
            value = parse_yaml(raw) if raw.strip() else raw
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(
                f"override {key.strip()}: not valid YAML ({problem}) in {raw!r}; fix the value or quote it"
            ) from exc
        _set_dotted(data, key.strip(), value)
    return from_dict(cls, data)


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read a recipe YAML from a path, or a built-in one by name (``micro_stage1``)."""
    return read_yaml_file(resolve_recipe_path(path))


def builtin_recipes() -> dict[str, Path]:
    """Built-in recipes shipped inside the package, by name."""
    folder = resources.files("mgpt4") / "recipes"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith((".yaml", ".json"))}


def resolve_recipe_path(path: str | os.PathLike) -> Path:
    file = Path(path)
    if file.is_file():
        return file
    recipes = builtin_recipes()
    if str(path) in recipes:
        return recipes[str(path)]
    hint = difflib.get_close_matches(str(path), list(recipes), n=1)
    extra = (
        f"; did you mean built-in recipe '{hint[0]}'?" if hint else "; `mgpt4 recipes` lists built-in ones"
    )
    raise ConfigError(f"recipe {path}: no such file{extra}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Instantiate dataclass ``cls`` from a nested dict, checking keys and coercing types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
            raise ConfigError(f"unknown config key '{prefix}{key}': {hint}valid keys: {', '.join(fields)}")
    kwargs = {}
    for name in fields:
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{prefix}{name}")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        check()
    return obj


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value if value is not None else {}, f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, args))}")
        return value
    if origin in (list, tuple, Sequence):
        items = value if isinstance(value, list | tuple) else [value]
        item_type = args[0] if args else Any
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(items)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1] if args else Any, f"{key}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else _fail_type(key, "int", value)
            except ValueError:
                pass
        _fail_type(key, "an integer", value)
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        _fail_type(key, "a number", value)
    if hint is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        _fail_type(key, "a string", value)
    return value


def _fail_type(key: str, expected: str, value: Any) -> typing.NoReturn:
    raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML-able data."""
    return dataclasses.asdict(cfg)


def to_dotted(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"train.lr": 1e-4, …}``: the keys ``KEY=VALUE`` overrides use."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat |= to_dotted(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def save_config(cfg: Any, path: str | os.PathLike, header: str | None = None) -> Path:
    """Write the fully resolved config as YAML (atomically), with an optional comment header."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if header:
        text = "".join(f"# {line}\n" for line in header.splitlines()) + text
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
