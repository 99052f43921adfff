"""An exported graph called with inputs it was not captured for names the input, the dimension
and the captured size or range, and says how to capture again (fxopt/call_check.py)."""
import copy
import re
import warnings

import pytest
import torch
from torch import nn

import fxopt
from fxopt.errors import InputMismatchError


class Positions(nn.Module):
    """Adds a learned position table sliced to the sequence length: export fixes that length."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.pos = nn.Parameter(torch.randn(16, 8))

    def forward(self, x, mask=None):
        y = self.proj(x) + self.pos[: x.shape[1]]
        return y if mask is None else y * mask


class TwoInputs(nn.Module):
    def forward(self, x, y):
        return x * 2 + y


def _export(model, inputs, **kw):
    return fxopt.capture(model.eval(), inputs, mode="export", **kw)


def test_a_specialized_sequence_length_names_input_dim_and_captured_size():
    gm = _export(Positions(), (torch.randn(2, 5, 8),))
    assert gm(torch.randn(3, 5, 8)).shape == (3, 5, 8)  # the batch stays dynamic: no error
    with pytest.raises(InputMismatchError) as info:
        gm(torch.randn(2, 6, 8))
    text = str(info.value)
    assert "input 0 ('x') has size 6 at dim 1, where the graph was captured with size 5" in text
    assert "dynamic_shapes={'x': {1: torch.export.Dim.AUTO}}" in text
    assert "Guard failed" in str(info.value.__cause__)  # torch's own words stay reachable


def test_a_keyword_the_graph_was_captured_without_is_named():
    gm = _export(Positions(), (torch.randn(2, 5, 8),))
    with pytest.raises(InputMismatchError, match="captured without input 'mask'.*takes \\(x\\)"):
        gm(torch.randn(2, 5, 8), mask=torch.ones(2, 5, 8))
    with pytest.raises(InputMismatchError, match="forward has no input 'nope'"):
        gm(torch.randn(2, 5, 8), nope=1)
    with pytest.raises(InputMismatchError, match="by keyword.*by position"):
        gm(x=torch.randn(2, 5, 8))
    with pytest.raises(InputMismatchError, match="called with 2 positional inputs"):
        gm(torch.randn(2, 5, 8), torch.ones(2, 5, 8))


def test_a_keyword_input_the_graph_was_captured_with_must_be_given():
    x, mask = torch.randn(2, 5, 8), torch.rand(2, 5, 8)
    model = Positions().eval()
    gm = _export(model, {"x": x, "mask": mask})
    torch.testing.assert_close(gm(x=x, mask=mask), model(x, mask))
    with pytest.raises(InputMismatchError, match="input 'mask' is missing"):
        gm(x=x)


def test_another_rank_is_named_with_the_captured_shape():
    gm = _export(Positions(), (torch.randn(2, 5, 8),))
    with pytest.raises(InputMismatchError, match=r"input 0 \('x'\) has 2 dimensions .*captured with 3 \(shape \[any, 5, 8\]\)"):
        gm(torch.randn(2, 8))


def test_inputs_that_share_the_batch_must_agree():
    gm = _export(TwoInputs(), (torch.randn(2, 4), torch.randn(2, 4)))
    gm(torch.randn(3, 4), torch.randn(3, 4))
    with pytest.raises(InputMismatchError, match=r"input 1 \('y'\) has size 5 at dim 0, where input 0 \('x'\) has 3"):
        gm(torch.randn(3, 4), torch.randn(5, 4))


def test_a_range_from_dynamic_shapes_is_named():
    x = torch.randn(2, 5, 8)
    seq = torch.export.Dim("seq", min=2, max=16)
    gm = _export(Positions(), (x,), dynamic_shapes={"x": {1: seq}})
    assert gm(torch.randn(3, 9, 8)).shape == (3, 9, 8)  # the batch is still dynamic beside it
    with pytest.raises(InputMismatchError, match=r"size 17 at dim 1; the graph takes sizes 0 to 16 there"):
        gm(torch.randn(2, 17, 8))


def test_the_advice_works_dim_auto_keeps_the_sequence_length_dynamic():
    x = torch.randn(2, 5, 8)
    model = Positions().eval()
    gm = _export(model, (x,), dynamic_shapes={"x": {1: torch.export.Dim.AUTO}})
    other = torch.randn(3, 7, 8)
    torch.testing.assert_close(gm(other), model(other))


def test_optimize_passes_dynamic_shapes_on():
    model = Positions().eval()
    res = fxopt.optimize(model, (torch.randn(2, 5, 8),), "fuse", mode="export",
                         dynamic_shapes={"x": {1: torch.export.Dim.AUTO}})
    other = torch.randn(1, 9, 8)
    torch.testing.assert_close(res.module(other), model(other), rtol=1e-4, atol=1e-5)


def test_dynamic_shapes_of_the_wrong_type_is_refused():
    with pytest.raises(TypeError, match="dynamic_shapes"):
        fxopt.capture(Positions().eval(), (torch.randn(2, 5, 8),), mode="export", dynamic_shapes="x:1")


def test_an_optimized_and_a_loaded_graph_explain_too(tmp_path):
    res = fxopt.optimize(Positions().eval(), (torch.randn(2, 5, 8),), "fuse,dce", mode="export")
    path = tmp_path / "m.pt"
    fxopt.save(res.module, path)
    for gm in (res.module, fxopt.load(path)):
        with pytest.raises(InputMismatchError, match="size 6 at dim 1, where the graph was captured with size 5"):
            gm(torch.randn(2, 6, 8))
        with pytest.raises(InputMismatchError, match="captured without input 'mask'"):
            gm(torch.randn(2, 5, 8), mask=torch.ones(2, 5, 8))


def test_a_failure_on_an_input_of_another_dtype_names_it_with_torch_error():
    gm = _export(Positions(), (torch.randn(2, 5, 8),))
    with pytest.raises(InputMismatchError, match=r"input 0 \('x'\) is float64; the graph was captured with float32 "
                                                 r"there, and the call fails on it \(RuntimeError: mat1 and mat2"):
        gm(torch.randn(2, 5, 8, dtype=torch.float64))


def test_a_specialized_flag_names_its_captured_value():
    class Flag(nn.Module):
        def forward(self, x, flag=True):
            return x if flag else -x

    gm = _export(Flag(), (torch.randn(2, 4), True))
    with pytest.raises(InputMismatchError, match=r"captured with input 1 \('flag'\)=True.*called with False"):
        gm(torch.randn(2, 4), False)


def test_only_the_captured_module_is_wrapped():
    """The wrapper sits on the GraphModule's own class: a graph of the user's is left as it was."""
    user_gm = torch.export.export(Positions().eval(), (torch.randn(2, 5, 8),), strict=False).module()
    before = type(user_gm)._wrapped_call
    gm = fxopt.capture(user_gm, (torch.randn(2, 5, 8),))
    assert type(user_gm)._wrapped_call is before
    assert type(gm) is not type(user_gm)


class SeqMean(nn.Module):
    """A branch on the sequence length: export keeps one branch, for one length."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[1] > 5:
            return self.proj(x).sum(1) / x.shape[1]
        return self.proj(x).amax(1)


def _saved_and_loaded(gm, tmp_path, name="m.pt"):
    fxopt.save(gm, tmp_path / name)
    return fxopt.load(tmp_path / name)


def test_a_loaded_graph_guards_its_inputs_as_the_captured_one_did(tmp_path):
    """save dropped export's guard: the loaded graph ran seq 3 and 9 through the seq-7 branch and
    returned wrong numbers without a word."""
    model = SeqMean().eval()
    loaded = _saved_and_loaded(_export(model, (torch.randn(2, 7, 4),)), tmp_path)
    x = torch.randn(3, 7, 4)
    torch.testing.assert_close(loaded(x), model(x))   # the batch stays dynamic
    for seq in (3, 9):
        with pytest.raises(InputMismatchError, match=rf"input 0 \('x'\) has size {seq} at dim 1, where the graph "
                                                     r"was captured with size 7"):
            loaded(torch.randn(2, seq, 4))
    with pytest.raises(InputMismatchError, match=r"has 2 dimensions"):
        loaded(torch.randn(2, 7))
    again = _saved_and_loaded(loaded, tmp_path, "again.pt")   # one guard, not two
    assert [n.target for n in again.graph.find_nodes(op="call_module")] == ["_guards_fxopt"]
    with pytest.raises(InputMismatchError, match="size 9 at dim 1"):
        copy.deepcopy(again)(torch.randn(2, 9, 4))   # the guard is in the graph: a copy keeps it


def test_a_loaded_graph_refuses_another_value_of_a_specialized_number(tmp_path):
    class Scale(nn.Module):
        def forward(self, x, n: int):
            return x * n

    loaded = _saved_and_loaded(_export(Scale(), (torch.randn(2, 4), 3)), tmp_path)
    torch.testing.assert_close(loaded(torch.ones(2, 4), 3), torch.full((2, 4), 3.0))
    with pytest.raises(InputMismatchError, match=r"captured with input 1 \('n'\)=3.*called with 7"):
        loaded(torch.ones(2, 4), 7)


def test_keyword_inputs_are_not_taken_by_position_by_an_optimized_or_loaded_graph(tmp_path):
    """Captured from {'y': Y, 'x': X}, the graph's forward is (y, x): without export's pre-hook
    (dropped by every copy) g(X, Y) swapped them and returned a wrong result."""
    class Sub(nn.Module):
        def forward(self, x, y):
            return x - 2 * y

    X, Y = torch.randn(2, 4), torch.randn(2, 4)
    res = fxopt.optimize(Sub().eval(), {"y": Y, "x": X}, "dce", mode="export")
    for gm in (res.module, _saved_and_loaded(res.module, tmp_path)):
        torch.testing.assert_close(gm(x=X, y=Y), X - 2 * Y)
        with pytest.raises(InputMismatchError, match=r"called with 2 positional inputs; the graph takes \(y=, x=\)"):
            gm(X, Y)


class Plus(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x, y=None):
        return self.proj(x) if y is None else self.proj(x) + y


def _runs(gm, shape):
    try:
        gm(torch.randn(*shape))
    except InputMismatchError:
        return False
    return True


@pytest.mark.parametrize("spec", [{"x": {1: torch.export.Dim.AUTO}}, ({1: torch.export.Dim.AUTO},),
                                  [{1: torch.export.Dim.AUTO}], {"x": {-2: torch.export.Dim.AUTO}}])
def test_dynamic_shapes_by_position_or_negative_dim_keep_the_batch_dynamic_too(spec):
    """By position, fxopt's dynamic batch was dropped; a negative dim was ignored by export."""
    gm = _export(Plus(), (torch.randn(2, 7, 4),), dynamic_shapes=spec)
    assert _runs(gm, (5, 7, 4)) and _runs(gm, (2, 9, 4))


@pytest.mark.parametrize("spec, says", [
    ({"x": {5: torch.export.Dim.AUTO}}, r"dynamic_shapes: input 'x' has 3 dimensions \(shape \(2, 7, 4\)\); it has no dim 5"),
    ({"z": {1: torch.export.Dim.AUTO}}, r"dynamic_shapes names input 'z', which the example inputs do not give; they give: x"),
    (({1: torch.export.Dim.AUTO}, None), r"dynamic_shapes gives 2 entries by position; forward takes 1 inputs here \(x\)"),
    ({"x": {1: "auto"}}, r"dim 1 of input 'x' is 'auto' \(a str\); give torch.export.Dim.AUTO"),
    ({"x": (None, torch.export.Dim.AUTO)}, r"input 'x' has 3 dimensions \(shape \(2, 7, 4\)\); its entry gives 2"),
    ({"x": 1}, r"dynamic_shapes: input 'x' is given 1 \(an int\); give a dict \{dim: spec\}"),
    ({"x": {1: torch.export.Dim("T", min=8, max=10)}},
     r"dynamic_shapes: dim 1 of input 'x' is Dim\('T', min=8, max=10\), but the example's size there is 7"),
])
@pytest.mark.parametrize("mode", ["export", "symbolic", "auto"])
def test_dynamic_shapes_that_name_no_dim_of_the_inputs_are_refused(spec, says, mode):
    """In every mode: a symbolic graph does not use dynamic_shapes, but a misnamed key is the caller's mistake."""
    with pytest.raises(fxopt.CaptureError, match=says):
        fxopt.capture(Plus().eval(), (torch.randn(2, 7, 4),), mode=mode, dynamic_shapes=spec)


@pytest.mark.parametrize("spec, asked", [
    ({"x": {1: 7}}, "dim 1 of input 'x' (static)"),
    ({"x": (None, None, torch.export.Dim.STATIC)}, "dim 2 of input 'x' (static)"),
    ({"x": {1: torch.export.Dim("T", min=3, max=10)}}, "dim 1 of input 'x' (Dim('T', min=3, max=10))"),
])
@pytest.mark.parametrize("mode", ["symbolic", "auto"])
def test_a_size_dynamic_shapes_asks_of_a_symbolic_graph_is_warned_unchecked(spec, asked, mode):
    """A symbolic graph runs at any size: a static dim or a Dim's range went unheeded without a word."""
    with pytest.warns(fxopt.CaptureWarning, match=re.escape(f"dynamic_shapes' {asked} is not checked")):
        gm = fxopt.capture(Plus().eval(), (torch.randn(2, 7, 4),), mode=mode, dynamic_shapes=spec)
    assert fxopt.frontend_of(gm) == "symbolic" and gm(torch.randn(2, 12, 4)).shape == (2, 12, 4)


@pytest.mark.parametrize("spec", [{"x": {1: torch.export.Dim.AUTO}}, {"x": {1: torch.export.Dim("T")}}])
def test_a_dim_any_size_fits_is_not_warned_about_in_a_symbolic_graph(spec):
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxopt.CaptureWarning)
        fxopt.capture(Plus().eval(), (torch.randn(2, 7, 4),), mode="symbolic", dynamic_shapes=spec)


class _FixedBatch(nn.Module):
    def forward(self, x, bias):
        return x.view(2, x.shape[1], -1) + bias  # the batch must be 2


def test_dynamic_shapes_naming_some_inputs_works_where_the_batch_cannot_stay_dynamic():
    """The export with a static batch was given the caller's dict as it was, naming 'x' only,
    and failed with torch's "top-level keys must be the arg names ['x', 'bias']"."""
    length = torch.export.Dim("T", min=2, max=10)
    with pytest.warns(fxopt.CaptureWarning, match="static batch size"):
        gm = _export(_FixedBatch(), (torch.randn(2, 5, 8), torch.randn(8)), dynamic_shapes={"x": {1: length}})
    x, bias = torch.randn(2, 7, 8), torch.randn(8)
    torch.testing.assert_close(gm(x, bias), x + bias)


def test_an_input_dynamic_shapes_leaves_at_none_keeps_its_batch():
    """`[{1: Dim.AUTO}, None]`: the None made y's batch static, and with it every input's."""
    inputs = (torch.randn(2, 7, 4), torch.randn(2, 7, 4))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="capture:.*static batch")
        gm = _export(Plus(), inputs, dynamic_shapes=[{1: torch.export.Dim.AUTO}, None])
    assert gm(torch.randn(5, 7, 4), torch.randn(5, 7, 4)).shape == (5, 7, 4)


@pytest.mark.parametrize("spec", [{"x": {1: 7}}, {"x": {0: torch.export.Dim.STATIC}},
                                  {"x": (None, torch.export.Dim.AUTO, None)}])
def test_what_dynamic_shapes_asks_for_is_not_warned_about(spec):
    """A static size asked for (an int, Dim.STATIC) was warned about as 'asked to keep dynamic',
    or as a batch that 'could not stay dynamic'; a per-dim tuple is read as the dict it means."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="capture:")
        gm = _export(Plus(), (torch.randn(2, 7, 4),), dynamic_shapes=spec)
    assert _runs(gm, (2, 7, 4))


def test_a_dim_asked_dynamic_that_export_kept_static_warns():
    """x + y ties x's dim 1 to y's static one: the graph refused seq 9 at the call, unannounced."""
    inputs = {"x": torch.randn(2, 7, 4), "y": torch.randn(2, 7, 4)}
    with pytest.warns(UserWarning, match=r"exported with dim 1 of 'x' \(size 7\) static, which dynamic_shapes asked "
                                         r"to keep dynamic"):
        _export(Plus(), inputs, dynamic_shapes={"x": {1: torch.export.Dim.AUTO}})


def test_a_batch_kept_dynamic_over_a_range_only_is_announced_at_capture():
    """`if x.shape[0] > 2:` keeps the batch dynamic from 3 up: a batch of 1 was refused at the
    call with no word at capture (the README promises a warning where the batch is not free)."""
    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            return self.proj(x) if x.shape[0] > 2 else -self.proj(x)

    with pytest.warns(UserWarning, match=r"exported for batch sizes 3 or more only"):
        gm = _export(Branch(), (torch.randn(4, 4),))
    with pytest.raises(InputMismatchError, match=r"size 1 at dim 0; the graph takes sizes 3 or more there"):
        gm(torch.randn(1, 4))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="capture:")   # a batch free from 1 up says nothing
        _export(TwoInputs(), (torch.randn(2, 4), torch.randn(2, 4)))


def test_the_batch_sizes_announced_at_capture_are_those_the_graph_takes():
    """`x.chunk(2)` traced at 4 refuses batches 2 and 3 too (a condition on the size, not the
    range), yet capture said "batch sizes 2 or more": the warning lists the sizes it takes."""
    class Halves(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            a, b = x.chunk(2, 0)
            return torch.cat([self.proj(a), self.proj(b) * 2])

    class EvenRows(nn.Module):
        def forward(self, x):
            return x.reshape(x.shape[0] // 2, -1) if x.shape[0] % 2 == 0 else x.reshape(1, -1)

    with pytest.warns(fxopt.CaptureWarning, match=r"exported for batch sizes 4, 5, 6, 7, 8, 9, 10, 11, \.\.\. only "
                                                  r"\(of 2 to 17, the others fail a condition"):
        halves = _export(Halves().eval(), (torch.randn(4, 4),))
    with pytest.warns(fxopt.CaptureWarning, match=r"exported for batch sizes 4, 6, 8, 10, 12, 14, 16, \.\.\. only"):
        even = _export(EvenRows(), (torch.randn(4, 4),))
    for gm, refused, taken in ((halves, (2, 3), (4, 5)), (even, (2, 3, 5), (4, 6))):
        for b in refused:
            with pytest.raises(InputMismatchError):
                gm(torch.randn(b, 4))
        for b in taken:
            gm(torch.randn(b, 4))


class SingleSample(nn.Module):
    """A path of its own for a batch of 1, which torch.export (tracing sizes 2 and up) never sees."""

    def forward(self, x):
        return x * 10 if x.shape[0] == 1 else x + 1


def test_a_batch_of_1_the_graph_did_not_trace_is_refused_not_answered_wrongly(tmp_path):
    """Captured at batch 3, the graph returned x + 1 at batch 1 where the model returns x * 10:
    the captured, the optimized and the loaded graph all refuse the batch now, and say so at capture."""
    model, x = SingleSample().eval(), torch.ones(1, 4)
    with pytest.warns(fxopt.CaptureWarning, match=r"exported for batch sizes 2 or more only"):
        gm = _export(model, (torch.randn(3, 4),))
    with pytest.warns(fxopt.CaptureWarning, match=r"exported for batch sizes 2 or more only"):
        optimized = fxopt.optimize(model, torch.randn(3, 4), "dce").module   # auto: symbolic fails, export
    for graph in (gm, optimized, _saved_and_loaded(gm, tmp_path)):
        with pytest.raises(InputMismatchError, match=r"input 0 \('x'\) has size 1 at dim 0; the graph takes sizes 2 "
                                                     r"or more there.*with an example of that size"):
            graph(x)
        assert graph(torch.ones(5, 4)).tolist() == [[2.0] * 4] * 5


def test_an_example_of_batch_1_gives_that_paths_graph():
    """Traced at a batch of 2 (export's smallest dynamic size), the graph took the other branch
    and capture failed; it falls back to a static batch of 1 and computes the model's path."""
    with pytest.warns(UserWarning, match=r"static batch size.*traced at a batch of 2, the graph differs from the "
                                         r"model at the example's batch of 1"):
        gm = _export(SingleSample(), (torch.ones(1, 4),))
    assert gm(torch.ones(1, 4)).tolist() == [[10.0] * 4]


class FirstToken(nn.Module):
    """A path of its own for a sequence of length 1 (as decoding code has)."""

    def forward(self, x):
        return x[:, 0] * 2 if x.shape[1] == 1 else x.mean(1)


def test_a_sequence_length_of_1_the_graph_did_not_trace_is_refused():
    gm = _export(FirstToken(), (torch.randn(2, 5, 4),), dynamic_shapes={"x": {1: torch.export.Dim.AUTO}})
    assert torch.equal(gm(torch.ones(2, 7, 4)), torch.ones(2, 4))
    with pytest.raises(InputMismatchError, match=r"size 1 at dim 1; the graph takes sizes 2 or more there"):
        gm(torch.randn(2, 1, 4))


def test_sizes_1_and_0_the_graph_computes_right_are_taken():
    """Most graphs compute the model at a batch of 1 and 0 alike: checked at capture, they stay open."""
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU()).eval()
    gm = _export(model, (torch.randn(3, 4),))
    assert gm.meta["fxopt"]["inputs"]["leaves"][0]["shape"][0]["min"] == 0
    for batch in (1, 0):
        x = torch.randn(batch, 4)
        assert torch.equal(gm(x), model(x))


class Untied(nn.Module):
    """Two inputs whose batches no op ties together: export gives each a symbol of its own."""

    def forward(self, ids, mask):
        return ids.sum(0) + mask.sum(0)


def test_a_batch_of_1_is_checked_for_every_input_at_once():
    """Each symbol was tried at 1 alone: ids of batch 1 beside a mask of batch 2 made the model
    fail, which was read as a branch, and a batch of 1 was refused (Hugging Face encoders)."""
    model = Untied().eval()
    gm = _export(model, (torch.randn(2, 8), torch.randn(2, 8)))
    ids, mask = torch.randn(1, 8), torch.randn(1, 8)
    torch.testing.assert_close(gm(ids, mask), model(ids, mask))


class Counter(nn.Module):
    """Output depends on a count kept in Python: each eager run differs from the last."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * self.calls


def test_state_kept_in_python_is_not_read_as_a_branch_on_the_batch():
    """The probe at batch 1 saw another output (the count moved) and blamed the batch size."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = _export(Counter(), (torch.randn(3, 4),))
    messages = [str(w.message) for w in caught]
    assert any("depends on state its forward keeps in Python" in m for m in messages), messages
    assert not any("batch sizes" in m for m in messages), messages
    assert gm(torch.ones(1, 4)).shape == (1, 4)


def test_a_record_saved_before_sizes_were_checked_takes_them_as_it_did():
    from fxopt.call_check import upgrade_record

    record = {"leaves": [{"label": "input 0 ('x')", "shape": [{"symbol": "s0", "min": 2, "max": None}, 4]}]}
    assert upgrade_record(record)["leaves"][0]["shape"][0]["min"] == 0


class Nested(nn.Module):
    def forward(self, batch, xs):
        return batch["a"] * 2 + batch["b"]["c"] + xs[0] - xs[1]


def _nested_inputs(n):
    return {"a": torch.randn(n, 3), "b": {"c": torch.randn(n, 3)}}, [torch.randn(n, 3), torch.randn(n, 3)]


def test_containers_eager_code_reads_alike_are_taken():
    """A nested dict's keys in another order, or a tuple for a list: eager takes them, export's
    input check refused them with torch's pytree dump."""
    model = Nested().eval()
    gm = _export(model, _nested_inputs(2))
    batch, xs = _nested_inputs(4)
    for args in (({"b": batch["b"], "a": batch["a"]}, xs), (batch, tuple(xs))):
        torch.testing.assert_close(gm(*args), model(*args))


def test_a_container_with_other_keys_or_length_is_named():
    gm = _export(Nested().eval(), _nested_inputs(2))
    batch, xs = _nested_inputs(2)
    with pytest.raises(InputMismatchError, match=r"input 0 \('batch'\)\['b'\] holds keys \['x'\], where the graph was "
                                                 r"captured with \['c'\]"):
        gm({"a": batch["a"], "b": {"x": batch["b"]["c"]}}, xs)
    with pytest.raises(InputMismatchError, match=r"input 1 \('xs'\) holds 3 values, where the graph was captured "
                                                 r"with 2"):
        gm(batch, [*xs, xs[0]])


class Offsets(nn.Module):
    def forward(self, x, xs):
        for t in xs:
            x = x - t
        return x


@pytest.mark.parametrize("extra", [lambda o: [o, o, o], lambda o: (o, o, o), lambda o: {0: o, 1: o, 2: o}])
def test_a_loaded_or_optimized_graph_refuses_a_longer_list_than_it_was_captured_with(extra, tmp_path):
    """The loaded graph read the first 2 items of a list of 3 and returned -2 where eager gives -3."""
    model, x, o = Offsets().eval(), torch.zeros(2, 3), torch.ones(2, 3)
    gm = _export(model, (x, [o, o]))
    optimized = fxopt.optimize(model, (x, [o, o]), "dce", mode="export").module
    for graph in (gm, optimized, _saved_and_loaded(gm, tmp_path)):
        torch.testing.assert_close(graph(x, (o, o)), model(x, (o, o)))
        with pytest.raises(InputMismatchError, match=r"input 1 \('xs'\) (holds 3 values|is a dict), where the graph "
                                                     r"was captured with (2|a list)"):
            graph(x, extra(o))


class EvenBatch(nn.Module):
    """A path of its own for even batches: export guards the parity, which no range holds."""

    def forward(self, x):
        return x * 10 if x.shape[0] % 2 == 0 else x + 1


def test_a_condition_export_guards_besides_ranges_is_checked_by_every_graph(tmp_path):
    """The loaded graph lost export's `x.size()[0] % 2 == 0` and returned x * 10 at batch 3 where
    the model returns x + 1; the captured one raised torch's raw AssertionError."""
    model = EvenBatch().eval()
    gm = _export(model, (torch.randn(4, 3),))
    optimized = fxopt.optimize(model, torch.randn(4, 3), "dce,lower-eager").module
    for graph in (gm, optimized, _saved_and_loaded(gm, tmp_path)):
        assert graph(torch.ones(6, 3)).tolist() == [[10.0] * 3] * 6
        with pytest.raises(InputMismatchError, match=r"the input sizes do not meet \(x\.shape\[0\] % 2\) == 0, a "
                                                     r"condition of the model's code"):
            graph(torch.ones(3, 3))


def test_a_condition_read_from_a_file_is_evaluated_only_as_arithmetic():
    from fxopt import size_guards

    assert size_guards.from_export(["__import__('os').getcwd() == L['x'].size()[0]", "L['y'].size()[0] > 1"],
                                   {"L['x']": 0}) == []
    crafted = ["__import__('os').system('false')", "v0_0 ** 99999999 > 1"]
    assert size_guards.failed(crafted, (torch.zeros(2),)) is None   # neither is run


class _FixedLength(torch.nn.Module):
    """Ties dim 1 of its input to a parameter's size: export keeps it static whatever is asked."""

    def __init__(self):
        super().__init__()
        self.pos = torch.nn.Parameter(torch.randn(5, 8))

    def forward(self, x):
        return x + self.pos


def test_a_dim_the_model_fixes_though_dynamic_shapes_asked_does_not_advise_dynamic_shapes(tmp_path):
    """The advice repeated what the caller had passed ('keep the dimension dynamic with
    dynamic_shapes={'x': {1: ...}}'): the model's code fixes that dimension."""
    with pytest.warns(fxopt.CaptureWarning, match="dynamic_shapes asked to keep dynamic"):
        gm = fxopt.capture(_FixedLength(), torch.randn(2, 5, 8), mode="export",
                           dynamic_shapes={"x": {1: torch.export.Dim.AUTO}})
    fxopt.save(gm, tmp_path / "g.pt")
    for graph in (gm, fxopt.load(tmp_path / "g.pt")):
        with pytest.raises(fxopt.InputMismatchError) as info:
            graph(torch.randn(2, 6, 8))
        message = str(info.value)
        assert "has size 6 at dim 1, where the graph was captured with size 5" in message
        assert "the model's code fixes that dimension" in message and "dynamic_shapes" not in message


class _FlattenedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(y.contiguous().view(y.shape[0], -1))


def test_an_input_of_another_memory_layout_runs_where_export_dropped_a_contiguous(tmp_path):
    """export traced `.contiguous()` on the contiguous example as nothing, and a channels_last
    input then failed in the `view` ("view size is not compatible"), where eager runs it."""
    model, x = _FlattenedConv().eval(), torch.randn(2, 3, 8, 8)
    gm = _export(model, (x,))
    path = tmp_path / "flat.pt"
    fxopt.save(gm, path)
    for graph in (gm, fxopt.load(path)):
        for _ in range(2):  # the second call takes the contiguous copy up front
            other = torch.randn(3, 3, 8, 8).to(memory_format=torch.channels_last)
            torch.testing.assert_close(graph(other), model(other), rtol=0, atol=0)


class _DoublesItsInput(nn.Module):
    def forward(self, x):
        x.mul_(2)
        return x.contiguous().view(x.shape[0], -1)


def test_a_graph_that_writes_its_input_is_not_run_again_on_a_copy():
    """The failed call wrote x already: run again on a contiguous copy of it, the output was 4x."""
    gm = _export(_DoublesItsInput(), (torch.randn(2, 3, 4, 4),))
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        gm(torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last))


def test_a_call_of_another_rank_is_refused_naming_the_input():
    """Captured at (4, 8), a (4, 8, 8) call ran: export's guard checks no rank, and after fuse
    folded a BatchNorm1d into the Linear (exact in 2-D only) the graph was off by 2.59."""
    model = nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 4)).eval()
    gm = _export(model, (torch.randn(4, 8),))
    with pytest.raises(InputMismatchError, match=r"input 0 \('input'\) has 3 dimensions \(shape \(4, 8, 8\)\); the "
                                                 r"graph was captured with 2"):
        gm(torch.randn(4, 8, 8))
    assert gm(torch.randn(3, 8)).shape == (3, 4)


class _CountsCalls(_FlattenedConv):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return super().forward(x)


def test_a_graph_that_writes_a_buffer_is_not_run_again_on_a_copy():
    """The failed call counted already: run again, the counter went 0 -> 2 for one call."""
    gm = _export(_CountsCalls(), (torch.randn(2, 3, 8, 8),))
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        gm(torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last))
    assert dict(gm.named_buffers())["calls"].item() <= 1


def test_a_graph_with_observers_is_not_run_again_on_a_copy():
    """An observer before the failing view counted one channels_last call as two batches."""
    gm = fxopt.optimize(_FlattenedConv().eval(), torch.randn(2, 3, 8, 8), "insert-observers", mode="export",
                        verify=False).module
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        gm(torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last))


class _Noisy(_FlattenedConv):
    def forward(self, x):
        return super().forward(x + torch.rand_like(x))


def test_a_graph_that_draws_random_numbers_is_not_run_again_on_a_copy():
    """Run again, it drew other numbers than eager under the same seed (off by 0.46)."""
    gm = _export(_Noisy(), (torch.randn(2, 3, 8, 8),))
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        gm(torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last))


class _CountsInARegion(_FlattenedConv):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        with torch.no_grad():
            self.calls.add_(1)
        return super().forward(x)


def test_a_buffer_written_inside_a_region_is_not_written_twice():
    """The retry's checks read the top graph only: a write inside a no_grad region ran twice."""
    gm = _export(_CountsInARegion(), (torch.randn(2, 3, 8, 8),))
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        gm(torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last))


def _eager_bound(model, x):
    """An export graph whose view is a Tensor method (lower-eager's binding): torch.fx prints the failing
    line of a call that raises in a method of the graph's own code, not in an OpOverload."""
    return fxopt.optimize(model, x, "lower-eager", mode="export", verify=False).module


def test_a_channels_last_call_run_again_on_a_copy_prints_nothing(capsys):
    """torch.fx printed the failed call's line ('Call using an FX-traced Module, line 13 ...') to
    stderr before the contiguous retry, which then succeeded."""
    model, x = _FlattenedConv().eval(), torch.randn(2, 3, 8, 8)
    gm = _eager_bound(model, x)
    capsys.readouterr()
    other = x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(gm(other), model(other), rtol=0, atol=0)
    assert capsys.readouterr().err == ""


def test_a_call_that_fails_all_the_same_prints_torch_fx_line_once(capsys):
    gm = _eager_bound(_CountsCalls(), torch.randn(2, 3, 8, 8))
    capsys.readouterr()
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        gm(torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last))
    assert capsys.readouterr().err.count("Call using an FX-traced Module") == 1


class _MaskedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, mask):
        return self.fc(x) * mask.to(torch.float32).unsqueeze(-1)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_an_input_of_another_dtype_is_named_with_the_captured_dtype(tmp_path, dtype):
    """export asserts each input's dtype where the graph converts it (mask.to(float32)): a mask of
    int32 or bool, which eager takes, failed with "Tensor dtype mismatch! Expected: Long, Got: int",
    naming no input (api F3)."""
    x, mask = torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.long)
    gm = _export(_MaskedLinear(), (x, mask))
    fxopt.save(gm, tmp_path / "masked.pt")
    for graph in (gm, fxopt.load(tmp_path / "masked.pt")):
        with pytest.raises(InputMismatchError, match=rf"input 1 \('mask'\) is {str(dtype)[6:]}; the graph was "
                                                     r"captured with int64 there, and the call fails on it \(RuntimeError: Tensor dtype "
                                                     r"mismatch! Expected: Long, .*\): pass int64 .*capture again"):
            graph(x, mask.to(dtype))


class _Looked(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)

    def forward(self, x, ids):
        return self.emb(ids) * x


def test_a_failure_that_is_no_dtype_error_is_not_blamed_on_an_input_dtype():
    """A float64 x (harmless: the graph runs on it) was named for an id out of range: "input 0 ('x') is
    float64 ... (IndexError: index out of range in self)" (advB B3); the model's own error stands."""
    x, ids = torch.randn(3, 4), torch.tensor([1, 2, 3])
    gm = _export(_Looked(), (x, ids))
    assert gm(x.double(), ids).dtype == torch.float64
    with pytest.raises(IndexError, match="index out of range"):
        gm(x.double(), torch.tensor([1, 2, 42]))


class _TakesKeywords(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, **inputs):
        return self.fc(inputs["x"])


def test_dynamic_shapes_naming_an_input_taken_through_var_keyword_says_why_it_cannot():
    """'x' given through **inputs was refused as an input "the example inputs do not give; they give: inputs"
    (torch.export cannot keep such an input dynamic: "Must provide a tree_name")."""
    with pytest.raises(fxopt.CaptureError, match=re.escape(
            "dynamic_shapes names input 'x', which forward takes through **inputs: torch.export cannot keep an input "
            "passed through **kwargs dynamic; name it in forward's signature")):
        _export(_TakesKeywords(), {"x": torch.randn(2, 4)}, dynamic_shapes={"x": {0: torch.export.Dim.AUTO}})


def test_a_call_at_another_size_of_an_input_taken_through_var_keyword_gives_advice_that_works():
    """The graph's refusal advised dynamic_shapes={'x': ...}, which capture refuses for an input taken
    through **kwargs (the batch stayed static for that reason)."""
    with pytest.warns(fxopt.CaptureWarning, match="static batch size"):
        gm = _export(_TakesKeywords(), {"x": torch.randn(2, 4)})
    with pytest.raises(InputMismatchError, match=re.escape(
            "or name 'x' in forward's signature (torch.export cannot keep an input passed through **kwargs dynamic) "
            "and capture with dynamic_shapes={'x': {0: torch.export.Dim.AUTO}}")):
        gm(x=torch.randn(3, 4))
