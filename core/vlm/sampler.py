"""The PrFlashAttention block sampler: which key blocks each query block attends to.

Far-away key blocks are kept with a probability that falls with their distance; the window,
the sink blocks and (up to a budget) protected spans such as image tokens are always kept. Draws
hash the block coordinates, so a sample is the same on any device and in prefill or decode.
"""

import math
from collections.abc import Sequence

import torch

from core.vlm.config import PrBlockConfig

Span = tuple[int, int]

# splitmix64's finaliser constants, as signed int64 so torch can multiply (and wrap) with them.
_MIX1 = 0xFF51AFD7ED558CCD - 2**64
_MIX2 = 0xC4CEB9FE1A85EC53 - 2**64
_STRIDES = (0x9E3779B97F4A7C15 - 2**64, 0x632BE59BD9B4E019, 0x2545F4914F6CDD1D)


def keep_probability(config: PrBlockConfig, distance: torch.Tensor) -> torch.Tensor:
    """p(d) = min(1, alpha / (d - w + 1)^beta) outside the window, 1 inside it."""
    beyond = (distance - config.window + 1).clamp(min=1).double()
    p = (config.alpha / beyond**config.beta).clamp(max=1.0)
    return torch.where(distance < config.window, 1.0, p)


def protected_blocks(
    spans: Sequence[Span], block_size: int, n_blocks: int, budget: int | None = None, device=None
) -> torch.Tensor:
    """Which key blocks hold a token of any half-open span [start, end), bool (n_blocks,).

    With a `budget` (tokens) smaller than the blocks the spans cover, an evenly spaced subset
    of those blocks that fits is kept instead (every k-th), so a huge image still has anchors
    across its whole extent without forcing every query to read all of it.
    """
    hit = torch.zeros(n_blocks, dtype=torch.bool)
    for start, end in spans:
        if end > start:
            hit[start // block_size : min(n_blocks, (end - 1) // block_size + 1)] = True
    covered = int(hit.sum())
    if budget is not None and covered * block_size > budget:
        allowed = budget // block_size
        blocks = hit.nonzero().flatten()
        hit = torch.zeros_like(hit)
        if allowed:
            hit[blocks[:: math.ceil(covered / allowed)]] = True
    return hit.to(device) if device is not None else hit


def _layout(config: PrBlockConfig, q_len: int, kv_len: int, protected: Sequence[Span], device):
    """Block distance of every (query block, key block) pair, and which are always computed."""
    size = config.block_size_on(torch.device(device or "cpu").type)
    first = (kv_len - q_len) // size
    rows = torch.arange(first, (kv_len - 1) // size + 1, device=device)[:, None]
    cols = torch.arange(math.ceil(kv_len / size), device=device)[None, :]
    distance = rows - cols
    always = (distance < config.window) | (cols < config.sinks)
    hit = protected_blocks(protected, size, cols.shape[1], config.protected_budget, device)
    always = always | hit[None, :]
    return rows, cols, distance, (distance >= 0) & always


def _uniform(seed: int, layer: int, heads: int, rows: torch.Tensor, cols: torch.Tensor):
    """A uniform draw per (seed, layer, head, query block, key block): a counter-based hash.

    Hashing the block coordinates (instead of drawing from a stream) gives a query block the
    same key blocks whether it is computed in one prefill or token by token while decoding.
    """
    head = torch.arange(heads, device=rows.device)[:, None, None]
    x = ((seed * 1_000_003 + layer) * 0x9E3779B1) % 2**63
    x = head * _STRIDES[0] + rows * _STRIDES[1] + cols * _STRIDES[2] + x
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
    device=None,
) -> torch.Tensor:
    """Kept key blocks for each query block: bool (heads, query blocks, key blocks).

    Row r is the query block holding cache position (kv_len - q_len) // block_size * block_size
    + r * block_size; column c is key block c. Blocks above the diagonal are never kept. Built
    on `device` (default the CPU) in a few vectorised ops.
    """
    rows, cols, distance, always = _layout(config, q_len, kv_len, protected, device)
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
    _, _, distance, always = _layout(config, q_len, kv_len, protected, keep.device)
    bias = -torch.log(keep_probability(config, distance)).float()
    bias = torch.where(keep & ~always, bias, 0.0)
    bias[_dense_heads(config, layer, keep.shape[0])] = 0.0
    return bias


def expected_density(config: PrBlockConfig, n_tokens: int, protected: Sequence[Span] = ()):
    """Expected share of the causal blocks computed in a prefill of n_tokens (1.0 = dense)."""
    _, _, distance, always = _layout(config, n_tokens, n_tokens, protected, None)
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
    return float(keep.tril(first).sum()) / (heads * causal)


def causal_pairs(q_len: int, kv_len: int, block_size: int) -> int:
    """How many (query block, key block) pairs a causal call of this shape has."""
    first = (kv_len - q_len) // block_size
    n_rows = (kv_len - 1) // block_size + 1 - first
    return sum(first + r + 1 for r in range(n_rows))


def token_mask(
    keep: torch.Tensor, block_size: int, q_len: int, kv_len: int, causal: bool = True
) -> torch.Tensor:
    """The dense bool mask (heads, q_len, kv_len) that a block sample stands for; causal unless
    told otherwise (a model's own mask then says which later keys a query may see)."""
    device = keep.device
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)
    k_pos = torch.arange(kv_len, device=device)
    rows = q_pos // block_size - (kv_len - q_len) // block_size
    mask = keep[:, rows][:, :, k_pos // block_size]
    return mask & (q_pos[:, None] >= k_pos[None, :]) if causal else mask


def token_bias(bias: torch.Tensor, block_size: int, q_len: int, kv_len: int) -> torch.Tensor:
    """A block bias (heads, rows, cols) spread over tokens (heads, q_len, kv_len)."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=bias.device)
    rows = q_pos // block_size - (kv_len - q_len) // block_size
    return bias[:, rows][:, :, torch.arange(kv_len, device=bias.device) // block_size]
