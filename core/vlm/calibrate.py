"""Which heads PrFlashAttention should leave dense: a one-off calibration per model.

Sparse attention costs a model unevenly: on SmolLM2-135M a few (layer, kv head) pairs account
for most of the perplexity lost (bench/results/attention-cpu.txt). This runs one dense forward
pass over a calibration text and, at every layer, measures for each kv head how much its share of
the attention output (after the output projection) changes when that head attends sparsely
under `config`, relative to the layer's whole output. The heads that change most are the ones
worth computing in full (`PrBlockConfig.dense_heads`). Use a text other than the one you
evaluate on.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from core.vlm.attention import masked_sdpa, sample_blocks, set_language_attention
from core.vlm.config import PrBlockConfig

Head = tuple[int, int]
_NAME = "prblock_calibrate"


def _head_changes(module, query, key, value, dense, scale, config) -> dict[Head, float]:
    """Relative change of each kv head's projected output when it attends sparsely.

    `dense` is the layer's exact attention output as transformers lays it out (b, n, heads, d).
    """
    layer = getattr(module, "layer_idx", 0) or 0
    n, kv_heads = query.shape[2], key.shape[1]
    group, dim = query.shape[1] // kv_heads, query.shape[-1]
    config = config.on(query.device.type)
    keep = sample_blocks(config, n, n, heads=kv_heads, layer=layer, device=query.device)
    sparse = masked_sdpa(query, key, value, keep, config.block_size, scale=scale)
    # (b * n, heads * d): the layout the output projection reads.
    flat = [t.reshape(-1, query.shape[1] * dim) for t in (dense, sparse.transpose(1, 2))]
    weight = module.o_proj.weight if hasattr(module, "o_proj") else None
    whole = flat[0] if weight is None else flat[0] @ weight.T
    changes = {}
    for head in range(kv_heads):
        part = slice(head * group * dim, (head + 1) * group * dim)
        diff = flat[1][:, part] - flat[0][:, part]
        if weight is not None:
            diff = diff @ weight[:, part].T
        changes[(layer, head)] = float(diff.norm() / whole.norm().clamp(min=1e-12))
    return changes


@contextmanager
def _measuring(model, config: PrBlockConfig, changes: dict) -> Iterator[None]:
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
        out, weights = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, **kw
        )
        if attention_mask is None and query.shape[2] == key.shape[2]:
            changes.update(_head_changes(module, query, key, value, out, scaling, config))
        return out, weights

    AttentionInterface.register(_NAME, attention)
    AttentionMaskInterface.register(_NAME, sdpa_mask)
    previous = model.config.get_text_config()._attn_implementation
    set_language_attention(model, _NAME)
    try:
        yield
    finally:
        set_language_attention(model, previous or "sdpa")


def head_changes(model, input_ids: torch.Tensor, config: PrBlockConfig) -> dict[Head, float]:
    """(layer, kv head) -> relative output change under `config`, largest first.

    `input_ids` is one unpadded calibration sequence (1, n); the forward pass stays dense, so
    every layer is measured on the inputs the unmodified model gives it.
    """
    if input_ids.shape[0] != 1:
        raise ValueError("calibrate on one unpadded sequence: input_ids must be (1, n)")
    changes: dict[Head, float] = {}
    config = replace(config, dense_heads=())
    with _measuring(model, config, changes), torch.no_grad():
        model(input_ids)
    return dict(sorted(changes.items(), key=lambda item: -item[1]))


def calibrate_dense_heads(
    model, input_ids: torch.Tensor, config: PrBlockConfig, count: int
) -> tuple[Head, ...]:
    """The `count` (layer, kv head) pairs that sparse attention changes most, sorted."""
    return tuple(sorted(list(head_changes(model, input_ids, config))[:count]))
