"""PrFlashAttention prefill through compiled FlexAttention: the GPU path (and CPU with padding).

Prompt lengths are padded to a few buckets so each compiles once (the padded query blocks get
no key block, so they cost nothing); block masks are built on the tensors' device in a few
vectorised ops, at kv-head level, cached per (bucket, layer, spans) and expanded to the query
heads; a compile that fails falls back for that call only, with one log line per shape.
"""

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from core.vlm.config import PrBlockConfig
from core.vlm.sampler import Span, sample_blocks

log = logging.getLogger(__name__)

# Buckets x mask variants (causal, masked, biased) must all fit dynamo's per-function limit;
# past it dynamo would run flex eagerly (the whole score matrix) without a word, so it raises.
_DYNAMO_LIMITS = {"recompile_limit": 64, "fail_on_recompile_limit_hit": True}


def bucket_length(n: int, buckets: Sequence[int], block_size: int) -> int:
    """The padded length a prompt of n tokens runs at: the first bucket that holds it (beyond
    the last, the next multiple of it), rounded up to whole blocks."""
    padded = next((b for b in buckets if b >= n), None)
    if padded is None:
        padded = math.ceil(n / buckets[-1]) * buckets[-1]
    return math.ceil(padded / block_size) * block_size


def kv_block_indices(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexAttention's (count, indices) of a bool block matrix (..., rows, cols), int32, kept
    columns first in ascending order: a cumulative sum and a scatter, no sort."""
    counts = blocks.sum(-1, dtype=torch.int32)
    cols = blocks.shape[-1]
    place = blocks.long().cumsum(-1) - 1
    # Kept column c goes to its rank; the others fill the places after the count, in order.
    rest = counts[..., None].long() + (~blocks).long().cumsum(-1) - 1
    order = torch.where(blocks, place, rest)
    column = torch.arange(cols, device=blocks.device, dtype=torch.int32).expand_as(order)
    indices = torch.empty_like(order, dtype=torch.int32).scatter_(-1, order, column)
    return counts, indices


@dataclass(frozen=True)
class FlexBlocks:
    """A block mask at kv-head level: partial blocks (masked per token) and full ones."""

    partial: tuple[torch.Tensor, torch.Tensor]
    full: tuple[torch.Tensor, torch.Tensor] | None
    block_size: int
    length: int  # padded tokens

    def expanded(self, group: int, rows: int) -> tuple[torch.Tensor, ...]:
        """(count, indices) pairs for every query head, query blocks from `rows` on empty."""
        out = []
        for counts, indices in (self.partial, self.full or (None, None)):
            if counts is None:
                out += [None, None]
                continue
            counts = counts.clone()
            counts[..., rows:] = 0
            out += [
                counts.repeat_interleave(group, 0)[None],
                indices.repeat_interleave(group, 0)[None],
            ]
        return tuple(out)


def blocks_from_keep(keep: torch.Tensor, length: int, block_size: int, masked: bool) -> FlexBlocks:
    """The FlexBlocks of a sample `keep` (kv heads, rows, cols) padded to `length` tokens.

    Without a model mask only the diagonal block needs a per-token test (causal) and blocks
    above it are dropped; with one (padding, bidirectional image spans), every kept block is
    tested against it and blocks above the diagonal stay as the sample has them.
    """
    n_blocks = length // block_size
    heads, rows, cols = keep.shape
    padded = F.pad(keep, (0, n_blocks - cols, 0, n_blocks - rows))
    if masked:
        return FlexBlocks(kv_block_indices(padded), None, block_size, length)
    causal = torch.ones(n_blocks, n_blocks, dtype=torch.bool, device=keep.device).tril(-1)
    return FlexBlocks(_diagonal(heads, n_blocks, keep.device), kv_block_indices(padded & causal),
                      block_size, length)  # fmt: skip


def _diagonal(heads: int, n_blocks: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query block's own block (FlexAttention wants a column per key block all the same)."""
    counts = torch.ones(heads, n_blocks, dtype=torch.int32, device=device)
    indices = torch.arange(n_blocks, dtype=torch.int32, device=device).repeat(n_blocks, 1)
    indices[:, 0] = torch.arange(n_blocks, dtype=torch.int32, device=device)
    return counts, indices.expand(heads, n_blocks, n_blocks)


@lru_cache(maxsize=256)
def bucket_keep(
    config: PrBlockConfig, length: int, heads: int, layer: int, spans: tuple[Span, ...], device
) -> torch.Tensor:
    """One layer's sample over a whole bucket of `length` tokens, built on `device`.

    A prompt of n tokens keeps exactly the first n / B rows and columns of it (blocks are
    addressed by position), so one entry serves every length in the bucket.
    """
    return sample_blocks(config, length, length, heads=heads, layer=layer, protected=spans,
                         device=device)  # fmt: skip


@lru_cache(maxsize=256)
def bucket_blocks(
    config: PrBlockConfig, length: int, heads: int, layer: int, spans: tuple[Span, ...], device
) -> FlexBlocks:
    """The causal FlexBlocks of `bucket_keep`: cached beside it."""
    keep = bucket_keep(config, length, heads, layer, spans, device)
    return blocks_from_keep(keep, length, config.block_size, masked=False)


@cache
def _compiled_flex():
    # dynamic=False: one static kernel per bucket and mask variant, shared by every layer.
    return torch.compile(flex_attention, dynamic=False)


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _kernel_options(block_size: int, device: torch.device) -> dict | None:
    # Inductor's kernel tiles must divide the block mask's blocks; its GPU defaults are 128 x 64.
    if device.type != "cuda" or block_size >= 128:
        return None
    tile = 1 << (block_size.bit_length() - 1)
    return {"BLOCK_M": min(tile, 64), "BLOCK_N": min(tile, 64)}


def flex_attention_blocks(
    query, key, value, blocks: FlexBlocks, attention_mask=None, scale=None, bias=None
) -> torch.Tensor:
    """Prefill (q_len == kv_len) over `blocks`: compiled FlexAttention that never touches a
    skipped block. `attention_mask` (b, 1, n, n) bool is the model's own, `bias` a log(1/p)
    per kv-head block (kv heads, rows, cols)."""
    n, group = query.shape[2], query.shape[1] // key.shape[1]
    size, length = blocks.block_size, blocks.length
    pad = length - n
    query, key, value = (F.pad(t, (0, 0, 0, pad)) for t in (query, key, value))
    if attention_mask is None:
        mask_mod = _causal
    else:
        padded = F.pad(attention_mask, (0, pad, 0, pad))

        def mask_mod(b, h, q_idx, kv_idx):
            return padded[b, 0, q_idx, kv_idx]

    block_mask = BlockMask.from_kv_blocks(
        *blocks.expanded(group, math.ceil(n / size)),
        BLOCK_SIZE=size,
        mask_mod=mask_mod,
        seq_lengths=(length, length),
        compute_q_blocks=False,
    )
    score_mod = None
    if bias is not None:
        rows, cols = bias.shape[1:]
        block_bias = F.pad(bias, (0, length // size - cols, 0, length // size - rows))
        block_bias = block_bias.to(query.device, query.dtype)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + block_bias[h // group, q_idx // size, kv_idx // size]

    with torch._dynamo.config.patch(**_supported(_DYNAMO_LIMITS)):
        out = _compiled_flex()(
            query,
            key,
            value,
            score_mod=score_mod,
            block_mask=block_mask,
            scale=scale,
            enable_gqa=group > 1,
            kernel_options=_kernel_options(size, query.device),
        )
    return out[:, :, :n]


def _supported(options: dict) -> dict:
    """The dynamo settings this torch has (their names changed across releases)."""
    return {name: value for name, value in options.items() if hasattr(torch._dynamo.config, name)}


def flex_block_attention(
    query, key, value, keep, block_size: int, attention_mask=None, scale=None, bias=None,
    buckets: Sequence[int] = PrBlockConfig.buckets,
) -> torch.Tensor:  # fmt: skip
    """Prefill over the blocks of a sample `keep` (kv heads, rows, cols), at a bucket length."""
    length = bucket_length(query.shape[2], buckets, block_size)
    blocks = blocks_from_keep(keep.to(query.device), length, block_size, attention_mask is not None)
    return flex_attention_blocks(query, key, value, blocks, attention_mask, scale, bias)


_failed: dict[tuple, str] = {}


def try_flex(run, key: tuple):
    """`run()`, or None when it raised (a failed compile): logged once per `key`, whose later
    calls skip straight to the caller's fallback; other shapes still try."""
    if key in _failed:
        return None
    try:
        return run()
    except Exception as error:  # compile needs a C compiler (CPU) or triton (GPU)
        first_line = (str(error).splitlines() or [""])[0][:200]
        _failed[key] = f"{type(error).__name__}: {first_line}"
        log.warning("prblock: compiled FlexAttention failed for %s, this shape uses masked "
                    "SDPA: %s", key, _failed[key])  # fmt: skip
        return None
