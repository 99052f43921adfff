"""Int8 post-training quantization: observers, calibration, lowering to int8 kernels.

Passes (registered by name in pyproject.toml):
- `insert-observers` (insert.py) — observers on every activation lowering may quantize;
- `lower-int8` (lower.py) — int8 kernels for x86 CPUs, a reference q/dq form for any device,
  int8 matmuls on CUDA; optional mixed precision by sensitivity (`target_sqnr`);
- `quantize` (composite.py) — both, calibrating on the pipeline's calibration data.

Between the two passes run `fxopt.calibrate(gm, batches)`. Store results with `save`/`load`
(serialize.py; no pickled code). See docs/quantization.md.
"""
from .observers import OBSERVER_KINDS, Observer, QuantizationError, observers_in
from .serialize import load, save

__all__ = ["OBSERVER_KINDS", "Observer", "QuantizationError", "load", "observers_in", "save"]
