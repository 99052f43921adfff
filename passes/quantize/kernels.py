"""Functions the lowered graphs call besides torch's own ops.

`int8_pad` pads a quantized tensor by padding its bytes: torch's own `F.pad` on a quantized
tensor copies element by element (304 µs for 8x32x32x32, against 88 µs for the float pad and
28 µs for this), and has no replicate or circular mode.

`depth_to_space` interleaves the output of the 1x1 conv a stride == kernel transposed conv is
lowered to (`subpixel_weight`) into the transposed conv's output; on a quantized tensor it moves
the bytes (torch's quantized `pixel_shuffle` took 1.5 ms for 16x256x8x8, this 0.06 ms).

`int8_cat` concatenates quantized tensors onto one grid by concatenating their bytes: an input
already on the output grid is copied as it is, any other is requantized first (dequantize and
quantize, both vectorized). torch's `quantized::cat` requantizes every input element by element,
even one already on the output grid (16x16x64x64 pair, one thread: 3.1 ms with one input off the
grid, 0.94 with both on it, against 0.85 and 0.44 here).

`int8_linear` is the `backend=cuda` linear: on a CUDA tensor whose shapes `torch._int_mm`
accepts it multiplies int8 by int8 into int32 on the tensor cores; anywhere else (CPU, odd
shapes) it computes the same value in float from the dequantized operands, so a graph lowered
for CUDA still runs, and agrees, on CPU.

Each graph-called function is a `fxopt.ir.leaf_function`: a re-trace of the lowered graph
(``torch.save(model)`` pickles it that way) keeps it one call instead of walking into its
branches.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fxopt.ir import leaf_function


@leaf_function
def int8_linear(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                x_scale: float, x_zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """y = dq(q(x)) @ dq(w)^T + bias, with x on the quint8 grid (scale, zero point) given.

    x is the float value of an activation already on its quantization grid (the reference
    representation), so re-quantizing it here is exact.
    """
    lead = x.shape[:-1]
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    m, n = x2.shape[0], w_int8.shape[0]
    if x.is_cuda and m > 16 and k % 8 == 0 and n % 8 == 0:
        y = int_mm_linear(x2, w_int8, w_scale, bias, x_scale, x_zero_point, qmin, qmax)
        return y.to(x.dtype).reshape(*lead, n)
    w = w_int8.to(x.dtype) * w_scale.to(x.dtype).unsqueeze(1)
    return torch.nn.functional.linear(x, w, bias)


def int_mm_linear(x2: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                  x_scale: float, x_zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """The integer path of `int8_linear` on a 2-d `x2`: one int8 x int8 -> int32 `torch._int_mm`.

    torch has this kernel on CPU too, so the integer arithmetic is tested without a GPU.
    """
    # x_q - zp = (x_q - 128) + (128 - zp): an int8 operand plus a per-column correction.
    xq = torch.clamp(torch.round(x2 / x_scale) + x_zero_point, qmin, qmax)
    x_i8 = (xq - 128).to(torch.int8)
    acc = torch._int_mm(x_i8.contiguous(), w_int8.t())
    colsum = w_int8.to(torch.int32).sum(dim=1)
    acc = acc + (128 - x_zero_point) * colsum
    y = acc.to(torch.float32) * (x_scale * w_scale.to(torch.float32))
    return y + bias if bias is not None else y


@leaf_function
def int8_pad(q: torch.Tensor, pad: list[int], mode: str = "constant") -> torch.Tensor:
    """`F.pad(q, pad, mode)` of a quint8 per-tensor tensor, padded with its zero point (0.0)
    in constant mode: the same values on the same grid, computed on the raw bytes.

    The bytes are read in place (a uint8 tensor over the quantized tensor's storage, with its
    sizes and strides), so a channels-last input gives a channels-last output.
    """
    if q.dtype != torch.quint8 or q.qscheme() != torch.per_tensor_affine:
        return F.pad(q, pad, mode=mode)  # torch's own quantized pad: slower, any layout of values
    raw = raw_bytes(q)
    zero_point = q.q_zero_point()
    padded = F.pad(raw, pad, mode=mode, value=zero_point) if mode == "constant" else F.pad(raw, pad, mode=mode)
    return torch._make_per_tensor_quantized_tensor(padded, q.q_scale(), zero_point)


@leaf_function
def int8_pixel_shuffle(q: torch.Tensor, factor: int, inverse: bool = False) -> torch.Tensor:
    """`F.pixel_shuffle(q, factor)` (`F.pixel_unshuffle` when `inverse`) of a quint8 per-tensor
    tensor: every element moves, none changes, so the bytes are moved and the grid kept. A
    channels-last input (what the int8 convs return) gives a channels-last output, what the next
    int8 conv reads, in one copy (torch's quantized pixel_shuffle returns a row-major one; on
    16x64x32x32 the two take about the same time, 1.2 and 1.4 ms at one thread).

        >>> x = torch.quantize_per_tensor(torch.randn(2, 8, 3, 5), 0.05, 128, torch.quint8)
        >>> y = int8_pixel_shuffle(x, 2)
        >>> y.shape, bool(torch.equal(y.dequantize(), F.pixel_shuffle(x.dequantize(), 2)))
        (torch.Size([2, 2, 6, 10]), True)
        >>> bool(torch.equal(int8_pixel_shuffle(y, 2, inverse=True).dequantize(), x.dequantize()))
        True
    """
    if not q.is_quantized or q.dtype != torch.quint8 or q.qscheme() != torch.per_tensor_affine:
        return F.pixel_unshuffle(q, factor) if inverse else F.pixel_shuffle(q, factor)
    if q.dim() != 4:  # (pixel_shuffle takes any batch dims; the int8 convs write 4-D values)
        return torch._make_per_tensor_quantized_tensor(
            (F.pixel_unshuffle if inverse else F.pixel_shuffle)(raw_bytes(q), factor), q.q_scale(), q.q_zero_point())
    raw = raw_bytes(q).movedim(1, -1)  # (N, H, W, C): a view where q is channels-last
    n, h, w, c = raw.shape
    r = factor
    if inverse:  # (N, H r, W r, C) -> (N, H, W, C r r)
        out = raw.reshape(n, h // r, r, w // r, r, c).permute(0, 1, 3, 5, 2, 4).reshape(n, h // r, w // r, c * r * r)
    else:  # (N, H, W, C r r) -> (N, H r, W r, C)
        out = raw.reshape(n, h, w, c // (r * r), r, r).permute(0, 1, 4, 2, 5, 3).reshape(n, h * r, w * r, c // (r * r))
    return torch._make_per_tensor_quantized_tensor(out.movedim(-1, 1), q.q_scale(), q.q_zero_point())


@leaf_function
def int8_cat(tensors: list[torch.Tensor], dim: int, scale: float, zero_point: int,
             qmin: int = 0, qmax: int = 255) -> torch.Tensor:
    """`torch.cat` of quantized (quint8 per-tensor) tensors onto the grid (scale, zero point,
    [qmin, qmax]): what quantizing the float cat of the dequantized inputs onto that grid gives.

    An input on the output grid contributes its bytes unchanged (no rounding, no arithmetic);
    any other (or a float tensor) is quantized onto the grid first, clamped to [qmin, qmax] when
    the grid is narrower than 0..255 (the 7-bit grid fbgemm's kernels need without VNNI; torch's
    `quantized::cat` leaves such values above 127). The bytes are concatenated by `torch.cat`
    on uint8 views, which keeps the inputs' layout: channels-last inputs (what the int8 convs
    return) give a channels-last output, what the next int8 conv reads without a copy.
    """
    pieces = []
    for q in tensors:
        if q.is_quantized and q.dtype == torch.quint8 and q.qscheme() == torch.per_tensor_affine \
                and q.q_scale() == scale and q.q_zero_point() == zero_point:
            pieces.append(raw_bytes(q))
            continue
        x = q.dequantize() if q.is_quantized else q
        raw = raw_bytes(torch.quantize_per_tensor(x, scale, zero_point, torch.quint8))
        if qmin > 0 or qmax < 255:
            raw = raw.clamp(qmin, qmax)
        pieces.append(raw)
    return torch._make_per_tensor_quantized_tensor(torch.cat(pieces, dim), scale, zero_point)


@leaf_function
def float_between_int8(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float | None,
                       zero_point: int | None, relu: bool, stride: list[int] | None = None,
                       padding: list[int] | None = None, dilation: list[int] | None = None,
                       groups: int = 1) -> torch.Tensor:
    """A conv (`stride` given) or linear that no int8 kernel on this CPU computes right
    (`packing.computes_right`): int8 in and out like its neighbours (float out when `scale` is
    None), float in between, with the int8 weight's values.

        >>> x = torch.quantize_per_tensor(torch.randn(1, 4, 8), 0.05, 128, torch.quint8)
        >>> y = float_between_int8(x, torch.randn(6, 4, 3), None, 0.1, 128, True, [1], [1], [1])
        >>> y.dtype, tuple(y.shape), bool((y.dequantize() >= 0).all())
        (torch.quint8, (1, 6, 8), True)
    """
    if stride is None:
        y = F.linear(x.dequantize(), weight, bias)
    else:
        conv = (F.conv1d, F.conv2d, F.conv3d)[weight.dim() - 3]
        y = conv(x.dequantize(), weight, bias, stride, padding, dilation, groups)
    y = F.relu(y) if relu else y
    return y if scale is None else torch.quantize_per_tensor(y, scale, zero_point, torch.quint8)


def raw_bytes(q: torch.Tensor) -> torch.Tensor:
    """The uint8 values of a quint8 tensor, in place (its sizes and strides, its storage)."""
    return torch.empty(0, dtype=torch.uint8, device=q.device).set_(
        q.untyped_storage(), q.storage_offset(), q.size(), q.stride())


def subpixel_weight(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The 1x1 conv weight ``[prod(k) * C_out, C_in, 1, ...]`` (and its bias) that, followed by
    `depth_to_space` with factors k, computes a transposed conv with weight ``[C_in, C_out, *k]``,
    stride == k, no padding, one group.

    Such a transposed conv (a U-Net's ``ConvTranspose2d(c, c // 2, 2, stride=2)``) writes
    every output pixel from exactly one input pixel and kernel tap: output channel
    ``(t, c)`` of the 1x1 conv is tap ``t`` (row-major over the kernel) of output channel c.

        >>> w, b = torch.randn(8, 4, 2, 2), torch.randn(4)
        >>> w1, b1 = subpixel_weight(w, b)
        >>> x = torch.randn(1, 8, 3, 5)
        >>> y = depth_to_space(F.conv2d(x, w1, b1), (2, 2))
        >>> torch.allclose(y, F.conv_transpose2d(x, w, b, stride=2), atol=1e-5)
        True
    """
    c_in, c_out, kernel = weight.shape[0], weight.shape[1], weight.shape[2:]
    taps = math.prod(kernel)
    w1 = weight.reshape(c_in, c_out, taps).permute(2, 1, 0).reshape(taps * c_out, c_in, *([1] * len(kernel)))
    return w1.contiguous(), (bias.repeat(taps) if bias is not None else None)


@leaf_function
def depth_to_space(x: torch.Tensor, factors: list[int]) -> torch.Tensor:
    """``(N, prod(f) * C, *S)`` with channels ordered (tap, channel) -> ``(N, C, S_0 f_0, ...)``:
    channel ``(t, c)`` at position p goes to channel c at ``p * f + t`` (t row-major over f).

    A quantized (quint8, per-tensor) tensor keeps its scale and zero point: its bytes are moved,
    and a channels-last input (what the int8 convs return) gives a channels-last output in one
    copy of contiguous runs of ``f_last * C`` bytes. A float tensor is moved the same way (the
    reference backend's form).
    """
    quantized = x.is_quantized
    if quantized and (x.dtype != torch.quint8 or x.qscheme() != torch.per_tensor_affine):
        x = x.dequantize()  # no other int8 layout reaches here; keep the values right regardless
        quantized = False
    raw = raw_bytes(x) if quantized else x
    n, sizes, dims = raw.shape[0], list(raw.shape[2:]), len(factors)
    channels = raw.shape[1] // math.prod(factors)
    t = raw.movedim(1, -1).reshape(n, *sizes, *factors, channels)
    order = [0, *(i for d in range(dims) for i in (1 + d, 1 + dims + d)), 1 + 2 * dims]
    t = t.permute(order).reshape(n, *(s * f for s, f in zip(sizes, factors)), channels).movedim(-1, 1)
    return torch._make_per_tensor_quantized_tensor(t, x.q_scale(), x.q_zero_point()) if quantized else t
