"""Cross-attention's q, k and v projections are pieces of torch.nn's packed `in_proj_weight`:
quantize and lower-cpu give each its own weight first, so every projection runs as an int8
or prepacked linear in both front ends, and the result still matches the model."""
import pytest
import torch

import fxopt
from fxopt.examples.zoo import TorchSeq2Seq


def _seq2seq():
    """torch.nn's Transformer, one encoder and one decoder layer of width 32, with inputs."""
    torch.manual_seed(0)
    model = TorchSeq2Seq(vocab=50, dim=32, layers=1, heads=4, ffn=48).eval()
    return model, (torch.randint(0, 50, (4, 6)), torch.randint(0, 50, (4, 5)))


def _linears(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "linear" in str(n.target)]


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_every_projection_of_an_encoder_decoder_runs_in_int8(mode):
    model, x = _seq2seq()
    calibration = [(torch.randint(0, 50, (4, 6)), torch.randint(0, 50, (4, 5))) for _ in range(4)]
    res = fxopt.optimize(model, x, "quantize", mode=mode, calibration=calibration)
    linears = _linears(res.module)
    assert linears and all("quantized" in t for t in linears), linears
    assert res.verification.verdict == "PASS"
    assert model.transformer.decoder.layers[0].multihead_attn.in_proj_weight.shape == (96, 32), "model untouched"


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_lower_cpu_prepacks_the_cross_attention_projections(mode):
    model, x = _seq2seq()
    res = fxopt.optimize(model, x, "lower-cpu{linear=true}", mode=mode)
    stats = res.passes[0].stats
    assert stats["unpacked_parameters"] == 2  # the cross-attention's weight and bias
    assert not [t for t in _linears(res.module) if "mkldnn" not in t], res.module.code
    assert res.verification.verdict == "PASS"
