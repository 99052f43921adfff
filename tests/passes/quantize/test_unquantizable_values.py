"""Values int8 lowering cannot quantize stay float, the rest of the model is still quantized:
values calibration saw an infinity in (a -inf attention mask), and float16/bfloat16 values
(the int8 kernels quantize float32). Small models; the file runs in seconds."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxopt
from fxopt.errors import PassError

warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")

INF_REASON = "saw ±inf in calibration: kept float"


def _targets(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def _int8_linears(gm, backend):
    if backend == "x86":
        return sum(t in ("quantized.linear.default", "quantized.linear_relu.default",
                         "quantized.linear_with_input_q_dq_qweight_dq_output_fp32.default") for t in _targets(gm))
    return sum(t == "quantized_decomposed.dequantize_per_channel.default" for t in _targets(gm))


# ----- a -inf mask ------------------------------------------------------------------------------

class MaskedAttention(nn.Module):
    """Single-head attention whose scores are masked with -inf, then transposed (a pass-through
    op, so the masked value is observed) before the softmax."""

    def __init__(self, d=16):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, mask):
        s = torch.matmul(self.q(x), self.k(x).transpose(1, 2))
        s = s.masked_fill(mask, float("-inf")).transpose(1, 2)
        return self.o(torch.matmul(torch.softmax(s, dim=-1), self.v(x)))


class AdditiveMask(nn.Module):
    """The mask as an additive -inf bias: an add that would be an int8 group reads it."""

    def __init__(self, d=16):
        super().__init__()
        self.q, self.k, self.o = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(8, d)

    def forward(self, x, mask):
        s = torch.matmul(self.q(x), self.k(x).transpose(1, 2))
        bias = torch.zeros_like(s).masked_fill(mask, float("-inf"))
        return self.o(torch.softmax(s + bias, dim=-1))


def _mask_batches(n, seed=0, b=4, t=8, d=16, transposed=False):
    """(x, mask) batches; the mask pads the last two keys (no softmax row is all -inf), along
    the last dimension, or the one before when the model transposes the masked scores."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.zeros(b, t, t, dtype=torch.bool)
        mask[..., 6:] = True
        if transposed:
            mask = mask.transpose(1, 2).contiguous()
        out.append((torch.randn(b, t, d, generator=g), mask))
    return out


def _inf_entries(stats):
    return {k: v for k, v in stats["float_ops"].items() if INF_REASON in v}


@pytest.mark.parametrize("backend", ["x86", "reference"])
@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_minus_inf_mask_stays_float_and_the_linears_are_int8(mode, backend):
    torch.manual_seed(0)
    model = MaskedAttention().eval()
    batches = _mask_batches(5, transposed=True)
    res = fxopt.optimize(model, batches[0], f"quantize{{backend={backend}}}", calibration=batches[1:],
                         mode=mode)
    assert res.verification.passed, res.verification.summary()
    stats = res.passes[0].stats
    assert stats["quantized"].get("linear", 0) == 4, stats
    assert _int8_linears(res.module, backend) == 4
    masked = _inf_entries(stats)
    assert [k for k in masked if "masked_fill" in k], stats["float_ops"]
    assert all(v == f"{INF_REASON} (-inf in batch 0)" for v in masked.values()), masked
    x, mask = _mask_batches(1, seed=9, transposed=True)[0]
    with torch.no_grad():                                       # fresh data, still close
        out, ref = res.module(x, mask), model(x, mask)
    assert bool(torch.isfinite(out).all()) and float((out - ref).norm() / ref.norm()) < 0.1


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_an_int8_group_reading_a_minus_inf_value_stays_float_and_says_why(mode):
    torch.manual_seed(0)
    batches = _mask_batches(5)
    res = fxopt.optimize(AdditiveMask().eval(), batches[0], "quantize{backend=x86}", calibration=batches[1:],
                         mode=mode)
    assert res.verification.passed, res.verification.summary()
    stats = res.passes[0].stats
    assert stats["quantized"] == {"linear": 3, "matmul": 1}, stats
    adds = {k: v for k, v in stats["float_ops"].items() if v.startswith("add: ")}
    assert len(adds) == 1 and INF_REASON in next(iter(adds.values())), stats["float_ops"]
    assert "'masked_fill" in next(iter(adds.values()))  # names the value it reads
    assert "quantized.add.default" not in _targets(res.module)


@pytest.mark.parametrize("backend", ["x86", "reference"])
def test_multihead_attention_with_a_key_padding_mask_quantizes_through_export(backend):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.head = nn.Linear(32, 10)

        def forward(self, x, kpm):
            return self.head(self.attn(x, x, x, key_padding_mask=kpm, need_weights=False)[0])

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)

    def batch(b=2):
        kpm = torch.zeros(b, 8, dtype=torch.bool)
        kpm[:, 6:] = True
        return (torch.randn(b, 8, 32, generator=g), kpm)

    res = fxopt.optimize(M().eval(), batch(), f"quantize{{backend={backend}}}",
                         calibration=[batch() for _ in range(4)], mode="export")
    assert res.verification.passed, res.verification.summary()
    stats = res.passes[0].stats
    assert stats["quantized"] == {"linear": 3}, stats           # in_proj, out_proj, head
    assert _inf_entries(stats).get("masked_fill_", "").startswith(INF_REASON), stats["float_ops"]


def test_nan_still_fails_naming_the_node():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(torch.log(x).transpose(0, 1))  # log(-1) = NaN

    x = (torch.rand(8, 8),)
    with pytest.raises(PassError, match=r"observer for node 'log'.*saw NaN"):
        fxopt.optimize(M().eval(), x, "quantize", calibration=[x, (-torch.rand(8, 8),)], mode="symbolic")


# ----- float16 / bfloat16 -----------------------------------------------------------------------

def _conv_net(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval().to(dtype)


@pytest.mark.parametrize("backend", ["x86", "reference"])
@pytest.mark.parametrize("mode", ["auto", "export"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_comes_back_runnable_in_its_own_dtype(dtype, mode, backend):
    model = _conv_net(dtype)
    g = torch.Generator().manual_seed(0)
    make = lambda: (torch.randn(4, 3, 8, 8, generator=g).to(dtype),)
    x, batches = make(), [make() for _ in range(3)]
    name = str(dtype).removeprefix("torch.")
    with pytest.warns(UserWarning, match=rf"quantize: nothing was quantized; the module stays float \({name} value"):
        res = fxopt.optimize(model, x, f"quantize{{backend={backend}}}", calibration=batches, mode=mode)
    assert res.verification.passed, res.verification.summary()
    with torch.no_grad():
        out = res.module(*x)
        assert out.dtype == model(*x).dtype == dtype
        torch.testing.assert_close(out, model(*x), atol=0, rtol=0)    # nothing was quantized
    stats = res.passes[0].stats
    assert stats["quantized"] == {} and stats["observers"] == 0 and stats["quantize_nodes"] == 0, stats
    reasons = stats["float_ops"]
    assert len(reasons) >= 5 and all(f"{name} value: int8 kernels take float32" in r for r in reasons.values()), reasons
    assert not res.passes[0].modified


class _HalfWithFloatIsland(nn.Module):
    """A float16 conv, then a float32 linear between explicit casts: only the linear is int8."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1).half()
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1).float()).half()


@pytest.mark.parametrize("backend", ["x86", "reference"])
@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_only_the_float32_part_of_a_mixed_model_is_quantized(mode, backend):
    torch.manual_seed(0)
    model = _HalfWithFloatIsland().eval()
    g = torch.Generator().manual_seed(0)
    make = lambda: (torch.randn(4, 3, 8, 8, generator=g).half(),)
    x, batches = make(), [make() for _ in range(4)]
    res = fxopt.optimize(model, x, f"quantize{{backend={backend}}}", calibration=batches, mode=mode)
    assert res.verification.passed, res.verification.summary()
    stats = res.passes[0].stats
    assert stats["quantized"] == {"linear": 1}, stats
    assert _int8_linears(res.module, backend) == 1
    assert sum("float16 value: int8 kernels take float32" in r for r in stats["float_ops"].values()) >= 3
    with torch.no_grad():
        assert res.module(*x).dtype == torch.float16


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_float32_model_with_nothing_to_quantize_comes_back_as_it_is(mode):
    model = nn.Sequential(nn.Sigmoid()).eval()  # no int8 pattern at all
    x = (torch.randn(4, 8),)
    reason = "sigmoid: no int8 kernel in fxopt.s lowering; runs in float"
    with pytest.warns(UserWarning, match=rf"nothing was quantized; the module stays float \({reason}\)"):
        res = fxopt.optimize(model, x, "quantize{backend=x86}", calibration=[x], mode=mode)
    assert res.verification.passed
    stats = res.passes[0].stats
    assert stats["quantized"] == {} and stats["observers"] == 0 and list(stats["float_ops"].values()) == [
        "sigmoid: no int8 kernel in fxopt's lowering; runs in float"]


# ----- kernels lowered for fp32 first ------------------------------------------------------------

@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_quantize_after_lower_cpu_warns_that_the_lowered_convs_stay_float():
    """`fuse,lower-cpu,quantize`: the convs are already oneDNN fp32 kernels with no int8 form;
    only the linear became int8, silently. The warning names one and the order that works."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()
    cal = [(torch.randn(4, 3, 16, 16),) for _ in range(3)]
    with pytest.warns(fxopt.PassWarning, match=r"float kernels a lowering pass wrote \(e\.g\. '_convolution_pointwise"
                                               r"[^']*'\).*run quantize before lower-cpu"):
        fxopt.optimize(model, cal[0], "fuse,lower-cpu{min_macs=0},quantize", calibration=cal)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxopt.PassWarning)  # the right order says nothing
        fxopt.optimize(model, cal[0], "fuse,quantize,lower-cpu{min_macs=0}", calibration=cal)


# ----- a library's own op reading a weight --------------------------------------------------------

@torch.library.custom_op("fxopt_test::expert_mm", mutates_args=())
def _expert_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w


@_expert_mm.register_fake
def _(x, w):
    return x.new_empty(*x.shape[:-1], w.shape[-1])


class _OwnKernelExperts(nn.Module):
    """A linear, then an op of another library with a weight of its own (Mixtral's experts run
    through transformers::grouped_mm_fallback): only the linear has an int8 kernel."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.experts = nn.Parameter(torch.randn(16, 8) / 4)

    def forward(self, x):
        return _expert_mm(torch.relu(self.fc(x)), self.experts.t().t())


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_an_op_reading_a_weight_without_an_int8_kernel_is_named_in_a_warning(mode):
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    with pytest.warns(fxopt.PassWarning, match=r"quantize: 1 op that reads weights has no int8 kernel and stays "
                                               r"float: '.*expert_mm.*'"):
        res = fxopt.optimize(_OwnKernelExperts().eval(), (x,), "quantize", calibration=[(x,)], mode=mode)
    assert any("quantized" in str(n.target) for n in res.module.graph.nodes), "the linear is still int8"
