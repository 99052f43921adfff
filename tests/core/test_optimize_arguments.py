"""`fxopt.optimize` refuses a bad argument before it captures or runs anything."""
import collections

import pytest
import torch
from torch import nn

import fxopt
from fxopt import api


def _no_capture(*args, **kwargs):
    pytest.fail("captured before checking the arguments")


@pytest.mark.parametrize("devices, error, match", [
    (["tpu"], ValueError, r"devices= names 'tpu', which is no torch device; use 'cpu', 'cuda'"),
    ("cpu", TypeError, r"devices= takes a list of device names, e.g. devices=\['cpu'\]"),
    (["meta"], ValueError, r"devices= names 'meta', which holds shapes without values"),
    (torch.device("cpu"), TypeError, r"devices= takes a list of device names, e.g. devices=\['cpu'\]"),
])
def test_a_device_torch_does_not_know_is_refused_up_front(monkeypatch, devices, error, match):
    """devices=['tpu'] came back as a FAIL report ('could not run on tpu') after the pipeline."""
    monkeypatch.setattr(api, "capture", _no_capture)
    with pytest.raises(error, match=match):
        fxopt.optimize(torch.nn.Linear(2, 2), torch.randn(1, 2), "dce", devices=devices)


def test_cuda_without_a_gpu_is_refused_up_front(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(api, "capture", _no_capture)
    with pytest.raises(ValueError, match=r"devices= names 'cuda', but this machine has no CUDA GPU"):
        fxopt.optimize(torch.nn.Linear(2, 2), torch.randn(1, 2), "dce", devices=["cuda"])


def _usable(device: str) -> bool:
    try:
        torch.empty(0, device=device)
    except Exception:  # noqa: BLE001
        return False
    return True


@pytest.mark.parametrize("device", ["xpu", "mps"])
def test_a_device_this_machine_lacks_is_refused_up_front(monkeypatch, device):
    """devices=['cpu', 'mps'] without MPS reported the model as FAILING verification on mps."""
    if _usable(device):
        pytest.skip(f"this machine has {device}")
    monkeypatch.setattr(api, "capture", _no_capture)
    with pytest.raises(ValueError, match=rf"devices= names '{device}', which this machine cannot use \(.+\); leave it out"):
        fxopt.optimize(torch.nn.Linear(2, 2), torch.randn(1, 2), "dce", devices=["cpu", device])
    with pytest.raises(ValueError, match=rf"verify: got device '{device}', which this machine cannot use"):
        fxopt.verify(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.randn(1, 2), device=device)


def test_named_devices_that_exist_still_verify():
    res = fxopt.optimize(torch.nn.Linear(2, 2), torch.randn(1, 2), "dce", devices=["cpu"])
    assert list(res.verification_by_device) == ["cpu"] and res.verification.passed


def test_one_instrument_not_in_a_list_is_named_before_any_work(monkeypatch):
    """optimize's own list() of it said "'TimePasses' object is not iterable"."""
    monkeypatch.setattr(api, "capture", _no_capture)
    with pytest.raises(TypeError, match=r"instruments= takes a list of Instruments, got one TimePasses: pass \[instrument\]"):
        fxopt.optimize(torch.nn.Linear(4, 2), torch.randn(3, 4), "dce", instruments=fxopt.TimePasses())


def test_a_torch_device_is_taken_as_its_name():
    """devices=[torch.device("cpu")] verified a correct result as FAIL: "'torch.device' object has no
    attribute 'startswith'"."""
    res = fxopt.optimize(torch.nn.Linear(2, 2), torch.randn(1, 2), "dce", devices=[torch.device("cpu")])
    assert list(res.verification_by_device) == ["cpu"] and res.verification.passed
    model = torch.nn.Linear(2, 2)
    assert fxopt.verify(model, model, torch.randn(3, 2), device=torch.device("cpu")).passed


@pytest.mark.parametrize("device, match", [("tpu", "verify: got device 'tpu', which is no torch device"),
                                           ("meta", "verify: got device 'meta', which holds shapes without values")])
def test_verify_names_a_device_it_cannot_compare_on(device, match):
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=match):
        fxopt.verify(model, model, torch.randn(3, 2), device=device)


class _KeywordModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, input_ids, attention_mask=None):
        return self.fc(input_ids) * attention_mask


class _Encoding(collections.UserDict):
    """What a Hugging Face tokenizer returns (BatchEncoding is a UserDict, no dict)."""


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_mapping_that_is_no_dict_is_read_as_keyword_inputs(mode):
    """A tokenizer's BatchEncoding was taken for one positional input: "linear(): argument 'input' must be
    Tensor, not BatchEncoding", where a dict of the same inputs is keyword inputs."""
    torch.manual_seed(0)
    model = _KeywordModel().eval()
    inputs = _Encoding(input_ids=torch.randn(2, 4), attention_mask=torch.ones(2, 4))
    batches = [_Encoding(input_ids=torch.randn(2, 4), attention_mask=torch.ones(2, 4)) for _ in range(3)]
    res = fxopt.optimize(model, inputs, "fuse,quantize", mode=mode, calibration=batches)
    assert res.verification.verdict == "PASS"
    assert fxopt.verify(model, res.module, inputs).passed
    assert fxopt.PassManager("fuse").run(fxopt.capture(model, inputs, mode=mode), inputs).module(**inputs).shape == (2, 4)


def test_no_instruments_may_be_given_as_none():
    """instruments=None failed with Python's bare "'NoneType' object is not iterable", where
    calibration=None means none."""
    model, x = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval(), torch.randn(2, 4)
    assert fxopt.optimize(model, x, "fuse", instruments=None).verification.verdict == "PASS"
    assert fxopt.PassManager("fuse", instruments=None).instruments == []
