"""PrFlashAttention: the sampler's law, exactness against SDPA, and transformers models using it."""

import statistics

import pytest
import torch
import torch.nn.functional as F

from core.vlm import attention, flex
from core.vlm.attention import (
    NotPrBlockModel,
    band_attention,
    band_decode,
    block_sparse_attention,
    expected_density,
    flex_block_attention,
    gather_attention,
    logit_bias,
    masked_sdpa,
    model_density,
    protected_blocks,
    protected_spans,
    realised_density,
    reference_attention,
    register,
    sample_blocks,
    token_mask,
    token_spans,
    use_prblock,
)
from core.vlm.calibrate import calibrate_dense_heads, head_changes
from core.vlm.config import PrBlockConfig
from tests.vlm.conftest import (
    GEMMA_IMAGE_TOKEN_ID,
    IMAGE_TOKEN_ID,
    gemma_prompt,
    llava_prompt,
)

BLOCK = 16
# Thresholds 0: the tiny shapes here must take the sparse paths, not the dense shortcut.
ANY_LENGTH = {"dense_below": 0, "decode_dense_below": 0}
SPARSE = PrBlockConfig(block_size=BLOCK, window=1, sinks=1, alpha=0.5, **ANY_LENGTH)
DENSE = PrBlockConfig(block_size=BLOCK, alpha=1e9, **ANY_LENGTH)
# The tiny Llama's attention shape, so the compiled kernels are shared with the model tests.
BATCH, Q_HEADS, KV_HEADS, DIM, LENGTH = 2, 4, 2, 16, 100
SCALE = DIM**-0.5


def qkv(q_len: int = LENGTH, kv_len: int = LENGTH, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(BATCH, Q_HEADS, q_len, DIM, generator=generator)
    key = torch.randn(BATCH, KV_HEADS, kv_len, DIM, generator=generator)
    value = torch.randn(BATCH, KV_HEADS, kv_len, DIM, generator=generator)
    return query, key, value


def left_padding_mask(q_len: int = LENGTH, kv_len: int = LENGTH, pads: int = 7) -> torch.Tensor:
    """transformers' bool mask (b, 1, q, kv): causal, with the second row left-padded."""
    keys = torch.ones(BATCH, kv_len, dtype=torch.bool)
    keys[1, :pads] = False
    q_pos = torch.arange(kv_len - q_len, kv_len)
    causal = q_pos[:, None] >= torch.arange(kv_len)[None, :]
    return causal[None, None] & keys[:, None, None, :]


def sdpa(query, key, value, mask=None):
    if mask is None:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True)


def all_kept(q_len: int = LENGTH, kv_len: int = LENGTH) -> torch.Tensor:
    return sample_blocks(DENSE, q_len, kv_len, heads=KV_HEADS)


# --- the sampler


def test_sample_keeps_window_sinks_and_protected_blocks_and_nothing_above_the_diagonal():
    config = PrBlockConfig(block_size=BLOCK, window=2, sinks=1, alpha=0.01)
    keep = sample_blocks(config, 320, 320, heads=3, protected=[(100, 130)])
    rows = torch.arange(20)[:, None]
    cols = torch.arange(20)[None, :]
    distance = rows - cols
    assert not keep[:, distance < 0].any()
    assert keep[:, (distance >= 0) & (distance < 2)].all()
    assert keep[:, :, 0].all()
    assert keep[:, 8:, 6:9].all()  # tokens 100..129 live in blocks 6, 7 and 8
    assert realised_density(keep) < 0.5


def test_realised_density_matches_the_formula_over_many_seeds():
    config = PrBlockConfig(block_size=64, window=4, sinks=1, alpha=1.0)
    densities = [
        realised_density(sample_blocks(replace_seed(config, seed), 4096, 4096, heads=3, layer=2))
        for seed in range(40)
    ]
    assert statistics.mean(densities) == pytest.approx(expected_density(config, 4096), rel=0.02)
    assert expected_density(config, 4096) < 0.35


def replace_seed(config: PrBlockConfig, seed: int) -> PrBlockConfig:
    return PrBlockConfig(**{**config.__dict__, "seed": seed})


def test_same_seed_same_blocks_other_seed_or_layer_other_blocks():
    keep = sample_blocks(SPARSE, 640, 640, heads=2, layer=1)
    assert torch.equal(keep, sample_blocks(SPARSE, 640, 640, heads=2, layer=1))
    assert not torch.equal(keep, sample_blocks(SPARSE, 640, 640, heads=2, layer=2))
    assert not torch.equal(keep, sample_blocks(replace_seed(SPARSE, 1), 640, 640, heads=2, layer=1))
    assert not torch.equal(keep[0], keep[1])


def test_decoding_a_token_keeps_the_blocks_its_prefill_row_kept():
    prefill = sample_blocks(SPARSE, 640, 640, heads=2, layer=3)
    for position in (17, 300, 639):
        decode = sample_blocks(SPARSE, 1, position + 1, heads=2, layer=3)
        row = position // BLOCK
        assert torch.equal(decode[:, 0], prefill[:, row, : row + 1])


def test_every_block_kept_means_density_one():
    assert expected_density(DENSE, 1000) == 1.0
    assert realised_density(all_kept()) == 1.0


def test_token_spans_finds_runs_of_image_tokens():
    ids = torch.tensor([[1, 9, 9, 9, 4, 9, 5], [1, 9, 9, 9, 4, 3, 5]])
    assert token_spans(ids, 9) == [(1, 4), (5, 6)]


# --- exactness


def test_every_block_kept_equals_sdpa_causal_with_gqa():
    query, key, value = qkv()
    out = reference_attention(query, key, value, all_kept(), BLOCK)
    torch.testing.assert_close(out, sdpa(query, key, value), atol=1e-5, rtol=1e-5)


def test_every_block_kept_equals_sdpa_with_padding():
    query, key, value = qkv()
    mask = left_padding_mask()
    out = reference_attention(query, key, value, all_kept(), BLOCK, mask)
    expected = sdpa(query, key, value, mask)
    # Padded query rows see nothing; only the real tokens' outputs are defined.
    torch.testing.assert_close(out[1, :, 7:], expected[1, :, 7:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0], expected[0], atol=1e-5, rtol=1e-5)


def test_sampled_blocks_equal_sdpa_under_the_same_dense_mask():
    query, key, value = qkv()
    keep = sample_blocks(SPARSE, LENGTH, LENGTH, heads=KV_HEADS)
    dense = token_mask(keep, BLOCK, LENGTH, LENGTH).repeat_interleave(2, 0)[None]
    out = reference_attention(query, key, value, keep, BLOCK)
    torch.testing.assert_close(out, sdpa(query, key, value, dense), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked_sdpa(query, key, value, keep, BLOCK), out, atol=1e-5, rtol=0)


def test_decode_gather_equals_the_reference_with_padding():
    query, key, value = qkv(q_len=1, kv_len=90)
    mask = left_padding_mask(q_len=1, kv_len=90)
    for config in (SPARSE, DENSE):
        keep = sample_blocks(config, 1, 90, heads=KV_HEADS, layer=4)
        out = gather_attention(query, key, value, keep, BLOCK, mask)
        expected = reference_attention(query, key, value, keep, BLOCK, mask)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, sdpa(query, key, value, mask), atol=1e-5, rtol=1e-5)


def test_chunk_of_queries_after_a_cache_equals_the_reference():
    query, key, value = qkv(q_len=37, kv_len=LENGTH)
    keep = sample_blocks(SPARSE, 37, LENGTH, heads=KV_HEADS, layer=1)
    out = block_sparse_attention(query, key, value, SPARSE, layer=1)
    torch.testing.assert_close(
        out, reference_attention(query, key, value, keep, BLOCK), atol=1e-5, rtol=1e-5
    )


def test_log_p_correction_adds_log_inverse_probability_to_sampled_blocks_only():
    query, key, value = qkv()
    keep = sample_blocks(SPARSE, LENGTH, LENGTH, heads=KV_HEADS)
    bias = logit_bias(SPARSE, keep, LENGTH, LENGTH)
    assert (bias[:, torch.arange(7), torch.arange(7)] == 0).all()  # the diagonal is not sampled
    assert (bias > 0).any()
    out = reference_attention(query, key, value, keep, BLOCK, bias=bias)
    torch.testing.assert_close(
        masked_sdpa(query, key, value, keep, BLOCK, bias=bias), out, atol=1e-5, rtol=1e-5
    )


def test_a_token_never_sees_the_future():
    query, key, value = qkv()
    keep = sample_blocks(SPARSE, LENGTH, LENGTH, heads=KV_HEADS)
    before = reference_attention(query, key, value, keep, BLOCK)
    future_key, future_value = key.clone(), value.clone()
    future_key[:, :, 50:] = 100.0
    future_value[:, :, 50:] = -100.0
    after = reference_attention(query, future_key, future_value, keep, BLOCK)
    torch.testing.assert_close(after[:, :, :50], before[:, :, :50])
    assert not token_mask(keep, BLOCK, LENGTH, LENGTH).triu(1).any()


def test_compiled_flex_equals_sdpa_dense_and_the_reference_sampled_with_and_without_padding():
    query, key, value = qkv()
    dense = flex_block_attention(query, key, value, all_kept(), BLOCK, scale=SCALE)
    torch.testing.assert_close(dense, sdpa(query, key, value), atol=1e-5, rtol=1e-5)
    keep = sample_blocks(SPARSE, LENGTH, LENGTH, heads=KV_HEADS)
    sampled = flex_block_attention(query, key, value, keep, BLOCK, scale=SCALE)
    expected = reference_attention(query, key, value, keep, BLOCK)
    torch.testing.assert_close(sampled, expected, atol=1e-5, rtol=1e-5)
    mask = left_padding_mask()
    padded = flex_block_attention(query, key, value, keep, BLOCK, mask, scale=SCALE)
    expected = reference_attention(query, key, value, keep, BLOCK, mask)
    torch.testing.assert_close(padded[:, :, 7:], expected[:, :, 7:], atol=1e-5, rtol=1e-5)


# --- transformers models


def test_register_returns_its_name_twice_and_refuses_flash_names():
    assert register(SPARSE) == register(SPARSE) == "prblock"
    with pytest.raises(ValueError):
        register(name="prflash")


def test_greedy_output_with_every_block_kept_equals_sdpa(tiny_llama):
    ids = torch.randint(3, 250, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :7] = 0
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=8, do_sample=False)
    expected = tiny_llama.generate(ids, **kwargs)
    # log(1/p) = 0 when p = 1, so this config computes every block through flex and gather.
    use_prblock(
        tiny_llama,
        PrBlockConfig(block_size=BLOCK, alpha=1e9, log_p_correction=True, **ANY_LENGTH),
    )
    assert tiny_llama.config._attn_implementation == "prblock"
    assert torch.equal(tiny_llama.generate(ids, **kwargs), expected)


def test_tiny_llama_generates_with_sparse_attention_and_padding(tiny_llama):
    ids = torch.randint(3, 250, (BATCH, LENGTH), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :7] = 0
    use_prblock(tiny_llama, SPARSE)
    out = tiny_llama.generate(ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False)
    assert out.shape == (BATCH, LENGTH + 8)
    assert torch.equal(out[:, :LENGTH], ids)


def test_tiny_llava_generates_with_its_image_tokens_protected(tiny_llava):
    ids, pixels = llava_prompt(n_text=60)
    use_prblock(tiny_llava, SPARSE)
    assert tiny_llava.config.text_config._attn_implementation == "prblock"
    assert tiny_llava.config.vision_config._attn_implementation == "sdpa"
    with protected_spans(tiny_llava, token_spans(ids, IMAGE_TOKEN_ID)):
        out = tiny_llava.generate(
            input_ids=ids, pixel_values=pixels, max_new_tokens=6, do_sample=False
        )
        state = tiny_llava.model.language_model.layers[0].self_attn.prblock
        assert state.protected == [(1, 17)]
    assert state.protected == []
    assert out.shape == (1, ids.shape[1] + 6)


def test_protected_spans_needs_a_prblock_model(tiny_llama):
    with pytest.raises(NotPrBlockModel), protected_spans(tiny_llama, [(0, 4)]):
        pass


def test_fewer_keys_than_dense_below_take_the_dense_shortcut():
    config = PrBlockConfig(block_size=BLOCK, window=1, sinks=1, alpha=0.5, dense_below=LENGTH + 1)
    q = torch.randn(1, Q_HEADS, LENGTH, DIM)
    k = torch.randn(1, KV_HEADS, LENGTH, DIM)
    assert block_sparse_attention(q, k, k, config, scale=SCALE) is None
    longer = PrBlockConfig(**{**config.__dict__, "dense_below": LENGTH})
    assert block_sparse_attention(q, k, k, longer, scale=SCALE) is not None


def test_decode_steps_with_fewer_keys_than_decode_dense_below_take_the_dense_shortcut():
    config = PrBlockConfig(
        **{**SPARSE.__dict__, "decode_dense_below": LENGTH + 1, "dense_below": LENGTH + 1}
    )
    q = torch.randn(1, Q_HEADS, 1, DIM)
    k = torch.randn(1, KV_HEADS, LENGTH, DIM)
    assert block_sparse_attention(q, k, k, config, scale=SCALE) is None
    # Past it, decode is sparse: the prefill threshold (still above) is not the decode one.
    longer = PrBlockConfig(**{**config.__dict__, "decode_dense_below": LENGTH})
    assert block_sparse_attention(q, k, k, longer, scale=SCALE) is not None
    prefill = torch.randn(1, Q_HEADS, LENGTH, DIM)
    assert block_sparse_attention(prefill, k, k, longer, scale=SCALE) is None


# --- the CPU band kernel, dense heads and their calibration


@pytest.mark.parametrize("length", [LENGTH, 7 * BLOCK, 40, 5])
@pytest.mark.parametrize("window", [1, 3])
# alpha 2 keeps distances window and window + 1 in every row: the band widens over them.
@pytest.mark.parametrize("alpha", [0.7, 2.0])
def test_band_kernel_equals_the_reference_for_any_length_window_and_dense_head(
    length, window, alpha
):
    config = PrBlockConfig(block_size=BLOCK, window=window, sinks=1, alpha=alpha, **ANY_LENGTH)
    query, key, value = qkv(length, length, seed=length + window)
    for dense_heads, protected in [((), ()), (((0, 1),), [(20, 37)]), (((0, 0), (0, 1)), ())]:
        case = PrBlockConfig(**{**config.__dict__, "dense_heads": dense_heads})
        keep = sample_blocks(case, length, length, heads=KV_HEADS, protected=protected)
        out = band_attention(query, key, value, keep, BLOCK, window, SCALE)
        expected = reference_attention(query, key, value, keep, BLOCK, scale=SCALE)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def record_windows(monkeypatch, name: str) -> list[int]:
    """Spy on the band kernel `name` of core.vlm.attention: the window of each call."""
    calls = []
    real = getattr(attention, name)

    def spy(*args):
        calls.append(args[5])
        return real(*args)

    monkeypatch.setattr(attention, name, spy)
    return calls


def test_cpu_prefill_without_padding_runs_the_band_kernel_and_equals_the_reference(monkeypatch):
    query, key, value = qkv()
    calls = record_windows(monkeypatch, "band_attention")
    out = block_sparse_attention(query, key, value, SPARSE, scale=SCALE)
    keep = sample_blocks(SPARSE, LENGTH, LENGTH, heads=KV_HEADS)
    expected = reference_attention(query, key, value, keep, BLOCK, scale=SCALE)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert calls == [SPARSE.window]
    # A padding mask goes to compiled flex instead, which takes masks.
    block_sparse_attention(query, key, value, SPARSE, attention_mask=left_padding_mask())
    assert calls == [SPARSE.window]


@pytest.mark.parametrize("kv_len", [1, 5, BLOCK, BLOCK + 1, LENGTH, 7 * BLOCK + 3])
@pytest.mark.parametrize("window", [1, 3])
@pytest.mark.parametrize("alpha", [0.7, 2.0])
def test_band_decode_equals_the_reference_for_any_length_window_and_dense_head(
    kv_len, window, alpha
):
    config = PrBlockConfig(block_size=BLOCK, window=window, sinks=1, alpha=alpha, **ANY_LENGTH)
    query, key, value = qkv(1, kv_len, seed=kv_len + window)
    for dense_heads, protected in [((), ()), (((0, 1),), [(20, 37)]), (((0, 0), (0, 1)), ())]:
        case = PrBlockConfig(**{**config.__dict__, "dense_heads": dense_heads})
        keep = sample_blocks(case, 1, kv_len, heads=KV_HEADS, protected=protected)
        out = band_decode(query, key, value, keep, BLOCK, window, SCALE)
        expected = reference_attention(query, key, value, keep, BLOCK, scale=SCALE)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_decode_gather_with_a_dense_head_equals_the_reference_with_and_without_padding():
    config = PrBlockConfig(**{**SPARSE.__dict__, "dense_heads": ((0, 1),)})
    query, key, value = qkv(q_len=1, kv_len=90)
    keep = sample_blocks(config, 1, 90, heads=KV_HEADS)
    assert keep[1].all() and not keep[0].all()
    for mask in (None, left_padding_mask(q_len=1, kv_len=90)):
        out = gather_attention(query, key, value, keep, BLOCK, mask, SCALE)
        expected = reference_attention(query, key, value, keep, BLOCK, mask, SCALE)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_cpu_decode_without_padding_takes_the_band_kernel_and_a_padded_one_the_gather(
    monkeypatch,
):
    query, key, value = qkv(q_len=1, kv_len=LENGTH)
    calls = record_windows(monkeypatch, "band_decode")
    for kv_len in (97, LENGTH):  # two steps in query block 6 share its sample
        k, v = key[:, :, :kv_len], value[:, :, :kv_len]
        out = block_sparse_attention(query, k, v, SPARSE, layer=2, scale=SCALE)
        keep = sample_blocks(SPARSE, 1, kv_len, heads=KV_HEADS, layer=2)
        expected = reference_attention(query, k, v, keep, BLOCK, scale=SCALE)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert calls == [SPARSE.window] * 2
    # A padding mask goes to the gather path instead, which takes masks.
    mask = left_padding_mask(q_len=1, kv_len=LENGTH)
    out = block_sparse_attention(query, key, value, SPARSE, layer=2, attention_mask=mask)
    assert calls == [SPARSE.window] * 2
    expected = reference_attention(query, key, value, keep, BLOCK, mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_greedy_sparse_generation_equals_the_reference_implementation(tiny_llama, monkeypatch):
    ids = torch.randint(3, 250, (1, LENGTH), generator=torch.Generator().manual_seed(3))
    use_prblock(tiny_llama, SPARSE)
    prefills = record_windows(monkeypatch, "band_attention")
    decodes = record_windows(monkeypatch, "band_decode")
    fast = tiny_llama.generate(ids, max_new_tokens=8, do_sample=False)
    assert prefills and decodes

    def oracle(query, key, value, keep, block_size, window, scale, plan=None):
        return reference_attention(query, key, value, keep, block_size, scale=scale)

    monkeypatch.setattr("core.vlm.attention.band_attention", oracle)
    monkeypatch.setattr("core.vlm.attention.band_decode", oracle)
    assert torch.equal(tiny_llama.generate(ids, max_new_tokens=8, do_sample=False), fast)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_prefill_and_decode_equal_the_reference_in_float32(dtype):
    config = PrBlockConfig(**{**SPARSE.__dict__, "dense_heads": ((0, 1),)})
    for q_len in (LENGTH, 1):
        query, key, value = (t.to(dtype) for t in qkv(q_len, LENGTH))
        out = block_sparse_attention(query, key, value, config, scale=SCALE)
        assert out.dtype == dtype
        keep = sample_blocks(config, q_len, LENGTH, heads=KV_HEADS)
        exact = (t.float() for t in (query, key, value))
        expected = reference_attention(*exact, keep, BLOCK, scale=SCALE)
        torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)


def test_values_narrower_than_queries_work_in_prefill_and_decode():
    config = PrBlockConfig(**{**SPARSE.__dict__, "dense_heads": ((0, 1),)})
    for q_len in (LENGTH, 1):
        query, key, _ = qkv(q_len, LENGTH)
        value = torch.randn(BATCH, KV_HEADS, LENGTH, DIM // 2)
        out = block_sparse_attention(query, key, value, config, scale=SCALE)
        keep = sample_blocks(config, q_len, LENGTH, heads=KV_HEADS)
        expected = reference_attention(query, key, value, keep, BLOCK, scale=SCALE)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_a_window_below_one_block_is_refused():
    with pytest.raises(ValueError, match="window"):
        PrBlockConfig(window=0)


def test_dense_heads_keep_every_causal_block_of_their_layer_only():
    config = PrBlockConfig(**{**SPARSE.__dict__, "dense_heads": ((1, 0),)})
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    layer1 = sample_blocks(config, LENGTH, LENGTH, heads=KV_HEADS, layer=1)
    assert torch.equal(layer1[0], causal)
    assert not torch.equal(layer1[1], causal)
    plain = sample_blocks(SPARSE, LENGTH, LENGTH, heads=KV_HEADS, layer=1)
    assert torch.equal(layer1[1], plain[1])
    layer0 = sample_blocks(config, LENGTH, LENGTH, heads=KV_HEADS, layer=0)
    assert torch.equal(layer0, sample_blocks(SPARSE, LENGTH, LENGTH, heads=KV_HEADS, layer=0))


def test_dense_heads_get_no_log_p_correction():
    # A dense head keeps every block for certain: log(1/p) would skew its softmax.
    config = PrBlockConfig(**{**SPARSE.__dict__, "dense_heads": ((1, 0),)})
    keep = sample_blocks(config, LENGTH, LENGTH, heads=KV_HEADS, layer=1)
    bias = logit_bias(config, keep, LENGTH, LENGTH, layer=1)
    assert (bias[0] == 0).all()
    assert torch.equal(bias[1], logit_bias(SPARSE, keep, LENGTH, LENGTH, layer=1)[1])
    assert (bias[1] > 0).any()


def test_model_density_counts_each_dense_head_as_one():
    sampled = expected_density(SPARSE, 4 * LENGTH)
    assert model_density(SPARSE, 4 * LENGTH, layers=2, kv_heads=2) == pytest.approx(sampled)
    one = PrBlockConfig(**{**SPARSE.__dict__, "dense_heads": ((1, 0), (1, 0), (9, 0))})
    assert model_density(one, 4 * LENGTH, layers=2, kv_heads=2) == pytest.approx(
        (1 + 3 * sampled) / 4
    )


def test_calibration_ranks_every_head_and_restores_the_model(tiny_llama):
    ids = torch.randint(3, 250, (1, LENGTH), generator=torch.Generator().manual_seed(3))
    changes = head_changes(tiny_llama, ids, SPARSE)
    assert set(changes) == {(layer, head) for layer in range(2) for head in range(KV_HEADS)}
    values = list(changes.values())
    assert values == sorted(values, reverse=True) and values[-1] >= 0 and values[0] > 0
    assert tiny_llama.config._attn_implementation == "sdpa"
    # Already-dense heads in the config are measured too, and keeping every block changes nothing.
    with_dense = PrBlockConfig(**{**SPARSE.__dict__, "dense_heads": tuple(changes)})
    assert head_changes(tiny_llama, ids, with_dense) == pytest.approx(changes)
    assert max(head_changes(tiny_llama, ids, DENSE).values()) < 1e-5
    top = calibrate_dense_heads(tiny_llama, ids, SPARSE, count=2)
    assert top == tuple(sorted(list(changes)[:2]))
    with pytest.raises(ValueError):
        head_changes(tiny_llama, ids.repeat(2, 1), SPARSE)


# --- masks that are not causal (Gemma-3 and PaliGemma image spans), sliding windows


def _image_positions(inputs) -> list[int]:
    return (inputs["input_ids"][0] == GEMMA_IMAGE_TOKEN_ID).nonzero().flatten().tolist()


def _first_image_output(model, inputs, nudge_last_image_token: bool) -> torch.Tensor:
    """The language model's last hidden state at the first image token, optionally after
    moving the last image token's features (a hook on the projector)."""

    def nudge(module, args, output):
        output = output.clone()
        output[:, -1] += 5.0
        return output

    projector = model.model.multi_modal_projector
    handle = projector.register_forward_hook(nudge) if nudge_last_image_token else None
    try:
        with torch.no_grad():
            hidden = model(**inputs, output_hidden_states=True).hidden_states[-1]
    finally:
        if handle is not None:
            handle.remove()
    return hidden[0, _image_positions(inputs)[0]]


# Every block kept, but through the sparse kernels (log(1/p) = 0 defeats the dense shortcut).
ALL_BLOCKS_SPARSE_PATH = PrBlockConfig(block_size=8, alpha=1e9, log_p_correction=True, **ANY_LENGTH)
SPARSE_8 = PrBlockConfig(block_size=8, window=1, sinks=1, alpha=0.3, **ANY_LENGTH)


@pytest.mark.parametrize("family", ["tiny_gemma3", "tiny_paligemma"])
def test_a_later_image_token_moves_an_earlier_one_as_under_sdpa(family, request):
    model = request.getfixturevalue(family)
    inputs = gemma_prompt(model)
    first, last = _image_positions(inputs)[0], _image_positions(inputs)[-1]
    assert first // 8 < last // 8  # the later image token sits in a later block
    before = _first_image_output(model, inputs, False)
    moved = _first_image_output(model, inputs, True) - before
    assert moved.abs().max() > 1e-3  # SDPA: the model's mask is bidirectional there
    use_prblock(model, ALL_BLOCKS_SPARSE_PATH)
    torch.testing.assert_close(_first_image_output(model, inputs, False), before)
    moved_prblock = _first_image_output(model, inputs, True) - before
    torch.testing.assert_close(moved_prblock, moved, atol=1e-4, rtol=1e-4)
    # Sampled blocks too keep the blocks the model's mask opens above the diagonal.
    use_prblock(model, SPARSE_8)
    sparse_before = _first_image_output(model, inputs, False)
    assert (_first_image_output(model, inputs, True) - sparse_before).abs().max() > 1e-3


def test_blocks_a_bidirectional_mask_opens_above_the_diagonal_are_found():
    mask = torch.ones(LENGTH, LENGTH, dtype=torch.bool).tril()
    mask[20:40, 20:40] = True  # an image span attending both ways
    blocks = attention.beyond_causal(mask[None, None], BLOCK)
    # Tokens 20-31 (block 1) see 32-39 (block 2); diagonal blocks are always computed anyway.
    assert blocks.triu(1).nonzero().tolist() == [[1, 2]]
    assert attention.beyond_causal(mask.tril()[None, None], BLOCK) is None


def test_bidirectional_spans_equal_the_reference_under_the_model_mask():
    query, key, value = qkv()
    mask = left_padding_mask().clone()
    mask[:, :, 20:40, 20:40] = True
    mask[1, :, :, :7] = False
    out = block_sparse_attention(query, key, value, SPARSE, attention_mask=mask, scale=SCALE)
    keep = sample_blocks(SPARSE, LENGTH, LENGTH, heads=KV_HEADS)
    keep = keep | attention.beyond_causal(mask, BLOCK)[None]
    expected = reference_attention(query, key, value, keep, BLOCK, mask, SCALE)
    torch.testing.assert_close(out[:, :, 7:], expected[:, :, 7:], atol=1e-5, rtol=1e-5)
    earlier = out[:, :, 25]
    moved_key = key.clone()
    moved_key[:, :, 35] += 3.0
    again = block_sparse_attention(
        query, moved_key, value, SPARSE, attention_mask=mask, scale=SCALE
    )
    assert (again[:, :, 25] - earlier).abs().max() > 1e-3


def test_sliding_window_layers_stay_on_sdpa(tiny_gemma3, monkeypatch):
    seen = []
    real = attention.block_sparse_attention

    def spy(query, key, value, config, *, layer=0, **kwargs):
        seen.append(layer)
        return real(query, key, value, config, layer=layer, **kwargs)

    monkeypatch.setattr(attention, "block_sparse_attention", spy)
    use_prblock(tiny_gemma3, SPARSE_8)
    with torch.no_grad():
        tiny_gemma3(**gemma_prompt(tiny_gemma3))
    assert seen == [1]  # layer 0 slides over 64 tokens: SDPA; layer 1 is global: sparse


# --- the GPU prefill path: block size, buckets, masks built once, per-shape fallback


def test_the_block_size_is_the_devices_unless_the_config_names_one():
    assert PrBlockConfig().block_size_on("cpu") == 64
    assert PrBlockConfig().on("cuda").block_size == 128
    assert PrBlockConfig(block_size=32).on("cuda").block_size == 32


def test_prompt_lengths_pad_to_buckets_then_to_multiples_of_the_last():
    buckets = (1024, 4096)
    assert [flex.bucket_length(n, buckets, 128) for n in (1, 1024, 1025, 4096, 5000)] == [
        1024, 1024, 4096, 4096, 8192,
    ]  # fmt: skip


def test_block_indices_list_kept_columns_first_in_order():
    blocks = torch.rand(3, 9, 9, generator=torch.Generator().manual_seed(0)) < 0.4
    counts, indices = flex.kv_block_indices(blocks)
    assert indices.dtype == counts.dtype == torch.int32
    for h in range(3):
        for r in range(9):
            kept = blocks[h, r].nonzero().flatten().tolist()
            assert counts[h, r] == len(kept)
            assert indices[h, r, : len(kept)].tolist() == kept
            assert sorted(indices[h, r].tolist()) == list(range(9))


def test_two_prompt_lengths_in_one_bucket_run_one_padded_shape(monkeypatch):
    lengths = []
    real = flex._compiled_flex()

    def recording(query, *args, **kwargs):
        lengths.append(query.shape[2])
        return real(query, *args, **kwargs)

    monkeypatch.setattr(flex, "_compiled_flex", lambda: recording)
    for n in (LENGTH, LENGTH - 10):
        query, key, value = qkv(n, n)
        mask = left_padding_mask(n, n)
        out = block_sparse_attention(query, key, value, SPARSE, attention_mask=mask, scale=SCALE)
        keep = sample_blocks(SPARSE, n, n, heads=KV_HEADS)
        expected = reference_attention(query, key, value, keep, BLOCK, mask, SCALE)
        torch.testing.assert_close(out[:, :, 7:], expected[:, :, 7:], atol=1e-5, rtol=1e-5)
    assert lengths == [SPARSE.buckets[0]] * 2


def test_causal_masks_are_built_once_per_bucket_and_layer(monkeypatch):
    monkeypatch.setattr(attention, "_cpu_fast_path", lambda *args: False)  # the GPU route
    flex.bucket_blocks.cache_clear()
    for n, layer in ((LENGTH, 0), (LENGTH - 10, 0), (LENGTH, 1)):
        query, key, value = qkv(n, n)
        out = block_sparse_attention(query, key, value, SPARSE, layer=layer, scale=SCALE)
        keep = sample_blocks(SPARSE, n, n, heads=KV_HEADS, layer=layer)
        expected = reference_attention(query, key, value, keep, BLOCK, scale=SCALE)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    info = flex.bucket_blocks.cache_info()
    assert (info.misses, info.hits) == (2, 1)


def test_a_failed_compile_falls_back_for_that_shape_only_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setattr(attention, "_cpu_fast_path", lambda *args: False)
    monkeypatch.setattr(flex, "_failed", {})
    real = flex._compiled_flex()

    def fails_in_half_precision(query, *args, **kwargs):
        if query.dtype != torch.float32:
            raise RuntimeError("no kernel for this shape\nmore detail")
        return real(query, *args, **kwargs)

    monkeypatch.setattr(flex, "_compiled_flex", lambda: fails_in_half_precision)
    query, key, value = qkv()
    keep = sample_blocks(SPARSE, LENGTH, LENGTH, heads=KV_HEADS)
    expected = reference_attention(query, key, value, keep, BLOCK, scale=SCALE)
    with caplog.at_level("WARNING", logger="core.vlm.flex"):
        for _ in range(2):
            half = (t.bfloat16() for t in (query, key, value))
            out = block_sparse_attention(*half, SPARSE, scale=SCALE)
            torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)
        # float32 still compiles: the failure did not switch flex off for the process.
        out = block_sparse_attention(query, key, value, SPARSE, scale=SCALE)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    lines = [r.getMessage() for r in caplog.records if "FlexAttention failed" in r.getMessage()]
    assert len(lines) == 1 and "no kernel for this shape" in lines[0] and "\n" not in lines[0]


def test_masked_sdpa_bounds_its_mask_by_chunks_of_query_rows(monkeypatch):
    monkeypatch.setattr(attention, "_MASK_ELEMENTS", BATCH * 2 * LENGTH * 7)  # 7 rows a chunk
    query, key, value = qkv()
    keep = sample_blocks(SPARSE, LENGTH, LENGTH, heads=KV_HEADS)
    expected = reference_attention(query, key, value, keep, BLOCK, scale=SCALE)
    torch.testing.assert_close(masked_sdpa(query, key, value, keep, BLOCK, scale=SCALE), expected,
                               atol=1e-5, rtol=1e-5)  # fmt: skip


def test_an_image_larger_than_the_budget_keeps_an_even_share_of_its_blocks():
    image = [(256, 15 * 1024 + 256)]  # a 15k-token image span in a 16k prompt
    config = PrBlockConfig(block_size=128, protected_budget=4096)
    hit = protected_blocks(image, 128, 128, budget=4096)
    # 120 blocks, 32 allowed: every fourth one.
    assert int(hit.sum()) == 30 and hit[2] and not hit[3:6].any() and hit[6]
    assert expected_density(config, 16384, image) < 0.5
    assert (
        expected_density(PrBlockConfig(block_size=128, protected_budget=10**9), 16384, image) > 0.9
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_prefill_compiles_and_equals_the_reference_in_bfloat16():
    config = PrBlockConfig(window=2, alpha=0.5, **ANY_LENGTH)
    n = 4096
    generator = torch.Generator("cuda").manual_seed(0)
    query, key, value = (torch.randn(1, h, n, 128, device="cuda", generator=generator,
                         dtype=torch.bfloat16) for h in (8, 2, 2))  # fmt: skip
    out = block_sparse_attention(query, key, value, config)
    keep = sample_blocks(config.on("cuda"), n, n, heads=2)
    expected = masked_sdpa(query.float(), key.float(), value.float(), keep, 128)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    assert not flex._failed


def test_warm_up_runs_each_bucket_from_dense_below_to_its_limit_once(tiny_llama, monkeypatch):
    seen = []
    real = attention.block_sparse_attention

    def spy(query, key, value, config, **kwargs):
        seen.append((query.shape[2], query.shape[1], key.shape[1], query.dtype))
        return real(query, key, value, config, **kwargs)

    monkeypatch.setattr(attention, "block_sparse_attention", spy)
    config = PrBlockConfig(block_size=BLOCK, dense_below=1536)
    assert attention.warm_up(tiny_llama, config, up_to=4096) == [2048, 4096]
    assert seen == [(2048, 4, 2, torch.float32), (4096, 4, 2, torch.float32)]
