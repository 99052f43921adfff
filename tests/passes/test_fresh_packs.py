"""`optimize` hands back int8 kernels whose packed weights it never called: oneDNN keeps the
primitive of the first call's shape in the packed object, so the example-batch calls of shape
propagation and verification would leave the user's batch size on a slow path. The packs are
rebuilt by their save/load codec, which keeps the engine lowering chose per layer (a deep copy
would re-pack MobileNetV2's depthwise convs under the current engine and compute otherwise)."""
import torch

import fxopt
import fxopt.api
from fxopt.examples import zoo


def _packs(gm):
    """Owner path -> pack, wherever it is held (a CodedValue holder since 14fe98d)."""
    return {f"{owner}.{name}": value for owner, module in gm.named_modules()
            for name, value in vars(module).items() if isinstance(value, torch.ScriptObject)}


def test_the_returned_int8_module_holds_packs_no_call_has_touched(monkeypatch):
    model, x = zoo.get("mobilenet_v2", batch=2, image_size=32)
    calibration = [zoo.get("mobilenet_v2", batch=4, image_size=32, seed=s)[1] for s in range(1, 4)]
    seen = {}
    verify_on = fxopt.api.verify_on

    def spy(original, module, *args, **kwargs):
        seen.update({name: id(obj) for name, obj in _packs(module).items()})
        return verify_on(original, module, *args, **kwargs)

    monkeypatch.setattr(fxopt.api, "verify_on", spy)
    res = fxopt.optimize(model, x, "quantize", calibration=calibration)
    packs = _packs(res.module)
    assert len(packs) > 40 and seen.keys() == packs.keys()
    assert all(id(obj) != seen[name] for name, obj in packs.items()), "fresh packs, not the verified ones"
    again = fxopt.verify(model, res.module, x)
    assert again.sqnr_db == res.verification.sqnr_db, "the rebuilt packs compute exactly what was verified"
    assert fxopt.verify(model, res.module, zoo.get("mobilenet_v2", batch=1, image_size=32, seed=9)[1]).passed
