"""What quantizing raises, as docs/quantization.md ("Errors") says: through optimize a PassError
whose cause is the pass's own error; a calibration tensor refused before capture."""
import warnings

import pytest
import torch
from torch import nn

import fxopt
from fxopt import FxoptError, PassError
from fxopt.passes.quantize import QuantizationError


@pytest.fixture
def model():
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()


@pytest.mark.parametrize("pipeline, calibration, cause, message", [
    ("quantize", None, QuantizationError, "quantize needs calibration data"),
    ("quantize", [], QuantizationError, "got an empty list"),
    ("quantize", [(torch.full((8, 4), float("nan")),)], QuantizationError, "saw NaN in calibration batch 0"),
    ("quantize", [(torch.ones(8, 4, dtype=torch.long),)], QuantizationError, "got a torch.int64 tensor"),
    ("lower-int8", None, QuantizationError, "lower-int8 found no observers"),
    ("quantize", [(torch.randn(8, 5),)], FxoptError, "calibration batch 0 (tensor shapes [(8, 5)]) does not run"),
    ("quantize", [{"input": torch.randn(8, 5)}], FxoptError,
     "calibration batch 0 (tensor shapes [input=(8, 5)]) does not run"),
    ("quantize{skip=[nope]}", [(torch.randn(8, 4),)], ValueError, "option 'skip': no quantizable layer named 'nope'"),
])
def test_a_failing_quantize_pass_raises_pass_error_with_its_cause(model, pipeline, calibration, cause, message):
    with pytest.raises(PassError) as info:
        fxopt.optimize(model, torch.randn(8, 4), pipeline, calibration=calibration)
    assert type(info.value.__cause__) is cause
    assert message in str(info.value) and str(info.value).startswith(f"pass '{pipeline.split('{')[0]}")
    assert isinstance(info.value.last_good_module, torch.fx.GraphModule)


def test_calibration_given_as_one_tensor_is_refused_before_capture(model):
    with pytest.raises(FxoptError, match="got one Tensor of shape") as info:
        fxopt.optimize(model, torch.randn(8, 4), "quantize", calibration=torch.randn(8, 4))
    assert type(info.value) is FxoptError


def test_outside_a_pipeline_calibrate_raises_unwrapped(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        observed = fxopt.optimize(model, torch.randn(8, 4), "insert-observers", verify=False).module
    with pytest.raises(QuantizationError, match="saw NaN"):
        fxopt.calibrate(observed, [(torch.full((8, 4), float("nan")),)], progress=False)
    with pytest.raises(FxoptError, match="does not run through the model") as info:
        fxopt.calibrate(observed, [(torch.randn(8, 5),)], progress=False)
    assert type(info.value) is FxoptError


def test_an_exported_shape_guard_says_which_sizes_were_fixed_and_what_to_do():
    """A sequence-first encoder exported on (S, 2, E): dim 0 (the sequence) stays dynamic, the
    batch on dim 1 is fixed, so a calibration batch of 8 trips torch's guard; the error says why
    and names the two ways out."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0)
    model = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    with pytest.raises(fxopt.PassError) as err:
        fxopt.optimize(model, torch.randn(6, 2, 16), "quantize", mode="export",
                       calibration=[torch.randn(6, 8, 16)])
    message = str(err.value)
    assert "calibration batch 0 " in message and "input 0 ('src') has size 8 at dim 1" in message
    assert "captured with size 2" in message and "mode='symbolic'" in message and "example inputs" in message


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_calibration_batch_with_another_rank_names_the_input_and_its_dimensions(mode):
    """Export said only 'IndexError: tuple index out of range' for a batch missing an axis."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
    with pytest.raises(PassError) as err:
        fxopt.optimize(model, torch.randn(4, 3, 16, 16), "quantize", calibration=[torch.randn(4, 3, 16)], mode=mode)
    message = str(err.value)
    assert "calibration batch 0 " in message
    assert ("has 3 dimensions [4, 3, 16]; the model was captured with 4 [4, 3, 16, 16]" in message if mode == "symbolic"
            else "has 3 dimensions (shape (4, 3, 16)); the graph was captured with 4 (shape [any, 3, 16, 16])" in message)


@pytest.mark.parametrize("pipeline", ["quantize{target_sqnr=-5}", "lower-int8{target_sqnr=0}"])
def test_a_target_sqnr_at_or_below_zero_is_refused_naming_the_option(pipeline):
    with pytest.raises(fxopt.PipelineError, match="option 'target_sqnr': .* is not a target"):
        fxopt.PassManager(pipeline)


class _Scaled(nn.Module):
    """Takes a number and a flag besides its tensor: both are specialized at capture."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, scale=1.0, flag=True):
        y = self.fc(x) * scale
        return torch.relu(y) if flag else y


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("batch, name", [((1.0, False), "flag"), ((2.0, True), "scale")])
def test_a_calibration_batch_with_another_non_tensor_value_names_the_batch_the_input_and_what_to_do(mode, batch, name):
    """Said 'capture again with the new value' with no batch index (symbolic), or torch's
    'Guard failed: scale == 1.0' with advice about sizes (export)."""
    x = torch.randn(8, 4)
    with pytest.raises(PassError) as err:
        fxopt.optimize(_Scaled().eval(), (x, 1.0, True), "quantize", mode=mode,
                       calibration=[(x, 1.0, True), (x, *batch)])
    message = str(err.value)
    assert type(err.value.__cause__) is fxopt.errors.InputMismatchError
    assert "calibration batch 1 " in message and f"'{name}'" in message
    assert "the same non-tensor values as the example inputs" in message
    assert "Guard failed" not in message


def test_calibrate_names_the_batch_whose_non_tensor_input_differs():
    x = torch.randn(8, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        observed = fxopt.optimize(_Scaled().eval(), (x, 1.0, True), "insert-observers", verify=False).module
    with pytest.raises(fxopt.errors.InputMismatchError, match=r"calibrate: calibration batch 2 .*'scale'"):
        fxopt.calibrate(observed, [(x, 1.0, True), (x, 1.0, True), (x, 3.0, True)], progress=False)
