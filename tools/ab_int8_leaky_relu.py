"""A/B of `quantize` on LeakyReLU: float between int8 layers, or an int8 op of its own.

A: every leaky_relu runs in float, so the conv before it writes float and the next int8 layer
quantizes again (what `quantize` did before; torch 2.13's oneDNN int8 conv has no leaky_relu
post-op); B: it is `quantized.leaky_relu` onto its own observed grid, as torch.ao runs it
(`passes/quantize/plan.py`: `_leaky_relu_reason`). Model: the CSPDarknet-style backbone of
`ab_bn_into_cat.py` (LeakyReLU(0.1) after every conv, BottleneckCSP merges). Prints latency
(`fxopt.measure.compare_latency`, one thread, interleaved rounds) of fp32 eager, torch.ao FX
int8 (x86; the peer), A and B at batch 1 and 16, and each int8 model's SQNR against fp32.

    python tools/ab_int8_leaky_relu.py --rounds 7
"""
from __future__ import annotations

import pathlib
import sys
from unittest import mock

from fxopt.passes.quantize import plan

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import quantize_ab  # noqa: E402  (a sibling module, not a package)
from ab_bn_into_cat import csp_darknet  # noqa: E402

import fuse_ab  # noqa: E402


def _float_leaky_relu():
    return mock.patch.object(plan, "_leaky_relu_reason", lambda view: "no int8 kernel (as before)")


if __name__ == "__main__":
    quantize_ab.main(__doc__.splitlines()[0], {"csp_darknet": fuse_ab.with_statistics(csp_darknet())},
                     _float_leaky_relu, ("leaky_relu in float", "int8 leaky_relu"), (3, 64, 64))
