"""The presets of published models (configs/llama3.py, qwen.py, gemma.py, moe.py): each is the model
transformers builds from the same config.json, parameter for parameter, and the tiny ones train.

The parameter counts are compared with transformers' own model built on PyTorch's meta device (no
memory, so 70B costs nothing), not with rounded figures from model cards.
"""

import importlib.util
import math
import os

import jax
import pytest

from llm_jax.models import family as family_lib
from llm_jax.training import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("llama3", "qwen", "gemma", "moe")


def _module(family: str):
    spec = importlib.util.spec_from_file_location(f"cfg_{family}", os.path.join(REPO, "configs", f"{family}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PRESETS = [(family, size) for family in FAMILIES for size in _module(family).SIZES]


def _our_params(config) -> tuple[int, int]:
    """(parameters, vocabulary) of the preset's model (a byte tokenizer's 256 where it has none)."""
    cfg = config_lib.model_config(config_lib.finalize(config), 256)
    shapes = family_lib.abstract_params(family_lib.build(cfg))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)), cfg.vocab_size


@pytest.mark.parametrize("family, size", PRESETS)
def test_preset_has_the_parameters_transformers_builds(family, size):
    torch = pytest.importorskip("torch", reason="the preset tests need the 'hf' extra: pip install -e .[hf]")
    transformers = pytest.importorskip("transformers", reason="the preset tests need the 'hf' extra")
    module = _module(family)
    config = module.get_config(size)
    ours, vocab = _our_params(config)
    published = {**module.published_config(size), "vocab_size": vocab}  # tiny sizes train on bytes
    kind = transformers.CONFIG_MAPPING[published["model_type"]]
    with torch.device("meta"):
        theirs = transformers.AutoModelForCausalLM.from_config(kind(**published))
    # Tied embeddings are one tensor to both sides (transformers counts it once: parameters() dedups).
    assert ours == sum(p.numel() for p in theirs.parameters())
    if not size.endswith("tiny"):
        assert vocab == module.published_config(size)["vocab_size"] and config.data.tokenizer == "hf"
        assert config.model.preset.endswith(size) and config.model.scan_layers and config.mesh.fsdp == -1


def test_unknown_size_names_the_sizes():
    with pytest.raises(ValueError, match=r"configs/gemma.py: unknown size 'gemma4-1b'; use one of \['gemma2-27b'"):
        _module("gemma").get_config("gemma4-1b")


@pytest.mark.parametrize(
    "family, size, pattern, window",
    [("gemma", "gemma3-1b", "lllllg", 512), ("gemma", "gemma2-9b", "lg", 4096), ("qwen", "qwen3-8b", "g", None)],
)
def test_preset_attention_layout(family, size, pattern, window):
    m = _module(family).get_config(size).model
    assert (m.layer_pattern, m.sliding_window) == (pattern, window)


@pytest.mark.parametrize(
    "family, size", [("gemma", "gemma3-tiny"), pytest.param("qwen", "qwen3-tiny", marks=pytest.mark.slow)]
)
def test_tiny_preset_trains(family, size, tmp_path):
    """The whole `llm_jax.main` path on the tiny size: the loss falls well below the uniform guess."""
    from llm_jax.training import loop

    config = _module(family).get_config(size)
    config.train.update(num_steps=6, log_every=3, eval_every=6, checkpoint_every=6, eval_steps=1)
    result = loop.train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 6 and result["eval/loss"] < math.log(256) - 0.3  # 5.55 nats: the uniform guess
