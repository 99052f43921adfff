"""`fxopt.calibrate(gm, batches)`: run calibration data through a module with observers.

Between `insert-observers` and `lower-int8` (the composite `quantize` pass does this itself on
the calibration batches given to `fxopt.optimize`)::

    >>> import torch, fxopt
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    >>> x = torch.randn(8, 4)
    >>> observed = fxopt.optimize(model, (x,), "insert-observers", verify=False).module
    >>> fxopt.calibrate(observed, [(torch.randn(8, 4),) for _ in range(3)], progress=False)
    3

Batches may be tensors, tuples of positional args, dicts of keyword args, or `(args, kwargs)`
pairs. Observers are found by duck typing (`is_fxopt_observer`), so the core does not import
the quantization passes.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from .capture import normalize_inputs
from .call_check import explain_failed_calls
from .errors import FxoptError, InputMismatchError
from .ir import flatten_inputs, fresh_inputs, tensor_meta
from .tracing import one_at_a_time


def _as_call(batch: Any) -> tuple[tuple, dict]:
    if (isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[0], tuple)
            and isinstance(batch[1], dict)):
        return batch
    return normalize_inputs(batch)


def check_batches(batches: Any, option: str = "calibration") -> None:
    """Refuse one tensor given where a sequence of batches is wanted: iterating it would yield
    its rows, each taken for a batch of its own (a linear accepts a 1-D row, so the mistake ran
    silently and calibrated on single samples); and one dict (a batch of keyword inputs), whose
    keys iteration would take for batches."""
    if isinstance(batches, torch.Tensor):
        rows = f"{batches.shape[0]} batches of its rows" if batches.dim() else "no batch at all"
        raise FxoptError(f"{option}: got one Tensor of shape {tuple(batches.shape)}, which would be read as "
                         f"{rows}; pass a sequence of batches, e.g. [(x,)] for one batch or "
                         f"[(b,) for b in x.split(8)] for several")
    if isinstance(batches, Mapping):  # iterated, it gives its keys: each taken for a batch
        keys = ", ".join(repr(k) for k in list(batches)[:3])
        raise FxoptError(f"{option}: got one dict (keys {keys}), which would be read as its keys, one batch each; "
                         "pass a sequence of batches, e.g. [batch] for one batch of keyword inputs")


class StreamedBatches:
    """The calibration data given to `fxopt.optimize` as a sized iterable that is not a list (a
    DataLoader): each pass that reads it iterates the source again, batch by batch, as
    `(args, kwargs)` pairs, so the batches are never all in memory at once.

        >>> import torch
        >>> loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(6, 4)), batch_size=2)
        >>> batches = StreamedBatches(loader)
        >>> len(batches), [tuple(args[0].shape) for args, kwargs in batches]
        (3, [(2, 4), (2, 4), (2, 4)])
    """

    def __init__(self, source: Any) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self) -> Iterator[tuple[tuple, dict]]:
        return (normalize_inputs(batch) for batch in self.source)

    def __repr__(self) -> str:
        return f"StreamedBatches({type(self.source).__name__}, {len(self)} batches)"


def pipeline_batches(calibration: Any) -> list[tuple[tuple, dict]] | StreamedBatches | None:
    """`fxopt.optimize`'s `calibration` as the passes read it (`PassContext.calibration`): None
    stays None; a list or tuple becomes a list of `(args, kwargs)` pairs, and so does a one-shot
    iterator (a generator, which passes could not read twice) or an iterable without a length (a
    DataLoader of an IterableDataset, whose `len` raises), read up to a cap (`_read_unsized`);
    another iterable with a length (a DataLoader) is streamed (`StreamedBatches`). Each batch is
    read as capture reads example inputs (a tuple is positional inputs, even ``(tuple, dict)``);
    what this returns comes back unchanged (`PassManager.run` reads its `calibration` here too).

        >>> import torch
        >>> pipeline_batches([torch.ones(2), (torch.ones(2), 3)])[1][0][1]
        3
    """
    if calibration is None or isinstance(calibration, (StreamedBatches, ReadBatches, ReadWhenUsed)):
        return calibration
    check_batches(calibration)
    if isinstance(calibration, (list, tuple)):
        return ReadBatches(normalize_inputs(batch) for batch in calibration)
    if _unsized(calibration):
        return _read_unsized(calibration)
    return StreamedBatches(calibration)


def _unsized(calibration: Any) -> bool:
    """Whether `calibration` is a source `pipeline_batches` reads into memory: a one-shot iterator,
    or an iterable whose `len` raises. (An Iterator is read once; asking a DataLoader for one would
    start its workers for nothing. What was read already is asked nothing: a `ReadWhenUsed`'s
    length reads it.)"""
    if isinstance(calibration, (list, tuple, StreamedBatches, ReadWhenUsed)):
        return False
    return isinstance(calibration, Iterator) or not _has_length(calibration)


#: The most batches read into memory from a source without a length (a generator, a DataLoader of
#: an IterableDataset): an endless one (``while True: yield ...``) was read until memory ran out.
MAX_UNSIZED_BATCHES = 100_000


_MEMINFO = "/proc/meminfo"
_CGROUP = "/sys/fs/cgroup"  # (cgroup v2 as a container sees it: its own group at the root)


def available_memory() -> int | None:
    """Bytes of memory available to new allocations, or None where unknown: Linux's MemAvailable,
    or what the container's cgroup limit leaves where that is less (MemAvailable is the machine's)."""
    machine = _read_number(_MEMINFO, "MemAvailable:")
    limit, used = _read_number(f"{_CGROUP}/memory.max"), _read_number(f"{_CGROUP}/memory.current")
    if limit is None or used is None:
        return machine * 1024 if machine is not None else None
    headroom = max(limit - used, 0)
    return min(machine * 1024, headroom) if machine is not None else headroom


def _read_number(path: str, key: str | None = None) -> int | None:
    """The number a file holds (after `key`, in a "key value" listing), or None ("max", no file)."""
    try:
        with open(path) as file:
            for line in file:
                if key is None or line.startswith(key):
                    return int(line.split()[1 if key else 0])
    except (OSError, ValueError, IndexError):
        pass
    return None


class ReadWhenUsed(Sequence):
    """A source `pipeline_batches` would read into memory (a generator, a DataLoader without a
    length), read on first use: `PassManager.run` hands it to the passes as it is, and a pipeline
    whose passes never read their calibration (dce) never reads it (an endless one included)."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self._read: list[tuple[tuple, dict]] | None = None

    def batches(self) -> list[tuple[tuple, dict]]:
        if self._read is None:
            self._read = _read_unsized(self.source)
        return self._read

    def __len__(self) -> int:
        return len(self.batches())

    def __getitem__(self, index: Any) -> Any:
        return self.batches()[index]

    def __iter__(self) -> Iterator[tuple[tuple, dict]]:
        return iter(self.batches())


def batches_for_passes(calibration: Any) -> list[tuple[tuple, dict]] | StreamedBatches | ReadWhenUsed | None:
    """`pipeline_batches`, but a source it would read into memory is read when a pass first uses it
    (`ReadWhenUsed`); one tensor or one dict is refused now."""
    if calibration is not None and _unsized(calibration):
        return ReadWhenUsed(calibration)
    return pipeline_batches(calibration)


class ReadBatches(list):
    """The `(args, kwargs)` pairs `pipeline_batches` read from the user's batches: given to it again
    (a pass's `ctx.calibration` handed to another `PassManager.run`), they are taken as they are,
    not read as batches of two positional inputs."""


def _read_unsized(batches: Iterable[Any]) -> list[tuple[tuple, dict]]:
    """Every batch of a source without a length, as `(args, kwargs)` pairs; raises FxoptError, naming
    the option, once it holds more than `MAX_UNSIZED_BATCHES` or its tensors take half the memory
    that was available when reading began (batches of images reach that long before the count)."""
    memory = available_memory()
    read = ReadBatches()
    held, seen = 0, set()
    for batch in batches:
        if len(read) == MAX_UNSIZED_BATCHES:
            _refuse_unsized(batches, f"read {MAX_UNSIZED_BATCHES} batches from {_source_name(batches)}, "
                                     "and it has not ended")
        read.append(normalize_inputs(batch))
        held += _new_bytes(read[-1], seen)
        if memory is not None and 2 * held > memory:
            _refuse_unsized(batches, f"the {len(read)} batches read from {_source_name(batches)} hold {held} bytes, "
                                     f"half the memory available ({memory} bytes), and it has not ended")
    return read


def _refuse_unsized(batches: Iterable[Any], what: str) -> None:
    raise FxoptError(f"calibration=: {what} (an endless generator or IterableDataset?): batches from a source "
                     "without a length are held in memory; pass itertools.islice(batches, n), a list of batches, "
                     "or a DataLoader of a sized dataset (streamed batch by batch)")


def _source_name(batches: Iterable[Any]) -> str:
    if isinstance(batches, Iterator):
        return f"a {type(batches).__name__}"
    return f"a {type(batches).__name__} without a length"


def _new_bytes(call: tuple[tuple, dict], seen: set[int]) -> int:
    """The bytes of the storages `call` holds that no batch read before held (`seen`, their
    addresses): a view or a repeat of a tensor already read holds no more memory, and a sparse
    tensor holds its indices and values, not its dense shape."""
    total = 0
    for leaf in torch.utils._pytree.tree_leaves(call):
        for part in _stored_parts(leaf) if isinstance(leaf, torch.Tensor) else ():
            storage = part.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def _stored_parts(t: torch.Tensor) -> list[torch.Tensor]:
    """The strided tensors holding `t`'s data: itself, or a sparse tensor's indices and values."""
    if t.layout == torch.strided:
        return [t]
    if t.layout == torch.sparse_coo:
        return [t._indices(), t._values()]
    if t.layout in (torch.sparse_csr, torch.sparse_bsr):
        return [t.crow_indices(), t.col_indices(), t.values()]
    if t.layout in (torch.sparse_csc, torch.sparse_bsc):
        return [t.ccol_indices(), t.row_indices(), t.values()]
    return []  # (another layout: not counted)


def _has_length(batches: Any) -> bool:
    """Whether `len(batches)` answers: a DataLoader always has `__len__`, which raises TypeError
    for an IterableDataset (the passes ask a streamed source its length)."""
    try:
        len(batches)
    except TypeError:
        return False
    return True


#: The index, within the running `calibrate` call, of the batch being fed (observers name it).
_BATCH: ContextVar[int | None] = ContextVar("fxopt_calibration_batch", default=None)


def current_batch() -> int | None:
    """Index of the batch the running `calibrate` call is feeding, counted within that call
    (what a user's list index is); None outside a call. Observers name it in their errors."""
    return _BATCH.get()


@one_at_a_time
def calibrate(gm: nn.Module, batches: Iterable[Any], *, progress: bool = True,
              max_batches: int | None = None) -> int:
    """Run `batches` through `gm` (no grad) so its observers record ranges; returns the count.

    `batches` is any iterable, read one batch at a time (a generator or a DataLoader streams:
    each batch runs before the next is asked for; `max_batches` stops reading after that many).
    Raises FxoptError when `gm` has no observers or `batches` is empty; observers raise on
    NaN or non-float data, naming the node they watch (an infinity, such as a -inf attention
    mask, is recorded: that value stays float).

        >>> import torch, fxopt
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        >>> observed = fxopt.optimize(model, torch.randn(8, 4), "insert-observers", verify=False).module
        >>> fxopt.calibrate(observed, [torch.randn(8, 4) for _ in range(2)], progress=False)
        2
    """
    observers = [m for m in gm.modules() if getattr(m, "is_fxopt_observer", False)]
    if not observers:
        raise FxoptError("calibrate: the module has no observers; run the 'insert-observers' pass first")
    if batches is None:
        raise FxoptError("calibrate: no calibration data (batches is None)")
    check_batches(batches, "calibrate")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise FxoptError(f"calibrate: max_batches must be an int >= 1 (or None for every batch), got {max_batches!r}")
    if max_batches is not None:
        batches = itertools.islice(batches, max_batches)
    from tqdm.auto import tqdm

    explain_failed_calls(gm)  # a pass's fresh copy (quantize's observed module) is not wrapped yet
    fed = 0
    with torch.no_grad(), _model_state_on_copies(gm):
        # read one batch at a time: a generator or a DataLoader is never held whole in memory
        for fed, batch in enumerate(tqdm(batches, desc="calibrating", unit="batch", disable=not progress,
                                         leave=False), start=1):
            _feed(gm, observers, fed - 1, batch)
    if not fed:
        raise FxoptError("calibrate: the calibration data is empty; give at least one batch")
    return fed


def _feed(gm: nn.Module, observers: list[nn.Module], i: int, batch: Any) -> None:
    """Run calibration batch `i` through `gm`; an error names the batch and what in it is wrong."""
    # copies: a model that writes into its input (``x.sub_(mean)``) must not change the
    # caller's batches, which a later calibration would read shifted
    args, kwargs = fresh_inputs(*_as_call(batch))
    token = _BATCH.set(i)
    try:
        gm(*args, **kwargs)
    except InputMismatchError as exc:  # a guard of the graph named the input that does not fit
        raise InputMismatchError(f"calibrate: calibration batch {i} does not fit the captured graph: {exc}\n  "
                                 f"{_fit_advice(exc)}{_pair_hint(args)}") from exc
    except FxoptError as exc:  # an observer's own message (NaN, non-float data) says what it saw
        infinite = [o.location for o in observers if getattr(o, "nonfinite_batch", None) == i
                    and getattr(o, "nonfinite", "")]
        if "NaN" in str(exc) and infinite:  # inf - inf, 0 * inf: where the NaN came from
            raise type(exc)(f"{exc} (this batch had infinities first, seen by the observer for "
                            f"{'; '.join(infinite[:3])}: arithmetic on them made the NaN)") from None
        raise
    except Exception as exc:  # a batch of the wrong shape or dtype fails deep inside a layer
        shapes = [str(tuple(a.shape)) for a in torch.utils._pytree.tree_leaves(args) if isinstance(a, torch.Tensor)]
        shapes += [f"{k}={tuple(v.shape)}" for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        raise FxoptError(f"calibrate: calibration batch {i} (tensor shapes [{', '.join(shapes)}]) does not run "
                         f"through the model: {type(exc).__name__}: {exc}{_rank_hint(gm, args, kwargs)}"
                         f"{_guard_hint(exc)}{_count_hint(exc, args)}{_pair_hint(args)}") from exc
    finally:
        _BATCH.reset(token)


def _fit_advice(exc: InputMismatchError) -> str:
    """What to do about a calibration batch a guard of the captured graph refused."""
    advice = ("each calibration batch is a call of the graph captured from the example inputs: give it the "
              "example's inputs, in the same places (by position or by keyword), at sizes the graph takes")
    if "specialized to that value" not in str(exc):  # capture's and call_check's words for a non-tensor input
        return advice
    return (f"{advice}, and the same non-tensor values as the example inputs (the graph is specialized to them); "
            "to quantize for another value, run fxopt.optimize again with an example that has it")


def _rank_hint(gm: nn.Module, args: tuple, kwargs: dict) -> str:
    """Which input has another number of dimensions than the one the graph was captured with
    (a missing batch or channel axis fails deep inside a layer, or on an index in export's guard)."""
    if not isinstance(gm, torch.fx.GraphModule):
        return ""
    try:
        values = flatten_inputs(gm, args, kwargs)
    except Exception:  # the batch does not even bind to forward's inputs: the error says so
        return ""
    placeholders = gm.graph.find_nodes(op="placeholder")
    for node, value in zip(placeholders, values):
        meta = tensor_meta(node)
        if meta is not None and isinstance(value, torch.Tensor) and value.dim() != len(meta[0]):
            return (f"\n  input '{node.target}' has {value.dim()} dimensions {list(value.shape)}; the model was "
                    f"captured with {len(meta[0])} {list(meta[0])}: give batches shaped like the example inputs")
    return ""


def _count_hint(exc: Exception, args: tuple) -> str:
    """What to do when a batch holds more positional inputs than forward takes: most often a
    DataLoader of (inputs, labels), whose labels are fed as an input."""
    if not (isinstance(exc, TypeError) and "positional argument" in str(exc) and len(args) > 1):
        return ""
    if _looks_like_a_call(args):
        return ""  # (`_pair_hint` says it)
    return (f"\n  a calibration batch is the model's positional inputs, and this one holds {len(args)}: batches "
            "of (inputs, labels) feed the labels as an input too; give the inputs only (e.g. [x for x, _ in loader])")


def _looks_like_a_call(args: tuple) -> bool:
    return len(args) == 2 and isinstance(args[0], tuple) and isinstance(args[1], dict)


def _pair_hint(args: tuple) -> str:
    """What to do when a batch of the pipeline was an `(args, kwargs)` pair, which it reads, as
    capture reads example inputs, as two positional inputs (the hint blamed (inputs, labels))."""
    if not _looks_like_a_call(args):
        return ""
    return ("\n  a calibration batch of fxopt.optimize / PassManager.run is read as example inputs are: this "
            "(tuple, dict) is two positional inputs, not (args, kwargs); give the batch as a tuple of positional "
            "inputs, or as a dict of all its inputs by forward's parameter names")


def _guard_hint(exc: Exception) -> str:
    """What to do when an exported graph's shape guard refused a batch."""
    if "Guard failed" not in str(exc):
        return ""
    return ("\n  the model was captured by torch.export, which keeps dim 0 of each input dynamic (taken for "
            "the batch) and fixes every other size to the example's: give example inputs with the sizes "
            "the calibration batches have, or capture with mode='symbolic' (a sequence-first model, "
            "batch on dim 1 as in torch.nn's attention with batch_first=False, needs one of the two)")


@contextmanager
def _model_state_on_copies(gm: nn.Module) -> Iterator[None]:
    """Calibration runs the model, and a forward that updates its own buffers (a step counter,
    a running statistic) would advance them and write into tensors the caller's model shares:
    the buffers are swapped for copies while it runs and put back after. Observers keep theirs:
    recording is their job."""
    recording = {id(m) for observer in gm.modules() if getattr(observer, "is_fxopt_observer", False)
                 for m in observer.modules()}
    swapped = [(module, name, b) for module in gm.modules() if id(module) not in recording
               for name, b in module._buffers.items() if b is not None]
    for module, name, b in swapped:
        module._buffers[name] = b.clone()
    try:
        yield
    finally:
        for module, name, b in swapped:
            module._buffers[name] = b
