"""``model.quantize``: the frozen LLM loaded in int8 / nf4 by bitsandbytes (the ``[quant]`` extra).

bitsandbytes runs both on the CPU here, so these tests load a real (micro-shaped) Llama folder
quantized, compare its weights' memory and logits with the bf16 load, and generate answers.
Only the tests that need bitsandbytes itself are skipped when the extra is absent.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mgpt4.cli import cli
from mgpt4.config import GenerateConfig, ModelConfig, load_config
from mgpt4.errors import ConfigError, UsageError
from mgpt4.model import llm as llm_module
from mgpt4.model.build import build_model
from mgpt4.model.synthetic import write_official_files

needs_bitsandbytes = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="the [quant] extra (bitsandbytes) is absent"
)
LINEAR_TYPES = {"int8": "Linear8bitLt", "nf4": "Linear4bit"}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return write_official_files("micro", tmp_path_factory.mktemp("official"), seed=11)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("image") / "photo.png"
    Image.new("RGB", (64, 64), "orange").save(path)
    return path


def config(files: dict[str, Path], quantize: str = "none", **changes) -> ModelConfig:
    values = {"preset": "micro", "llm_path": str(files["llm"]), "proj_weights": str(files["proj"]),
              "dtype": "bf16", "grad_checkpointing": False, "quantize": quantize}  # fmt: skip
    return ModelConfig(**(values | changes))


def _tensor_bytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def decoder_weight_bytes(llm) -> int:
    """Bytes of the decoder layers' linear weights, with bitsandbytes' scales and quantization state."""
    total = 0
    for module in llm.model.layers.modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.ndim != 2:
            continue
        total += _tensor_bytes(weight) + _tensor_bytes(getattr(weight, "SCB", None))  # int8 row scales
        state = getattr(weight, "quant_state", None)  # nf4: absmax (itself quantized) + code book
        if state is not None:
            total += _tensor_bytes(state.absmax) + _tensor_bytes(state.code)
            if state.state2 is not None:
                total += _tensor_bytes(state.state2.absmax) + _tensor_bytes(state.state2.code)
    return total


@needs_bitsandbytes
@pytest.mark.parametrize(("mode", "max_ratio"), [("int8", 0.56), ("nf4", 0.33)])
def test_quantized_llm_is_smaller_close_and_answers(files, mode, max_ratio):
    reference = build_model(config(files)).eval()
    model = build_model(config(files, mode)).eval()
    layer = model.llama_model.model.layers[0]
    assert type(layer.mlp.up_proj).__name__ == LINEAR_TYPES[mode]
    assert type(layer.self_attn.q_proj).__name__ == LINEAR_TYPES[mode]

    ratio = decoder_weight_bytes(model.llama_model) / decoder_weight_bytes(reference.llama_model)
    assert ratio < max_ratio, ratio  # int8: 1 byte + a row scale; nf4: 4 bits + block scales

    # Same weights up to quantization error: next-token logits point the same way.
    ids = torch.tensor([[1, 17, 42, 99, 7]])
    with torch.no_grad():
        ours = model.llama_model(ids).logits.float().flatten()
        full = reference.llama_model(ids).logits.float().flatten()
    assert torch.nn.functional.cosine_similarity(ours, full, dim=0) > 0.9

    images = torch.randn(2, 3, 64, 64)
    answers = model.generate(
        ["<Img><ImageHere></Img> Describe it."] * 2, images, GenerateConfig(max_new_tokens=4)
    )
    assert len(answers) == 2 and all(a.tokens > 0 for a in answers)


@needs_bitsandbytes
def test_describe_runs_with_a_quantized_llm(files, image):
    result = CliRunner().invoke(
        cli,
        ["describe", "-m", "micro", "--llm", str(files["llm"]), "--dtype", "bf16", "model.quantize=nf4",
         "--max-new-tokens", "4", "--json", str(image)],
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert json.loads(line)["tokens"] > 0


def test_quantize_without_the_extra_names_the_install_command(files, image, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        llm_module.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "bitsandbytes" else real_find_spec(name, *args),
    )
    with pytest.raises(
        UsageError, match=r"model\.quantize=int8 needs bitsandbytes: pip install -e '\.\[quant\]'"
    ):
        build_model(config(files, "int8"))
    result = CliRunner().invoke(
        cli, ["describe", "-m", "micro", "--llm", str(files["llm"]), "model.quantize=nf4", str(image)]
    )
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line == "error: model.quantize=nf4 needs bitsandbytes: pip install -e '.[quant]'"


def test_quantize_needs_a_frozen_llm_from_a_folder(files):
    with pytest.raises(
        UsageError, match=r"model\.quantize=nf4 applies to an LLM loaded from model\.llm_path"
    ):
        build_model(config(files, "nf4", llm_path=None))
    with pytest.raises(UsageError, match=r"a quantized LLM cannot train; drop 'llm' from trainable"):
        build_model(config(files, "int8", trainable=["proj", "llm"]))
    with pytest.raises(ConfigError, match=r"quantize: 'int4' is not allowed; choose one of none, int8, nf4"):
        load_config(ModelConfig, None, ["quantize=int4"])
