"""Hardswish (MobileNetV3's activation) runs in int8 with an output grid of its own, so a
conv -> hardswish -> conv chain stays int8 from end to end: one quantize, one dequantize."""
import pytest
import torch
from torch import nn

import fxopt


def _mobile_block():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Hardswish(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Hardswish(),
        nn.Conv2d(16, 8, 1), nn.Hardswish(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    model.train()
    with torch.no_grad():  # non-trivial batchnorm statistics
        model(torch.randn(16, 3, 16, 16) * 2 + 0.5)
    return model.eval()


def _count(gm, text):
    return sum(text in str(n.target) for n in gm.graph.nodes if n.op == "call_function")


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_hardswish_chain_stays_int8_and_matches_the_reference_backend(mode):
    model = _mobile_block()
    x = torch.randn(4, 3, 16, 16)
    calibration = [torch.randn(8, 3, 16, 16) for _ in range(4)]
    x86 = fxopt.optimize(model, x, "quantize{backend=x86}", mode=mode, calibration=calibration)
    assert _count(x86.module, "quantized.hardswish") == 3
    assert _count(x86.module, "quantize_per_tensor") == 1 and _count(x86.module, "dequantize") == 1
    assert "hardswish" not in " ".join(x86.passes[-1].stats.get("float_ops", {}).values())
    assert x86.verification.sqnr_db > 40
    reference = fxopt.optimize(model, x, "quantize{backend=reference}", mode=mode, calibration=calibration)
    y = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        step = (x86.module(y) - reference.module(y)).abs().max()
    assert step < 0.02, "x86 and reference agree within about one output step"
