"""Knowledge-distillation fine-tuning: recover a pruned model against the original's logits.

    >>> import torch, fxopt
    >>> teacher = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    >>> student = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 3)))
    >>> data = [(torch.randn(16, 4),) for _ in range(4)]
    >>> tuned = fxopt.distill(student, teacher, data, epochs=1, progress=False)
    >>> tuned(torch.randn(2, 4)).shape
    torch.Size([2, 3])

The loss is ``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, plus ``(1 - alpha)`` times the
cross-entropy with labels when ``labeled=True``. The softmax is over the output's last dimension,
which is meant to hold classes: distilling a hidden state (BertModel's ``last_hidden_state``)
matches its softmax-normalized features, not their values, and an output of one dimension or of
4 or more (a feature map) is warned about. An output whose last dimension is one (a binary classifier's logit, a
regressor's value) is matched by the squared error instead, and its labels are 0 or 1 (binary
cross-entropy).

Which output: a model may return more than its logits (``(features, logits)``, a dict, a
dataclass). ``output=`` names the tensor distillation matches — an index into a tuple or list,
a key of a dict, a field of a dataclass or namedtuple. Left out, it is the output's only
floating-point tensor (``(argmax, logits)`` has one), else its entry named ``logits``; several
floating tensors and none named so is an error that lists them (`select_output`).

Batches: a batch is the model's inputs, as calibration batches are everywhere in fxopt — a tensor
or a tuple of positional inputs, a dict of keyword inputs (``{"input_ids": ..., "attention_mask":
...}``) or an ``(args, kwargs)`` pair — so ``(features, ids)`` is two inputs, never inputs and
labels. Labels come only when the caller says so: with ``labeled=True`` every batch is
``(inputs, labels)``.

Modes: fine-tuning runs with the student in *eval* mode — batchnorm statistics frozen, dropout
off. GraphModules from torch.export bake eval behaviour into their ops and refuse
``.train()``/``.eval()``, and a pruned model's statistics are still valid for its remaining
channels, so this is the one mode that works for both front ends. The student is copied first:
pruned GraphModules share unpruned tensors with the model they came from, and training must not
write into the teacher.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import warnings
from typing import Any, Iterable, Iterator, Mapping

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .errors import first_line, user_stacklevel
from .ir.interpret import BufferState, fresh_inputs
from .ir.rewrite import deep_copy
from .tracing import one_at_a_time

# A batch as the models are called with it: positional inputs and keyword inputs.
Inputs = tuple[tuple, dict]


def inference_kernels(model: nn.Module) -> list[tuple[str, str]]:
    """(node name, target) of every op in a GraphModule that has no backward: q/dq ops, int8
    kernels, oneDNN kernels (``quantize*``, ``quantized.*``, ``mkldnn.*``) and calls of modules
    that declare ``inference_only = True`` (lower-cpu's packs and batch switches)."""
    if not isinstance(model, torch.fx.GraphModule):
        return []
    found = []
    for node in model.graph.nodes:
        if node.op == "call_module":
            if getattr(model.get_submodule(node.target), "inference_only", False):
                found.append((node.name, str(node.target)))
        elif node.op == "call_function":
            target = str(node.target)
            if "quantize" in target or target.startswith("mkldnn."):
                found.append((node.name, target))
    return found


def _observers(model: nn.Module) -> list[tuple[str, str]]:
    """(node name, what it observes) of each observer a GraphModule calls (`insert-observers`')."""
    if not isinstance(model, torch.fx.GraphModule):
        return []
    modules = dict(model.named_modules())
    return [(node.name, getattr(modules[node.target], "location", str(node.target)))
            for node in model.graph.find_nodes(op="call_module")
            if getattr(modules.get(node.target), "is_fxopt_observer", False)]


@one_at_a_time
def distill(student: nn.Module, teacher: nn.Module, data: Iterable, *, epochs: int = 3,
            temperature: float = 4.0, alpha: float = 1.0, lr: float = 1e-3, weight_decay: float = 0.0,
            labeled: bool = False, progress: bool = True, output: int | str | None = None) -> nn.Module:
    """Fine-tune a copy of `student` to match `teacher`'s logits on `data`; return the copy.
    Only the parameters that require grad train (a backbone the user froze stays as it is, and
    comes back frozen); a student with all of them frozen is a ValueError, and so is one holding
    int8 or oneDNN kernels or observers (distill before `insert-observers` and `quantize`).

    `output` selects the logits in a structured output: an index (``(features, logits)``:
    ``output=1``) or a key or field name (``output="logits"``); left out, the only
    floating-point tensor, else the entry named ``logits`` (`select_output`).

    `data`: an iterable (re-iterated every epoch: a list or a DataLoader) of batches, each the
    model's inputs — a tensor, a tuple of positional inputs, a dict of keyword inputs or an
    ``(args, kwargs)`` pair, read as `fxopt.calibrate` reads its batches (a tuple of a tuple and a
    dict is such a pair: a forward taking a tuple and a dict positionally gets
    ``((tuple_input, dict_input), {})``; `fxopt.optimize`'s calibration batches are read as its
    example inputs instead). With ``labeled=True`` each batch is ``(inputs, labels)`` instead
    (`inputs` any of those, `labels` a class index per prediction: shape ``(B,)`` for ``(B, C)``
    logits, ``(B, T)`` for a sequence's ``(B, T, C)``), which ``alpha < 1`` needs: it mixes in
    ``(1 - alpha)`` times the labels' cross-entropy. Both terms take the classes on the last dim
    and are means per prediction (per token of a sequence). A batch
    that does not fit the models' forward raises a ValueError saying what it was taken as, and
    so does `data` with no batches; a loss that stops being finite (a learning rate that
    diverges, NaN in the data) stops training with a ValueError naming the epoch and batch. The
    student's loss over all of `data` is measured before training and after (two more passes
    over it, without gradients): one that training made worse (a learning rate too high for a
    student already close to its teacher) is returned as it was given, with a
    `fxopt.PassWarning`; data that cannot be iterated again (a generator) gets the warning only,
    judged on its first batch. A student that matches its teacher already (the same model: a
    pipeline's distill has the pipeline's input for teacher) is returned untrained, with a
    warning. `teacher` runs in eval mode and comes back in the mode each of its submodules had,
    and with the buffer values it had: a forward that updates a buffer (a call counter) runs from
    the same state on every batch, as `fxopt.verify` runs it. `student`
    is not changed (a copy is trained, and its buffers are put back to their values after
    training); a student whose forward writes in place into a value its backward needs (an
    export graph writing a buffer update back) cannot be trained: a ValueError names the buffers.

        >>> import torch, fxopt
        >>> teacher = torch.nn.Linear(4, 3).eval()
        >>> student = fxopt.capture(torch.nn.Linear(4, 3), torch.randn(2, 4))
        >>> data = [torch.randn(8, 4) for _ in range(4)]
        >>> tuned = fxopt.distill(student, teacher, data, epochs=2, lr=0.05, progress=False)
        >>> gap = lambda m: float((m(data[0]) - teacher(data[0])).abs().mean())
        >>> gap(tuned) < gap(student)
        True
    """
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    for option, value in (("temperature", temperature), ("lr", lr)):
        if not 0 < value < math.inf:  # also NaN: it trained a NaN student, silently
            raise ValueError(f"{option} must be a finite number > 0, got {value}")
    if not 0 <= weight_decay < math.inf:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha < 1.0 and not labeled:
        raise ValueError(f"alpha={alpha} mixes in the cross-entropy with labels, but without labeled=True a "
                         "batch is the model's inputs only: pass labeled=True with (inputs, labels) batches")
    frozen = inference_kernels(student)
    if frozen:
        name, what = frozen[0]
        raise ValueError(f"distill: node '{name}' ({what}) is an inference kernel (int8 or oneDNN) that "
                         "cannot be fine-tuned; run distill before quantize and lower-cpu")
    observing = _observers(student)
    if observing:  # they recorded the model before training: lower-int8 would use those ranges (1.6 dB)
        name, where = observing[0]
        raise ValueError(f"distill: the student holds observers (node '{name}' observes {where}), whose ranges "
                         "would not follow the training: run distill before insert-observers or quantize")
    if isinstance(data, (Mapping, str, bytes)) or not isinstance(data, (Iterable, torch.Tensor)):
        raise TypeError(f"distill: data is a {type(data).__name__}; give an iterable of batches (a list or a "
                        "DataLoader), each the model's inputs (a tensor, a tuple of them or a dict of keyword "
                        "inputs)")
    batches = data if not isinstance(data, torch.Tensor) else [data]
    length = _length(batches)
    if length == 0:
        raise ValueError(_NO_BATCHES.format(when="data holds none"))
    student = deep_copy(student)
    params = [p for p in student.parameters() if p.is_floating_point() and p.requires_grad]
    if not params:
        if any(p.is_floating_point() for p in student.parameters()):
            raise ValueError("distill: every parameter of the student is frozen (requires_grad=False), so there is "
                             "nothing to fine-tune; unfreeze the layers to train (student.requires_grad_(True), or "
                             "the model's before fxopt.optimize)")
        raise ValueError("the student has no floating-point parameters to fine-tune")
    _set_eval(student)
    student_state, teacher_state = BufferState(student), BufferState(teacher)
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    total = epochs * length if length is not None else None
    from tqdm.auto import tqdm

    t = float(temperature)
    models = (("teacher", teacher), ("student", student))
    # the caller's teacher comes back in the mode it was given, and with its buffers' values
    with _eval_mode(teacher), _restored(teacher_state):
        # data iterated again (a list, a DataLoader): the student is judged on all of it before and
        # after, and comes back as it was given where training made it worse
        reiterable = not isinstance(batches, Iterator)  # (a DataLoader of an IterableDataset too: no length)
        judge = _Judge(student, teacher, batches, labeled, output, t, alpha) if reiterable and epochs else None
        start = judge.snapshot(params) if judge is not None else None
    if judge is not None and judge.matches():
        _warn_already_matches(judge.start_loss)
        return student
    bar = tqdm(total=total, desc="distill", disable=not progress)
    with _eval_mode(teacher), _restored(teacher_state), bar:
        for epoch in range(epochs):
            seen = 0
            for index, batch in enumerate(batches):
                inputs, labels = _split_batch(batch, labeled, index)
                for role, model in models:
                    _check_fits(role, model, inputs, index, labeled)
                with torch.no_grad():
                    target = select_output(_forward("teacher", teacher, inputs, index), output, role="teacher")
                    teacher_state.restore()  # every batch sees the teacher as it was given
                out = select_output(_forward("student", student, inputs, index), output, role="student")
                if index == 0 and epoch == 0:
                    _check_trainable(out, target, output)
                    first = (inputs, labels, target)
                loss = _loss(out, target, labels, t, alpha, index)
                _check_finite(loss, epoch, index, lr)
                if index == 0 and epoch == 0:
                    start_loss = float(loss.detach())
                opt.zero_grad(set_to_none=True)
                try:
                    loss.backward()
                except RuntimeError as exc:
                    if "modified by an inplace operation" not in str(exc):
                        raise
                    raise ValueError(_WRITES_IN_PLACE.format(buffers=_names(student_state.changed()))) from None
                opt.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
                seen += 1
            if not seen:  # an iterator is used up after one pass: later epochs would train on nothing
                raise ValueError(_NO_BATCHES.format(when=f"epoch {epoch + 1} got none"))
    student_state.restore()
    if judge is not None:
        with _eval_mode(teacher), _restored(teacher_state):
            judge.keep_the_better(params, start, lr)
    elif epochs:
        _warn_if_worse(student, first, start_loss, t, alpha, lr, output)
        student_state.restore()
    return student


def _loss(out: torch.Tensor, target: torch.Tensor, labels: Any, t: float, alpha: float, index: int) -> torch.Tensor:
    """Distillation's loss: ``T² · KL(softmax(target/T) ‖ softmax(out/T))``, mixed with the
    labels' cross-entropy by `alpha` when there are labels."""
    if _one_value(out):
        loss = F.mse_loss(out, target)
        if labels is not None and alpha < 1.0:
            loss = alpha * loss + (1 - alpha) * _binary_cross_entropy(out, labels, index)
        return loss
    # one prediction per row, classes on the last dim (a sequence model's (B, T, C): B * T of them), so
    # "batchmean" is a mean per prediction, as the labels' cross-entropy is: it divided by B alone, and
    # weighed a sequence's KL term T times its label term against the alpha asked for
    loss = F.kl_div(F.log_softmax(_predictions(out) / t, -1), F.log_softmax(_predictions(target) / t, -1),
                    log_target=True, reduction="batchmean") * (t * t)
    if labels is not None and alpha < 1.0:
        loss = alpha * loss + (1 - alpha) * _cross_entropy(out, labels, index)
    return loss


def _one_value(out: torch.Tensor) -> bool:
    """Whether `out` ends in a dimension of one (a binary classifier's logit, a regressor's value):
    a softmax over it is 1 whatever the value (the loss was 0 and nothing trained), and a sigmoid
    saturates on a regressor's values; it is matched by the squared error instead."""
    return out.dim() > 0 and out.shape[-1] == 1


def _binary_cross_entropy(out: torch.Tensor, labels: Any, index: int) -> torch.Tensor:
    """The labels' binary cross-entropy with a one-value output (its logit); labels that are no 0
    or 1, one per sample, name the batch."""
    if not (isinstance(labels, torch.Tensor) and labels.numel() == out.numel()
            and bool(((labels == 0) | (labels == 1)).all())):
        what = _tensor_text(labels) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"distill: the labels of batch {index} ({what}) are no 0/1 label per sample for the "
                         f"student's one-value output {_tensor_text(out)} (a binary classifier's logit); a "
                         "regressor's targets: distill without labels")
    return F.binary_cross_entropy_with_logits(out, labels.reshape(out.shape).to(out.dtype))


class _Judge:
    """The student's mean loss over all of the data, before training and after: training at a
    learning rate too high for a student already close to its teacher (a pruned layer that lost
    almost nothing) ends worse than it began, and was handed back so, without a word."""

    def __init__(self, student: nn.Module, teacher: nn.Module, batches: Any, labeled: bool,
                 output: int | str | None, t: float, alpha: float) -> None:
        self.student, self.teacher, self.batches = student, teacher, batches
        self.labeled, self.output, self.t, self.alpha = labeled, output, t, alpha
        self.student_state, self.teacher_state = BufferState(student), BufferState(teacher)
        self.start_loss = math.nan
        self.loss_scale = 1.0  # what a loss is small against (`matches`)

    def mean_loss(self) -> float:
        """The loss averaged over every batch, the student's parameters as they are now."""
        total, count, scale = 0.0, 0, 0.0
        with torch.no_grad():
            for index, batch in enumerate(self.batches):
                inputs, labels = _split_batch(batch, self.labeled, index)
                for role, model in (("teacher", self.teacher), ("student", self.student)):
                    _check_fits(role, model, inputs, index, self.labeled)
                target = select_output(_forward("teacher", self.teacher, inputs, index), self.output, role="teacher")
                self.teacher_state.restore()
                out = select_output(_forward("student", self.student, inputs, index), self.output, role="student")
                self.student_state.restore()
                _check_shapes(out, target, self.output)
                total += float(_loss(out, target, labels, self.t, self.alpha, index))
                # the squared error of a one-value output is in its units squared; a softmax's KL has none
                scale += float(target.float().pow(2).mean()) if _one_value(out) else 1.0
                count += 1
        self.loss_scale = scale / count if count else 1.0
        return total / count if count else math.nan

    def matches(self) -> bool:
        """Whether the student computed what its teacher does before training: a loss below
        `_MATCHED_LOSS` of the teacher's output scale (a regressor's outputs of 1e-4 made a
        student 50% off read as matching against an absolute bound)."""
        return self.start_loss < _MATCHED_LOSS * self.loss_scale

    def snapshot(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        """The trained parameters' values now, and the loss they give."""
        self.start_loss = self.mean_loss()
        return [p.detach().clone() for p in params]

    def keep_the_better(self, params: list[nn.Parameter], start: list[torch.Tensor], lr: float) -> None:
        """Put the starting values back, with a PassWarning, where training did not lower the loss."""
        from .errors import PassWarning

        end_loss = self.mean_loss()
        if end_loss <= self.start_loss:
            return
        with torch.no_grad():
            for p, value in zip(params, start):
                p.copy_(value)
        warnings.warn(f"distill: the trained student matches the teacher worse than before training (mean loss "
                      f"{self.start_loss:.4g} -> {end_loss:.4g} over the data): returning the student as it was "
                      f"given; lower lr (now {lr}) to train it, or leave distill out", PassWarning,
                      stacklevel=user_stacklevel())


#: A mean loss below this (times the teacher's mean squared output, for a one-value output) before
#: training: the student computes what its teacher does (the same model).
_MATCHED_LOSS = 1e-9


def _warn_already_matches(loss: float) -> None:
    """Say that there was nothing to train: a pipeline's distill on a model saved after prune and
    loaded again has that model, the pipeline's input, for teacher; training it against itself took
    the time of every epoch, and the warning that followed blamed the learning rate."""
    from .errors import PassWarning

    warnings.warn(f"distill: the student already matches its teacher (mean loss {loss:.2g} before training), so "
                  "there is nothing to learn: it is returned as given. A pipeline's distill has for teacher the "
                  "model that fxopt.optimize was given: to distill a pruned model saved and loaded again against "
                  "the original, call fxopt.distill(student, original_model, batches)", PassWarning,
                  stacklevel=user_stacklevel())


def _warn_if_worse(student: nn.Module, first: tuple, start_loss: float, t: float, alpha: float, lr: float,
                   output: int | str | None) -> None:
    """Warn when the trained student matches the teacher worse than it did before training, on
    the first batch: a learning rate that blows the weights up without making the loss infinite
    trained a student far worse than the one given, without a word."""
    from .errors import PassWarning

    inputs, labels, target = first
    with torch.no_grad():
        out = select_output(_forward("student", student, inputs, 0), output, role="student")
        end_loss = float(_loss(out, target, labels, t, alpha, 0))
    if not end_loss <= max(2 * start_loss, start_loss + 1e-3):  # NaN too
        warnings.warn(f"distill: the trained student matches the teacher worse than before training (loss "
                      f"{start_loss:.4g} -> {end_loss:.4g} on batch 0): training diverged; lower lr (now {lr}) "
                      "or leave distill out", PassWarning, stacklevel=user_stacklevel())


def _forward(role: str, model: nn.Module, inputs: Inputs, index: int) -> Any:
    """`model(*args, **kwargs)` on copies of the inputs: a forward that writes into its input
    (``x.mul_(2)``) changes neither the caller's batch nor what the other model sees. An error of
    the forward names the batch and what it was (a conv's channel count, a dtype: a bare torch
    error from inside the training loop named neither)."""
    args, kwargs = fresh_inputs(*inputs)
    try:
        return model(*args, **kwargs)
    except Exception as exc:  # the model's own code: whatever it raises is this batch's misfit
        raise ValueError(f"distill: batch {index}, {_describe_inputs(inputs)}, does not fit the {role}: "
                         f"{type(exc).__name__}: {first_line(exc)}") from exc


def _predictions(logits: torch.Tensor) -> torch.Tensor:
    """`logits` as one row per prediction, its classes on the last dim: (B, T, C) -> (B * T, C)."""
    return logits.reshape(-1, logits.shape[-1]) if logits.dim() > 0 else logits


def _cross_entropy(out: torch.Tensor, labels: Any, index: int) -> torch.Tensor:
    """The labels' cross-entropy, the classes on the last dim of `out` as the distillation term
    takes them (F.cross_entropy takes them on dim 1: a sequence model's (B, T, C) logits trained on
    the token axis where T == C, and refused good (B, T) labels where not), a mean per prediction.
    `labels` are a class index per prediction (shape ``out.shape[:-1]``) or class probabilities
    (``out``'s shape); others, and indices out of range, name the batch."""
    what = _tensor_text(labels) if isinstance(labels, torch.Tensor) else type(labels).__name__
    if not isinstance(labels, torch.Tensor) or out.dim() == 0:
        flat = labels
    elif labels.shape == out.shape and labels.is_floating_point():
        flat = _predictions(labels)
    elif labels.shape == out.shape[:-1]:
        flat = labels.reshape(-1)
    else:
        raise ValueError(f"distill: the labels of batch {index} ({what}) are no class index per prediction of the "
                         f"student's {_tensor_text(out)} logits (classes on the last dim): give labels of shape "
                         f"{tuple(out.shape[:-1])}, or class probabilities of shape {tuple(out.shape)}")
    try:
        return F.cross_entropy(_predictions(out), flat)
    except Exception as exc:  # noqa: BLE001  (torch's IndexError / RuntimeError on bad targets)
        raise ValueError(f"distill: the labels of batch {index} ({what}) are no class indices for the student's "
                         f"{_tensor_text(out)} logits: {type(exc).__name__}: {first_line(exc)}") from exc


def _check_finite(loss: torch.Tensor, epoch: int, index: int, lr: float) -> None:
    """Stop at the first NaN or infinite loss: every step after it makes the student NaN."""
    if not torch.isfinite(loss):
        raise ValueError(f"distill: the loss is {loss.item()} at epoch {epoch + 1}, batch {index}: training "
                         f"diverged (lr={lr} too high?) or the data holds NaN or infinity")


_WRITES_IN_PLACE = ("distill cannot train the student: its forward writes in place into a value its backward "
                    "pass needs ({buffers}; an export graph writes a buffer's update back with copy_), so autograd "
                    "refuses the gradient; fine-tune a model whose forward does not update state in place (or "
                    "leave distill out of the pipeline)")


def _names(buffers: list[str]) -> str:
    if not buffers:
        return "a tensor it updates"
    return "it updates buffer" + ("s " if len(buffers) > 1 else " ") + ", ".join(f"'{b}'" for b in buffers)


@contextlib.contextmanager
def _restored(state: BufferState) -> Iterator[None]:
    """The buffers of `state` back at their values after the block, also when it raises."""
    try:
        yield
    finally:
        with torch.no_grad():
            state.restore()


_NO_BATCHES = ("distill: no batches to train on ({when}); pass a non-empty list or a DataLoader (each "
               "epoch iterates the data again, so not an iterator that is used up after one pass)")


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside the block, each back to its own mode after, also when
    the block raises: the teacher is the caller's model, and a mixed train/eval one stays mixed."""
    modes = [(m, m.training) for m in module.modules()]
    _set_eval(module)
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _set_eval(module: nn.Module) -> None:
    """Eval mode for every submodule; export GraphModules refuse `.eval()` on the root."""
    for m in module.modules():
        m.training = False


def _length(batches: Any) -> int | None:
    """`len(batches)`, or None for a generator and for a DataLoader of an IterableDataset (its
    `__len__` raises TypeError)."""
    try:
        return len(batches)
    except TypeError:
        return None


def _split_batch(batch: Any, labeled: bool, index: int) -> tuple[Inputs, torch.Tensor | None]:
    """(inputs, labels or None) of one batch, by the rule of the module doc: the
    batch is the inputs, unless the caller said `labeled`. Never guessed from dtypes: a long
    tensor is as often an input (token ids) as a label."""
    if not labeled:
        return _as_inputs(batch, index), None
    if isinstance(batch, Mapping):  # (indexed by 0 and 1, it raised a bare KeyError)
        raise ValueError(f"distill: batch {index} is a dict (keys {', '.join(map(repr, batch))}); with labeled=True "
                         "every batch is (inputs, labels), inputs a tensor, a tuple in forward's order or a dict "
                         "of keyword inputs")
    if isinstance(batch, torch.Tensor) or len(batch) != 2:
        raise ValueError(f"distill: batch {index} is {_describe(batch)}; with labeled=True every batch is "
                         "(inputs, labels)")
    return _as_inputs(batch[0], index), batch[1]


def _as_inputs(value: Any, index: int = 0) -> Inputs:
    """A batch as `(args, kwargs)`: a tensor is one positional input, a tuple or list the positional
    inputs, a dict the keyword inputs, an `(args, kwargs)` pair itself (calibration's form, a
    pipeline's distill pass hands that on). A batch of no samples (its loss is NaN) is named."""
    if isinstance(value, Mapping):
        inputs: Inputs = ((), dict(value))
    elif isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], tuple) and isinstance(value[1], dict):
        inputs = (value[0], dict(value[1]))
    else:
        inputs = ((value,) if isinstance(value, torch.Tensor) else tuple(value), {})
    tensors = [*inputs[0], *inputs[1].values()]
    empty = next((t for t in tensors if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == 0), None)
    if empty is not None:
        raise ValueError(f"distill: batch {index} holds no samples ({_describe_inputs(inputs)}); drop it")
    return inputs


def _check_fits(role: str, model: nn.Module, inputs: Inputs, index: int, labeled: bool) -> None:
    """Raise a ValueError that says what the batch was taken as when `model`'s forward cannot
    take `inputs` (a bare TypeError from deep in the training loop did not)."""
    try:
        signature = inspect.signature(model.forward, follow_wrapped=False)
    except (TypeError, ValueError):  # no signature to read: forward itself will say
        return
    try:
        signature.bind(*inputs[0], **inputs[1])
    except TypeError as exc:
        taken = ("the inputs of (inputs, labels), as labeled=True says" if labeled
                 else f"the model's {'positional ' * (not inputs[1])}inputs")
        other = ("without labeled=True it is the inputs" if labeled
                 else "if the batches are (inputs, labels), pass labeled=True to fxopt.distill; a pipeline's "
                      "distill pass takes the model's inputs only: give those ([x for x, _ in loader])")
        raise ValueError(f"distill: batch {index} was taken as {taken}, {_describe_inputs(inputs)}, which the "
                         f"{role} {_model_name(model)}.forward{signature} does not take: {exc}; "
                         f"{other}") from None


def _model_name(model: nn.Module) -> str:
    """The model's class as its user wrote it: a captured graph's records it (its own class is
    torch.fx's "GraphModule.__new__.<locals>.GraphModuleImpl")."""
    info = model.meta.get("fxopt") or {} if isinstance(model, torch.fx.GraphModule) else {}
    return info.get("model_class") or type(model).__qualname__


def _describe(value: Any) -> str:
    """A batch's structure in a few words: `2 inputs (float32[8, 4], int64[8])`."""
    if isinstance(value, torch.Tensor):
        return f"one tensor {_tensor_text(value)}"
    items = list(value) if isinstance(value, (tuple, list)) else [value]
    parts = [_tensor_text(v) if isinstance(v, torch.Tensor) else type(v).__name__ for v in items]
    return f"{len(items)} input{'s' if len(items) != 1 else ''} ({', '.join(parts)})"


def _describe_inputs(inputs: Inputs) -> str:
    """`(args, kwargs)` in a few words: `2 inputs (float32[8, 4], int64[8])`, and the keyword
    inputs by name: `keyword inputs (input_ids=int64[2, 8])`."""
    args, kwargs = inputs
    parts = [_describe(args)] if args or not kwargs else []
    if kwargs:
        text = lambda v: _tensor_text(v) if isinstance(v, torch.Tensor) else type(v).__name__  # noqa: E731
        parts.append(f"keyword inputs ({', '.join(f'{k}={text(v)}' for k, v in kwargs.items())})")
    return " and ".join(parts)


def _tensor_text(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"


def select_output(value: Any, output: int | str | None = None, *, role: str = "teacher") -> torch.Tensor:
    """The tensor of a model's output that distillation matches (see the module doc).

        >>> import torch
        >>> from fxopt.distillation import select_output
        >>> ids, logits = torch.tensor([2, 0]), torch.randn(2, 3)
        >>> select_output((ids, logits)) is logits      # the only floating-point tensor
        True
        >>> select_output({"hidden": torch.randn(2, 8), "logits": logits}) is logits
        True
        >>> select_output((torch.randn(2, 8), logits), output=1) is logits
        True
    """
    if output is None:
        floating = [(path, t) for path, t in _leaves(value) if _is_floating(t)]
        if len(floating) == 1:
            return floating[0][1]
        named = [t for path, t in floating if path in ("['logits']", ".logits")]
        if len(named) == 1:
            return named[0]
        if not floating:
            raise ValueError(f"distill: the {role}'s output has no floating-point tensor to match "
                             f"({_describe_output(value)}); distillation needs the model's logits")
        raise ValueError(f"distill: the {role}'s output has {len(floating)} floating-point tensors "
                         f"({', '.join(p or 'output' for p, _ in floating)}) and none is named 'logits'; "
                         f"say which one holds the logits with output= (an index into a tuple, a key of a "
                         f"dict or a field name: fxopt.distill(..., output=1), distill{{output=1}} in a pipeline)")
    entry = _entry(value, output, role)
    if not _is_floating(entry):
        what = _tensor_text(entry) if isinstance(entry, torch.Tensor) else type(entry).__name__
        floating = [p or "output" for p, t in _leaves(value) if _is_floating(t)]
        hint = f"; floating-point outputs: {', '.join(floating)}" if floating else ""
        raise ValueError(f"distill: output={output!r} selects the {role}'s {what}, not floating-point "
                         f"logits distillation can match{hint}")
    return entry


def _entry(value: Any, output: int | str, role: str) -> Any:
    """`value[output]` for a tuple, list or dict, `value.output` for a dataclass or namedtuple."""
    if isinstance(value, dict):
        for key in (output, str(output)):
            if key in value:
                return value[key]
    elif isinstance(value, (tuple, list)) and isinstance(output, int) and not isinstance(output, bool):
        if -len(value) <= output < len(value):
            return value[output]
    elif isinstance(output, str) and not isinstance(value, torch.Tensor) and hasattr(value, output):
        return getattr(value, output)
    if isinstance(value, (tuple, list)) and isinstance(output, str) and hasattr(value, output):
        return getattr(value, output)  # a namedtuple's field by name
    raise ValueError(f"distill: output={output!r} is not an entry of the {role}'s output "
                     f"({_describe_output(value)}); valid: {_entries(value)}")


def _entries(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "none, the output is one tensor: leave output unset"
    if isinstance(value, dict):
        return ", ".join(map(repr, value))
    if dataclasses.is_dataclass(value):
        return ", ".join(repr(f.name) for f in dataclasses.fields(value))
    if isinstance(value, (tuple, list)):
        names = [repr(n) for n in getattr(value, "_fields", ())]
        return f"0..{len(value) - 1}" + (f" or {', '.join(names)}" if names else "")
    return f"none ({type(value).__name__} has no entries)"


def _leaves(value: Any) -> list[tuple[str, Any]]:
    from torch.utils._pytree import keystr, tree_flatten_with_path

    from .verify import _expand_dataclasses

    return [(keystr(path), leaf) for path, leaf in tree_flatten_with_path(_expand_dataclasses(value))[0]]


def _describe_output(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"one tensor {_tensor_text(value)}"
    parts = [f"{p or 'output'} {_tensor_text(t) if isinstance(t, torch.Tensor) else type(t).__name__}"
             for p, t in _leaves(value)]
    return f"{type(value).__name__} of " + (", ".join(parts) or "nothing")


def _is_floating(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _which_output(output: int | str | None) -> str:
    return "the selected output" if output is None else f"output={output!r}"


def _check_shapes(out: torch.Tensor, target: torch.Tensor, output: int | str | None) -> None:
    """The student's selected output must be shaped like the teacher's (the loss measured before
    training failed in kl_div's "The size of tensor a (5) must match ...")."""
    if tuple(out.shape) != tuple(target.shape):
        raise ValueError(f"distill: {_which_output(output)} of the student is {_tensor_text(out)} but the teacher's "
                         f"is {_tensor_text(target)}; they must match")


def _check_trainable(out: torch.Tensor, target: torch.Tensor, output: int | str | None) -> None:
    """The selected student output must be computed from trainable parameters and be shaped like
    the teacher's, or there is nothing to fit (autograd's own words were obscure)."""
    which = _which_output(output)
    _check_shapes(out, target, output)
    if not out.requires_grad:
        raise ValueError(f"distill: {which} of the student ({_tensor_text(out)}) does not depend on any "
                         "floating-point parameter, so training cannot move it; select the logits with output=")
    from .errors import PassWarning

    if out.dim() == 1:
        warnings.warn(f"distill: {which} is {_tensor_text(out)}, one dimension: distillation's loss is a softmax "
                      "over all of it, as over one sample's classes; where it holds one value per sample, that "
                      "compares the samples with each other: return it as (batch, 1) (out[:, None]), which is "
                      "matched value by value", PassWarning, stacklevel=user_stacklevel())
    if out.dim() >= 4:  # a feature map, or a segmentation map with its classes in dim 1
        warnings.warn(f"distill: {which} is {_tensor_text(out)}, and distillation's loss is a softmax over its last "
                      f"dimension ({out.shape[-1]}), as over the classes of logits: for a feature map or a "
                      "segmentation map (classes in dim 1) that matches the wrong thing; select the logits with "
                      "output=, or distill a model whose output ends in its classes", PassWarning,
                      stacklevel=user_stacklevel())
