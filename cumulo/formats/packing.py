"""Bit-packing of sub-byte codes so that bytes per weight are real: FP4 two per byte, FP6 four per three bytes.

FP4: element 2i in the low nibble of byte i, element 2i+1 in the high nibble (the layout of NVIDIA's and
PyTorch's `float4_e2m1fn_x2` and of OCP MX implementations). FP6: each group of four codes is a 24-bit
little-endian word, element j of the group in bits [6j, 6j + 6). Rows are packed independently; a row whose
length the group does not divide is padded with zero codes, so the packed row is ceil(K / 2) or
3 * ceil(K / 4) bytes and `unpack` takes the true length back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cumulo.errors import FormatError


def packed_row_bytes(bits: int, k: int) -> int:
    if bits == 8:
        return k
    if bits == 4:
        return (k + 1) // 2
    if bits == 6:
        return 3 * ((k + 3) // 4)
    raise FormatError(f"no packing for {bits}-bit codes")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., K] (one code per byte) -> packed uint8 [..., packed_row_bytes(bits, K)]."""
    if bits == 8:
        return codes.to(torch.uint8)
    c = codes.to(torch.uint8)
    k = c.shape[-1]
    group = 2 if bits == 4 else 4
    pad = (-k) % group
    if pad:
        c = F.pad(c, (0, pad))
    if bits == 4:
        pairs = c.reshape(*c.shape[:-1], -1, 2)
        return (pairs[..., 0] & 0xF) | ((pairs[..., 1] & 0xF) << 4)
    quads = c.reshape(*c.shape[:-1], -1, 4).to(torch.int32) & 0x3F
    word = quads[..., 0] | (quads[..., 1] << 6) | (quads[..., 2] << 12) | (quads[..., 3] << 18)
    out = torch.stack([word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF], dim=-1)
    return out.reshape(*c.shape[:-1], -1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of `pack`: packed uint8 [..., bytes] -> uint8 codes [..., k]."""
    if bits == 8:
        return packed[..., :k]
    p = packed.to(torch.uint8)
    if bits == 4:
        out = torch.stack([p & 0xF, p >> 4], dim=-1).reshape(*p.shape[:-1], -1)
        return out[..., :k]
    if bits != 6:
        raise FormatError(f"no packing for {bits}-bit codes")
    b = p.reshape(*p.shape[:-1], -1, 3).to(torch.int32)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    out = torch.stack([(word >> s) & 0x3F for s in (0, 6, 12, 18)], dim=-1)
    return out.reshape(*p.shape[:-1], -1)[..., :k].to(torch.uint8)
