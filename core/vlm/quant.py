"""Group-wise asymmetric integer quantization with real bit-packing into uint8.

Codes of 2 or 4 bits are packed four or two to a byte, so what the SAQ cache saves is real memory.
"""

from dataclasses import dataclass

import torch

PACKABLE_BITS = (2, 4, 8)
# Scale and low of each group; float16 keeps the per-group overhead at 32 bits.
META_DTYPE = torch.float16


@dataclass
class QuantizedGroups:
    """A tensor cut into groups of `group_size` along `dim`, each stored as codes, scale and low.

    Layout: the grouped dim becomes (n_groups, group_size) and the group members move last, so
    `packed` is `[*shape[:dim], n_groups, *shape[dim+1:], group_size * bits // 8]` and `scale` and
    `low` are the same without the last dim. Dims before `dim` keep their index, which lets
    `cat_groups` append along them (the SAQ cache appends tokens along dim 2).
    """

    packed: torch.Tensor
    scale: torch.Tensor
    low: torch.Tensor
    bits: int
    dim: int
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in (self.packed, self.scale, self.low))


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes below 2**bits along the last dim, 8 // bits to a byte (zero padded)."""
    if bits not in PACKABLE_BITS:
        raise ValueError(f"can pack 2, 4 or 8 bits, not {bits}")
    per_byte = 8 // bits
    codes = codes.to(torch.uint8)
    padding = -codes.shape[-1] % per_byte
    if padding:
        codes = torch.nn.functional.pad(codes, (0, padding))
    codes = codes.unflatten(-1, (-1, per_byte))
    packed = codes[..., 0].clone()
    for i in range(1, per_byte):
        packed |= codes[..., i] << (i * bits)
    return packed


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first `n` uint8 codes of each row of `packed` (the inverse of `pack`)."""
    if bits not in PACKABLE_BITS:
        raise ValueError(f"can unpack 2, 4 or 8 bits, not {bits}")
    if bits == 8:
        return packed[..., :n]
    # One scalar shift per code in a byte: contiguous ops, far faster than a broadcast shift.
    low = 2**bits - 1
    codes = [packed & low] + [(packed >> shift) & low for shift in range(bits, 8, bits)]
    return torch.stack(codes, -1).flatten(-2)[..., :n]


def quantize_groups(x: torch.Tensor, bits: int, group_size: int, dim: int) -> QuantizedGroups:
    """Min/max asymmetric quantization of `x` in groups of `group_size` consecutive items on `dim`.

    Each element is off by at most half its group's scale, (max - min) / (2**bits - 1), because
    low is rounded down and the scale up when they are stored as float16.
    """
    dim = dim % x.dim()
    if x.shape[dim] % group_size:
        raise ValueError(f"dim {dim} of length {x.shape[dim]} is not a multiple of {group_size}")
    levels = 2**bits - 1
    grouped = x.float().unflatten(dim, (-1, group_size)).movedim(dim + 1, -1)
    low = _round_meta(grouped.amin(-1), toward=-torch.inf)
    scale = _round_meta((grouped.amax(-1) - low.float()) / levels, toward=torch.inf)
    # A constant group has no range; any positive scale codes it exactly as its low.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = ((grouped - low.float().unsqueeze(-1)) / scale.float().unsqueeze(-1)).round_()
    codes = codes.clamp_(0, levels).to(torch.uint8)
    return QuantizedGroups(pack(codes, bits), scale, low, bits, dim, tuple(x.shape))


def dequantize_groups(q: QuantizedGroups, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor `q` stands for, in `dtype`."""
    group_size = q.shape[q.dim] // q.scale.shape[q.dim]
    codes = unpack(q.packed, q.bits, group_size)
    grouped = codes.to(torch.float32) * q.scale.float().unsqueeze(-1) + q.low.float().unsqueeze(-1)
    return grouped.movedim(-1, q.dim + 1).flatten(q.dim, q.dim + 1).to(dtype)


def cat_groups(parts: list[QuantizedGroups], dim: int) -> QuantizedGroups:
    """Concatenate same-bit quantized tensors along `dim`, which must not come after the groups'."""
    first = parts[0]
    if any(p.bits != first.bits or p.dim != first.dim for p in parts) or dim > first.dim:
        raise ValueError("can only concatenate same-bit groups along a dim before the grouped one")
    shape = list(first.shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    return QuantizedGroups(
        torch.cat([p.packed for p in parts], dim),
        torch.cat([p.scale for p in parts], dim),
        torch.cat([p.low for p in parts], dim),
        first.bits,
        first.dim,
        tuple(shape),
    )


def _round_meta(x: torch.Tensor, toward: float) -> torch.Tensor:
    """`x` as META_DTYPE, moved one step toward `toward` wherever the cast went the other way."""
    stored = x.to(META_DTYPE)
    wrong_side = (stored.float() > x) if toward < 0 else (stored.float() < x)
    target = torch.full_like(stored, toward)
    return torch.where(wrong_side, torch.nextafter(stored, target), stored)


def slice_tokens(q: QuantizedGroups, start: int, stop: int, dim: int = 2) -> QuantizedGroups:
    """Items [start, stop) of dim `dim` of the tensor `q` stands for, still quantized (views).

    Grouped along that dim, the bounds must fall on group edges; grouped along a later dim,
    any bounds do.
    """
    shape = list(q.shape)
    shape[dim] = stop - start
    if q.dim == dim:
        size = q.shape[dim] // q.scale.shape[dim]
        if start % size or (stop % size and stop != q.shape[dim]):
            raise ValueError(f"token bounds {start}:{stop} cut groups of {size}")
        start, stop = start // size, -(-stop // size)
    elif q.dim < dim:
        raise ValueError("can only slice a dim before or at the grouped one")
    index = (slice(None),) * dim + (slice(start, stop),)
    return QuantizedGroups(
        q.packed[index], q.scale[index], q.low[index], q.bits, q.dim, tuple(shape)
    )
