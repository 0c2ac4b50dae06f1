"""PrFlashAttention: probabilistic block-sparse attention for any transformers decoder.

Far-away key blocks are skipped with a probability that grows with their distance, so prefill
costs about n log n instead of n^2. Register it, then switch a model with `use_prblock(model)`.

How settings reach the attention function: `use_prblock` puts one `PrBlockState` (the config
and the protected token spans) on every attention module of the language model, as the
attribute `prblock`; transformers hands the module to the attention function on every call, so
this works through `model.generate`. `protected_spans(model, spans)` swaps the spans for the
length of a `with` block. A module without a state uses the config given to `register`.

Blocks are counted over cache positions: query t of a call with q_len queries and kv_len keys
sits at position kv_len - q_len + t (what a DynamicCache gives), key k at position k.

Paths, all equal to `reference_attention` (the oracle) up to rounding: on a CPU with no
padding mask, prefill runs `band_attention` and decode `band_decode`; otherwise prefill runs
compiled FlexAttention (masked SDPA where it cannot compile) and decode `gather_attention`.
"""

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache, lru_cache, partial

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from core.vlm.config import PrBlockConfig

log = logging.getLogger(__name__)

Span = tuple[int, int]

# splitmix64's finaliser constants, as signed int64 so torch can multiply (and wrap) with them.
_MIX1 = 0xFF51AFD7ED558CCD - 2**64
_MIX2 = 0xC4CEB9FE1A85EC53 - 2**64
_STRIDES = (0x9E3779B97F4A7C15 - 2**64, 0x632BE59BD9B4E019, 0x2545F4914F6CDD1D)


class NotPrBlockModel(ValueError):
    """The model was not switched to PrFlashAttention with `use_prblock`."""


@dataclass
class PrBlockState:
    """What one model's attention modules read on every call."""

    config: PrBlockConfig
    protected: list[Span] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# The block sampler


def keep_probability(config: PrBlockConfig, distance: torch.Tensor) -> torch.Tensor:
    """p(d) = min(1, alpha / (d - w + 1)^beta) outside the window, 1 inside it."""
    beyond = (distance - config.window + 1).clamp(min=1).double()
    p = (config.alpha / beyond**config.beta).clamp(max=1.0)
    return torch.where(distance < config.window, 1.0, p)


def protected_blocks(spans: Sequence[Span], block_size: int, n_blocks: int) -> torch.Tensor:
    """Which key blocks hold a token of any half-open span [start, end)."""
    hit = torch.zeros(n_blocks, dtype=torch.bool)
    for start, end in spans:
        if end > start:
            hit[start // block_size : min(n_blocks, (end - 1) // block_size + 1)] = True
    return hit


def _layout(config: PrBlockConfig, q_len: int, kv_len: int, protected: Sequence[Span]):
    """Block distance of every (query block, key block) pair, and which are always computed."""
    size = config.block_size
    first = (kv_len - q_len) // size
    rows = torch.arange(first, (kv_len - 1) // size + 1)[:, None]
    cols = torch.arange(math.ceil(kv_len / size))[None, :]
    distance = rows - cols
    always = (distance < config.window) | (cols < config.sinks)
    always = always | protected_blocks(protected, size, cols.shape[1])[None, :]
    return rows, cols, distance, (distance >= 0) & always


def _uniform(seed: int, layer: int, heads: int, rows: torch.Tensor, cols: torch.Tensor):
    """A uniform draw per (seed, layer, head, query block, key block): a counter-based hash.

    Hashing the block coordinates (instead of drawing from a stream) gives a query block the
    same key blocks whether it is computed in one prefill or token by token while decoding.
    """
    head = torch.arange(heads)[:, None, None]
    x = torch.tensor(((seed * 1_000_003 + layer) * 0x9E3779B1) % 2**63, dtype=torch.int64)
    x = x + head * _STRIDES[0] + rows * _STRIDES[1] + cols * _STRIDES[2]
    for multiplier in (_MIX1, _MIX2):
        x = (x ^ ((x >> 31) & (2**33 - 1))) * multiplier
    x = x ^ ((x >> 31) & (2**33 - 1))
    return ((x >> 40) & (2**24 - 1)).double() / 2**24


def sample_blocks(
    config: PrBlockConfig,
    q_len: int,
    kv_len: int,
    *,
    heads: int = 1,
    layer: int = 0,
    protected: Sequence[Span] = (),
) -> torch.Tensor:
    """Kept key blocks for each query block: bool (heads, query blocks, key blocks).

    Row r is the query block holding cache position (kv_len - q_len) // block_size * block_size
    + r * block_size; column c is key block c. Blocks above the diagonal are never kept.
    """
    rows, cols, distance, always = _layout(config, q_len, kv_len, protected)
    draw = _uniform(config.seed, layer, heads, rows, cols)
    sampled = (distance >= 0) & (draw < keep_probability(config, distance))
    keep = always | sampled
    keep[_dense_heads(config, layer, heads)] = distance >= 0
    return keep


def _dense_heads(config: PrBlockConfig, layer: int, heads: int) -> list[int]:
    """The kv heads of this layer that `config.dense_heads` computes in full."""
    return sorted({h for at, h in config.dense_heads or () if at == layer and h < heads})


def logit_bias(
    config: PrBlockConfig, keep: torch.Tensor, q_len: int, kv_len: int, protected=(), layer=0
) -> torch.Tensor:
    """log(1/p) on sampled kept blocks, 0 elsewhere (dense heads sample nothing): the optional
    skipped-mass correction."""
    _, _, distance, always = _layout(config, q_len, kv_len, protected)
    bias = -torch.log(keep_probability(config, distance)).float()
    bias = torch.where(keep & ~always, bias, 0.0)
    bias[_dense_heads(config, layer, keep.shape[0])] = 0.0
    return bias


def expected_density(config: PrBlockConfig, n_tokens: int, protected: Sequence[Span] = ()):
    """Expected share of the causal blocks computed in a prefill of n_tokens (1.0 = dense)."""
    _, _, distance, always = _layout(config, n_tokens, n_tokens, protected)
    p = torch.where(always, 1.0, keep_probability(config, distance))
    return float(p[distance >= 0].mean())


def model_density(
    config: PrBlockConfig, n_tokens: int, layers: int, kv_heads: int, protected=()
) -> float:
    """Expected share of the causal blocks a whole model computes: `dense_heads` count as 1."""
    sampled = expected_density(config, n_tokens, protected)
    heads = set(config.dense_heads or ())
    dense = sum(layer < layers and head < kv_heads for layer, head in heads)
    return (dense + sampled * (layers * kv_heads - dense)) / (layers * kv_heads)


def realised_density(keep: torch.Tensor) -> float:
    """Share of the causal blocks a sample keeps (rows are the last query blocks)."""
    heads, n_rows, n_cols = keep.shape
    first = n_cols - n_rows
    causal = sum(first + r + 1 for r in range(n_rows))
    return float(keep.sum()) / (heads * causal)


def _causal_pairs(q_len: int, kv_len: int, block_size: int) -> int:
    first = (kv_len - q_len) // block_size
    n_rows = (kv_len - 1) // block_size + 1 - first
    return sum(first + r + 1 for r in range(n_rows))


# ---------------------------------------------------------------------------------------------
# Attention over kept blocks. All take query (b, hq, q_len, d), key/value (b, hkv, kv_len, d),
# keep (hkv, rows, cols) from `sample_blocks`, an optional bool mask (b, 1, q_len, kv_len) from
# transformers (padding), and return (b, hq, q_len, d).


def token_mask(keep: torch.Tensor, block_size: int, q_len: int, kv_len: int) -> torch.Tensor:
    """The dense bool mask (heads, q_len, kv_len) that a block sample stands for, causal."""
    q_pos = torch.arange(kv_len - q_len, kv_len)
    k_pos = torch.arange(kv_len)
    rows = q_pos // block_size - (kv_len - q_len) // block_size
    mask = keep[:, rows][:, :, k_pos // block_size]
    return mask & (q_pos[:, None] >= k_pos[None, :])


def _token_bias(bias: torch.Tensor, block_size: int, q_len: int, kv_len: int) -> torch.Tensor:
    q_pos = torch.arange(kv_len - q_len, kv_len)
    rows = q_pos // block_size - (kv_len - q_len) // block_size
    return bias[:, rows][:, :, torch.arange(kv_len) // block_size]


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
            allowed = heads_kept[None, :, None, None] & (q_pos[:, None] >= k_pos[None, :])
            if attention_mask is not None:
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
    """SDPA under the dense mask a sample stands for: correct for any shape, but no faster."""
    q_len, kv_len, group = query.shape[2], key.shape[2], query.shape[1] // key.shape[1]
    mask = token_mask(keep, block_size, q_len, kv_len).repeat_interleave(group, 0)[None]
    mask = mask.to(query.device)
    if attention_mask is not None:
        mask = mask & attention_mask
    if bias is not None:
        bias = _token_bias(bias, block_size, q_len, kv_len).repeat_interleave(group, 0)
        bias = bias.to(query.device)
        mask = torch.where(mask, bias.to(query.dtype), -math.inf)
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scale, enable_gqa=group > 1
    )


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
        return _split_heads(full, _sdpa_decode, gather_attention, *args)
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
    k, v = _gather_tokens(key, positions), _gather_tokens(value, positions)
    mask = allowed[:, :, None, :]
    if bias is not None:
        token_bias = bias[:, -1].gather(1, chosen).repeat_interleave(block_size, 1).to(device)
        mask = torch.where(mask, token_bias[None, :, None, :].to(query.dtype), -math.inf)
    q = query.reshape(batch, kv_heads, q_heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.reshape(batch, q_heads, 1, out.shape[-1])


def _gather_tokens(cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """cache[:, h, positions[h]] for every kv head h: (b, heads, n, d) -> (b, heads, width, d).

    One index_select over the cache's (head, token) rows, read in place where its layout allows
    (a contiguous cache, or a slice of a longer buffer): far cheaper than advanced indexing.
    """
    batch, heads, _, dim = cache.shape
    b_stride, h_stride, t_stride, d_stride = cache.stride()
    if d_stride != 1 or not t_stride or h_stride % t_stride:
        cache = cache.contiguous()
        b_stride, h_stride, t_stride, _ = cache.stride()
    per_head = h_stride // t_stride
    rows = (heads - 1) * per_head + cache.shape[2]
    flat = cache.as_strided((batch, rows, dim), (b_stride, t_stride, 1))
    index = (torch.arange(heads)[:, None] * per_head + positions).flatten().to(cache.device)
    return flat.index_select(1, index).view(batch, heads, -1, dim)


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


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _block_indices(blocks: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    counts = blocks.sum(-1, dtype=torch.int32)
    order = torch.argsort(blocks.int(), dim=-1, descending=True, stable=True).int()
    return counts[None].to(device), order[None].to(device)


@cache
def _compiled_flex():
    # One compile per padded length; the compiled function is shared by every layer and model.
    return torch.compile(flex_attention, dynamic=False)


def flex_block_attention(
    query, key, value, keep, block_size: int, attention_mask=None, scale=None, bias=None
) -> torch.Tensor:
    """Prefill (q_len == kv_len): compiled FlexAttention that never touches skipped blocks."""
    n, group = query.shape[2], query.shape[1] // key.shape[1]
    n_blocks = keep.shape[-1]
    pad = n_blocks * block_size - n
    query, key, value = (F.pad(t, (0, 0, 0, pad)) for t in (query, key, value))
    # Never a block above the diagonal, whatever the caller passed: causality first.
    keep = (
        keep.repeat_interleave(group, 0) & torch.ones(n_blocks, n_blocks, dtype=torch.bool).tril()
    )
    if attention_mask is None:
        # Only the diagonal block needs the causal test; the others are computed whole.
        diagonal = torch.eye(n_blocks, dtype=torch.bool)
        partial_blocks, full_blocks, mask_mod = keep & diagonal, keep & ~diagonal, _causal
    else:
        padded = F.pad(attention_mask, (0, pad, 0, pad))

        def mask_mod(b, h, q_idx, kv_idx):
            return padded[b, 0, q_idx, kv_idx]

        partial_blocks, full_blocks = keep, torch.zeros_like(keep)
    block_mask = BlockMask.from_kv_blocks(
        *_block_indices(partial_blocks, query.device),
        *_block_indices(full_blocks, query.device),
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(n + pad, n + pad),
    )
    score_mod = None
    if bias is not None:
        head_bias = bias.repeat_interleave(group, 0).to(query.device, query.dtype)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + head_bias[h, q_idx // block_size, kv_idx // block_size]

    out = _compiled_flex()(
        query,
        key,
        value,
        score_mod=score_mod,
        block_mask=block_mask,
        scale=scale,
        enable_gqa=group > 1,
    )
    return out[:, :, :n]


_HAS_FLASH_CPU = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _flash_cpu(query, key, value, mask=None, scale=None):
    """CPU flash attention that also returns the log-sum-exp of every query row (b, h, q)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, attn_mask=mask, scale=scale
    )


def _sdpa_causal(query, key, value, keep, block_size, window, scale):
    """Dense causal SDPA, with `band_attention`'s signature (the block arguments unused)."""
    return F.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=scale, enable_gqa=query.shape[1] > key.shape[1]
    )


def _split_heads(full, dense, sparse, query, key, value, keep, *args) -> torch.Tensor:
    """Kv heads that keep every causal block (`full`) through `dense`, the others `sparse`."""
    group = query.shape[1] // key.shape[1]
    out = query.new_empty(*query.shape[:-1], value.shape[-1])
    for heads, function in ((full, dense), (~full, sparse)):
        kv = heads.nonzero().flatten().tolist()
        qh = [h * group + g for h in kv for g in range(group)]
        k, v = _heads(key, kv), _heads(value, kv)
        out[:, qh] = function(_heads(query, qh), k, v, keep[kv], *args)
    return out


def _heads(tensor: torch.Tensor, heads: list[int]) -> torch.Tensor:
    """tensor[:, heads]: a view when the heads are consecutive (a decode step copies no cache)."""
    if heads == list(range(heads[0], heads[0] + len(heads))):
        return tensor[:, heads[0] : heads[0] + len(heads)]
    return tensor[:, heads]


def band_attention(
    query, key, value, keep, block_size: int, window: int, scale=None
) -> torch.Tensor:
    """Prefill on the CPU, no padding mask: the window band densely, the far blocks gathered.

    Every query block i sees its window (key blocks i-w+1..i) whatever was sampled, so the band
    is one flash-attention call over a strided, copy-free view of the keys: row i reads the
    w*B keys starting at (i-w+1)*B, with one small mask shared by all rows for the causal
    diagonal. The kept blocks beyond the window (sinks, protected, sampled) are gathered per
    (kv head, query block), grouped by how many there are so no call pads, and merged with the
    band through the log-sum-exp. The first w-1 query blocks see only their window: causal SDPA.
    Heads that keep every block (`dense_heads`) run causal SDPA. Only kept blocks are computed,
    in large dense tiles: that is what makes skipping pay on a CPU.
    """
    batch, q_heads, n, dim = query.shape
    kv_heads, n_blocks = key.shape[1], keep.shape[-1]
    group, size = q_heads // kv_heads, block_size
    scale = scale if scale is not None else dim**-0.5
    full = keep.flatten(1).sum(1) == _causal_pairs(n, n, block_size)
    if full.any() and not full.all():
        args = (query, key, value, keep, block_size, window, scale)
        return _split_heads(full, _sdpa_causal, band_attention, *args)
    # Diagonals kept in every row widen the band (alpha >= 1 always keeps distance `window`).
    while window < n_blocks and keep.diagonal(-window, 1, 2).all():
        window += 1
    first = min(window - 1, n_blocks)  # rows whose window reaches key 0: plain causal SDPA
    rows, pad = n_blocks - first, n_blocks * size - n
    if full.all() or rows == 0:
        return _sdpa_causal(query, key, value, keep, block_size, window, scale)
    out = query.new_empty(batch, q_heads, n_blocks * size, value.shape[-1])
    prefix = first * size
    out[:, :, :prefix] = _sdpa_causal(
        query[:, :, :prefix], key[:, :, :prefix], value[:, :, :prefix], keep, size, window, scale
    )
    # Far blocks: kept, at distance >= window. (kv head, row) problems grouped by their count.
    distance = torch.arange(first, n_blocks)[:, None] - torch.arange(n_blocks)[None, :]
    far = keep[:, first:] & (distance >= window)[None]
    counts = far.sum(-1)
    cols = torch.argsort(far.int(), dim=-1, descending=True, stable=True)
    # Flat indices: problem p = head * rows + row; key block head * n_blocks + col.
    by_count = [(c, (counts.flatten() == c).nonzero().flatten()) for c in counts.unique().tolist()]
    offsets = (torch.arange(kv_heads) * n_blocks)[:, None, None]
    buckets = [
        (p.to(query.device), (cols + offsets).flatten(0, 1)[p, :c].flatten().to(query.device))
        for c, p in by_count
        if c
    ]
    # The band's diagonal block: query t of the block sees keys up to its own position.
    t = torch.arange(group * size, device=query.device) % size
    j = torch.arange(window * size, device=query.device) - (window - 1) * size
    band_mask = torch.where(j[None, :] <= t[:, None], 0.0, -math.inf).to(query.dtype)
    band_mask = band_mask[None, None].expand(kv_heads, rows, -1, -1)
    shape = (kv_heads, rows, window * size, dim)
    for b in range(batch):
        # Queries as (kv head, row, group * B, d): the heads sharing a kv head are one problem.
        q = F.pad(query[b, :, prefix:], (0, 0, 0, pad)) if pad else query[b, :, prefix:]
        q = q.reshape(kv_heads, group, rows, size, dim).transpose(1, 2)
        q = q.reshape(kv_heads, rows, group * size, dim)
        k = F.pad(key[b], (0, 0, 0, pad)) if pad else key[b].contiguous()
        v = F.pad(value[b], (0, 0, 0, pad)) if pad else value[b].contiguous()
        strides = (k.stride(0), size * dim, dim, 1)
        o, lse = _flash_cpu(
            q, k.as_strided(shape, strides), v.as_strided(shape, strides), band_mask, scale
        )
        if buckets:
            _merge_far_blocks(q, k, v, o, lse, buckets, size, scale)
        rest = out[b, :, prefix:].view(kv_heads, group, rows, size, -1)
        rest.copy_(o.view(kv_heads, rows, group, size, -1).transpose(1, 2))
    return out[:, :, :n]


def _merge_far_blocks(q, k, v, o, lse, buckets, size, scale) -> None:
    """Attend each bucket's problems to their far blocks; merge them into o by log-sum-exp."""
    kv_heads, rows, width, dim = q.shape
    problems = q.view(kv_heads * rows, width, dim)
    k_blocks, v_blocks = k.view(-1, size, dim), v.view(-1, size, v.shape[-1])
    covered = sum(len(problem) for problem, _ in buckets) == kv_heads * rows
    o_far = (o.new_empty if covered else o.new_zeros)(kv_heads * rows, width, o.shape[-1])
    lse_far = lse.new_full((kv_heads * rows, width), -math.inf)
    for problem, blocks in buckets:
        count = len(blocks) // len(problem)
        shape = (1, len(problem), count * size, -1)
        out, log_sum = _flash_cpu(
            problems.index_select(0, problem)[None],
            k_blocks.index_select(0, blocks).view(shape),
            v_blocks.index_select(0, blocks).view(shape),
            None,
            scale,
        )
        o_far.index_copy_(0, problem, out[0])
        lse_far.index_copy_(0, problem, log_sum[0])
    # Softmax over the union: the far part's share of the mass is sigmoid(lse_far - lse).
    share = torch.sigmoid(lse_far.view(lse.shape) - lse)[..., None]
    o.lerp_(o_far.view(o.shape), share.to(o.dtype))


def band_decode(
    query, key, value, keep, block_size: int, window: int, scale=None, plan=None
) -> torch.Tensor:
    """Decode (one query token) on the CPU, no padding mask: the window read in place.

    The query's window (its last w key blocks, widened over older blocks every head keeps) is
    one contiguous slice of the cache, attended without a copy; only the kept blocks beyond it
    (sinks, protected, sampled: a handful) are gathered, and the two merge by log-sum-exp.
    Heads that keep every block (`dense_heads`) attend to the whole cache, in place. SDPA
    reads the whole cache for every head; this reads a few blocks, in a few ops. `plan` is
    `band_plan(keep, block_size, window)`, when the caller keeps it.
    """
    batch, q_heads, _, dim = query.shape
    kv_heads = key.shape[1]
    scale = scale if scale is not None else dim**-0.5
    plan = plan or band_plan(keep, block_size, window)
    # Queries as (b, kv head, group, d): the heads sharing a kv head are one problem.
    q = query.reshape(batch, kv_heads, q_heads // kv_heads, dim)
    band = slice(plan.start * block_size, None)
    o, lse = _flash_cpu(q, key[:, :, band], value[:, :, band], None, scale)
    if plan.far_tokens is not None:
        k, v = _gather_tokens(key, plan.far_tokens), _gather_tokens(value, plan.far_tokens)
        mask = plan.far_mask.to(query.dtype).expand(batch, -1, q.shape[2], -1)
        o_far, lse_far = _flash_cpu(q, k, v, mask, scale)
        # A head with no far block: the op gives 0 for its log-sum-exp; its share is none.
        lse_far = lse_far.masked_fill(plan.no_far, -math.inf)
        o.lerp_(o_far, torch.sigmoid(lse_far - lse)[..., None].to(o.dtype))
    for h in plan.dense:
        heads = slice(h, h + 1)
        o[:, heads] = F.scaled_dot_product_attention(
            q[:, heads], key[:, heads], value[:, heads], scale=scale
        )
    return o.reshape(batch, q_heads, 1, -1)


@dataclass(frozen=True)
class BandPlan:
    """Where `band_decode` reads a sample's last row: a band, far blocks, dense heads."""

    start: int  # first key block of the band
    dense: tuple[int, ...]  # kv heads that keep every block
    far_tokens: torch.Tensor | None  # (kv heads, width * B) positions of the far blocks
    far_mask: torch.Tensor | None  # (1, kv heads, 1, width * B): 0, or -inf on padding
    no_far: torch.Tensor | None  # (1, kv heads, 1): heads with no far block, dense ones too


def band_plan(keep: torch.Tensor, block_size: int, window: int) -> BandPlan:
    """What `band_decode` derives from a sample's last row (once per query block and layer)."""
    row = keep[:, -1]
    full = row.all(-1)
    start = max(0, row.shape[-1] - window)
    while start and row[:, start - 1].all():
        start -= 1
    far = row[:, :start] & ~full[:, None]
    counts = far.sum(-1)
    dense = tuple(full.nonzero().flatten().tolist())
    if not counts.any():
        return BandPlan(start, dense, None, None, None)
    width = int(counts.max())
    chosen = torch.argsort(far.int(), dim=-1, descending=True, stable=True)[:, :width]
    tokens = (chosen[..., None] * block_size + torch.arange(block_size)).flatten(1)
    # A head with fewer far blocks than the widest pads with masked copies of its first ones.
    kept = torch.arange(width).repeat_interleave(block_size)[None, :] < counts[:, None]
    mask = torch.where(kept, 0.0, -math.inf)[None, :, None, :]
    return BandPlan(start, dense, tokens, mask, (counts == 0)[None, :, None])


_flex_failure: list[str] = []


def _cpu_fast_path(query, value, attention_mask, bias) -> bool:
    """The band kernels: CPU tensors, no padding mask, no log(1/p) bias, and values as wide as
    queries (the CPU flash op needs it)."""
    return (
        query.device.type == "cpu"
        and attention_mask is None
        and bias is None
        and query.shape[-1] == value.shape[-1]
        and _HAS_FLASH_CPU
    )


def _prefill(query, key, value, keep, config, attention_mask, scale, bias):
    block_size = config.block_size
    if _cpu_fast_path(query, value, attention_mask, bias):
        # On a CPU the band kernel beats compiled flex at every density we measured.
        return band_attention(query, key, value, keep, block_size, config.window, scale)
    if not _flex_failure:
        try:
            return flex_block_attention(
                query, key, value, keep, block_size, attention_mask, scale, bias
            )
        except Exception as error:  # compile needs a C compiler (CPU) or triton (GPU)
            _flex_failure.append(repr(error))
            log.warning("prblock: compiled FlexAttention unavailable, using masked SDPA: %r", error)
    return masked_sdpa(query, key, value, keep, block_size, attention_mask, scale, bias)


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
    (b, 1, q_len, kv_len); returns (b, hq, q_len, d).
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    if kv_len < (config.decode_dense_below if q_len == 1 else config.dense_below):
        return None
    heads, plan = key.shape[1], None
    if q_len == 1:
        spans = tuple(map(tuple, protected))
        row = (kv_len - 1) // config.block_size
        keep, plan = _decode_sample(config, row, heads, layer, spans)
    else:
        keep = sample_blocks(config, q_len, kv_len, heads=heads, layer=layer, protected=protected)
    bias = None
    if config.log_p_correction:
        bias = logit_bias(config, keep, q_len, kv_len, protected, layer)
    elif int(keep.sum()) == key.shape[1] * _causal_pairs(q_len, kv_len, config.block_size):
        return None
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask == 0
    args = (query, key, value, keep, config.block_size, attention_mask, scale, bias)
    if q_len == 1:
        if _cpu_fast_path(query, value, attention_mask, bias):
            size, window = config.block_size, config.window
            return band_decode(query, key, value, keep, size, window, scale, plan)
        return gather_attention(*args)
    if q_len == kv_len:
        return _prefill(query, key, value, keep, config, attention_mask, scale, bias)
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
    """The function transformers calls in place of SDPA; returns (b, q_len, heads, d)."""
    state = getattr(module, "prblock", None) or default_state
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
    return name


def _language_attention(model: torch.nn.Module) -> list[torch.nn.Module]:
    text_config = model.config.get_text_config()
    return [
        module
        for module in model.modules()
        if type(module).__name__.endswith("Attention")
        and getattr(module, "config", None) is text_config
    ]


def use_prblock(
    model: torch.nn.Module, config: PrBlockConfig | None = None, name: str = "prblock"
) -> None:
    """Switch the language model of a decoder or VLM to PrFlashAttention; vision stays as is."""
    register(config, name)
    state = PrBlockState(config or PrBlockConfig())
    for module in _language_attention(model):
        module.prblock = state
    set_language_attention(model, name)


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
    states = {id(m.prblock): m.prblock for m in _language_attention(model) if hasattr(m, "prblock")}
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
