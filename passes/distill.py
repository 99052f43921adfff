"""`distill`: knowledge-distillation fine-tuning as a pipeline step.

Recovers accuracy after a lossy pass (pruning) inside the pipeline itself, so the order a
researcher wants — `fuse,prune{ratio=0.5},distill{epochs=5},quantize` — is one line of text.
The teacher is the captured, unoptimized model (`ctx.reference`); the data are the pipeline's
calibration batches, each the model's positional inputs as for every other pass (a long tensor
in a batch is an input, such as token ids, never a label: the teacher's logits are the targets). The graph is
unchanged; only floating-point parameters move, in a copy (the input module is untouched).

    before:  %conv = call_module conv(%x)   ; weights W (pruned)
    after:   %conv = call_module conv(%x)   ; weights W' fine-tuned against the teacher

Which output is matched: `output=` (an index, `distill{output=1}`, or a key or field name,
`distill{output=logits}`); left out, the only floating-point output tensor, else the one named
`logits` (`fxopt.distillation.select_output`).

Preconditions: calibration batches (`fxopt.optimize(..., calibration=...)`); a module with
floating-point parameters (run it before `quantize`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch.fx

from fxopt import Pass, PassContext, PassResult
from fxopt.distillation import distill
from fxopt.errors import FxoptError
from fxopt.ir import clone_sharing_tensors


@dataclass
class Distill(Pass):
    """Fine-tune against the original model's logits on the calibration batches."""

    name = "distill"
    preserves = frozenset({"shapes", "dataflow"})
    tolerance = "lossy"
    epochs: int = 3
    temperature: float = 4.0
    lr: float = 1e-3
    output: int | str | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"option 'epochs' must be >= 1, got {self.epochs}")
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"option 'temperature' must be a finite number > 0, got {self.temperature}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"option 'lr' must be a finite number > 0, got {self.lr}")

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        if not ctx.calibration:
            raise FxoptError("distill needs data: pass calibration batches to fxopt.optimize or "
                             "PassManager.run (calibration=[...]); they are the distillation inputs")
        if ctx.reference is None:
            raise FxoptError("distill needs the original model as teacher (ctx.reference)")
        # calibration's (args, kwargs) pairs, which `fxopt.distill` takes as they are (keyword inputs too)
        data = [(tuple(args), dict(kwargs)) for args, kwargs in ctx.calibration]
        trains = {name: p.requires_grad for name, p in gm.named_parameters()}
        try:
            tuned = distill(gm, _private_buffers(ctx.reference), data, epochs=self.epochs, temperature=self.temperature,
                            lr=self.lr, progress=ctx.verbose, output=self.output)
        except ValueError as exc:  # the distill function's words, raised as the pass's own error
            raise FxoptError(str(exc)) from None
        for name, p in tuned.named_parameters():  # as trainable as they came in
            p.requires_grad_(trains.get(name, False))
        return PassResult(tuned, modified=True, stats={"epochs": self.epochs, "batches": len(data)})


def _private_buffers(module: torch.nn.Module) -> torch.nn.Module:
    """The teacher with its own copy of its buffers (its parameters shared): a forward that
    updates a buffer must not write into the verification reference's."""
    teacher = clone_sharing_tensors(module)
    for m in teacher.modules():
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = b.clone()
    return teacher
