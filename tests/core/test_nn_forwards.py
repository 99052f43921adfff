"""torch.nn's attention and transformer modules, traced through fxopt's traceable forwards:
the symbolic graph must compute what the module does, for every option they cover, at other
batch sizes and sequence lengths too, and keep the module as one call for those they do not."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt import capture
from fxopt.tracing import NotTraceable, register_traceable_forward, unregister_traceable_forward

E, HEADS = 16, 4


def _call_modules(gm):
    return {n.target for n in gm.graph.nodes if n.op == "call_module"}


class Attend(nn.Module):
    def __init__(self, batch_first=True, need_weights=False, average=True, **call):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first)
        self.need_weights, self.average, self.call = need_weights, average, call

    def forward(self, x, attn_mask=None, key_padding_mask=None):
        out, weights = self.attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                 need_weights=self.need_weights, average_attn_weights=self.average, **self.call)
        return (out, weights) if self.need_weights else out


def _masks(batch, seq, kind):
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1)
    padding = torch.zeros(batch, seq, dtype=torch.bool)
    padding[0, -2:] = True
    return {
        "none": {},
        "bool causal": {"attn_mask": causal},
        "float causal": {"attn_mask": torch.zeros(seq, seq).masked_fill(causal, float("-inf"))},
        "per head": {"attn_mask": torch.randn(batch * HEADS, seq, seq)},
        "padding": {"key_padding_mask": padding},
        "both": {"attn_mask": causal, "key_padding_mask": padding},
    }[kind]


@pytest.mark.parametrize("kind", ["none", "bool causal", "float causal", "per head", "padding", "both"])
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_matches_the_module(kind, need_weights, average, batch_first):
    torch.manual_seed(0)
    model = Attend(batch_first, need_weights, average).eval()
    batch, seq = 3, 6
    x = torch.randn(batch, seq, E) if batch_first else torch.randn(seq, batch, E)
    masks = _masks(batch, seq, kind)
    gm = capture(model, (x,) if not masks else {"x": x, **masks}, mode="symbolic")
    assert "attn" not in _call_modules(gm) and "attn.out_proj" in _call_modules(gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(x, **masks), model(x, **masks), rtol=1e-5, atol=1e-5)
        if kind == "none":  # the batch and the sequence stay free
            y = torch.randn(5, 9, E) if batch_first else torch.randn(9, 5, E)
            torch.testing.assert_close(gm(y), model(y), rtol=1e-5, atol=1e-5)


class Unmasked(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=True)


def test_attention_weights_come_from_the_one_softmax_the_output_uses():
    """need_weights=True and no mask: the output is that softmax times v (no second attention
    by SDPA); at other sizes too."""
    torch.manual_seed(0)
    model = Unmasked().eval()
    gm = capture(model, (torch.randn(2, 5, E),), mode="symbolic")
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.softmax) == 1 and F.scaled_dot_product_attention not in targets
    y = torch.randn(3, 7, E)
    with torch.no_grad():
        for got, want in zip(gm(y), model(y)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_causal_hint_with_its_mask_matches_the_module():
    torch.manual_seed(0)
    model = Attend(is_causal=True).eval()
    x = torch.randn(2, 5, E)
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    gm = capture(model, {"x": x, "attn_mask": mask}, mode="symbolic")
    torch.testing.assert_close(gm(x, attn_mask=mask), model(x, attn_mask=mask))


class CrossAttend(nn.Module):
    def __init__(self, kdim=None, batch_first=True, bias=True, need_weights=False):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, kdim=kdim, vdim=kdim, bias=bias)
        self.need_weights = need_weights

    def forward(self, x, memory, key_padding_mask=None):
        out, weights = self.attn(x, memory, memory, key_padding_mask=key_padding_mask, need_weights=self.need_weights)
        return (out, weights) if self.need_weights else out


@pytest.mark.parametrize("kdim", [None, 12])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("need_weights", [False, True])
def test_cross_attention_matches_the_module_as_three_projections(kdim, batch_first, bias, need_weights):
    """Keys and values from another stream (or with their own dimension): three linears whose
    weights are the packed parameter's thirds (or the separate q/k/v weights), no module call
    but out_proj, at the captured sizes and at others."""
    torch.manual_seed(0)
    model = CrossAttend(kdim, batch_first, bias, need_weights).eval()

    def inputs(batch, q_len, kv_len):
        x, memory = torch.randn(batch, q_len, E), torch.randn(batch, kv_len, kdim or E)
        padding = torch.zeros(batch, kv_len, dtype=torch.bool)
        padding[0, -2:] = True
        if not batch_first:
            x, memory = x.transpose(0, 1), memory.transpose(0, 1)
        return x, memory, padding

    x, memory, padding = inputs(2, 3, 7)
    gm = capture(model, (x, memory, padding), mode="symbolic")
    assert _call_modules(gm) == {"attn.out_proj"}
    linears = [n for n in gm.graph.nodes if n.target is F.linear]
    assert len(linears) == 3
    with torch.no_grad():
        torch.testing.assert_close(gm(x, memory, padding), model(x, memory, padding), rtol=1e-5, atol=1e-5)
        y = inputs(4, 5, 9)
        torch.testing.assert_close(gm(*y), model(*y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu", F.silu])
@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_stack_matches_the_module(norm_first, activation, batch_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, 32, activation=activation, norm_first=norm_first,
                                       batch_first=batch_first)
    model = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(E), enable_nested_tensor=False).eval()
    x = torch.randn(3, 6, E) if batch_first else torch.randn(6, 3, E)
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[1, -3:] = True
    gm = capture(model, {"src": x, "src_key_padding_mask": padding}, mode="symbolic")
    assert not any(name.endswith("self_attn") for name in _call_modules(gm))
    with torch.no_grad():
        torch.testing.assert_close(gm(x, src_key_padding_mask=padding),
                                   model(x, src_key_padding_mask=padding), rtol=1e-5, atol=1e-5)


def test_full_transformer_matches_the_module():
    torch.manual_seed(0)
    model = nn.Transformer(E, HEADS, 1, 1, 32, batch_first=True).eval()
    src, tgt = torch.randn(2, 7, E), torch.randn(2, 5, E)
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    gm = capture(model, {"src": src, "tgt": tgt, "tgt_mask": mask}, mode="symbolic")
    assert not {"decoder.layers.0.multihead_attn", "decoder.layers.0.self_attn"} & _call_modules(gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(src, tgt, tgt_mask=mask), model(src, tgt, tgt_mask=mask),
                                   rtol=1e-5, atol=1e-5)


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.dim() == 2 else self.fc(x).mean(1)


def test_a_registered_forward_makes_an_untraceable_module_traceable():
    model, x = nn.Sequential(Gate(), nn.ReLU()), torch.randn(2, 4)
    with pytest.raises(Exception):
        capture(model, (x,), mode="symbolic")
    register_traceable_forward(Gate, lambda m, x: m.fc(x))
    try:
        gm = capture(model, (x,), mode="symbolic")
        assert _call_modules(gm) == {"0.fc", "1"}
        torch.testing.assert_close(gm(x), model(x))
    finally:
        unregister_traceable_forward(Gate)


def test_not_traceable_keeps_the_module_as_one_call():
    def refuse(m, x):
        raise NotTraceable("not this one")

    register_traceable_forward(Gate, refuse)
    try:
        gm = capture(nn.Sequential(nn.Linear(4, 4), Gate()), (torch.randn(2, 4),), mode="symbolic")
        assert _call_modules(gm) == {"0", "1"}
    finally:
        unregister_traceable_forward(Gate)


def test_registration_checks_its_arguments():
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_traceable_forward(int, lambda m: m)
    with pytest.raises(TypeError, match="not callable"):
        register_traceable_forward(Gate, "forward")


def test_a_module_with_hooks_stays_one_call_so_its_hooks_run():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, 32, dropout=0.0, batch_first=True).eval()
    layer.self_attn.register_forward_hook(lambda mod, inputs, out: (out[0] * 2, out[1]))
    model = nn.Sequential(layer)
    gm = capture(model, (torch.randn(2, 5, E),), mode="symbolic")
    assert "0.self_attn" in _call_modules(gm)
    y = torch.randn(3, 7, E)
    with torch.no_grad():
        torch.testing.assert_close(gm(y), model(y))


class PaddedEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, HEADS, 32, batch_first=True), 2)

    def forward(self, x, padding):
        return self.encoder(x, src_key_padding_mask=padding)


def test_an_encoder_on_its_nested_tensor_path_stays_one_call():
    """With a padding mask, inference through nested tensors zeroes the padded positions."""
    torch.manual_seed(0)
    model = PaddedEncoder().eval()
    padding = torch.zeros(2, 5, dtype=torch.bool)
    gm = capture(model, (torch.randn(2, 5, E), padding), mode="symbolic")
    assert "encoder" in _call_modules(gm)
    x, padding = torch.randn(3, 7, E), torch.zeros(3, 7, dtype=torch.bool)
    padding[0, 4:] = True
    with torch.no_grad():
        torch.testing.assert_close(gm(x, padding), model(x, padding))


def test_a_bfloat16_layer_is_checked_at_its_own_precision():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, 32, batch_first=True).to(torch.bfloat16).eval()
    gm = capture(layer, (torch.randn(2, 5, E, dtype=torch.bfloat16),), mode="symbolic")
    assert "self_attn.out_proj" in _call_modules(gm)


def test_a_traceable_forward_that_cannot_take_the_inputs_is_refused_at_registration():
    """It failed at capture with "<lambda>() takes 1 positional argument", naming neither."""
    class Gate(nn.Module):
        def forward(self, x, scale=2.0):
            return x * scale

    with pytest.raises(TypeError, match=r"the traceable forward for Gate takes \(self\), but a call passes the module "
                                        r"and Gate.forward's inputs \(x\)"):
        fxopt.register_traceable_forward(Gate, lambda self: 1)
    fxopt.register_traceable_forward(Gate, lambda self, x, scale=2.0: x * scale)   # fits: taken
    fxopt.unregister_traceable_forward(Gate)


def test_attention_on_unbatched_inputs_is_kept_as_one_call_where_its_traceable_forward_fails():
    """Called on (L, E) inputs, which torch documents, the traced attention computed a wrong
    shape and symbolic capture failed ("shape '[5, 16, 4, 4]' is invalid"), naming no module."""
    class Unbatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x)[0]

    model = Unbatched().eval()
    gm = capture(model, (torch.randn(5, 16),), mode="symbolic")
    assert "attn" in _call_modules(gm)
    assert gm.meta["fxopt"]["attempts"][0]["reason"].startswith("kept MultiheadAttention 'attn' as one call each")
    x = torch.randn(9, 16)
    torch.testing.assert_close(gm(x), model(x))


def test_a_capture_that_fails_through_a_registered_forward_names_it():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    fxopt.register_traceable_forward(nn.Linear, lambda self, x: torch.nn.functional.linear(x, self.weight) * 2)
    try:
        with pytest.raises(fxopt.CaptureError, match=r"the trace entered Linear '0' through a traceable forward "
                                                     r"registered with fxopt.register_traceable_forward"):
            fxopt.capture(model, (torch.randn(3, 4),), mode="symbolic")
    finally:
        fxopt.unregister_traceable_forward(nn.Linear)
