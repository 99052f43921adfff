"""fxopt.examples.digits: data split, traceability, training and the weight cache."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.fx

from fxopt.examples import digits
from fxopt.examples.digits import (
    DigitsCNN,
    calibration_batches,
    evaluate_accuracy,
    load_digits_data,
    load_example,
    train_digits_cnn,
    weights_cache_path,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train once into a private cache: (cache dir, model, example inputs)."""
    cache = tmp_path_factory.mktemp("fxopt-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FXOPT_CACHE", str(cache))
        model, inputs = load_example(progress=False)
    return cache, model, inputs


def _fake_trainer(calls: list[int]):
    """A stand-in for train_digits_cnn that is instant and records that it ran."""

    def train(**kwargs) -> DigitsCNN:
        calls.append(1)
        return DigitsCNN().eval()

    return train


def _refuse_training(**kwargs):
    raise AssertionError("load_example retrained although cached weights exist")


def test_split_is_deterministic_and_normalised():
    train, test = load_digits_data()
    images, labels = train.tensors
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert images.shape[1:] == (1, 8, 8) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))
    assert 0.0 <= images.min() and images.max() == 1.0
    again, _ = load_digits_data()
    assert torch.equal(images, again.tensors[0]) and torch.equal(labels, again.tensors[1])


def test_model_traces_with_fx_and_export():
    model = DigitsCNN().eval()
    x = torch.randn(4, 1, 8, 8)
    expected = model(x)
    traced = torch.fx.symbolic_trace(model)
    exported = torch.export.export(model, (x,), strict=False).module()
    torch.testing.assert_close(traced(x), expected)
    torch.testing.assert_close(exported(x), expected)
    # the residual add is a real graph node for passes to see
    assert any(n.op == "call_function" and "add" in str(n.target) for n in traced.graph.nodes)
    assert expected.shape == (4, 10)


def test_trained_example_is_accurate(trained):
    cache, model, (images,) = trained
    assert not model.training
    assert images.shape == (16, 1, 8, 8)
    assert evaluate_accuracy(model) >= 90.0
    assert len(list(cache.glob("digits_cnn-*.pt"))) == 1
    assert not list(cache.glob("*.tmp"))  # the atomic write left no temp file behind


def test_cached_weights_are_reused(trained, monkeypatch):
    cache, model, _ = trained
    monkeypatch.setenv("FXOPT_CACHE", str(cache))
    monkeypatch.setattr(digits, "train_digits_cnn", _refuse_training)
    rng_before = torch.get_rng_state()
    reloaded, _ = load_example(progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)
    for name, value in model.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[name]), name


def test_corrupted_cache_is_retrained_and_overwritten(tmp_path, monkeypatch):
    monkeypatch.setenv("FXOPT_CACHE", str(tmp_path))
    path = weights_cache_path()
    path.write_bytes(b"not a checkpoint")
    calls: list[int] = []
    monkeypatch.setattr(digits, "train_digits_cnn", _fake_trainer(calls))
    with pytest.warns(UserWarning, match="unreadable cached weights"):
        model, _ = load_example(progress=False)
    assert calls == [1]
    saved = torch.load(path, weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    load_example(progress=False)
    assert calls == [1]  # the rewritten file is used from now on


def test_cache_location_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FXOPT_CACHE", str(tmp_path / "sub"))
    path = weights_cache_path()
    assert path.parent == tmp_path / "sub"
    assert path.name.startswith("digits_cnn-") and path.suffix == ".pt"
    monkeypatch.delenv("FXOPT_CACHE")
    assert weights_cache_path().parent == Path.home() / ".cache" / "fxopt"


def test_training_is_deterministic_and_keeps_the_callers_rng_and_threads():
    rng_before, threads_before = torch.get_rng_state(), torch.get_num_threads()
    first = train_digits_cnn(epochs=1, seed=0, progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.get_num_threads() == threads_before
    second = train_digits_cnn(epochs=1, seed=0, progress=False)
    other = train_digits_cnn(epochs=1, seed=1, progress=False)
    assert not first.training
    weights = [m.state_dict()["fc.weight"] for m in (first, second, other)]
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])


def test_calibration_batches_come_from_the_training_split():
    batches = calibration_batches(n_batches=3, batch_size=5)
    assert [b[0].shape for b in batches] == [torch.Size([5, 1, 8, 8])] * 3
    train_images = load_digits_data()[0].tensors[0]
    assert torch.equal(torch.cat([b[0] for b in batches]), train_images[:15])
    with pytest.raises(ValueError):
        calibration_batches(n_batches=0)


def test_evaluate_accuracy_accepts_any_callable_and_output_structure(trained):
    _, model, _ = trained
    reference = evaluate_accuracy(model)
    assert evaluate_accuracy(lambda x: {"logits": model(x), "aux": 0}) == reference
    assert evaluate_accuracy(lambda x: (model(x), None)) == reference
    # always predicting class 0 scores exactly the share of zeros in the test split
    _, test = load_digits_data()
    always_zero = evaluate_accuracy(lambda x: torch.eye(10)[[0] * len(x)])
    assert always_zero == pytest.approx(100.0 * (test.tensors[1] == 0).float().mean().item())


def test_evaluate_accuracy_leaves_the_mode_alone():
    model = DigitsCNN().train()
    evaluate_accuracy(model, dataset=load_digits_data()[1])
    assert model.training
    batch = {"x": {0: torch.export.Dim.DYNAMIC}}
    exported = torch.export.export(
        DigitsCNN().eval(), (torch.randn(2, 1, 8, 8),), dynamic_shapes=batch, strict=False
    )
    evaluate_accuracy(exported.module())  # would raise if .eval() were called on it


def test_main_prints_accuracy(capsys):
    digits.main(["--epochs", "1"])
    assert "test accuracy:" in capsys.readouterr().out
