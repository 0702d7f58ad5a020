"""`PackedWeight`: a weight held as codes plus scales in one of the `schemes`, and its reference dequantize.

Layouts (N outputs, K inputs):
- codes: uint8 [N, packed_row_bytes(bits, K)] (FP4 two per byte, FP6 four per three bytes); bf16: the bf16 weight.
- scales: fp32 [ceil(N / br), ceil(K / bc)] for fp32/UE8M0 schemes (for block FP8 this is DeepSeek's
  `weight_scale_inv`: dequantized = code value x scale); uint8 E8M0 codes [N, ceil(K / 32)] for MX; uint8 E4M3
  codes [N, ceil(K / 16)] for NVFP4, whose fp32 tensor scale sits in `tensor_scale`.
`dequantize()` is plain PyTorch and runs on any device; fused kernels live in `cumulo.formats.kernels`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cumulo.formats import codec, packing
from cumulo.formats.element import E4M3FN
from cumulo.formats.scales import e8m0_to_float
from cumulo.formats.schemes import Scheme, get_scheme


@dataclass
class PackedWeight:
    format: str
    codes: torch.Tensor
    scales: torch.Tensor | None
    shape: tuple[int, int]
    tensor_scale: torch.Tensor | None = None
    # Scale tile (rows, cols) when it differs from the scheme's: `concat_rows` of 128x128-block weights whose
    # row counts are not multiples of 128 keeps one scale row per weight row, (1, 128).
    block_override: tuple[int, int] | None = None

    @property
    def block(self) -> tuple[int, int]:
        return self.block_override or self.scheme.block

    @property
    def scheme(self) -> Scheme:
        return get_scheme(self.format)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        parts = [self.codes, self.scales, self.tensor_scale]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def to(self, device: torch.device | str) -> PackedWeight:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return PackedWeight(
            self.format,
            self.codes.to(device),
            move(self.scales),
            self.shape,
            move(self.tensor_scale),
            self.block_override,
        )

    def element_codes(self) -> torch.Tensor:
        """Unpacked uint8 codes [N, K], one per weight."""
        scheme = self.scheme
        assert scheme.element is not None
        return packing.unpack(self.codes, scheme.element.bits, self.shape[1])

    def block_scales(self) -> torch.Tensor:
        """fp32 scale per block, [ceil(N / br), ceil(K / bc)], whatever the stored scale type."""
        scheme = self.scheme
        assert self.scales is not None
        if scheme.scale.startswith("e8m0"):
            return e8m0_to_float(self.scales)
        if scheme.scale == "nvfp4":
            assert self.tensor_scale is not None
            return codec.decode(E4M3FN, self.scales) * self.tensor_scale.to(torch.float32)
        return self.scales.to(torch.float32)

    def _apply_scales(self, values: torch.Tensor) -> torch.Tensor:
        """values [N, K] times their block's scale, by broadcasting over a blocked view (no [N, K] scale grid)."""
        n, k = self.shape
        br, bc = self.block
        br, bc = br or n, bc or k
        s = self.block_scales()
        pad_n, pad_k = (-n) % br, (-k) % bc
        if pad_n or pad_k:
            values = F.pad(values, (0, pad_k, 0, pad_n))
        blocked = values.reshape(s.shape[0], br, s.shape[1], bc) * s[:, None, :, None]
        return blocked.reshape(values.shape)[:n, :k]

    def dequantize_rows(self, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight rows `rows` (int64 indices into N), [len(rows), K], without the full matrix:
        an output head refines its top logits this way. Only the gathered rows' codes and scales are decoded."""
        n, k = self.shape
        if self.scheme.element is None:
            return self.codes[rows].to(dtype)
        br, bc = self.block
        assert self.scales is not None
        picked = PackedWeight(
            self.format,
            self.codes[rows],
            self.scales[rows // (br or n)],  # each row's own scale row: block (1, bc) from here on
            (rows.numel(), k),
            self.tensor_scale,
            (1, bc),
        )
        return picked.dequantize(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scheme = self.scheme
        if scheme.element is None:
            return self.codes.to(dtype)
        values = codec.decode(scheme.element, self.element_codes())
        return self._apply_scales(values).to(dtype)


def concat_rows(parts: list[PackedWeight]) -> PackedWeight:
    """Stack weights along N (q, k, v -> qkv; gate, up -> gate_up) without requantizing: exact.

    Scales are stacked as they are when every part's row count fits the scale tile; otherwise float scales are
    expanded to one row of scales per weight row. NVFP4 parts must share their tensor scale.
    """
    from cumulo.errors import FormatError

    first = parts[0]
    k = first.shape[1]
    if any(p.format != first.format or p.shape[1] != k for p in parts):
        raise FormatError("concat_rows: parts differ in format or in K")
    n = sum(p.shape[0] for p in parts)
    codes = torch.cat([p.codes for p in parts])
    if first.scheme.element is None:
        return PackedWeight(first.format, codes, None, (n, k))
    if first.tensor_scale is not None and any(
        p.tensor_scale is None or not torch.equal(p.tensor_scale, first.tensor_scale) for p in parts
    ):
        raise FormatError("concat_rows: NVFP4 parts with different tensor scales cannot be joined exactly")
    br, bc = first.block
    aligned = (
        all(p.block == first.block for p in parts) and br != 0 and all(p.shape[0] % br == 0 for p in parts)
    )
    if br == 1 or aligned:
        scales = torch.cat([p.scales for p in parts if p.scales is not None])
        return PackedWeight(first.format, codes, scales, (n, k), first.tensor_scale, first.block_override)
    if first.scheme.scale.startswith("e8m0") or first.scheme.scale == "nvfp4":
        raise FormatError(f"concat_rows: cannot join {first.format} parts with these row counts")
    rows = []
    for p in parts:
        pbr, pbc = p.block
        if (pbc or k) != (bc or k):
            raise FormatError("concat_rows: parts differ in scale block width")
        assert p.scales is not None
        rows.append(p.scales.to(torch.float32).repeat_interleave(pbr or p.shape[0], dim=0)[: p.shape[0]])
    return PackedWeight(first.format, codes, torch.cat(rows), (n, k), None, (1, bc))
