"""SAQ: a transformers KV cache that keeps fewer bits for older tokens (staircase quantization).

The newest tokens stay exact in a residual buffer; each time it holds S tokens they become the
first stair at the highest quantized precision and every stair steps one tier down (8 -> 4 -> 2).
Inside `staircase_attention(model, cache)`, decode steps attend to the stairs where they are
stored, segment by segment, merged by log-sum-exp: no step rebuilds the cache in position order.
"""

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from core.vlm.attention import language_attention, reads_staircase, set_language_attention
from core.vlm.config import SAQConfig
from core.vlm.quant import (
    QuantizedGroups,
    cat_groups,
    dequantize_groups,
    quantize_groups,
    slice_tokens,
    unpack,
)

TOKEN_DIM = 2  # keys and values are [batch, heads, tokens, head_dim]

Stored = torch.Tensor | QuantizedGroups


@dataclass
class Stair:
    """Keys and values of consecutive unprotected tokens, at one bit width (above 8: exact)."""

    keys: Stored
    values: Stored
    bits: int

    @property
    def length(self) -> int:
        return self.keys.shape[TOKEN_DIM]

    def tensors(self) -> list[torch.Tensor]:
        return [t for s in (self.keys, self.values) for t in _tensors(s)]


class StaircaseLayer(DynamicLayer):
    """One attention layer's cache: exact protected tokens, quantized stairs, an exact residual.

    Protected tokens (the first `sinks` and any `protected_spans`, in absolute positions) are kept
    exact and out of the quantization groups, so an outlier such as BOS does not widen a group.
    """

    is_croppable = False
    # Set by `staircase_attention`: decode steps are attended by `attend`, not from `update`'s
    # return value (then only the newest tokens).
    reads_in_place = False

    def __init__(self, saq: SAQConfig, protected_spans: list[tuple[int, int]] | None = None):
        super().__init__()
        self.saq = saq
        self.protected_spans = list(protected_spans or [])
        self.seen = 0
        self.stairs: list[Stair | None] = [None] * len(saq.bits)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        empty_keys = key_states[..., :0, :].clone()
        empty_values = value_states[..., :0, :].clone()
        self.exact_keys, self.exact_values = empty_keys, empty_values
        self.exact_positions: list[int] = []
        self.residual_keys, self.residual_values = empty_keys.clone(), empty_values.clone()
        # Values are grouped along channels: the largest divisor of head_dim not above G.
        self.value_group = math.gcd(self.saq.group_size, value_states.shape[-1])
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        in_place = self.reads_in_place and key_states.shape[TOKEN_DIM] == 1
        if in_place:
            self._flush()  # what the last step left in the residual; this step stays exact
        positions = torch.arange(self.seen, self.seen + key_states.shape[TOKEN_DIM])
        is_protected = self._is_protected(positions)
        if is_protected.any():
            self.exact_positions += positions[is_protected].tolist()
            mask = is_protected.to(key_states.device)
            self.exact_keys = torch.cat([self.exact_keys, key_states[:, :, mask]], TOKEN_DIM)
            self.exact_values = torch.cat([self.exact_values, value_states[:, :, mask]], TOKEN_DIM)
            key_states, value_states = key_states[:, :, ~mask], value_states[:, :, ~mask]
        self.residual_keys = torch.cat([self.residual_keys, key_states], TOKEN_DIM)
        self.residual_values = torch.cat([self.residual_values, value_states], TOKEN_DIM)
        self.seen += len(positions)
        if in_place:
            return self.residual_keys, self.residual_values
        # Attention sees this step's tokens exactly; quantization happens after, for later steps.
        keys, values = self._assemble()
        self._flush()
        return keys, values

    def get_seq_length(self) -> int:
        return self.seen

    def stair_lengths(self) -> list[int]:
        return [0 if stair is None else stair.length for stair in self.stairs]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer holds."""
        if not self.is_initialized:
            return []
        held = [self.exact_keys, self.exact_values, self.residual_keys, self.residual_values]
        return held + [t for stair in self.stairs if stair is not None for t in stair.tensors()]

    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self.tensors())

    def elements(self) -> int:
        """How many key and value numbers this layer stands for."""
        if not self.is_initialized:
            return 0
        batch, heads, _, head_dim = self.exact_keys.shape
        return batch * heads * self.seen * (head_dim + self.exact_values.shape[-1])

    def reset(self) -> None:
        self.seen = 0
        self.stairs = [None] * len(self.saq.bits)
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("a staircase cache cannot drop tokens once quantized")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device)])

    def _is_protected(self, positions: torch.Tensor) -> torch.Tensor:
        protected = positions < self.saq.sinks
        for start, end in self.protected_spans:
            protected |= (positions >= start) & (positions < end)
        return protected

    def _assemble(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All keys and values so far, exact or dequantized, in position order."""
        stream = [s for s in reversed(self.stairs) if s is not None]  # oldest stair first
        keys = [self.exact_keys, *(self._expand(s.keys) for s in stream), self.residual_keys]
        values = [
            self.exact_values,
            *(self._expand(s.values) for s in stream),
            self.residual_values,
        ]
        keys, values = torch.cat(keys, TOKEN_DIM), torch.cat(values, TOKEN_DIM)
        n_exact = len(self.exact_positions)
        if n_exact == 0 or self.exact_positions[-1] == n_exact - 1:
            return keys, values  # protected tokens are a prefix: already in position order
        is_streamed = torch.ones(self.seen, dtype=torch.bool)
        is_streamed[self.exact_positions] = False
        order = torch.cat([torch.tensor(self.exact_positions), is_streamed.nonzero().squeeze(1)])
        order = order.to(keys.device)
        return (
            torch.empty_like(keys).index_copy_(TOKEN_DIM, order, keys),
            torch.empty_like(values).index_copy_(TOKEN_DIM, order, values),
        )

    def segments(self) -> Iterator[tuple[Stored, Stored, int]]:
        """(keys, values, bits) of each part of the cache: the exact tokens, each stair (oldest
        first), the residual. Not in position order; `segment_positions` says where each is."""
        yield self.exact_keys, self.exact_values, 16
        for stair in reversed(self.stairs):
            if stair is not None:
                yield stair.keys, stair.values, stair.bits
        yield self.residual_keys, self.residual_values, 16

    def segment_positions(self) -> torch.Tensor:
        """The cache position of every token in `segments` order."""
        exact = torch.tensor(self.exact_positions, dtype=torch.long)
        streamed = torch.ones(self.seen, dtype=torch.bool)
        streamed[exact] = False
        return torch.cat([exact, streamed.nonzero().flatten()])

    def attend(
        self, query: torch.Tensor, attention_mask: torch.Tensor | None = None, scale=None
    ) -> torch.Tensor:
        """Attention of query (b, q_heads, 1, d) over everything cached: (b, q_heads, 1, d).

        Segment by segment, each quantized stair `saq.attend_chunk` tokens at a time, the
        parts merged by an online softmax in float32. As KIVI does, the products are taken on
        the codes: q.K as (q * scale) . codes + q . low per key group, p.V as (p * scale) .
        codes + p . low per value group, so no dequantized key or value is ever formed; the
        working buffer is one chunk's codes. Equals SDPA over `_assemble()` up to rounding.
        `attention_mask` is transformers' (b, 1, 1, kv_len) over cache positions (bool, or
        additive float)."""
        batch, q_heads, _, dim = query.shape
        kv_heads = self.exact_keys.shape[1]
        scale = scale if scale is not None else dim**-0.5
        # Products in the query's dtype on a GPU (half the bytes of float32, its tensor cores
        # accumulate in float32 anyway), float32 on a CPU; the softmax state is float32.
        work = query.dtype if query.device.type == "cuda" else torch.float32
        q = (query.reshape(batch, kv_heads, q_heads // kv_heads, dim).float() * scale).to(work)
        bias = None
        if attention_mask is not None:
            mask = attention_mask[:, 0, -1, : self.seen]
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, -math.inf)
            bias = mask.float().index_select(1, self.segment_positions().to(q.device))
        best = q.new_full(q.shape[:-1], -math.inf)
        total = q.new_zeros(q.shape[:-1])
        acc = q.new_zeros(*q.shape[:-1], self.exact_values.shape[-1])
        group = self.saq.group_size
        chunk, offset = max(group, self.saq.attend_chunk // group * group), 0
        for keys, values, _ in self.segments():
            length = keys.shape[TOKEN_DIM]
            step = max(1, length) if isinstance(keys, torch.Tensor) else chunk
            for start in range(0, length, step):
                stop = min(length, start + step)
                k, v = _tokens(keys, start, stop), _tokens(values, start, stop)
                scores = _scores(q, k).float()  # (b, kv heads, group, chunk)
                if bias is not None:
                    scores = scores + bias[:, None, None, offset + start : offset + stop]
                new_best = torch.maximum(best, scores.amax(-1))
                shift = torch.where(new_best.isinf(), 0.0, new_best)
                weights = torch.exp(scores - shift[..., None])
                rescale = torch.exp(best - shift)
                total = total * rescale + weights.sum(-1)
                coded = _weighted_values(weights.to(work), v).float()
                acc = acc * rescale[..., None] + coded
                best = new_best
            offset += length
        out = acc / total.clamp(min=1e-30)[..., None]
        return out.reshape(batch, q_heads, 1, -1).to(query.dtype)

    def _flush(self) -> None:
        """Move every whole S tokens of the residual onto the staircase, in one step.

        Pushing k chunks at once gives the layout k single pushes would, but quantizes each new
        chunk straight to the bits of the stair it lands on.
        """
        size, bits = self.saq.residual, self.saq.bits
        k = self.residual_keys.shape[TOKEN_DIM] // size
        if k == 0:
            return
        fresh_keys = self.residual_keys[:, :, : k * size]
        fresh_values = self.residual_values[:, :, : k * size]
        self.residual_keys = self.residual_keys[:, :, k * size :].clone()
        self.residual_values = self.residual_values[:, :, k * size :].clone()

        def fresh(first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
            span = slice(first * size, last * size)  # chunks [first, last), oldest is chunk 0
            return fresh_keys[:, :, span], fresh_values[:, :, span]

        bounded = len(bits) - 1
        old = self.stairs
        new: list[Stair | None] = [None] * len(bits)
        for i in range(bounded):
            if i < k:
                new[i] = self._squeeze(*fresh(k - 1 - i, k - i), bits[i])
            elif old[i - k] is not None:
                new[i] = self._requantize(old[i - k], bits[i])
        # Everything older than the bounded stairs joins the last one, oldest first.
        spill = [old[-1]] + [
            self._requantize(old[j], bits[-1])
            for j in reversed(range(max(0, bounded - k), bounded))
            if old[j] is not None
        ]
        if k > bounded:
            spill.append(self._squeeze(*fresh(0, k - bounded), bits[-1]))
        new[-1] = _cat_stairs([s for s in spill if s is not None])
        self.stairs = new

    def _squeeze(self, keys: torch.Tensor, values: torch.Tensor, bits: int) -> Stair:
        if bits > 8:
            return Stair(keys.clone(), values.clone(), bits)
        # Keys per channel over G tokens and values per token over G channels, as KIVI does.
        return Stair(
            quantize_groups(keys, bits, self.saq.group_size, dim=TOKEN_DIM),
            quantize_groups(values, bits, self.value_group, dim=-1),
            bits,
        )

    def _requantize(self, stair: Stair, bits: int) -> Stair:
        if stair.bits == bits:
            return stair
        return self._squeeze(self._expand(stair.keys), self._expand(stair.values), bits)

    def _expand(self, stored: Stored) -> torch.Tensor:
        if isinstance(stored, QuantizedGroups):
            return dequantize_groups(stored, self.dtype)
        return stored

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.exact_keys, self.exact_values = fn(self.exact_keys), fn(self.exact_values)
        self.residual_keys, self.residual_values = fn(self.residual_keys), fn(self.residual_values)
        self.stairs = [
            None if s is None else Stair(_map_stored(s.keys, fn), _map_stored(s.values, fn), s.bits)
            for s in self.stairs
        ]


class StaircaseCache(Cache):
    """A transformers `Cache` whose full-attention layers are `StaircaseLayer`s.

    `config` is a model config; a VLM's text config is used. Sliding-window and other special
    layers keep the layer `DynamicCache` would give them.
    """

    def __init__(
        self,
        config,
        saq: SAQConfig | None = None,
        protected_spans: list[tuple[int, int]] | None = None,
    ):
        saq = saq or SAQConfig()
        text_config = config.get_text_config(decoder=True)
        layers = [
            StaircaseLayer(saq, protected_spans) if type(layer) is DynamicLayer else layer
            for layer in DynamicCache(config=text_config).layers
        ]
        super().__init__(layers=layers)
        self.saq = saq

    @classmethod
    def compress(
        cls, cache: DynamicCache, config, saq: SAQConfig | None = None
    ) -> "StaircaseCache":
        """The staircase form of a filled DynamicCache: the KV of a conversation kept between
        turns in fewer bytes (its newest tokens stay exact, older ones lose bits)."""
        stairs = cls(config, saq)
        for layer, source in zip(stairs.layers, cache.layers, strict=True):
            if source.is_initialized:
                layer.update(source.keys, source.values)
        return stairs

    def expand(self, config) -> DynamicCache:
        """A DynamicCache holding this cache's keys and values, dequantized, in position order:
        what a new turn continues from at full speed."""
        cache = DynamicCache(config=config.get_text_config(decoder=True))
        for index, layer in enumerate(self.layers):
            if isinstance(layer, StaircaseLayer) and layer.is_initialized:
                cache.update(*layer._assemble(), index)
            elif layer.is_initialized:
                cache.update(layer.keys, layer.values, index)
        return cache

    def nbytes(self) -> int:
        """Bytes of every key and value tensor the cache holds, quantization metadata included."""
        return sum(_layer_nbytes(layer) for layer in self.layers)

    def bits_per_element(self) -> float:
        """Stored bits per cached key or value number, over all layers."""
        elements = sum(_layer_elements(layer) for layer in self.layers)
        return 8 * self.nbytes() / elements if elements else 0.0


def _tokens(stored: Stored, start: int, stop: int) -> Stored:
    if isinstance(stored, QuantizedGroups):
        return slice_tokens(stored, start, stop, TOKEN_DIM)
    return stored[:, :, start:stop]


def _scores(q: torch.Tensor, keys: Stored) -> torch.Tensor:
    """q (b, h, g, d) against keys (b, h, n, d), in q's dtype: (b, h, g, n)."""
    if not isinstance(keys, QuantizedGroups):
        return q @ keys.to(q.dtype).transpose(-1, -2)
    # Keys are grouped over G tokens per channel: packed (b, h, n / G, d, G * bits / 8).
    batch, heads, n_groups, _ = keys.scale.shape
    size = keys.shape[TOKEN_DIM] // n_groups
    codes = unpack(keys.packed, keys.bits, size).to(q.dtype)  # (b, h, n / G, d, G)
    scale, low = (t[:, :, :, None].to(q.dtype) for t in (keys.scale, keys.low))
    grouped = q[:, :, None]  # (b, h, 1, g, d)
    scores = (grouped * scale) @ codes + (grouped * low).sum(-1, keepdim=True)
    return scores.transpose(2, 3).reshape(batch, heads, q.shape[2], -1)


def _weighted_values(weights: torch.Tensor, values: Stored) -> torch.Tensor:
    """weights (b, h, g, n) times values (b, h, n, d), in the weights' dtype: (b, h, g, d).

    Quantized values are grouped over channels per token, so one chunk dequantizes in place
    in its own layout (codes * scale + low, one fused op) and meets the weights in one matmul.
    """
    if not isinstance(values, QuantizedGroups):
        return weights @ values.to(weights.dtype)
    # packed (b, h, n, d / Gv, Gv * bits / 8)
    size = values.shape[-1] // values.scale.shape[-1]
    codes = unpack(values.packed, values.bits, size)
    scale, low = (t[..., None].to(weights.dtype) for t in (values.scale, values.low))
    return weights @ torch.addcmul(low, codes, scale).flatten(-2)


STAIRCASE_ATTENTION = "staircase"


def _staircase_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
    """SDPA, except decode steps of an attached staircase layer, which attend in place."""
    stored = getattr(module, "staircase", None)
    if stored is not None and stored.reads_in_place and query.shape[2] == 1:
        return stored.attend(query, attention_mask, scaling).transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kw)


@contextmanager
def staircase_attention(model: torch.nn.Module, cache: "StaircaseCache") -> Iterator[None]:
    """Within the block, `model`'s decode steps attend to `cache`'s stairs where they are
    stored (`StaircaseLayer.attend`) instead of a dequantized copy of the whole cache.

    The language model keeps its attention if it reads staircases (PrFlashAttention does);
    otherwise it runs SDPA that does, for the length of the block.
    """
    text_config = model.config.get_text_config()
    previous = text_config._attn_implementation or "sdpa"
    if not reads_staircase(previous):
        AttentionInterface.register(STAIRCASE_ATTENTION, _staircase_sdpa)
        AttentionMaskInterface.register(STAIRCASE_ATTENTION, sdpa_mask)
        set_language_attention(model, STAIRCASE_ATTENTION)
    attached = []
    for module in language_attention(model):
        index = getattr(module, "layer_idx", None)
        layer = cache.layers[index] if index is not None and index < len(cache.layers) else None
        if isinstance(layer, StaircaseLayer):
            module.staircase, layer.reads_in_place = layer, True
            attached.append(module)
    try:
        yield
    finally:
        for module in attached:
            module.staircase.reads_in_place = False
            del module.staircase
        if not reads_staircase(previous):
            set_language_attention(model, previous)


def image_token_spans(input_ids: torch.Tensor, image_token_id: int) -> list[tuple[int, int]]:
    """[start, end) positions of each run of image placeholder tokens in the first prompt row."""
    is_image = torch.nn.functional.pad((input_ids[0].cpu() == image_token_id).int(), (1, 1))
    edges = is_image.diff().nonzero().squeeze(1).tolist()
    return list(zip(edges[::2], edges[1::2], strict=True))


def _cat_stairs(stairs: list[Stair]) -> Stair | None:
    if not stairs:
        return None
    if len(stairs) == 1:
        return stairs[0]
    if isinstance(stairs[0].keys, QuantizedGroups):
        keys = cat_groups([s.keys for s in stairs], TOKEN_DIM)
        values = cat_groups([s.values for s in stairs], TOKEN_DIM)
    else:
        keys = torch.cat([s.keys for s in stairs], TOKEN_DIM)
        values = torch.cat([s.values for s in stairs], TOKEN_DIM)
    return Stair(keys, values, stairs[0].bits)


def _tensors(stored: Stored) -> list[torch.Tensor]:
    if isinstance(stored, QuantizedGroups):
        return [stored.packed, stored.scale, stored.low]
    return [stored]


def _map_stored(stored: Stored, fn) -> Stored:
    if not isinstance(stored, QuantizedGroups):
        return fn(stored)
    packed = fn(stored.packed)
    shape = (packed.shape[0], *stored.shape[1:])
    return QuantizedGroups(packed, fn(stored.scale), fn(stored.low), stored.bits, stored.dim, shape)


def _layer_nbytes(layer) -> int:
    if isinstance(layer, StaircaseLayer):
        return layer.nbytes()
    held = [t for t in (layer.keys, layer.values) if t is not None]
    return sum(t.untyped_storage().nbytes() for t in held)


def _layer_elements(layer) -> int:
    if isinstance(layer, StaircaseLayer):
        return layer.elements()
    return sum(t.numel() for t in (layer.keys, layer.values) if t is not None)
