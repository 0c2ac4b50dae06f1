"""PrFlashAttention: probabilistic block-sparse attention for any transformers decoder.

Far-away key blocks are skipped with a probability that grows with their distance, so prefill
costs about n log n instead of n^2. Register it, then switch a model with `use_prblock(model)`.

How settings reach the attention function: `use_prblock` puts one `PrBlockState` (the config
and the protected token spans) on every attention module of the language model, as the
attribute `prblock`; transformers hands the module to the attention function on every call, so
this works through `model.generate`. `protected_spans(model, spans)` swaps the spans for the
length of a `with` block. A module without a state uses the config given to `register`.

Blocks are counted over cache positions: query t of a call with q_len queries and kv_len keys
sits at position kv_len - q_len + t (what a DynamicCache gives), key k at position k. Where the
model's own mask lets a query see later keys (Gemma-3 and PaliGemma image spans are
bidirectional), those blocks are kept as the model defines them.

Paths, all equal to `reference_attention` (the oracle) up to rounding: on a CPU with no model
mask, prefill runs `band_attention` and decode `band_decode` (core/vlm/band.py); otherwise
prefill runs compiled FlexAttention at a bucket length (core/vlm/flex.py; masked SDPA for a
shape that cannot compile) and decode `gather_attention`. The sampler is core/vlm/sampler.py.
"""

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache, partial

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from core.vlm.band import (
    HAS_FLASH_CPU,
    band_attention,
    band_decode,
    band_plan,
    gather_tokens,
    split_heads,
)
from core.vlm.config import PrBlockConfig
from core.vlm.flex import (
    blocks_from_keep,
    bucket_blocks,
    bucket_keep,
    bucket_length,
    flex_attention_blocks,
    flex_block_attention,
    try_flex,
)
from core.vlm.sampler import (
    Span,
    causal_pairs,
    expected_density,
    keep_probability,
    logit_bias,
    model_density,
    protected_blocks,
    realised_density,
    sample_blocks,
    token_mask,
)

__all__ = [
    "NotPrBlockModel",
    "PrBlockState",
    "band_attention",
    "band_decode",
    "block_sparse_attention",
    "expected_density",
    "flex_block_attention",
    "gather_attention",
    "keep_probability",
    "logit_bias",
    "masked_sdpa",
    "model_density",
    "protected_blocks",
    "protected_spans",
    "realised_density",
    "reference_attention",
    "register",
    "sample_blocks",
    "set_language_attention",
    "token_mask",
    "token_spans",
    "use_prblock",
    "warm_up",
]

# masked_sdpa's token mask, at most this many elements at once (256 MiB of bools).
_MASK_ELEMENTS = 1 << 28


class NotPrBlockModel(ValueError):
    """The model was not switched to PrFlashAttention with `use_prblock`."""


@dataclass
class PrBlockState:
    """What one model's attention modules read on every call."""

    config: PrBlockConfig
    protected: list[Span] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Attention over kept blocks. All take query (b, hq, q_len, d), key/value (b, hkv, kv_len, d),
# keep (hkv, rows, cols) from `sample_blocks`, an optional bool mask (b, 1, q_len, kv_len) from
# the model (padding; causal unless the model says otherwise), and return (b, hq, q_len, d).
# Without a mask, attention is causal.


def reference_attention(
    query, key, value, keep, block_size: int, attention_mask=None, scale=None, bias=None
) -> torch.Tensor:
    """The correctness oracle: a FlashAttention-style loop with an online softmax per block."""
    batch, q_heads, q_len, _ = query.shape
    kv_len, group = key.shape[2], q_heads // key.shape[1]
    keep = keep.repeat_interleave(group, 0)
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    bias = None if bias is None else bias.repeat_interleave(group, 0)
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    offset = kv_len - q_len
    first = offset // block_size
    out = query.new_zeros(batch, q_heads, q_len, value.shape[-1])
    for row in range(keep.shape[1]):
        qs = slice(
            max(0, (first + row) * block_size - offset), (first + row + 1) * block_size - offset
        )
        q = query[:, :, qs] * scale
        q_pos = torch.arange(offset, kv_len)[qs]
        best = q.new_full(q.shape[:-1], -math.inf)
        total = q.new_zeros(q.shape[:-1])
        acc = q.new_zeros(*q.shape[:-1], value.shape[-1])
        for col in range(keep.shape[2]):
            heads_kept = keep[:, row, col]
            if not heads_kept.any():
                continue
            ks = slice(col * block_size, (col + 1) * block_size)
            scores = q @ key[:, :, ks].transpose(-1, -2)
            if bias is not None:
                scores = scores + bias[:, row, col][None, :, None, None]
            k_pos = torch.arange(kv_len)[ks]
            allowed = heads_kept[None, :, None, None]
            if attention_mask is None:
                allowed = allowed & (q_pos[:, None] >= k_pos[None, :])
            else:
                allowed = allowed & attention_mask[:, :, qs, ks]
            scores = scores.masked_fill(~allowed, -math.inf)
            new_best = torch.maximum(best, scores.amax(-1))
            shift = torch.where(new_best.isinf(), 0.0, new_best)
            weights = torch.exp(scores - shift[..., None])
            rescale = torch.exp(best - shift)
            total = total * rescale + weights.sum(-1)
            acc = acc * rescale[..., None] + weights @ value[:, :, ks]
            best = new_best
        out[:, :, qs] = torch.where(
            total[..., None] > 0, acc / total.clamp(min=1e-30)[..., None], 0
        )
    return out


def masked_sdpa(
    query, key, value, keep, block_size: int, attention_mask=None, scale=None, bias=None
) -> torch.Tensor:
    """SDPA under the dense mask a sample stands for: correct for any shape, but no faster.

    The mask is built on the tensors' device, one kv head and a bounded chunk of query rows at
    a time (a whole (heads, n, n) mask is 28 GiB at 32k tokens).
    """
    batch, q_heads, q_len, _ = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    keep = keep.to(query.device)
    bias = None if bias is None else bias.to(query.device)
    out = query.new_empty(batch, q_heads, q_len, value.shape[-1])
    rows = max(1, _MASK_ELEMENTS // (batch * group * kv_len))
    offset = kv_len - q_len
    for h in range(kv_heads):
        heads = slice(h * group, (h + 1) * group)
        for start in range(0, q_len, rows):
            stop = min(q_len, start + rows)
            # The chunk's own rows of the sample, as if it were a call of its own.
            q_pos = torch.arange(offset + start, offset + stop, device=query.device)
            row_of = q_pos // block_size - offset // block_size
            k_blocks = torch.arange(kv_len, device=query.device) // block_size
            mask = keep[h][row_of][:, k_blocks][None, None]
            if attention_mask is None:
                mask = mask & (q_pos[:, None] >= torch.arange(kv_len, device=query.device))
            else:
                mask = mask & attention_mask[:, :, start:stop]
            if bias is not None:
                add = bias[h][row_of][:, k_blocks].to(query.dtype)
                mask = torch.where(mask, add, -math.inf)
            out[:, heads, start:stop] = F.scaled_dot_product_attention(
                query[:, heads, start:stop], key[:, h : h + 1], value[:, h : h + 1],
                attn_mask=mask, scale=scale, enable_gqa=True,
            )  # fmt: skip
    return out


def gather_attention(
    query, key, value, keep, block_size: int, attention_mask=None, scale=None, bias=None
) -> torch.Tensor:
    """Decode (one query token): SDPA over only the kept key blocks of each kv head, gathered.

    SDPA would read the whole cache; this reads the kept blocks (a window and a handful beyond
    it). Heads that keep every block (`dense_heads`) read the cache in place with plain SDPA.
    """
    batch, q_heads, _, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    row = keep[:, -1]
    full = row.all(-1)
    if bias is None and full.any() and not full.all():
        args = (query, key, value, keep, block_size, attention_mask, scale, bias)
        return split_heads(full, _sdpa_decode, gather_attention, *args)
    count = row.sum(-1)
    width = int(count.max())
    chosen = torch.argsort(row.int(), dim=-1, descending=True, stable=True)[:, :width]
    positions = chosen[..., None] * block_size + torch.arange(block_size)
    allowed = (torch.arange(width)[None, :, None] < count[:, None, None]) & (positions < kv_len)
    positions = positions.flatten(1).clamp(max=kv_len - 1)
    # Indices are worked out on the CPU (tiny), then moved to where the cache lives.
    device = query.device
    allowed = allowed.flatten(1)[None].expand(batch, -1, -1).to(device)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, 0, -1][:, positions.to(device)]
    k, v = gather_tokens(key, positions), gather_tokens(value, positions)
    mask = allowed[:, :, None, :]
    if bias is not None:
        token_bias = bias[:, -1].gather(1, chosen).repeat_interleave(block_size, 1).to(device)
        mask = torch.where(mask, token_bias[None, :, None, :].to(query.dtype), -math.inf)
    q = query.reshape(batch, kv_heads, q_heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.reshape(batch, q_heads, 1, out.shape[-1])


def _sdpa_decode(query, key, value, keep, block_size, attention_mask=None, scale=None, bias=None):
    """One query token over every cached key: SDPA, with `gather_attention`'s signature."""
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=scale, enable_gqa=True
    )


# Each layer decodes in one query block at a time: this holds ~30 layers' blocks many times.
@lru_cache(maxsize=1024)
def _decode_sample(config: PrBlockConfig, row: int, heads: int, layer: int, protected):
    """`sample_blocks` for a query in query block `row`, and its `band_plan`: the same for all
    the decode steps of that block, so they are worked out once."""
    size = config.block_size
    keep = sample_blocks(config, 1, (row + 1) * size, heads=heads, layer=layer, protected=protected)
    return keep, band_plan(keep, size, config.window)


def beyond_causal(attention_mask: torch.Tensor, block_size: int) -> torch.Tensor | None:
    """Blocks (rows, cols) where the model's bool mask (b, 1, q_len, kv_len) lets a query see a
    later key (bidirectional image spans), or None where it is causal."""
    _, _, q_len, kv_len = attention_mask.shape
    device = attention_mask.device
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)
    later = attention_mask[:, 0] & (torch.arange(kv_len, device=device) > q_pos[:, None])
    if not later.any():
        return None
    # Pad to whole blocks (the first query block may start inside a block) and reduce.
    front = (kv_len - q_len) % block_size
    rows = math.ceil((front + q_len) / block_size)
    cols = math.ceil(kv_len / block_size)
    later = F.pad(
        later.any(0), (0, cols * block_size - kv_len, front, rows * block_size - front - q_len)
    )
    return later.view(rows, block_size, cols, block_size).any(3).any(1)


@lru_cache(maxsize=1024)
def _every_block(config: PrBlockConfig, rows: int, heads: int, layer: int, spans, device) -> bool:
    """Whether a prompt of `rows` blocks keeps every causal block (worked out once per shape,
    so a GPU prefill does not wait on it every layer)."""
    length = bucket_length(rows * config.block_size, config.buckets, config.block_size)
    keep = bucket_keep(config, length, heads, layer, spans, device)[:, :rows, :rows]
    return int(keep.sum()) == heads * rows * (rows + 1) // 2


def _cpu_fast_path(query, value, attention_mask, bias) -> bool:
    """The band kernels: CPU tensors, no model mask, no log(1/p) bias, and values as wide as
    queries (the CPU flash op needs it)."""
    return (
        query.device.type == "cpu"
        and attention_mask is None
        and bias is None
        and query.shape[-1] == value.shape[-1]
        and HAS_FLASH_CPU
    )


def _prefill(query, key, value, keep, config, attention_mask, scale, bias, layer, spans):
    """q_len == kv_len: the band kernel on a CPU, else compiled flex at the prompt's bucket."""
    block_size, n = config.block_size, query.shape[2]
    if _cpu_fast_path(query, value, attention_mask, bias):
        # On a CPU the band kernel beats compiled flex at every density we measured.
        return band_attention(query, key, value, keep, block_size, config.window, scale)
    length = bucket_length(n, config.buckets, block_size)
    if attention_mask is None:
        # The common case: the layer's causal sample over the whole bucket, cached.
        blocks = bucket_blocks(config, length, key.shape[1], layer, spans, query.device)
    else:
        blocks = blocks_from_keep(keep.to(query.device), length, block_size, masked=True)
    shape = (length, query.dtype, query.device, query.shape[1], key.shape[1], query.shape[-1],
             value.shape[-1], attention_mask is None, bias is None)  # fmt: skip
    out = try_flex(
        lambda: flex_attention_blocks(query, key, value, blocks, attention_mask, scale, bias),
        shape,
    )
    if out is None:
        out = masked_sdpa(query, key, value, keep, block_size, attention_mask, scale, bias)
    return out


# ---------------------------------------------------------------------------------------------
# transformers glue


def block_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    config: PrBlockConfig,
    *,
    layer: int = 0,
    attention_mask: torch.Tensor | None = None,
    protected: Sequence[Span] = (),
    scale: float | None = None,
) -> torch.Tensor | None:
    """Sample the blocks and run the right path; None when every block is kept or the keys are
    fewer than `config.dense_below` (`decode_dense_below` for one query): use SDPA.

    Takes query (b, hq, q_len, d), key/value (b, hkv, kv_len, d), an optional bool mask
    (b, 1, q_len, kv_len); returns (b, hq, q_len, d). The block size is the device's unless
    the config names one.
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    if kv_len < (config.decode_dense_below if q_len == 1 else config.dense_below):
        return None
    config = config.on(query.device.type)
    heads, plan, spans = key.shape[1], None, tuple(map(tuple, protected))
    if q_len == 1:
        row = (kv_len - 1) // config.block_size
        keep, plan = _decode_sample(config, row, heads, layer, spans)
        every_block = bool(keep.all())
    elif q_len == kv_len:
        # The layer's sample over the prompt's bucket, cached on the tensors' device.
        length = bucket_length(q_len, config.buckets, config.block_size)
        rows = math.ceil(q_len / config.block_size)
        keep = bucket_keep(config, length, heads, layer, spans, query.device)[:, :rows, :rows]
        every_block = _every_block(config, rows, heads, layer, spans, query.device)
    else:
        keep = sample_blocks(config, q_len, kv_len, heads=heads, layer=layer, protected=spans)
        every_block = int(keep.sum()) == heads * causal_pairs(q_len, kv_len, config.block_size)
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask == 0
    if every_block and not config.log_p_correction:
        return None  # SDPA under the model's own mask computes exactly this
    if attention_mask is not None and q_len > 1:
        later = beyond_causal(attention_mask, config.block_size)
        if later is not None:
            keep = keep | later.to(keep.device)[None]
    bias = None
    if config.log_p_correction:
        bias = logit_bias(config, keep, q_len, kv_len, spans, layer)
    args = (query, key, value, keep, config.block_size, attention_mask, scale, bias)
    if q_len == 1:
        if _cpu_fast_path(query, value, attention_mask, bias):
            size, window = config.block_size, config.window
            return band_decode(query, key, value, keep, size, window, scale, plan)
        return gather_attention(*args)
    if q_len == kv_len:
        return _prefill(*args[:4], config, attention_mask, scale, bias, layer, spans)
    return masked_sdpa(*args)


def prblock_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    default_state: PrBlockState,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The function transformers calls in place of SDPA; returns (b, q_len, heads, d).

    A decode step whose layer cache reads its own stored form (an SAQ staircase attached with
    `core.vlm.saq.staircase_attention`) attends there. Sliding-window layers (Gemma-2/3,
    Qwen2's) stay on SDPA: their window already bounds the cost, and their cache holds only
    the window, so its positions are not the absolute ones blocks and sinks are counted in.
    """
    stored = getattr(module, "staircase", None)
    if stored is not None and stored.reads_in_place and query.shape[2] == 1:
        return stored.attend(query, attention_mask, scaling).transpose(1, 2).contiguous(), None
    state = getattr(module, "prblock", None) or default_state
    if getattr(module, "sliding_window", None):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, **kwargs
        )
    out = block_sparse_attention(
        query,
        key,
        value,
        state.config,
        layer=getattr(module, "layer_idx", 0) or 0,
        attention_mask=attention_mask,
        protected=state.protected,
        scale=scaling,
    )
    if out is None:
        # Nothing to skip (short prompts): SDPA computes exactly the same thing, fastest.
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, **kwargs
        )
    return out.transpose(1, 2).contiguous(), None


def register(config: PrBlockConfig | None = None, name: str = "prblock") -> str:
    """Make `name` usable as `attn_implementation`; `config` is the default. Idempotent."""
    if "flash" in name:
        raise ValueError("transformers refuses attention names containing 'flash'.")
    function = partial(prblock_attention, default_state=PrBlockState(config or PrBlockConfig()))
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, sdpa_mask)
    _READS_STAIRCASE.add(name)
    return name


# Attention names whose function attends to an attached SAQ staircase itself (`register`).
_READS_STAIRCASE: set[str] = set()


def reads_staircase(name: str) -> bool:
    """Whether the attention registered as `name` attends to attached SAQ staircases."""
    return name in _READS_STAIRCASE


def language_attention(model: torch.nn.Module) -> list[torch.nn.Module]:
    text_config = model.config.get_text_config()
    return [
        module
        for module in model.modules()
        if type(module).__name__.endswith("Attention")
        and getattr(module, "config", None) is text_config
    ]


def use_prblock(
    model: torch.nn.Module,
    config: PrBlockConfig | None = None,
    name: str = "prblock",
    warm: bool | None = None,
) -> None:
    """Switch the language model of a decoder or VLM to PrFlashAttention; vision stays as is.

    `warm` (default: when the model is on a GPU) compiles the prefill kernel for the common
    buckets now (`warm_up`), so the first long prompt does not wait for it.
    """
    register(config, name)
    state = PrBlockState(config or PrBlockConfig())
    for module in language_attention(model):
        module.prblock = state
    set_language_attention(model, name)
    parameter = next(model.parameters(), None)
    if warm or (warm is None and parameter is not None and parameter.device.type == "cuda"):
        warm_up(model, state.config)


# Warmed at load by default: longer prompts compile on first use.
WARM_UP_TO = 16384


def warm_up(model: torch.nn.Module, config: PrBlockConfig, up_to: int = WARM_UP_TO) -> list[int]:
    """Compile the prefill kernel of `model`'s attention shape for every bucket from
    `config.dense_below` to `up_to` tokens (and the model's own limit); the lengths warmed."""
    text = model.config.get_text_config()
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    limit = min(up_to, getattr(text, "max_position_embeddings", None) or up_to)
    size = config.block_size_on(device.type)
    lengths = sorted({bucket_length(b, config.buckets, size) for b in config.buckets
                      if config.dense_below <= b <= limit})  # fmt: skip
    for length in lengths:
        q = torch.zeros(1, heads, length, dim, device=device, dtype=dtype)
        k = torch.zeros(1, kv_heads, length, dim, device=device, dtype=dtype)
        with torch.no_grad():
            block_sparse_attention(q, k, k, config, scale=dim**-0.5)
    return lengths


def set_language_attention(model: torch.nn.Module, name: str) -> None:
    """Switch only the language model of a decoder or VLM to the attention `name`."""
    text_config = model.config.get_text_config()
    if text_config is model.config:
        model.set_attn_implementation(name)
    else:
        keys = [
            key for key in model.config.sub_configs if getattr(model.config, key) is text_config
        ]
        model.set_attn_implementation(dict.fromkeys(keys, name))


@contextmanager
def protected_spans(model: torch.nn.Module, spans: Sequence[Span]) -> Iterator[None]:
    """Within the block, the token ranges [start, end) (e.g. image tokens) are always attended."""
    states = {id(m.prblock): m.prblock for m in language_attention(model) if hasattr(m, "prblock")}
    if not states:
        raise NotPrBlockModel("call use_prblock(model) before protected_spans(model, ...).")
    saved = {key: state.protected for key, state in states.items()}
    for state in states.values():
        state.protected = list(spans)
    try:
        yield
    finally:
        for key, state in states.items():
            state.protected = saved[key]


def token_spans(input_ids: torch.Tensor, token_id: int) -> list[Span]:
    """Runs of `token_id` (e.g. a VLM's image placeholder) in any row, as [start, end) spans."""
    hit = (input_ids == token_id).any(0).int()
    edges = torch.diff(F.pad(hit, (1, 1))).nonzero().flatten().tolist()
    return list(zip(edges[::2], edges[1::2], strict=True))
