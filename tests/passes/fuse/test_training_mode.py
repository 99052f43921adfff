"""A model in training mode: fxopt optimizes its eval-mode semantics, and says so.

Folding a batchnorm is only valid with its running statistics (eval mode). `capture` optimizes an
eval copy of the model; when the model has a batchnorm or dropout in training mode, the result
(and its verification) differ from what the model computes as it stands, so a
`fxopt.TrainingModeWarning` names them. A graph captured by the user in training mode keeps its
batchnorm unfolded, and `fuse` names it.
"""
import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt

MODES = ("symbolic", "export")


def _conv_bn(dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    model = nn.Sequential(*layers)
    with torch.no_grad():  # running statistics far from any batch's: train and eval outputs differ
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.3, 3)
    return model


def _kinds(gm):
    return [v.kind for n in gm.graph.nodes if (v := fxopt.ir.op_view(gm, n)) is not None]


def _capture_warning(listed: str, effects: str) -> str:
    return re.escape(
        f"capture: Sequential is in training mode ({listed}); fxopt optimizes its eval-mode semantics, as after "
        f"model.eval(): {effects}. The result is verified against that eval-mode copy, not against the model in "
        "training mode (left as it is); call model.eval() first to optimize for inference without this warning")


BN_EFFECT = ("batchnorm uses its running statistics, not each batch's (`fuse` folds them into the conv or linear "
             "before it)")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pipeline", ["fuse", "fuse,lower-cpu"])
def test_a_model_in_training_mode_is_optimized_in_eval_mode_with_a_warning(mode, pipeline):
    model, x = _conv_bn(dropout=0.2), torch.randn(4, 3, 8, 8)
    state = copy.deepcopy(model.state_dict())
    with pytest.warns(fxopt.TrainingModeWarning) as record:
        res = fxopt.optimize(model, (x,), pipeline=pipeline, mode=mode)
    ours = [w for w in record if issubclass(w.category, fxopt.TrainingModeWarning)]
    assert len(ours) == 1
    assert re.fullmatch(_capture_warning("BatchNorm2d '1', Dropout '3'", BN_EFFECT + " and dropout is off"),
                        str(ours[0].message)), str(ours[0].message)
    assert ours[0].filename == __file__  # it points at the user's call, not at fxopt's call of capture
    # the user's model is left in training mode, its statistics untouched
    assert all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    # what was optimized, folded and verified is the eval-mode model ...
    assert res.verification.passed and "batch_norm" not in _kinds(res.module)
    eval_copy = copy.deepcopy(model).eval()
    torch.testing.assert_close(res.module(x), eval_copy(x), rtol=1e-4, atol=1e-5)
    # ... which is not what the model computes in training mode: that is why it warns
    train_copy = copy.deepcopy(model)
    train_copy[3].p = 0.0  # the batch statistics alone make the difference
    assert not torch.allclose(res.module(x), train_copy(x), rtol=0.05, atol=0.05)


def test_the_warning_can_be_made_an_error():
    model = _conv_bn()
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxopt.TrainingModeWarning)
        with pytest.raises(fxopt.TrainingModeWarning, match=_capture_warning("BatchNorm2d '1'", BN_EFFECT)):
            fxopt.optimize(model, (torch.randn(2, 3, 8, 8),), pipeline="fuse", mode="symbolic")
        fxopt.optimize(model.eval(), (torch.randn(2, 3, 8, 8),), pipeline="fuse", mode="symbolic")  # no warning


def test_only_the_batchnorm_left_in_training_mode_is_named():
    model = _conv_bn(dropout=0.2).eval()
    model[1].train()
    with pytest.warns(fxopt.TrainingModeWarning, match="^" + _capture_warning("BatchNorm2d '1'", BN_EFFECT) + "$"):
        fxopt.capture(model, (torch.randn(2, 3, 8, 8),), mode="symbolic")
    assert model[1].training and not model[3].training


@pytest.mark.parametrize("build,listed,effects", [
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.ReLU()), "Dropout '1'", "dropout is off"),
    (lambda: nn.Sequential(nn.Conv1d(3, 3, 1), nn.InstanceNorm1d(3, track_running_stats=True)),
     "InstanceNorm1d '1'", BN_EFFECT),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Dropout(0.1), nn.Dropout(0.1), nn.Dropout(0.1)),
     "Dropout '1', Dropout '2', Dropout '3' and 1 more", "dropout is off"),
])
def test_the_modules_that_compute_otherwise_in_eval_mode_are_named(build, listed, effects):
    with pytest.warns(fxopt.TrainingModeWarning, match="^" + _capture_warning(listed, effects) + "$"):
        fxopt.capture(build(), (torch.randn(2, 3, 4),), mode="symbolic")


def test_a_rate_attribute_counts_as_dropout():
    class Attention(nn.Module):  # Hugging Face's way: a float rate, F.dropout(p=..., training=self.training)
        def __init__(self):
            super().__init__()
            self.proj, self.attention_dropout = nn.Linear(4, 4), 0.1

        def forward(self, x):
            return torch.nn.functional.dropout(self.proj(x), p=self.attention_dropout, training=self.training)

    with pytest.warns(fxopt.TrainingModeWarning, match=r"^capture: Attention is in training mode \(Attention "
                                                        r"\(the model itself\)\); .*: dropout is off\. "):
        fxopt.capture(Attention(), (torch.randn(2, 4),), mode="symbolic")


@pytest.mark.parametrize("build", [
    lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU()),  # nothing that depends on the mode
    lambda: nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.0)),
    lambda: nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False)),  # batch stats either way
])
def test_a_model_whose_modes_agree_does_not_warn(build):
    model, x = build(), torch.randn(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxopt.TrainingModeWarning)
        res = fxopt.optimize(model, (x,), pipeline="fuse", mode="symbolic")
    torch.testing.assert_close(res.module(x), model(x))


@pytest.mark.parametrize("frontend", ["symbolic_trace", "torch.export"])
def test_a_graph_captured_in_training_mode_keeps_its_batchnorm(frontend):
    """The user's own train-mode graph is not put in eval mode: `fuse` leaves the batchnorm
    (batch statistics fold into no weight) and names it; the result computes what the graph does."""
    model, x = _conv_bn(), torch.randn(4, 3, 8, 8)
    if frontend == "symbolic_trace":
        gm = torch.fx.symbolic_trace(model)
        label, conv = "node '_1' (call_module 1)", "_0"
    else:
        gm = torch.export.export(copy.deepcopy(model), (x,)).module()
        label, conv = "node 'batch_norm' (call_function aten::batch_norm)", "conv2d"
    with pytest.warns(fxopt.TrainingModeWarning, match="^" + re.escape(
            f"fuse: {label} is a batchnorm in training mode: it normalizes each batch with that batch's statistics, "
            f"which no folded weight holds, so it is not folded into its conv '{conv}'; call model.eval() before "
            "capturing the model to fold its running statistics")):
        res = fxopt.optimize(gm, (x,), pipeline="fuse")
    assert "batch_norm" in _kinds(res.module) and "conv+bn" not in res.passes[0].stats["matches"]
    torch.testing.assert_close(res.module(x), copy.deepcopy(model)(x), rtol=1e-4, atol=1e-5)


class _BatchStatisticsByDesign(nn.Module):
    """An eval-mode model whose forward asks for batch statistics itself."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3)
        self.register_buffer("rm", torch.zeros(8))
        self.register_buffer("rv", torch.ones(8))

    def forward(self, x):
        return F.batch_norm(self.c(x), self.rm.clone(), self.rv.clone(), None, None, True, 0.1, 1e-5)


def test_a_forward_that_asks_for_batch_statistics_is_not_told_to_call_eval():
    """model.eval() cannot change a literal training=True: the warning said to call it."""
    model = _BatchStatisticsByDesign().eval()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        res = fxopt.optimize(model, torch.randn(2, 3, 8, 8), "fuse", mode="symbolic")
    assert res.verification.passed
    assert not [w for w in record if issubclass(w.category, fxopt.TrainingModeWarning)]
    assert any("called with training=True by the model's forward" in str(w.message) for w in record)


def test_a_batchnorm_in_training_mode_before_a_conv_is_named_too():
    """bn+conv folds a batchnorm into the conv after it: one in training mode stays, with the
    same warning as one after a conv (it was kept silently)."""
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 8, 3))
    x = torch.randn(4, 3, 8, 8)
    with pytest.warns(fxopt.TrainingModeWarning, match="node '_0' .* is a batchnorm in training mode.*conv '_1'"):
        res = fxopt.optimize(torch.fx.symbolic_trace(model), (x,), pipeline="fuse")
    assert "batch_norm" in _kinds(res.module)
    torch.testing.assert_close(res.module(x), copy.deepcopy(model)(x), rtol=1e-4, atol=1e-5)
