"""The bundled real example: a small CNN trained on scikit-learn's handwritten digits.

fxopt rewrites a trained model's graph without changing what it computes. This module gives every
command, test and tutorial the same real model to do that on: the 8x8 grayscale digits that ship
inside scikit-learn (1,797 images, 10 classes; nothing is downloaded) and a CNN with
conv+BatchNorm+ReLU chains, a residual add, pooling, dropout and a linear classifier. Training is
deterministic and takes a few seconds on a laptop CPU; the weights are cached after the first call.

Example::

    >>> from fxopt.examples.digits import evaluate_accuracy, load_example
    >>> model, example_inputs = load_example(progress=False)  # trains once, then loads the cache
    >>> example_inputs[0].shape
    torch.Size([16, 1, 8, 8])
    >>> evaluate_accuracy(model) >= 95.0
    True

``python -m fxopt.examples.digits`` trains from scratch and prints the test accuracy.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

# The training recipe. Any edit to this file changes the cache file name (see weights_cache_path).
EPOCHS = 8
BATCH_SIZE = 64
LEARNING_RATE = 3e-3
TEST_FRACTION = 0.2
EXAMPLE_BATCH = 16


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    # bias=False because BatchNorm follows, as in real CNNs; conv-BN folding must handle it.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class ResidualBlock(nn.Module):
    """Two 3x3 conv+BN layers with an identity skip: relu(bn2(conv2(relu(bn1(conv1(x))))) + x)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + x)


class DigitsCNN(nn.Module):
    """A small residual CNN for 8x8 digits: (N, 1, 8, 8) float in [0, 1] -> (N, 10) logits."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn_relu(1, 16), _conv_bn_relu(16, 32))
        self.block = ResidualBlock(32)
        self.pool = nn.MaxPool2d(2)
        self.features = _conv_bn_relu(32, 64)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.block(self.stem(x)))
        x = torch.flatten(self.gap(self.features(x)), 1)
        return self.fc(self.dropout(x))


def load_digits_data() -> tuple[TensorDataset, TensorDataset]:
    """The (train, test) split: images (N, 1, 8, 8) float32 in [0, 1], labels int64.

    The split is a fixed permutation (seed 0) with the last 20% as test, so it is identical on
    every machine.

    >>> train, test = load_digits_data()
    >>> len(train), len(test), train.tensors[0].shape[1:]
    (1438, 359, torch.Size([1, 8, 8]))
    """
    digits = load_digits()
    pixels = (digits.images / 16.0).astype(np.float32)  # sklearn's pixels are 0..16
    images = torch.from_numpy(pixels).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(labels)))
    n_test = round(len(labels) * TEST_FRACTION)
    train_idx, test_idx = order[:-n_test], order[-n_test:]
    return (
        TensorDataset(images[train_idx], labels[train_idx]),
        TensorDataset(images[test_idx], labels[test_idx]),
    )


def train_digits_cnn(epochs: int = EPOCHS, seed: int = 0, progress: bool = True) -> DigitsCNN:
    """Train a fresh DigitsCNN with Adam and return it in eval mode.

    The same seed gives the same weights; the caller's global RNG state is left untouched.

    >>> model = train_digits_cnn(epochs=1, progress=False)
    >>> model.training
    False
    """
    train, _ = load_digits_data()
    # fork_rng: seed init and dropout without clobbering the caller's RNG.
    with torch.random.fork_rng(devices=[]), _single_thread():
        torch.manual_seed(seed)
        model = DigitsCNN()
        shuffle = torch.Generator().manual_seed(seed)
        loader = DataLoader(train, batch_size=BATCH_SIZE, shuffle=True, generator=shuffle)
        optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        model.train()
        bar = tqdm(range(epochs), desc="training digits CNN", unit="epoch", disable=not progress)
        for _ in bar:
            loss = _train_one_epoch(model, loader, optimizer)
            bar.set_postfix(loss=f"{loss:.3f}")
    return model.eval()


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """One intra-op thread while training.

    8x8 convolutions gain nothing from more threads, and on a busy machine OpenMP threads
    spin-waiting for each other made training 5-10x slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train_one_epoch(
    model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer
) -> float:
    """One pass over loader; returns the mean training loss."""
    total, count = 0.0, 0
    for images, labels in loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(labels)
        count += len(labels)
    return total / count


def weights_cache_path() -> Path:
    """Where load_example caches trained weights: ``$FXOPT_CACHE`` or ``~/.cache/fxopt``.

    The file name carries a hash of this module's source (architecture and training recipe), so
    changing either trains afresh instead of loading stale weights.

    >>> weights_cache_path().name.startswith("digits_cnn-")
    True
    """
    root = Path(os.environ.get("FXOPT_CACHE") or Path.home() / ".cache" / "fxopt").expanduser()
    recipe = inspect.getsource(sys.modules[__name__]).encode()
    return root / f"digits_cnn-{hashlib.sha256(recipe).hexdigest()[:16]}.pt"


def load_example(progress: bool = True) -> tuple[nn.Module, tuple[Tensor]]:
    """The trained DigitsCNN in eval mode and example inputs (a 1-tuple of 16 test images).

    The first call trains (a few seconds) and caches the weights at weights_cache_path(); later
    calls load them. An unreadable cache file is retrained and overwritten.

    >>> model, (images,) = load_example(progress=False)
    >>> model(images).shape
    torch.Size([16, 10])
    """
    path = weights_cache_path()
    with torch.random.fork_rng(devices=[]):  # the init is overwritten; keep the caller's RNG as is
        model = DigitsCNN()
    if not _load_cached_weights(model, path):
        model = train_digits_cnn(progress=progress)
        _save_atomically(model.state_dict(), path)
    _, test = load_digits_data()
    return model.eval(), (test.tensors[0][:EXAMPLE_BATCH],)


def _load_cached_weights(model: nn.Module, path: Path) -> bool:
    """Load path into model; False (with a warning if the file exists) when it cannot be used."""
    if not path.exists():
        return False
    try:
        model.load_state_dict(torch.load(path, weights_only=True))
    except Exception as err:  # truncated/garbled/foreign file: every failure mode means "retrain"
        warnings.warn(f"unreadable cached weights {path} ({type(err).__name__}); retraining")
        return False
    return True


def _save_atomically(state_dict: dict[str, Tensor], path: Path) -> None:
    """Write a temp file, then os.replace: a killed or concurrent run never leaves a torn file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state_dict, f)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as err:  # a read-only home must not stop the example from working
        warnings.warn(f"could not cache digits weights at {path}: {err}")


def calibration_batches(n_batches: int = 8, batch_size: int = 32) -> list[tuple[Tensor]]:
    """Fixed 1-tuples of training images for quantization calibration (never test images).

    Fewer batches come back if the training split runs out.

    >>> batches = calibration_batches(n_batches=2, batch_size=4)
    >>> len(batches), batches[0][0].shape
    (2, torch.Size([4, 1, 8, 8]))
    """
    if n_batches < 1 or batch_size < 1:
        raise ValueError(f"n_batches and batch_size must be >= 1, got {n_batches} and {batch_size}")
    images = load_digits_data()[0].tensors[0][: n_batches * batch_size]
    return [(chunk,) for chunk in images.split(batch_size)]


def evaluate_accuracy(
    model: Callable[..., Any], dataset: TensorDataset | None = None, batch_size: int = 256
) -> float:
    """Top-1 accuracy in percent on dataset (default: the test split).

    model may be any callable; its output may be a Tensor or a tuple/dict whose first tensor leaf
    is the logits. The model's train/eval mode is left as it is (some exported GraphModules refuse
    ``.eval()``), so pass a model already in eval mode. Batches have up to batch_size images (the
    last one fewer), so an exported model needs a dynamic batch dimension.

    >>> model, _ = load_example(progress=False)
    >>> 0.0 <= evaluate_accuracy(model) <= 100.0
    True
    """
    if dataset is None:
        dataset = load_digits_data()[1]
    device = _device_of(model)
    correct = 0
    with torch.no_grad():
        for images, labels in DataLoader(dataset, batch_size=batch_size):
            logits = _first_tensor(model(images.to(device)))
            correct += (logits.argmax(dim=1).cpu() == labels).sum().item()
    return 100.0 * correct / len(dataset)


def _first_tensor(output: Any) -> Tensor:
    """The logits: the output itself, or the first tensor leaf of a tuple/dict/ModelOutput."""
    return next(leaf for leaf in tree_leaves(output) if isinstance(leaf, Tensor))


def _device_of(model: Callable[..., Any]) -> torch.device:
    """The device of the model's first parameter, so a model moved to a GPU gets GPU inputs."""
    if isinstance(model, nn.Module):
        for param in model.parameters():
            return param.device
    return torch.device("cpu")


def main(argv: list[str] | None = None) -> None:
    """Train from scratch and print the test accuracy and training time."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    model = train_digits_cnn(epochs=args.epochs, seed=args.seed)
    seconds = time.perf_counter() - start
    print(f"test accuracy: {evaluate_accuracy(model):.2f}% (trained in {seconds:.1f} s)")


if __name__ == "__main__":
    main()
