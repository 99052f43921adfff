"""Linear layers spelled as a matmul with a parameter weight stored [in, out]: ``addmm(b, x, W)``
(Hugging Face GPT-2's Conv1D), ``mm(x, W)`` and ``x @ W``. They are producers like a Linear with
the weight axes swapped; importance, apply and masking read their layout, and the reshapes
around them (``x.view(-1, nx)``, ``view(x.size()[:-1] + (nf,))``) follow — on both front ends."""
import math
import operator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.measure import count_parameters
from fxopt.passes.prune.apply import zero_removed
from fxopt.passes.prune.channel_graph import WEIGHT_LAYOUTS, build_channel_graph
from fxopt.passes.prune.prune_pass import analyze
from prune_masking import prune_and_mask

MODES = ["symbolic", "export"]


class Conv1D(nn.Module):
    """Hugging Face's GPT-2 Conv1D: a linear layer whose weight is [in_features, out_features]."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.2)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class Conv1DMLP(nn.Module):
    def __init__(self, d=16, hidden=32, residual=False):
        super().__init__()
        self.residual = residual
        self.c_fc, self.c_proj = Conv1D(hidden, d), Conv1D(d, hidden)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.c_proj(F.gelu(self.c_fc(x)))
        return self.head(x + h if self.residual else h)


class MatmulMLP(nn.Module):
    """``x @ W1 + b1 -> gelu -> torch.mm(h2d, W2)``: weights as bare [in, out] parameters."""

    def __init__(self, d=16, hidden=32):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(d, hidden) * 0.2)
        self.b1 = nn.Parameter(torch.randn(hidden) * 0.2)
        self.w2 = nn.Parameter(torch.randn(hidden, d) * 0.2)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = F.gelu(x @ self.w1 + self.b1)
        return self.head(torch.mm(h.reshape(-1, h.shape[-1]), self.w2).view(x.shape))


class TanhGeluMLP(nn.Module):
    """GPT-2's `gelu_new` spelled out: ``0.5 * x * (1 + tanh(c * (x + 0.044715 * x**3)))``.
    ``1 + tanh(...)`` is not zero on removed channels, but it only ever multiplies ``0.5 * x``."""

    def __init__(self, d=16, hidden=32):
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(hidden, d), Conv1D(d, hidden)

    def forward(self, x):
        h = self.c_fc(x)
        h = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))))
        return self.c_proj(h)


class SwishGate(nn.Module):
    """``x * sigmoid(x)`` gates away the nonzero sigmoid(0); ``sigmoid(y) + 1`` into a layer does not."""

    def __init__(self):
        super().__init__()
        self.a, self.b = Conv1D(16, 8), Conv1D(16, 8)
        self.out_a, self.out_b = Conv1D(4, 16), Conv1D(4, 16)

    def forward(self, x):
        y = self.a(x)
        z = self.b(x)
        return self.out_a(y * torch.sigmoid(y)) + self.out_b(torch.sigmoid(z) + 1.0)


class ScaledBySize(nn.Module):
    """Reads the channel count for arithmetic: that query must see the original width."""

    def __init__(self):
        super().__init__()
        self.a, self.b = Conv1D(16, 8), Conv1D(4, 16)

    def forward(self, x):
        h = F.relu(self.a(x))
        return self.b(h * h.size(-1) ** -0.5)


class TransposedWeightMLP(nn.Module):
    """Falcon's linear, ``x @ self.weight.T`` with the weight [out, in] and no module: viewed
    as a linear layer, it shrinks like nn.Linear; the separate bias add follows its channels."""

    def __init__(self, d=16, hidden=32):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(hidden, d) * 0.2)
        self.b1 = nn.Parameter(torch.randn(hidden) * 0.2)
        self.w2 = nn.Parameter(torch.randn(d, hidden) * 0.2)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = F.gelu(x @ self.w1.T + self.b1)
        return self.head(x + h @ self.w2.t())


SEQ = lambda: torch.randn(2, 5, 16)  # noqa: E731
CASES = {
    "conv1d_mlp": (Conv1DMLP, SEQ),
    "conv1d_residual": (lambda: Conv1DMLP(residual=True), SEQ),
    "matmul_mlp": (MatmulMLP, SEQ),
    "transposed_weight_mlp": (TransposedWeightMLP, SEQ),
    "tanh_gelu": (TanhGeluMLP, SEQ),
    "swish_gate": (SwishGate, lambda: torch.randn(2, 5, 8)),
    "scaled_by_size": (ScaledBySize, lambda: torch.randn(2, 5, 8)),
}


def _pruned_and_masked(name, mode, ratio=0.5, **options):
    torch.manual_seed(0)
    build, make = CASES[name]
    x = make()
    r = prune_and_mask(build().eval(), x, mode, ratio, **options)
    return r.plan, r.masked, r.out, r.params_before, r.pruned, x, r.original


def _param(gm, suffix):
    return next(p for n, p in gm.named_parameters() if n.endswith(suffix))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_zeroed_channels_prune_exactly(name, mode):
    plan, masked, out, params_before, pruned, x, _ = _pruned_and_masked(name, mode)
    assert plan.selection.removed > 0, plan.stats()
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-5)
    assert count_parameters(pruned) < params_before
    pruned.graph.lint()
    # the batch size stays free (export captures it dynamic; symbolic never fixed it)
    x5 = torch.randn(5, *x.shape[1:])
    assert pruned(x5).shape[0] == 5


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("residual", [False, True])
def test_conv1d_is_a_producer_with_weight_in_out(mode, residual):
    """c_fc loses output channels on weight axis 1 (and its bias); c_proj the same rows on axis 0."""
    name = "conv1d_residual" if residual else "conv1d_mlp"
    plan, *_, pruned, x, original = _pruned_and_masked(name, mode)
    cg = plan.channel_graph
    producers = {r.kind for r in cg.rules.values() if r.category == "producer"}
    assert "addmm" in producers and not cg.pinned_nodes, cg.pinned_nodes
    assert WEIGHT_LAYOUTS["addmm"].out_axis == 1 and WEIGHT_LAYOUTS["addmm"].in_axis == 0
    w_fc, b_fc = _param(pruned, "c_fc.weight"), _param(pruned, "c_fc.bias")
    w_proj, b_proj = _param(pruned, "c_proj.weight"), _param(pruned, "c_proj.bias")
    kept, out = w_fc.shape[1], w_proj.shape[1]
    assert 0 < kept < 32 and 0 < out <= 16
    assert w_fc.shape == (16, kept) and b_fc.shape == (kept,) and w_proj.shape == (kept, out) and b_proj.shape == (out,)
    assert residual or _param(pruned, "head.weight").shape == (3, out)
    assert pruned(x).shape == original.shape == (2, 5, 3)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("importance", ["l1", "l2"])
def test_importance_reads_output_channels_on_weight_axis_1(mode, importance):
    """Channels whose [in, out] weight *columns* (and bias) are zero are the ones removed, and
    removing them changes nothing."""
    torch.manual_seed(0)
    model = Conv1DMLP().eval()
    dead, dead_out = [1, 4, 5, 9, 13, 20, 27, 30], [2, 7, 8, 15]  # a quarter of each layer's outputs
    with torch.no_grad():
        model.c_fc.weight[:, dead] = 0
        model.c_fc.bias[dead] = 0
        model.c_fc.weight[3, :] = 0  # a zero *row* (one input feature) must not read as a channel
        model.c_proj.weight[:, dead_out] = 0
        model.c_proj.bias[dead_out] = 0
    x = SEQ()
    plan = analyze(model, (x,), mode=mode, ratio=len(dead) / 32, importance=importance, adapter_cost=0.0)
    cg = plan.channel_graph
    fc = next(r for r in cg.rules.values() if r.kind == "addmm" and cg.module_names[r.node] == "c_fc")
    alive = np.nonzero(~plan.dead[cg.positions(fc.outputs[0])])[0]
    assert sorted(set(range(32)) - set(alive.tolist())) == dead
    pruned = plan.apply()
    torch.testing.assert_close(pruned(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_taylor_importance_runs_on_addmm(mode):
    torch.manual_seed(0)
    model, x = Conv1DMLP().eval(), SEQ()
    plan = analyze(model, (x,), mode=mode, ratio=0.5, importance="taylor", calibration=[(SEQ(),)])
    assert plan.selection.removed > 0 and np.isfinite(plan.costs["imp"]).all()
    assert plan.apply()(x).shape == (2, 5, 3)


@pytest.mark.parametrize("mode", MODES)
def test_matmul_with_parameter_weight_shrinks(mode):
    plan, *_, pruned, x, _ = _pruned_and_masked("matmul_mlp", mode)
    assert {r.kind for r in plan.channel_graph.rules.values() if r.category == "producer"} >= {"matmul"}
    w1, b1, w2 = (getattr(pruned, n) for n in ("w1", "b1", "w2"))
    kept, out = w1.shape[1], w2.shape[1]
    # b1 is added by a separate op (a junction): a channel lives while its bias does
    assert 0 < kept < 32 and w1.shape == (16, kept) and kept <= b1.shape[0] == w2.shape[0] < 32
    assert pruned.get_submodule("head").weight.shape == (3, out)


def test_macs_of_an_addmm_producer_match_a_linear():
    """Each output channel of c_fc costs rows * in_features MACs, each input channel of c_proj
    rows * out_features: the [in, out] layout is read, not assumed [out, in]."""
    torch.manual_seed(0)
    model, x = Conv1DMLP().eval(), SEQ()
    plan = analyze(model, (x,), mode="export", ratio=0.5)
    cg, macs = plan.channel_graph, plan.costs["macs"]
    fc = next(r for r in cg.rules.values() if r.kind == "addmm" and cg.module_names[r.node] == "c_fc")
    hidden = np.unique(cg.positions(fc.outputs[0]))
    rows = 2 * 5
    # c_fc row (16 inputs) + c_proj column (16 outputs)
    assert np.allclose(macs[hidden], rows * 16 + rows * 16)


@pytest.mark.parametrize("mode", MODES)
def test_shared_matmul_weight_is_pruned_per_site(mode):
    """One parameter read by two matmuls: each site gets its own copy before pruning."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(16, 32) * 0.2)
            self.out1, self.out2 = nn.Linear(32, 3), nn.Linear(32, 3)

        def forward(self, x):
            return self.out1(F.relu(x @ self.w)) + self.out2(torch.tanh(x @ self.w))

    torch.manual_seed(0)
    model, x = Shared().eval(), SEQ()
    plan = analyze(model, (x,), mode=mode, ratio=0.5, adapter_cost=0.0)
    zero_removed(plan.gm, plan.channel_graph, plan.dead)
    with torch.no_grad():
        masked = plan.gm(x)
    pruned = plan.apply()
    assert plan.selection.removed > 0
    torch.testing.assert_close(pruned(x), masked, rtol=1e-4, atol=1e-5)
    assert model.w.shape == (16, 32), "the user's model is never touched"


def test_dirty_values_into_a_layer_are_pinned_and_gated_ones_are_not():
    cg = build_channel_graph(fxopt.capture(SwishGate().eval(), (torch.randn(2, 5, 8),), mode="export"))
    reasons = {name: why for name, why in cg.pinned_nodes.items()}
    assert list(reasons) == ["sigmoid_1"], reasons  # sigmoid(z) + 1 reaches a layer: pinned
    assert "not zero-preserving" in reasons["sigmoid_1"]


def test_size_query_for_arithmetic_reads_the_original_count_and_reshape_queries_are_free():
    plan, masked, out, _, pruned, _, _ = _pruned_and_masked("scaled_by_size", "symbolic")
    pinned = plan.channel_graph.pinned_nodes
    # h.size(-1) ** -0.5 computes with the original 16, written in as a constant (it was pinned,
    # h re-expanded to full width only to read it); the Conv1D views' x.size(-1) are rewritten
    assert not [n for n in pinned if n.startswith("size")], pinned
    assert _param(pruned, "a.weight").shape[1] < 16, "h loses channels"
    assert not plan.applied["reexpansions"]
    assert [n.args for n in pruned.graph.nodes if n.target is operator.pow] == [(16, -0.5)]
    torch.testing.assert_close(out, masked, rtol=1e-4, atol=1e-5)


def test_gpt2_conv1d_layers_shrink():
    transformers = pytest.importorskip("transformers")
    import warnings

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 16))
    inputs = {"input_ids": ids, "use_cache": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fxopt.optimize(model, inputs, "prune{ratio=0.3}", verify=False)
    stats = res.passes[0].stats
    assert res.passes[0].modified and stats["removed_channels"] > 0
    shapes = {n: tuple(p.shape) for n, p in res.module.named_parameters()}
    for layer in range(2):
        fc = shapes[f"transformer.h.{layer}.mlp.c_fc.weight"]
        proj = shapes[f"transformer.h.{layer}.mlp.c_proj.weight"]
        assert fc[0] == 64 and fc[1] < 256 and proj == (fc[1], 64)
        assert shapes[f"transformer.h.{layer}.mlp.c_fc.bias"] == (fc[1],)
    assert not [n for n, why in stats["pinned"].items() if n.startswith("addmm")]
    # whole heads go too: sdpa's causal mask broadcasts over the head axis
    c_attn = [shapes[f"transformer.h.{layer}.attn.c_attn.weight"] for layer in range(2)]
    assert any(w[1] < 192 and w[1] % (3 * 16) == 0 for w in c_attn), c_attn
    with torch.no_grad():
        out = res.module(**inputs)
    logits = out["logits"] if isinstance(out, dict) else out.logits
    assert logits.shape == (2, 16, 100) and torch.isfinite(logits).all()


def test_gpt2_hidden_size_shrinks_when_norms_may():
    """The residual stream of GPT-2 passes its position embedding through `.to(device)` (an
    `_assert_tensor_metadata` + `aten.to` in the export graph): casts have a rule, so with
    `exact_norms=false` the hidden size shrinks, layer norms and position table with it."""
    transformers = pytest.importorskip("transformers")
    import warnings

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    inputs = {"input_ids": torch.randint(0, 100, (2, 16)), "use_cache": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fxopt.optimize(model, inputs, "prune{ratio=0.3,exact_norms=false}", verify=False)
    pinned = res.passes[0].stats["pinned"]
    assert not [n for n in pinned if n.startswith(("to", "_assert"))], pinned
    shapes = {n: tuple(p.shape) for n, p in res.module.named_parameters()}
    width = shapes["transformer.wpe.weight"][1]
    assert width < 64 and shapes["transformer.ln_f.weight"] == (width,)
    assert all(shapes[f"transformer.h.{i}.ln_1.weight"] == (width,) for i in range(2))
    with torch.no_grad():
        out = res.module(**inputs)
    logits = out["logits"] if isinstance(out, dict) else out.logits
    assert logits.shape == (2, 16, 100) and torch.isfinite(logits).all()


class MaskedAttention(nn.Module):
    """GPT-2's attention shape: one Conv1D for q, k, v (split), heads by view, sdpa with a mask."""

    def __init__(self, d=32, heads=4, t=6, per_head_mask=False):
        super().__init__()
        self.heads = heads
        self.c_attn, self.c_proj = Conv1D(3 * d, d), Conv1D(d, d)
        self.head = nn.Linear(d, 3)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        if per_head_mask:
            causal = causal & (torch.rand(heads, t, t) > 0.2)  # also diagonal: no empty row
            causal[:, range(t), range(t)] = True
        self.register_buffer("mask", causal.expand(1, heads if per_head_mask else 1, t, t).clone())

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        return self.head(self.c_proj(ctx.transpose(1, 2).reshape(b, t, d)))


@pytest.mark.parametrize("mode", MODES)
def test_attention_with_a_mask_broadcast_over_heads_prunes_heads(mode):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 32)
    plan = analyze(MaskedAttention().eval(), (x,), mode=mode, ratio=0.5, adapter_cost=0.0)
    assert not plan.channel_graph.pinned_nodes, plan.channel_graph.pinned_nodes
    zero_removed(plan.gm, plan.channel_graph, plan.dead)
    with torch.no_grad():
        masked = plan.gm(x)
    pruned = plan.apply()
    torch.testing.assert_close(pruned(x), masked, rtol=1e-4, atol=1e-5)
    w = _param(pruned, "c_attn.weight")
    assert w.shape[0] == 32 and w.shape[1] % 3 == 0 and (w.shape[1] // 3) % 8 == 0 and w.shape[1] < 96
    assert _param(pruned, "c_proj.weight").shape[0] == w.shape[1] // 3


@pytest.mark.parametrize("mode", MODES)
def test_attention_mask_that_varies_over_heads_keeps_the_heads_it_cannot_slice(mode):
    """The mask's head axis goes with q/k/v; a bool buffer holds no channels, so it pins them."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 32)
    plan = analyze(MaskedAttention(per_head_mask=True).eval(), (x,), mode=mode, ratio=0.5, adapter_cost=0.0)
    zero_removed(plan.gm, plan.channel_graph, plan.dead)
    with torch.no_grad():
        masked = plan.gm(x)
    pruned = plan.apply()
    assert _param(pruned, "c_attn.weight").shape == (32, 96)
    assert _param(pruned, "c_proj.weight").shape[1] < 32  # the output projection still shrinks
    torch.testing.assert_close(pruned(x), masked, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_a_transposed_parameter_weight_shrinks_like_a_linear(mode):
    plan, *_, pruned, x, original = _pruned_and_masked("transposed_weight_mlp", mode)
    producers = [r for r in plan.channel_graph.rules.values() if r.category == "producer"]
    assert [r.kind for r in producers].count("linear") == 3, [r.kind for r in producers]
    w1, b1, w2 = (getattr(pruned, n) for n in ("w1", "b1", "w2"))
    kept = w1.shape[0]
    # as in matmul_mlp, the bias add is its own op: a channel lives while its bias does
    assert 0 < kept < 32 and w1.shape == (kept, 16) and kept <= b1.shape[0] == w2.shape[1] < 32
    assert pruned(x).shape == original.shape == (2, 5, 3)


def _prune_hf(model: nn.Module, pick, **call_kwargs):
    """`prune_and_mask` at the default adapter charge, exported, of a Hugging Face model fed token
    ids (2 x 12), its output reduced to one tensor by `pick`."""
    import warnings

    class Picked(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model.eval()

        def forward(self, ids):
            return pick(self.m(input_ids=ids, **call_kwargs))

    ids = torch.randint(0, 100, (2, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prune_and_mask(Picked().eval(), ids, "export", 0.5, adapter_cost=1.0)


def test_deberta_relative_position_keys_repeated_over_the_batch_prune_exactly():
    """Hugging Face DeBERTa-v2 computes its position keys once, heads folded into a batch of 1,
    and repeats them over the batch (``.repeat(q.size(0) // heads, 1, 1)``). The slot sat on the
    folded heads there, so the repeat's computed count pinned it, and q/k/v with it (256 of 864
    channels removed, 0.632 of the MACs kept); that conflict now moves the slot to each head's
    features, as an index or a reduction on the folded axis already did: nothing is pinned."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.DebertaV2Config(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, relative_attention=True, position_buckets=16, pos_att_type=["p2c", "c2p"],
        num_labels=3)
    torch.manual_seed(0)
    r = _prune_hf(transformers.DebertaV2ForSequenceClassification(cfg), lambda out: out.logits)
    assert not r.plan.channel_graph.pinned_nodes, r.plan.channel_graph.pinned_nodes
    assert r.plan.selection.removed >= 0.5 * r.plan.selection.target, r.plan.stats()
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert r.pruned(torch.randint(0, 100, (3, 12))).shape == (3, 3)


def test_bloom_alibi_scores_from_baddbmm_prune_heads_features_exactly():
    """Bloom adds its ALiBi bias to q @ kᵀ in one ``baddbmm`` (heads folded into the batch):
    it had no rule, so q and k kept every channel (0.680 of the MACs at ratio 0.5); its
    product's features are now contracted like a ``bmm``'s."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=100)
    torch.manual_seed(0)
    r = _prune_hf(transformers.BloomModel(cfg), lambda out: out.last_hidden_state, use_cache=False)
    assert not [n for n in r.plan.channel_graph.pinned_nodes if "baddbmm" in n], r.plan.channel_graph.pinned_nodes
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    qkv = [tuple(p.shape) for n, p in r.pruned.named_parameters() if n.endswith("query_key_value.weight")]
    assert qkv and all(rows < 3 * 64 for rows, _ in qkv), qkv


def test_roformer_interleaved_rotary_prunes_heads_without_a_pin():
    """Hugging Face RoFormer rotates q and k by sin/cos read from a fixed sinusoidal embedding
    table, spread over the heads; that product pinned q and k (22% of the target removed). The
    table is a constant: it keeps its columns, and whole heads go."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.RoFormerConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                      intermediate_size=128, vocab_size=100, max_position_embeddings=64,
                                      embedding_size=64)
    torch.manual_seed(0)
    r = _prune_hf(transformers.RoFormerModel(cfg), lambda out: out.last_hidden_state)
    assert not r.plan.channel_graph.pinned_nodes, r.plan.channel_graph.pinned_nodes
    torch.testing.assert_close(r.out, r.masked, rtol=1e-4, atol=1e-5)
    queries = [tuple(p.shape) for n, p in r.pruned.named_parameters() if n.endswith("query.weight")]
    assert queries and all(rows < 64 and rows % 16 == 0 for rows, _ in queries), queries
