"""The staircase KV cache: layout by age, exact protected tokens, real bytes, same greedy output."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM
from transformers.cache_utils import DynamicSlidingWindowLayer

from core.vlm.attention import use_prblock
from core.vlm.config import PrBlockConfig, SAQConfig
from core.vlm.memory import AllocationMeter
from core.vlm.saq import StaircaseCache, StaircaseLayer, image_token_spans, staircase_attention
from tests.vlm.conftest import IMAGE_TOKEN_ID, llava_prompt

EXACT = SAQConfig(bits=(16, 16, 16), residual=16, group_size=8, sinks=4)
SMALL = SAQConfig(bits=(8, 4, 2), residual=8, group_size=4, sinks=2)
HEADS, HEAD_DIM = 2, 16


def random_kv(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, HEADS, n, HEAD_DIM, generator=generator),
        torch.randn(1, HEADS, n, HEAD_DIM, generator=generator),
    )


def expected_layout(saq: SAQConfig, n_streamed: int) -> tuple[list[int], int]:
    """Stair lengths and residual length after `n_streamed` unprotected tokens."""
    chunks, residual = divmod(n_streamed, saq.residual)
    bounded = len(saq.bits) - 1
    stairs = [saq.residual if chunks > i else 0 for i in range(bounded)]
    return stairs + [max(0, chunks - bounded) * saq.residual], residual


def greedy(model, cache, ids: torch.Tensor, n: int = 40, **inputs) -> torch.Tensor:
    return model.generate(
        ids,
        past_key_values=cache,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        **inputs,
    )


def test_tokens_step_down_the_staircase_exactly_when_the_residual_fills():
    layer = StaircaseLayer(SMALL)
    keys, values = random_kv(70)
    for n in range(1, 71):
        layer.update(keys[:, :, n - 1 : n], values[:, :, n - 1 : n])
        stairs, residual = expected_layout(SMALL, n - min(n, SMALL.sinks))
        assert layer.stair_lengths() == stairs, n
        assert layer.residual_keys.shape[2] == residual, n
    assert [stair.bits for stair in layer.stairs] == list(SMALL.bits)


def test_a_prompt_is_laid_out_on_the_staircase_at_once():
    keys, values = random_kv(61)
    one_by_one, at_once = StaircaseLayer(SMALL), StaircaseLayer(SMALL)
    for n in range(61):
        one_by_one.update(keys[:, :, n : n + 1], values[:, :, n : n + 1])
    at_once.update(keys, values)
    assert at_once.stair_lengths() == one_by_one.stair_lengths() == [8, 8, 40]
    # Quantized once, straight to its stair's bits, the prompt is closer than after three hops.
    error = {
        name: (layer.update(*random_kv(1, seed=1))[0][:, :, :61] - keys).abs().mean()
        for name, layer in (("at_once", at_once), ("one_by_one", one_by_one))
    }
    assert error["at_once"] <= error["one_by_one"]


def test_older_stairs_are_less_precise():
    layer = StaircaseLayer(SMALL)
    keys, values = random_kv(2 + 3 * 8 + 5)
    returned, _ = layer.update(keys, values)
    returned, _ = layer.update(*random_kv(1, seed=1))
    error = (returned[:, :, : keys.shape[2]] - keys).abs().mean(dim=(0, 1, 3))
    two_bit, four_bit, eight_bit, exact = error[2:10], error[10:18], error[18:26], error[26:]
    assert two_bit.mean() > four_bit.mean() > eight_bit.mean() > 0
    assert exact.max() == 0


def test_sinks_and_protected_spans_stay_exact():
    layer = StaircaseLayer(SMALL, protected_spans=[(20, 25)])
    keys, values = random_kv(80)
    for start in range(0, 80, 3):
        layer.update(keys[:, :, start : start + 3], values[:, :, start : start + 3])
    returned_keys, returned_values = layer.update(*random_kv(1, seed=1))
    for exact in (slice(0, SMALL.sinks), slice(20, 25)):
        assert torch.equal(returned_keys[:, :, exact], keys[:, :, exact])
        assert torch.equal(returned_values[:, :, exact], values[:, :, exact])
    assert not torch.equal(returned_keys[:, :, 5:20], keys[:, :, 5:20])


def test_nbytes_counts_exactly_the_tensors_held():
    layer = StaircaseLayer(SMALL, protected_spans=[(10, 12)])
    layer.update(*random_kv(2 + 2 + 8 * 5 + 3))
    held = layer.tensors()
    assert layer.nbytes() == sum(t.numel() * t.element_size() for t in held)
    fp32, fp16 = 4, 2
    exact_tokens = 2 + 2 + 3  # sinks, the protected span, the residual

    def stair_bytes(tokens: int, bits: int) -> int:
        codes = 2 * tokens * HEAD_DIM * bits // 8
        groups = tokens * HEAD_DIM // SMALL.group_size * 2  # keys and values alike here
        return HEADS * (codes + groups * 2 * fp16)

    quantized = stair_bytes(8, 8) + stair_bytes(8, 4) + stair_bytes(24, 2)
    assert layer.nbytes() == HEADS * exact_tokens * 2 * HEAD_DIM * fp32 + quantized


def test_full_precision_stairs_generate_like_dynamic_cache(tiny_llama):
    ids = torch.randint(3, 200, (1, 30), generator=torch.Generator().manual_seed(0))
    reference = greedy(tiny_llama, DynamicCache(config=tiny_llama.config), ids)
    cache = StaircaseCache(tiny_llama.config, EXACT, protected_spans=[(9, 13)])
    assert torch.equal(greedy(tiny_llama, cache, ids), reference)


def test_full_precision_stairs_beam_search_like_dynamic_cache(tiny_llama):
    ids = torch.randint(3, 200, (1, 20), generator=torch.Generator().manual_seed(1))
    beams = dict(num_beams=2, n=24)
    reference = greedy(tiny_llama, DynamicCache(config=tiny_llama.config), ids, **beams)
    assert torch.equal(
        greedy(tiny_llama, StaircaseCache(tiny_llama.config, EXACT), ids, **beams), reference
    )


def test_full_precision_stairs_generate_like_dynamic_cache_on_a_vlm(tiny_llava):
    ids, pixels = llava_prompt()
    spans = image_token_spans(ids, IMAGE_TOKEN_ID)
    reference = greedy(tiny_llava, DynamicCache(config=tiny_llava.config), ids, pixel_values=pixels)
    cache = StaircaseCache(tiny_llava.config, EXACT, protected_spans=spans)
    assert torch.equal(greedy(tiny_llava, cache, ids, pixel_values=pixels), reference)


def test_image_token_spans_find_the_placeholder_run():
    ids, _ = llava_prompt()
    assert image_token_spans(ids, IMAGE_TOKEN_ID) == [(1, 17)]


def test_image_tokens_of_a_vlm_prompt_stay_exact(tiny_llava):
    ids, pixels = llava_prompt()
    saq = SAQConfig(bits=(2,), residual=8, group_size=4, sinks=1)
    cache = StaircaseCache(tiny_llava.config, saq, image_token_spans(ids, IMAGE_TOKEN_ID))
    greedy(tiny_llava, cache, ids, n=20, pixel_values=pixels)
    layer = cache.layers[0]
    assert layer.exact_positions == list(range(17))
    assert layer.stair_lengths() == [32]


def test_long_generation_keeps_memory_on_the_staircase(tiny_llama):
    saq = SAQConfig(bits=(8, 4, 2), residual=16, group_size=8, sinks=4)
    cache = StaircaseCache(tiny_llama.config, saq)
    ids = torch.randint(3, 200, (1, 10), generator=torch.Generator().manual_seed(2))
    sizes = {}
    for n in (60, 60 + 3 * 16):
        cache.reset()
        greedy(tiny_llama, cache, ids, n=n)
        stairs, residual = expected_layout(saq, cache.get_seq_length() - saq.sinks)
        for layer in cache.layers:
            assert layer.stair_lengths() == stairs and stairs[-1] > 0
            assert layer.residual_keys.shape[2] == residual == 1
        sizes[n] = cache.nbytes()
    # The 48 extra tokens all land on the 2-bit stair: 2 bits plus 32 bits of metadata per group.
    layers, heads, head_dim = 2, 2, 16
    per_token = layers * heads * 2 * head_dim * (2 + 32 / saq.group_size) // 8
    assert sizes[108] - sizes[60] == 48 * per_token
    assert cache.bits_per_element() < 32 / 3


def test_sliding_window_layers_fall_back_to_transformers_own_layer():
    config = Qwen2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
    )
    model = Qwen2ForCausalLM(config).eval()
    cache = StaircaseCache(config, SMALL)
    assert [type(layer) for layer in cache.layers] == [StaircaseLayer, DynamicSlidingWindowLayer]
    greedy(model, cache, torch.randint(3, 200, (1, 12)), n=20)
    assert cache.nbytes() > 0 and cache.get_seq_length() == 31


def test_staircase_settings_are_checked():
    with pytest.raises(ValueError):
        SAQConfig(bits=(8, 3))
    with pytest.raises(ValueError):
        SAQConfig(residual=100, group_size=32)


# --- decode steps attending to the stairs in place


def _filled_layer(saq: SAQConfig, n: int, protected=None, batch: int = 1) -> StaircaseLayer:
    layer = StaircaseLayer(saq, protected)
    keys, values = random_kv(n, seed=n)
    layer.update(
        keys.repeat(batch, 1, 1, 1),
        values.repeat(batch, 1, 1, 1) + torch.arange(batch)[:, None, None, None],
    )
    return layer


@pytest.mark.parametrize(
    "saq", [SMALL, SAQConfig(bits=(8, 4), residual=8, group_size=4, sinks=2, attend_chunk=8)]
)
@pytest.mark.parametrize("protected", [None, [(10, 21)]])
def test_attending_in_place_equals_sdpa_over_the_dequantized_cache(saq, protected):
    layer = _filled_layer(saq, 75, protected, batch=2)
    assert sum(layer.stair_lengths()) > 0
    # With a span, exact tokens are not a prefix: the dequantize-all path had to reorder.
    assert (layer.exact_positions[-1] >= len(layer.exact_positions)) == bool(protected)
    keys, values = layer._assemble()
    query = torch.randn(2, 2 * HEADS, 1, HEAD_DIM, generator=torch.Generator().manual_seed(1))
    expected = F.scaled_dot_product_attention(query, keys, values, enable_gqa=True)
    torch.testing.assert_close(layer.attend(query), expected, atol=1e-5, rtol=1e-5)
    # A padding mask over cache positions, as transformers gives it for a left-padded row.
    mask = torch.ones(2, 1, 1, 75, dtype=torch.bool)
    mask[1, :, :, :9] = False
    expected = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(layer.attend(query, mask), expected, atol=1e-5, rtol=1e-5)


def test_greedy_decoding_attending_in_place_equals_the_dequantize_all_path(tiny_llama):
    ids = torch.randint(3, 250, (1, 37), generator=torch.Generator().manual_seed(4))
    expected = greedy(tiny_llama, StaircaseCache(tiny_llama.config, SMALL), ids)
    cache = StaircaseCache(tiny_llama.config, SMALL)
    with staircase_attention(tiny_llama, cache):
        assert tiny_llama.config._attn_implementation == "staircase"
        out = greedy(tiny_llama, cache, ids)
    assert tiny_llama.config._attn_implementation == "sdpa"
    assert not cache.layers[0].reads_in_place
    assert torch.equal(out, expected)


def test_exact_stairs_attending_in_place_generate_like_dynamic_cache_under_prblock(tiny_llava):
    ids, pixels = llava_prompt(n_text=30)
    expected = greedy(tiny_llava, DynamicCache(config=tiny_llava.config), ids, pixel_values=pixels)
    use_prblock(tiny_llava, PrBlockConfig(block_size=16, alpha=1e9))
    spans = image_token_spans(ids, IMAGE_TOKEN_ID)
    cache = StaircaseCache(tiny_llava.config, EXACT, protected_spans=spans)
    with staircase_attention(tiny_llava, cache):
        assert tiny_llava.config.text_config._attn_implementation == "prblock"
        out = greedy(tiny_llava, cache, ids, pixel_values=pixels)
    assert torch.equal(out, expected)


def test_a_decode_step_in_place_allocates_a_bounded_buffer_not_the_whole_cache():
    saq = SAQConfig(bits=(8, 4), residual=64, group_size=32, attend_chunk=256)
    layer = _filled_layer(saq, 4096)
    query = torch.randn(1, HEADS, 1, HEAD_DIM)
    whole = 2 * HEADS * 4096 * HEAD_DIM * 4  # keys and values in float32
    with AllocationMeter() as in_place:
        layer.attend(query)
    with AllocationMeter() as reassembled:
        layer._assemble()
    assert in_place.allocations.peak < whole / 4
    assert reassembled.allocations.peak >= whole


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_attending_in_place_on_a_gpu_in_bfloat16_equals_sdpa_over_the_dequantized_cache():
    layer = StaircaseLayer(SAQConfig(attend_chunk=256))
    generator = torch.Generator("cuda").manual_seed(0)
    keys, values = (torch.randn(1, 4, 2048, 128, device="cuda", dtype=torch.bfloat16,
                                generator=generator) for _ in range(2))  # fmt: skip
    layer.update(keys, values)
    query = torch.randn(1, 28, 1, 128, device="cuda", dtype=torch.bfloat16, generator=generator)
    k, v = layer._assemble()
    expected = F.scaled_dot_product_attention(query.float(), k.float(), v.float(), enable_gqa=True)
    torch.testing.assert_close(layer.attend(query).float(), expected, atol=2e-2, rtol=2e-2)
