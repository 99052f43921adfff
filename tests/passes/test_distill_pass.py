"""The `distill` pipeline step: recovers a pruned model against the original; clear errors."""
import copy
import warnings

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
    # as trainable as the user's model: a fine-tuning loop of theirs can go on from here
    assert all(p.requires_grad for p in tuned.module.parameters())


def test_distill_leaves_the_users_model_untouched():
    model, data = _teacher_and_data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # pruned first: a student that matches its teacher is returned untrained, and nothing would run
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxopt.optimize(model, data[0], "prune{ratio=0.5},distill{epochs=2}", calibration=data)
    assert not any("already matches" in str(w.message) for w in caught)  # it ran the training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_distill_without_data_names_the_pass_and_the_fix():
    model, data = _teacher_and_data()
    with pytest.raises(fxopt.PassError, match=r"pass .distill.*needs data.*calibration="):
        fxopt.optimize(model, data[0], "distill")


def test_distill_rejects_bad_options():
    with pytest.raises(fxopt.PipelineError, match="epochs"):
        fxopt.parse_pipeline("distill{epochs=0}")
    for bad in ("-1", "nan", "inf"):  # NaN and inf passed `<= 0` and trained a NaN model
        with pytest.raises(fxopt.PipelineError, match="temperature"):
            fxopt.parse_pipeline(f"distill{{temperature={bad}}}")
        with pytest.raises(fxopt.PipelineError, match="lr"):
            fxopt.parse_pipeline(f"distill{{lr={bad}}}")


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


class _FeaturesAndIds(torch.nn.Module):
    """Two positional inputs, the second a long tensor (token ids), not labels."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc = torch.nn.Embedding(10, 4), torch.nn.Linear(8, 3)

    def forward(self, x, ids):
        return self.fc(torch.cat([x, self.emb(ids)], -1))


def _features_and_ids(n=4):
    torch.manual_seed(0)
    return _FeaturesAndIds().eval(), [(torch.randn(8, 4), torch.randint(0, 10, (8,))) for _ in range(n)]


def test_the_distill_pass_takes_a_batch_with_a_long_input_as_the_models_inputs():
    """(float features, long ids) was split into (inputs, labels): the student got one argument
    and failed with "forward() missing 1 required positional argument: 'ids'"."""
    model, data = _features_and_ids()
    res = fxopt.optimize(model, data[0], "distill{epochs=1}", calibration=data, mode="symbolic")
    assert res.passes[0].stats == {"epochs": 1, "batches": 4}
    assert res.module(*data[0]).shape == (8, 3)


def test_fxopt_distill_takes_labels_only_when_told():
    model, data = _features_and_ids()
    student = fxopt.capture(model, data[0])
    with torch.no_grad():  # something to learn: a student equal to its teacher comes back as given
        student.fc.weight.add_(0.5 * torch.randn_like(student.fc.weight))
    before = student.fc.weight.clone()
    tuned = fxopt.distill(student, model, data, epochs=1, progress=False)
    assert not torch.equal(tuned.fc.weight, before)  # it trained on both inputs
    labeled = [(batch, torch.randint(0, 3, (8,))) for batch in data]
    tuned = fxopt.distill(student, model, labeled, epochs=1, alpha=0.5, labeled=True, progress=False)
    assert tuned(*data[0]).shape == (8, 3)
    with pytest.raises(ValueError, match=r"alpha=0.5 mixes in the cross-entropy.*pass labeled=True"):
        fxopt.distill(student, model, labeled, epochs=1, alpha=0.5, progress=False)


def test_a_batch_that_does_not_fit_says_what_it_was_taken_as():
    model, data = _features_and_ids()
    student = fxopt.capture(model, data[0])
    with pytest.raises(ValueError, match=r"batch 0 was taken as the model's positional inputs, 1 input "
                                         r"\(float32\[8, 4\]\), which the teacher _FeaturesAndIds.forward\(x, ids\) "
                                         r"does not take: missing a required argument: 'ids'; if the batches "
                                         r"are \(inputs, labels\), pass labeled=True"):
        fxopt.distill(student, model, [(x,) for x, _ in data], epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"batch 0 was taken as the inputs of \(inputs, labels\), as "
                                         r"labeled=True says, 1 input \(float32\[8, 4\]\)"):
        fxopt.distill(student, model, data, epochs=1, labeled=True, progress=False)
    with pytest.raises(fxopt.PassError, match=r"batch 0 was taken as the model's positional inputs, 3 inputs"):
        fxopt.optimize(model, data[0], "distill{epochs=1}", calibration=[(*b, b[1]) for b in data])


def test_fxopt_distill_gives_the_teacher_back_in_the_modes_it_had():
    """The teacher (and its BatchNorm) stayed in eval mode after fxopt.distill: the caller's
    model came back changed."""
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(),
                                  torch.nn.Linear(8, 3)).train()
    teacher[2].eval()  # a mixed model stays mixed
    modes = [m.training for m in teacher.modules()]
    student = fxopt.capture(torch.nn.Sequential(torch.nn.Linear(4, 3)), torch.randn(2, 4))
    fxopt.distill(student, teacher, [torch.randn(8, 4)], epochs=1, progress=False)
    assert [m.training for m in teacher.modules()] == modes == [True, True, True, False, True]
    with pytest.raises(ValueError, match="batch 0 was taken as"):  # and when training fails
        fxopt.distill(student, teacher, [(torch.randn(8, 4), torch.randn(8, 4))], epochs=1, progress=False)
    assert [m.training for m in teacher.modules()] == modes


def test_fxopt_distill_without_batches_raises():
    """data=[] returned the untrained copy, silently."""
    teacher = torch.nn.Linear(4, 3).eval()
    student = fxopt.capture(torch.nn.Linear(4, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"distill: no batches to train on \(data holds none\)"):
        fxopt.distill(student, teacher, [], epochs=5, progress=False)
    once = (torch.randn(8, 4) for _ in range(2))  # used up by the first epoch
    with pytest.raises(ValueError, match=r"no batches to train on \(epoch 2 got none\).*not an iterator"):
        fxopt.distill(student, teacher, once, epochs=2, progress=False)


class _FeaturesAndLogits(torch.nn.Module):
    def __init__(self, out="tuple"):
        super().__init__()
        self.f = torch.nn.Linear(4, 16)
        self.head = torch.nn.Linear(16, 3)
        self.out = out

    def forward(self, x):
        feat = self.f(x).relu()
        logits = self.head(feat)
        if self.out == "dict":
            return {"hidden": feat, "logits": logits}
        if self.out == "argmax":
            return logits.argmax(-1), logits
        return feat, logits


def _damaged(teacher):
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.head.weight.add_(torch.randn_like(student.head.weight))
        student.f.weight.mul_(0.7)
    return student


def test_fxopt_distill_matches_the_selected_output_not_the_first():
    torch.manual_seed(0)
    teacher = _FeaturesAndLogits().eval()
    student = _damaged(teacher)
    data = [torch.randn(32, 4) for _ in range(8)]
    with pytest.raises(ValueError, match=r"2 floating-point tensors \(\[0\], \[1\]\) and none is named "
                                         r"'logits'; say which one holds the logits with output="):
        fxopt.distill(student, teacher, data, epochs=1, progress=False)
    tuned = fxopt.distill(student, teacher, data, epochs=30, lr=0.01, progress=False, output=1)

    def gap(m):
        return float((m(data[0])[1] - teacher(data[0])[1]).abs().mean())

    assert gap(tuned) < 0.7 * gap(student)
    assert not torch.equal(tuned.head.weight, student.head.weight)   # the logits head was trained


def test_the_distill_pass_picks_logits_by_name_and_takes_an_output_option():
    torch.manual_seed(0)
    teacher = _FeaturesAndLogits("dict").eval()
    data = [(torch.randn(16, 4),) for _ in range(4)]
    res = fxopt.optimize(teacher, data[0], "distill{epochs=1}", calibration=data)
    assert res.pipeline == "distill{epochs=1}"
    p = fxopt.parse_pipeline("distill{output=logits},distill{output=1}")
    assert (p[0].output, p[1].output) == ("logits", 1)
    assert fxopt.format_pipeline(p) == "distill{output=logits},distill{output=1}"
    with pytest.raises(fxopt.PassError, match=r"output='nope' is not an entry of the teacher's output .*"
                                              r"valid: 'hidden', 'logits'"):
        fxopt.optimize(teacher, data[0], "distill{epochs=1,output=nope}", calibration=data)


def test_distill_on_dataclass_and_argmax_outputs_and_a_non_floating_choice():
    import dataclasses

    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.f = torch.nn.Linear(4, 3)

        def forward(self, x):
            return Out(self.f(x))

    x = torch.randn(4, 4)
    m = M().eval()
    tuned = fxopt.distill(copy.deepcopy(m), m, [x], epochs=1, progress=False)
    assert isinstance(tuned(x), Out)
    fxopt.optimize(m, x, "distill{epochs=1}", calibration=[x])
    a = _FeaturesAndLogits("argmax").eval()
    fxopt.distill(copy.deepcopy(a), a, [x], epochs=1, progress=False)   # the only floating output: logits
    with pytest.raises(ValueError, match=r"output=0 selects the teacher's int64\[4\], not floating-point "
                                         r"logits .*floating-point outputs: \[1\]"):
        fxopt.distill(copy.deepcopy(a), a, [x], epochs=1, progress=False, output=0)


class _Counting(torch.nn.Module):
    """A forward that updates a buffer (a call counter) and reads it."""

    def __init__(self):
        super().__init__()
        self.f = torch.nn.Linear(4, 3)
        self.register_buffer("n", torch.zeros(()))

    def forward(self, x):
        self.n += 1
        return self.f(x) * self.n


def test_fxopt_distill_gives_the_teacher_and_the_student_copy_back_their_buffers():
    """The caller's teacher came back with n = 6 after 2 epochs of 3 batches."""
    torch.manual_seed(0)
    teacher, data = _Counting().eval(), [torch.randn(4, 4) for _ in range(3)]
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.f.weight.add_(0.1)  # one that differs from its teacher (one that matches it is not trained)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuned = fxopt.distill(student, teacher, data, epochs=2, progress=False)
    assert not any("already matches" in str(w.message) for w in caught)  # it ran the training
    assert teacher.n.item() == 0.0 and student.n.item() == 0.0 and tuned.n.item() == 0.0
    with pytest.raises(ValueError, match="batch 0 was taken as"):  # also when training fails
        fxopt.distill(student, teacher, [(data[0], data[0])], epochs=1, progress=False)
    assert teacher.n.item() == 0.0


def test_a_student_that_cannot_be_trained_because_it_writes_in_place_is_named():
    """optimize(..., "distill") on it failed with autograd's "modified by an inplace operation"."""
    torch.manual_seed(0)
    model, x = _Counting().eval(), torch.randn(8, 4)
    student = fxopt.capture(model, x, mode="export")
    with torch.no_grad():
        student.f.weight.add_(0.1)  # one that differs from its teacher (one that matches it is not trained)
    with pytest.raises(fxopt.PassError, match=r"distill cannot train the student: its forward writes in place into "
                                              r"a value its backward pass needs \(it updates buffer 'n'"):
        fxopt.PassManager("distill{epochs=1}").run(student, (x,), calibration=[x] * 2, reference=model)
    assert model.n.item() == 0.0


class _KeywordModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = torch.nn.Embedding(10, 16), torch.nn.Linear(16, 4)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return self.fc(h.mean(1))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_the_distill_pass_takes_keyword_calibration_batches(mode):
    """A pipeline's distill refused batches of keyword inputs (every Hugging Face model's:
    "are not supported yet"), which `fxopt.distill` itself takes; it trains on them now."""
    torch.manual_seed(0)
    model = _KeywordModel().eval()
    data = [{"input_ids": torch.randint(0, 10, (4, 6)), "attention_mask": torch.ones(4, 6)} for _ in range(4)]
    res = fxopt.optimize(model, data[0], "prune{ratio=0.5},distill{epochs=20,lr=0.01}", calibration=data, mode=mode)
    pruned = fxopt.optimize(model, data[0], "prune{ratio=0.5}", calibration=data, mode=mode)
    assert res.passes[-1].stats == {"epochs": 20, "batches": 4}
    with torch.no_grad():
        gap = {name: float((m(**data[0]) - model(**data[0])).abs().mean())
               for name, m in (("pruned", pruned.module), ("distilled", res.module))}
    assert gap["distilled"] < gap["pruned"], gap
