"""PrFlashAttention's CPU kernels: the window band in place, far blocks gathered, merged by
log-sum-exp (prefill `band_attention`, decode `band_decode`); each equals the reference.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.vlm.sampler import causal_pairs


def gather_tokens(cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
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


HAS_FLASH_CPU = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def flash_cpu(query, key, value, mask=None, scale=None):
    """CPU flash attention that also returns the log-sum-exp of every query row (b, h, q)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, attn_mask=mask, scale=scale
    )


def _sdpa_causal(query, key, value, keep, block_size, window, scale):
    """Dense causal SDPA, with `band_attention`'s signature (the block arguments unused)."""
    return F.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=scale, enable_gqa=query.shape[1] > key.shape[1]
    )


def split_heads(full, dense, sparse, query, key, value, keep, *args) -> torch.Tensor:
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
    full = keep.flatten(1).sum(1) == causal_pairs(n, n, block_size)
    if full.any() and not full.all():
        args = (query, key, value, keep, block_size, window, scale)
        return split_heads(full, _sdpa_causal, band_attention, *args)
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
        o, lse = flash_cpu(
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
        out, log_sum = flash_cpu(
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
    o, lse = flash_cpu(q, key[:, :, band], value[:, :, band], None, scale)
    if plan.far_tokens is not None:
        k, v = gather_tokens(key, plan.far_tokens), gather_tokens(value, plan.far_tokens)
        mask = plan.far_mask.to(query.dtype).expand(batch, -1, q.shape[2], -1)
        o_far, lse_far = flash_cpu(q, k, v, mask, scale)
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
