"""1x1 convolutions of the vision model in Cumulo's formats, and the swap that puts them in (`quantize_vision_net`).

int8 / mxint8: int8 weights times int8 activations, summed in int32.

Why not `PackedLinear` with pixels as rows: a 1x1 conv over a 112x112 map is a matmul of 12,544 rows, far past
the fused kernels' batch-1 sweet spot (`FUSED_MAX_ROWS`), so they dequantize the weight and call the same fp32
GEMM as the fp32 model; a weight-only format then costs time instead of saving it. What a CPU does faster in
8 bits is the multiply itself: `torch._int_mm` (oneDNN's s8 x s8 -> s32 GEMM) runs these shapes 4-8x faster than
fp32 sgemm on AVX2. So both operands are 8-bit: the weight per output channel (int8, symmetric, amax / 127) and
the activation per pixel, quantized on the fly (int8, amax / 127 of each row; a ReLU6 output, which is >= 0, as
u8 [0, 255] at the fixed step 6/255), and y = acc * s_pixel * s_channel + bias.

On a CPU with AVX512-VNNI, where Cumulo's int8 GEMM kernel builds (`cumulo.platform.kernels.int8_gemm`), each
1x1 conv is that one kernel: the activation quantize in its prologue, the dequantize, bias, the residual add
and the ReLU6 that follow in its epilogue (`Int8InvertedResidual` hands it the block's input and the depthwise's
unclamped output), with the same int8 codes and int32 sums as the torch path, which stays as the fallback.

`mxint8` weights are quantized with Cumulo's MXINT8 codec first (block 32 along K, E8M0 scales: what the
package holds and the fleet ships) and the int8 GEMM runs on that weight re-expressed per output channel, a
second rounding that the agreement test covers; `int8` quantizes the fp32 weight per channel directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cumulo.edge.vision import same_padding
from cumulo.errors import FormatError
from cumulo.formats import get_scheme, quantize
from cumulo.formats.linear import PackedLinear
from cumulo.platform.kernels import int8_gemm

INT8_MAX = 127.0
RELU6_MAX = 255.0  # relu6 inputs: u8 codes [0, 255] (ReLU6 outputs are >= 0, so the sign bit is a level too)
RELU6_STEP = 6.0 / RELU6_MAX  # their fixed step


def per_channel_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (int8 codes [N, K], fp32 scales [N]), symmetric, one scale per output channel."""
    amax = weight.abs().amax(1).clamp_min(1e-12)
    scale = (amax / INT8_MAX).float()
    codes = (weight / scale[:, None]).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


def corrected_bias(
    bias: torch.Tensor, rounded: torch.Tensor, weight: torch.Tensor, input_mean: torch.Tensor | None
) -> torch.Tensor:
    """bias - (rounded - weight) @ E[x]: the mean output shift the weight's rounding causes, taken off (bias
    correction; `cumulo.edge.vision.input_means` says why it matters for this net). No mean: the bias as is."""
    if input_mean is None or input_mean.numel() == 0:
        return bias
    return bias - (rounded.float() - weight.float()) @ input_mean.float()


def int8_weight(weight: torch.Tensor, format: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 codes and channel scales the GEMM uses for `weight` [N, K] held in `format`."""
    if format == "int8":
        return per_channel_int8(weight.float())
    if format == "mxint8":
        return per_channel_int8(quantize(weight.float(), "mxint8", name=name).dequantize(torch.float32))
    raise FormatError(f"{name}: the int8 GEMM takes int8 or mxint8 weights, not {format!r}")


class Int8Pointwise(nn.Module):
    """A 1x1 conv (or a linear layer: one pixel) as an int8 x int8 GEMM over pixels.

    Takes NCHW activations, fastest in channels_last memory (the rows [pixels, channels] are then a view);
    answers in channels_last. `relu6_input`: the inputs are quantized as relu6(x), u8 codes [0, 255] at the fixed
    step 6/255 (so the ReLU6 before the conv may be left to it); `relu6_output`: the ReLU6 after the conv is
    applied here; `forward(x, residual)` adds a residual (NCHW, the output's shape) before that."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        format: str,
        name: str,
        relu6_input: bool = False,
        input_mean: torch.Tensor | None = None,
        relu6_output: bool = False,
    ) -> None:
        super().__init__()
        self.format = format
        self.relu6_input = relu6_input  # inputs are ReLU6 outputs (or their mean): known range [0, 6]
        self.relu6_output = relu6_output
        self.out_channels, self.in_channels = weight.shape[0], weight.shape[1]
        codes, scale = int8_weight(weight.detach().flatten(1), format, name)
        self.register_buffer("codes", codes)  # [N, K]; the GEMM reads its transpose [K, N] as a view
        self.register_buffer("scale", scale)
        bias = bias.detach().float().clone() if bias is not None else torch.zeros(self.out_channels)
        rounded = codes.float() * scale[:, None]  # [N, K], the weight the GEMM multiplies by
        self.register_buffer("bias", corrected_bias(bias, rounded, weight.detach().flatten(1), input_mean))
        self._native: tuple[tuple[int, int, int, bool, int], int8_gemm.Int8Gemm | None] | None = None

    def native(self) -> int8_gemm.Int8Gemm | None:
        """The native kernel bound to this layer's codes, scale and bias (None where it cannot run here), bound
        again whenever one of them is another tensor or the codes changed in place (inference tensors keep no
        version: swap them, or call `rebind`). The scale and bias are read where they are on every call."""
        codes, scale, bias = self.codes, self.scale, self.bias
        version = -1 if codes.is_inference() else codes._version
        key = (id(codes), id(scale), id(bias), self.relu6_output, version)
        bound = self._native
        if bound is None or bound[0] != key:  # the bound gemm holds the tensors, so their ids stay theirs
            gemm = int8_gemm.bind(
                codes, scale, bias, relu6_input=self.relu6_input, relu6_output=self.relu6_output
            )
            self._native = bound = (key, gemm)
        return bound[1]

    def packed(self) -> int8_gemm.PackedInt8:
        """`codes` in the native kernel's layout (tests)."""
        native = self.native()
        return native.packed if native is not None else int8_gemm.pack(self.codes)

    def rebind(self) -> None:
        """Forget the bound kernel (after changing inference-mode `codes` in place)."""
        self._native = None

    def quantize(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[M, K] float -> (codes [M, K], the per-row step [M, 1]): int8 codes at a per-row step, or for relu6
        inputs uint8 codes [0, 255] and None for the fixed step 6/255."""
        if self.relu6_input:
            return self._relu6_levels(x2).to(torch.uint8), None
        low, high = torch.aminmax(x2, dim=1, keepdim=True)  # [M, 1] each: one pass for the per-pixel range
        sx = torch.maximum(high, -low).clamp_min_(1e-12).div_(INT8_MAX)  # [M, 1] per-pixel scale
        return torch.div(x2, sx).round_().to(torch.int8), sx  # [M, K]

    @staticmethod
    def _relu6_levels(x2: torch.Tensor) -> torch.Tensor:
        """relu6(x) in [0, 6] as its codes [0, 255] (float): one fixed step, no pass to find it."""
        return torch.mul(x2, RELU6_MAX / 6.0).round_().clamp_(0.0, RELU6_MAX)

    def matmul(self, x2: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """[M, K] float (+ [M, N] residual) -> [M, N] float: the native kernel where it runs, else torch."""
        native = self.native()
        y = native(x2, residual) if native is not None else None
        if y is not None:
            return y
        acc, sx = self.sums(x2)  # [M, N] int32
        if sx is None:
            y = torch.addcmul(self.bias, acc.float(), self.scale * RELU6_STEP)
        else:
            y = torch.addcmul(self.bias, acc.float().mul_(sx), self.scale)  # [M, N]
        if residual is not None:
            y += residual
        return y.clamp_(0.0, 6.0) if self.relu6_output else y

    def sums(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[M, K] float -> (the int32 sums [M, N] of its codes times the weight's, the step as `quantize` gives
        it): the torch path's GEMM, the sums the native kernel forms too."""
        if self.relu6_input:  # _int_mm is s8 x s8: send code - 128, add 128 x each channel's code sum (exact)
            q = self._relu6_levels(x2).sub_(128.0).to(torch.int8)
            return self._int_mm(q).add_(self.codes.sum(1, dtype=torch.int32).mul_(128)), None
        q, sx = self.quantize(x2)
        return self._int_mm(q), sx

    def _int_mm(self, q: torch.Tensor) -> torch.Tensor:
        """[M, K] int8 x [K, N] int8 -> [M, N] int32 (oneDNN takes more than 16 rows; fewer go exact in int32)."""
        return torch._int_mm(q, self.codes.t()) if q.shape[0] > 16 else q.int() @ self.codes.t().int()

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
        pad: tuple[int, int, int, int] | None = None,
    ) -> torch.Tensor:
        """`pad` (left, right, top, bottom): the output zero-padded as F.pad would (the next conv's padding)."""
        if x.dim() == 2:  # a linear layer
            return self.matmul(x, residual)
        native = self.native()  # pixels in channels_last straight to the kernel: no views made per call
        y = native(x, residual, pad) if native is not None else None
        if y is not None:
            return y
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # [n*h*w, cin], a view in channels_last
        if residual is not None:  # [n, cout, h, w] -> [n*h*w, cout], a view in channels_last
            residual = residual.permute(0, 2, 3, 1).reshape(n * h * w, self.out_channels)
        y = self.matmul(rows, residual)  # [n*h*w, cout]
        y = y.view(n, h, w, self.out_channels).permute(0, 3, 1, 2)  # [n, cout, h, w], channels_last
        return F.pad(y, pad) if pad is not None else y

    def extra_repr(self) -> str:
        return f"in={self.in_channels}, out={self.out_channels}, format={self.format}"


class Int8InvertedResidual(nn.Module):
    """An MBConv block (cumulo.edge.vision) whose 1x1 convs are `Int8Pointwise`, with its elementwise work moved
    into them: the expand conv applies the ReLU6 after it, the project conv quantizes relu6 of the depthwise's
    output (so that ReLU6 is no pass of its own) and adds the skip. Same submodule names as the block."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.expand, self.depthwise, self.project = block.expand, block.depthwise, block.project
        self.skip = block.skip
        if self.expand is not None:
            self.expand.relu6_output = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dw = self.depthwise  # a SameConv: a strided one pads first ("SAME"), its conv itself does not
        if self.expand is not None and dw.stride > 1:  # the expand conv writes the padded map (no F.pad pass)
            y = self.expand(x, pad=same_padding(*x.shape[-2:], dw.kernel, dw.stride))  # [n, mid, h+p, w+p]
            y = dw.conv(y)  # [n, mid, h/s, w/s]
        else:
            y = self.expand(x) if self.expand is not None else x  # [n, mid, h, w], ReLU6 applied
            y = dw(y)  # [n, mid, h/s, w/s]; its ReLU6 is the project's quantize
        return self.project(y, x if self.skip else None)  # [n, cout, h/s, w/s]


class DensePointwise(nn.Module):
    """The fp32 anchor: a 1x1 conv as torch's fp32 GEMM over pixels, the same layout and glue as the packed
    paths (torch's own channels_last 1x1 conv takes a slow im2col path on CPU: measured 2x slower)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().flatten(1).float().clone(), requires_grad=False)  # [N, K]
        self.bias = (
            nn.Parameter(bias.detach().float().clone(), requires_grad=False) if bias is not None else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return F.linear(x, self.weight, self.bias)
        n, c, h, w = x.shape
        y = F.linear(x.permute(0, 2, 3, 1).reshape(n * h * w, c), self.weight, self.bias)  # [n*h*w, cout]
        return y.view(n, h, w, -1).permute(0, 3, 1, 2)


class PackedPointwise(nn.Module):
    """A 1x1 conv through `PackedLinear` (weight-only: fp8 and the other formats without an int8 GEMM): pixels
    are rows, so past `FUSED_MAX_ROWS` pixels it dequantizes and runs torch's fp32 GEMM (slower than fp32)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        format: str,
        name: str,
        input_mean: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        w = weight.detach().flatten(1).float()
        packed = quantize(w, format, name=name)
        if bias is not None:
            bias = corrected_bias(bias.detach().float(), packed.dequantize(torch.float32), w, input_mean)
        self.linear = PackedLinear(packed, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return self.linear(x)
        n, c, h, w = x.shape
        y = self.linear(x.permute(0, 2, 3, 1).reshape(n * h * w, c))  # [n*h*w, cout]
        return y.view(n, h, w, -1).permute(0, 3, 1, 2)


INT8_GEMM_FORMATS = ("int8", "mxint8")


def pointwise(
    layer: nn.Conv2d | nn.Linear, format: str, name: str, input_mean: torch.Tensor | None = None
) -> nn.Module:
    """The form of a 1x1 conv or linear layer in `format` (fp32: the dense GEMM over pixels); `input_mean`, the
    layer's expected input per channel, corrects the bias for the weight's rounding."""
    if format == "fp32":
        return DensePointwise(layer.weight, layer.bias)
    if format in INT8_GEMM_FORMATS:
        # Project convs read ReLU6 outputs over the largest maps: one fixed scale. The head and classifier read
        # ReLU6 outputs too, but their small values need a per-pixel scale (a fixed one flips ImageNet top-1).
        relu6_input = name.endswith("project")  # big maps, ReLU6 inputs; head and classifier: per pixel
        return Int8Pointwise(layer.weight, layer.bias, format, f"{name}.weight", relu6_input, input_mean)
    return PackedPointwise(layer.weight, layer.bias, format, f"{name}.weight", input_mean)


def quantize_vision_net(net: nn.Module, format: str) -> nn.Module:
    """Swap every 1x1 conv and the classifier for its packed form, in place, and put the net in channels_last
    (the layout that makes pixels rows). `fp32` swaps in the dense GEMM over pixels, so the anchor has the same
    layout and glue and only the multiply differs. The stem (3 input channels) and the depthwise convs stay fp32: they are ~5% of the
    multiply-adds and have no matmul to speed up."""
    if format not in ("fp32", *INT8_GEMM_FORMATS):
        get_scheme(format)  # an unknown name is a FormatError before anything changes
    targets = [
        (name, mod)
        for name, mod in net.named_modules()
        if isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.kernel_size == (1, 1))
    ]
    means = getattr(net, "input_means", {})  # set by cumulo.edge.vision.from_state_dict
    for name, layer in targets:
        _replace(net, name, pointwise(layer, format, name, means.get(name)))
    blocks = [
        (name, mod)
        for name, mod in net.named_modules()
        if isinstance(getattr(mod, "project", None), Int8Pointwise) and hasattr(mod, "depthwise")
    ]
    for name, block in blocks:  # int8 formats: the blocks' ReLU6s and skips go into the GEMMs
        _replace(net, name, Int8InvertedResidual(block))
    return net.to(memory_format=torch.channels_last)


def _replace(net: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, module)
