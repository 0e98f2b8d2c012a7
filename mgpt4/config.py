"""Typed dataclass configs: YAML recipe → dotted overrides → coercion → validation → saved YAML.

Every command has one top-level dataclass (nested by concern). Each field carries a one-line ``doc``
in its metadata; ``describe_fields`` turns those into ``--help`` text and recipe comments.

    cfg = load_config(TrainRunConfig, "recipes/micro_stage1.yaml", ["train.lr=3e-4"])
    save_config(cfg, run_dir / "config.yaml")
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

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


def parse_yaml(text: str) -> Any:
    """Parse YAML text safely (no code, YAML 1.2 booleans)."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


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
    attn_implementation: str = field("sdpa", doc="LLM attention kernel: sdpa, eager or flash_attention_2")
    max_txt_len: int = field(32, doc="max target tokens per sample (official: 32 stage 1, 160 stage 2)")
    dtype: str = field("auto", doc="weights dtype: auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16")


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
        _set_dotted(data, key.strip(), parse_yaml(raw) if raw.strip() else raw)
    return from_dict(cls, data)


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read a recipe YAML from a path, or a built-in one by name (``micro_stage1``)."""
    file = resolve_recipe_path(path)
    try:
        data = parse_yaml(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: a recipe must be a mapping of keys to values")
    return data


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
# Saving and describing
# --------------------------------------------------------------------------------------------------


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML-able data."""
    return dataclasses.asdict(cfg)


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


def describe_fields(cls: type, prefix: str = "") -> Iterable[tuple[str, str, Any]]:
    """Yield (dotted key, doc, default) for every leaf field of a config class."""
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from describe_fields(hint, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f.metadata.get("doc", ""), getattr(defaults, f.name)
