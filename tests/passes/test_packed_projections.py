"""Cross-attention's q, k and v projections are pieces of torch.nn's packed `in_proj_weight`:
quantize and lower-cpu give each its own weight first, so every projection runs as an int8
or prepacked linear in both front ends, and the result still matches the model."""
import pytest
import torch
from torch import nn

import fxopt


class Decoder(nn.Module):
    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.tgt, self.mem = nn.Linear(6, dim), nn.Linear(6, dim)
        self.layer = nn.TransformerDecoderLayer(dim, heads, 48, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        return self.head(self.layer(self.tgt(x), self.mem(x[:, :3])).mean(1))


def _linears(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_every_projection_of_a_decoder_runs_in_int8(mode):
    torch.manual_seed(0)
    model, x = Decoder().eval(), torch.randn(4, 5, 6)
    calibration = [torch.randn(4, 5, 6) for _ in range(4)]
    res = fxopt.optimize(model, x, "quantize", mode=mode, calibration=calibration)
    linears = _linears(res.module)
    assert linears and all("quantized" in t for t in linears), linears
    assert res.verification.verdict == "PASS"
    assert model.layer.multihead_attn.in_proj_weight.shape == (96, 32), "the model is not touched"


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_lower_cpu_prepacks_the_cross_attention_projections(mode):
    torch.manual_seed(0)
    model, x = Decoder().eval(), torch.randn(4, 5, 6)
    res = fxopt.optimize(model, x, "lower-cpu{linear=true}", mode=mode)
    stats = res.passes[0].stats
    assert stats["unpacked_parameters"] == 2  # the cross-attention's weight and bias
    assert not [t for t in _linears(res.module) if "mkldnn" not in t], res.module.code
    assert res.verification.verdict == "PASS"
