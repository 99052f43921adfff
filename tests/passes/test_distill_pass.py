"""The `distill` pipeline step: recovers a pruned model against the original; clear errors."""
import pytest
import torch

import fxopt


def _teacher_and_data():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                                torch.nn.ReLU(), torch.nn.Linear(64, 8))
    data = [(torch.randn(32, 16),) for _ in range(8)]
    return model, data


def test_distill_after_prune_moves_the_student_toward_the_teacher():
    model, data = _teacher_and_data()
    pruned = fxopt.optimize(model, data[0], "prune{ratio=0.5}", calibration=data)
    tuned = fxopt.optimize(model, data[0], "prune{ratio=0.5},distill{epochs=30,lr=0.003}", calibration=data)
    assert [r.name for r in tuned.passes] == ["prune", "distill"]
    assert tuned.verification.sqnr_db > pruned.verification.sqnr_db + 3.0
    # same graph and parameter count: distillation moves weights, it does not resize anything
    assert sum(p.numel() for p in tuned.module.parameters()) == sum(p.numel() for p in pruned.module.parameters())
    assert all(not p.requires_grad for p in tuned.module.parameters())


def test_distill_leaves_the_users_model_untouched():
    model, data = _teacher_and_data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fxopt.optimize(model, data[0], "distill{epochs=2}", calibration=data)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_distill_without_data_names_the_pass_and_the_fix():
    model, data = _teacher_and_data()
    with pytest.raises(fxopt.PassError, match=r"pass .distill.*needs data.*calibration="):
        fxopt.optimize(model, data[0], "distill")


def test_distill_rejects_bad_options():
    with pytest.raises(fxopt.PipelineError, match="epochs"):
        fxopt.parse_pipeline("distill{epochs=0}")
    with pytest.raises(fxopt.PipelineError, match="temperature"):
        fxopt.parse_pipeline("distill{temperature=-1}")


@pytest.mark.parametrize("lowering", ["quantize{backend=x86}", "quantize{backend=reference}",
                                      "lower-cpu{min_macs=0}", "lower-cpu"])  # the last: batch switches
def test_distill_after_lowering_is_refused_naming_the_kernel(lowering):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3))
    data = [(torch.randn(2, 3, 12, 12),) for _ in range(2)]
    with pytest.raises(fxopt.PassError, match=r"distill: node '.*' .*cannot be fine-tuned; run distill before"):
        fxopt.optimize(model, data[0], f"{lowering},distill", calibration=data)


def test_distill_function_refuses_inference_kernels_too():
    """fxopt.distill itself (not only the pass) names the kernel it cannot train through."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3)).eval()
    x = torch.randn(2, 3, 12, 12)
    lowered = fxopt.optimize(model, (x,), "fuse,lower-cpu").module
    with pytest.raises(ValueError, match=r"distill: node '.*_by_batch' .*cannot be fine-tuned"):
        fxopt.distill(lowered, model, [(x,)], epochs=1, progress=False)
