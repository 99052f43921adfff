"""Functions the lowered graphs call besides torch's own ops.

`int8_linear` is the `backend=cuda` linear: on a CUDA tensor whose shapes `torch._int_mm`
accepts it multiplies int8 by int8 into int32 on the tensor cores; anywhere else (CPU, odd
shapes) it computes the same value in float from the dequantized operands, so a graph lowered
for CUDA still runs, and agrees, on CPU.
"""
from __future__ import annotations

import torch


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
