"""`optimize` hands back int8 kernels whose packed weights it never called: oneDNN keeps the
primitive of the first call's shape in the packed object, so the example-batch calls of shape
propagation and verification would leave the user's batch size on a slow path."""
import torch
from torch import nn

import fxopt
import fxopt.api


def _packs(gm):
    return {name: value for name, value in vars(gm).items() if isinstance(value, torch.ScriptObject)}


def test_the_returned_int8_module_holds_packs_no_call_has_touched(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(),
                          nn.LazyLinear(4)).eval()
    x = torch.randn(2, 3, 8, 8)
    model(x)  # materialize the lazy layer
    seen = {}
    verify_on = fxopt.api.verify_on

    def spy(original, module, *args, **kwargs):
        seen.update({name: id(obj) for name, obj in _packs(module).items()})
        return verify_on(original, module, *args, **kwargs)

    monkeypatch.setattr(fxopt.api, "verify_on", spy)
    res = fxopt.optimize(model, x, "quantize", calibration=[torch.randn(4, 3, 8, 8) for _ in range(3)])
    packs = _packs(res.module)
    assert len(packs) == 3 and seen.keys() == packs.keys()
    assert all(id(obj) != seen[name] for name, obj in packs.items()), "fresh copies, not the verified ones"
    assert res.verification.passed
    assert fxopt.verify(model, res.module, torch.randn(1, 3, 8, 8)).passed, "the copies compute the same"
