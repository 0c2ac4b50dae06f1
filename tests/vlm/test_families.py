"""Tiny random models of real VLM families run PrFlashAttention + SAQ end to end: image spans
found, the vision tower left on SDPA, and with every block kept and exact stairs the same
greedy tokens as SDPA + DynamicCache."""

import pytest
import torch
from transformers import DynamicCache

from core.vlm.attention import protected_spans, token_spans, use_prblock
from core.vlm.config import PrBlockConfig, SAQConfig
from core.vlm.saq import StaircaseCache, staircase_attention
from tests.vlm.conftest import gemma_prompt, llava_prompt, qwen2_vl_prompt

# Every block kept, through the sparse kernels (log(1/p) = 0 defeats the dense shortcut).
EVERY_BLOCK = PrBlockConfig(
    block_size=8, alpha=1e9, log_p_correction=True, dense_below=0, decode_dense_below=0
)
SPARSE = PrBlockConfig(block_size=8, window=1, alpha=0.3, dense_below=0, decode_dense_below=0)
EXACT_STAIRS = SAQConfig(bits=(16, 16), residual=8, group_size=4, sinks=1)
SMALL_STAIRS = SAQConfig(bits=(8, 4), residual=8, group_size=4, sinks=1)


def _inputs(family: str, model) -> dict:
    if family == "tiny_llava":
        ids, pixels = llava_prompt(n_text=40)
        return {"input_ids": ids, "pixel_values": pixels}
    if family == "tiny_qwen2_vl":
        return qwen2_vl_prompt()
    return gemma_prompt(model)


def _generate(model, inputs, cache, spans=None) -> torch.Tensor:
    with torch.no_grad():
        if spans is None:
            return model.generate(
                **inputs,
                past_key_values=cache,
                max_new_tokens=12,
                min_new_tokens=12,
                do_sample=False,
            )
        with protected_spans(model, spans), staircase_attention(model, cache):
            return model.generate(
                **inputs,
                past_key_values=cache,
                max_new_tokens=12,
                min_new_tokens=12,
                do_sample=False,
            )


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_qwen2_vl", "tiny_gemma3", "tiny_paligemma"])
def test_every_block_and_exact_stairs_generate_what_sdpa_and_dynamic_cache_do(family, request):
    model = request.getfixturevalue(family)
    inputs = _inputs(family, model)
    spans = token_spans(inputs["input_ids"], model.config.image_token_id)
    assert spans and all(end - start >= 4 for start, end in spans)
    expected = _generate(model, inputs, DynamicCache(config=model.config))
    use_prblock(model, EVERY_BLOCK)
    assert model.config.vision_config._attn_implementation == "sdpa"
    cache = StaircaseCache(model.config, EXACT_STAIRS, protected_spans=spans)
    assert torch.equal(_generate(model, inputs, cache, spans), expected)
    # Sampled blocks and quantized stairs: it still runs and answers the same prompt.
    use_prblock(model, SPARSE)
    cache = StaircaseCache(model.config, SMALL_STAIRS, protected_spans=spans)
    out = _generate(model, inputs, cache, spans)
    assert out.shape == expected.shape and torch.equal(
        out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"]
    )
    assert sum(layer.stair_lengths()[-1] for layer in cache.layers if hasattr(layer, "stairs")) > 0
