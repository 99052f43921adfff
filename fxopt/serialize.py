"""Save and load GraphModules without unpickling arbitrary objects: `fxopt.save` / `fxopt.load`.

`save(gm, path)` writes one `torch.save` file holding only plain data: the graph as a list of node
records (op, target *by name*, args, the source lines and module path errors name), plain tensors
(quantized ones as integers plus their scales), for `torch.nn` leaf modules their class name, plain
attributes and tensors, and for other attribute objects what a registered codec makes of them (int8
prepacked weights: the quantize passes register one). `load(path)` reads it with
`torch.load(weights_only=True)`, resolves targets by name from an allow-list of modules (torch,
operator, math, builtins, fxopt) — no code from the file ever runs — and rebuilds the GraphModule,
pytree input/output handling of exported graphs included, and the subgraphs its higher-order ops run
(a ``torch.no_grad()`` or autocast region, `torch.cond`'s branches); tensors the graph held as one
object (an embedding tied to the output layer) come back as one object. A CRC32 of every part,
stored at save, makes `load` refuse a damaged file by the name of the tensor that differs.
`torch.save` itself fails on export-captured graphs (their stateful wrapper holds local functions);
this works for both front ends.

    >>> import torch, fxopt, tempfile, os
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    >>> gm = fxopt.capture(model, (torch.randn(2, 4),), mode="export")
    >>> path = os.path.join(tempfile.mkdtemp(), "model.fxopt.pt")
    >>> fxopt.save(gm, path)
    >>> x = torch.randn(3, 4)
    >>> torch.equal(fxopt.load(path)(x), gm(x))
    True
"""
from __future__ import annotations

import copy
import os
import zlib

import dataclasses
import functools
import importlib
import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.fx
from torch import nn
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.utils._pytree import TreeSpec, treespec_dumps, treespec_loads

import torch.ao.quantization.fx._decomposed  # noqa: F401  the reference int8 form's ops

from .call_check import INPUTS_KEY, explain_failed_calls, guard_inputs, upgrade_record
from .errors import SerializationError, first_line, node_location

FORMAT = "fxopt.graph/1"
_OLD_FORMATS = ("fxopt.quantized-graph/1",)  # written by the quantize passes before fxopt.save
_ALLOWED_MODULES = ("torch", "operator", "_operator", "builtins", "math", "fxopt")
_SIMPLE = (int, float, bool, str, type(None))


@dataclass(frozen=True)
class AttributeCodec:
    """How to store an attribute object that is no tensor (an int8 prepacked weight).

    `matches(obj)` says whether the codec handles `obj`; `encode(obj)` returns plain data
    (tensors, numbers, lists, dicts); `decode(data)` rebuilds the object. `provider` is the
    module that registers the codec: `load` imports it (an `fxopt.*` module only) when a file
    needs a codec no import has registered yet.
    """

    name: str
    matches: Callable[[Any], bool]
    encode: Callable[[Any], dict]
    decode: Callable[[dict], Any]
    provider: str


_CODECS: dict[str, AttributeCodec] = {}


def register_codec(codec: AttributeCodec) -> None:
    """Make `save`/`load` store attributes `codec.matches` (a pass registers its own objects)."""
    _CODECS[codec.name] = codec


class CodedValue(nn.Module):
    """Holds one attribute object a registered codec stores (an int8 prepacked weight); a graph
    reads it as ``get_attr holder.value``.

    Why a holder: an opaque object copies and pickles by its own rules, and those can lose what
    the codec keeps. A prepacked int8 weight re-packs under the global quantized engine when it
    is deep-copied or unpickled, which undoes the engine lowering chose for the layer: a
    256-channel depthwise conv re-packed by fbgemm saturates (35 -> 15 dB after
    ``copy.deepcopy(model)``, the same after ``torch.save(model)`` / ``torch.load``). Held
    here, a deep copy shares the object (nothing writes into it) and pickling stores what the
    codec encodes and rebuilds it with the codec.

        >>> import copy, torch
        >>> holder = CodedValue(torch.ones(2))   # any object; a codec-less one copies as usual
        >>> copy.deepcopy(holder).value
        tensor([1., 1.])
    """

    def __init__(self, value: Any) -> None:
        super().__init__()
        self.value = value

    def __deepcopy__(self, memo: dict) -> "CodedValue":
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        shared = _codec_for(self.value) is not None
        new.__dict__.update({k: v if k == "value" and shared else copy.deepcopy(v, memo)
                             for k, v in self.__dict__.items()})
        return new

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        codec = _codec_for(self.value)
        if codec is not None:
            state["value"] = _coded_record(codec, self.value)
            # encoding read the object back (an int8 pack's unpack), leaving it on a slower path
            self.value = _decode_attribute(state["value"][_CODED_KEY])
        return state

    def __setstate__(self, state: dict) -> None:
        value = state.get("value")
        if isinstance(value, dict) and _CODED_KEY in value:
            state = {**state, "value": _decode_attribute(value[_CODED_KEY])}
        super().__setstate__(state)


#: Marks a pickled `CodedValue`'s encoded object (a plain dict of the codec's data never has it).
_CODED_KEY = "fxopt.coded_value"


def _coded_record(codec: AttributeCodec, value: Any) -> dict:
    return {_CODED_KEY: {"codec": codec.name, "provider": codec.provider, "data": codec.encode(value)}}


def _check_is_file(path: Any) -> None:
    """Refuse a path with no file at it, naming it (torch.load's FileNotFoundError read as a
    file of another format); a file-like object is torch.load's to read."""
    if not isinstance(path, (str, os.PathLike)):
        return
    if os.path.isdir(path):
        raise SerializationError(f"load: {os.fspath(path)} is a directory, not a file saved by fxopt.save")
    if not os.path.exists(path):
        raise SerializationError(f"load: no file at {os.fspath(path)}: check the path (relative paths start at "
                                 f"{os.getcwd()})")


def rebuild_coded_attributes(module: nn.Module) -> int:
    """Replace every attribute a registered codec stores by the object its codec rebuilds from
    it (what `save` then `load` would give); returns how many.

    A prepacked int8 weight keeps the oneDNN primitive built for its first call's shape, and
    calls at any other shape take a slower path: a model run once at the example's batch
    (shape propagation, verification) stays 1.4-2x slower at batch 1 after. A rebuilt weight
    lets the caller's first call choose. The codec, not `copy.deepcopy`, rebuilds it: a deep
    copy re-packs under the current engine and loses the per-layer engine lowering chose
    (MobileNetV2's depthwise convs back on fbgemm: 47.6 -> 40.2 dB).
    """
    count = 0
    for owner in module.modules():
        for name, value in list(vars(owner).items()):
            codec = _codec_for(value) if not isinstance(value, (torch.Tensor, nn.Module)) else None
            if codec is not None:
                setattr(owner, name, codec.decode(codec.encode(value)))
                count += 1
    if count and isinstance(module, torch.fx.GraphModule):
        hold_coded_attributes(module)
    return count


def holds_coded_attributes(module: nn.Module) -> bool:
    """Whether `module` or a submodule holds an attribute a registered codec stores (an int8
    prepacked weight)."""
    return any(_codec_for(value) is not None for owner in module.modules() for value in vars(owner).values()
               if not isinstance(value, (torch.Tensor, nn.Module)))


def hold_coded_attributes(gm: torch.fx.GraphModule) -> int:
    """Make every codec-stored object the graph reads a `CodedValue`'s ``value``; returns how
    many were not. ``torch.fx.GraphModule(root, graph)`` (a re-trace, a load) copies a
    ``holder.value`` target into a plain module, and files from before the holders keep the
    object on the root: both would copy and pickle it by its own rules again."""
    held: dict[str, str] = {}  # target read -> the holder's target now
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        if node.target in held:
            node.target = held[node.target]
            continue
        owner_path, _, attr = node.target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        value = getattr(owner, attr, None)
        if _codec_for(value) is None or isinstance(owner, CodedValue) and attr == "value":
            continue
        if owner_path and attr == "value" and type(owner) is nn.Module and not (
                owner._modules or owner._parameters or owner._buffers):
            # what GraphModule made of a holder: the holder again, at the same path
            parent_path, _, name = owner_path.rpartition(".")
            setattr(gm.get_submodule(parent_path) if parent_path else gm, name, CodedValue(value))
            held[node.target] = node.target
            continue
        name, i = f"{attr}_held", 0
        while hasattr(owner, name):
            i += 1
            name = f"{attr}_held_{i}"
        owner.add_module(name, CodedValue(value))
        delattr(owner, attr)
        new_target = f"{owner_path + '.' if owner_path else ''}{name}.value"
        held[node.target] = new_target
        node.target = new_target
    if held:
        gm.recompile()
    return len(held)


def _codec_for(value: Any) -> AttributeCodec | None:
    """The registered codec that stores `value`, if any."""
    return next((c for c in _CODECS.values() if c.matches(value)), None)


# ----- saving ---------------------------------------------------------------------------------

def save(gm: torch.fx.GraphModule, path) -> None:
    """Write `gm` (a GraphModule from any front end and pipeline) to `path`; see the module doc.

    Raises SerializationError naming the node whose attribute or module cannot be stored.

        >>> import os, tempfile, torch, fxopt
        >>> gm = fxopt.optimize(torch.nn.Linear(4, 2), torch.randn(3, 4), "dce").module
        >>> path = os.path.join(tempfile.mkdtemp(), "linear.fxopt.pt")
        >>> fxopt.save(gm, path)
        >>> os.path.getsize(path) > 0
        True
    """
    _check_destination(path)
    _check_savable(gm)
    tensors: dict[str, torch.Tensor] = {}
    packed: dict[str, dict] = {}
    modules: dict[str, dict] = {}
    parameters: dict[str, bool] = {}  # get_attr target -> requires_grad, for the tensors that are parameters
    subgraphs: dict[str, dict] = {}  # get_attr target -> `_subgraph_record`
    nodes = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target.startswith("_guards") and not node.users:
            continue  # export's input guards (or fxopt's): load puts fxopt's InputGuard back from the record
        value = _attr_value(gm, node.target) if node.op == "get_attr" else None
        if isinstance(value, torch.fx.GraphModule):  # a region a higher-order op runs (export's no_grad)
            subgraphs[node.target] = _subgraph_record(value, node.target, tensors)
        elif node.op == "get_attr":
            _save_attr(gm, node, tensors, packed)
            if isinstance(value, nn.Parameter):
                parameters[node.target] = value.requires_grad
        elif node.op == "call_module":
            modules[node.target] = _save_module(gm.get_submodule(node.target), node)
        nodes.append(_node_record(node, tensors))
    codegen = gm.graph._codegen
    pytree = None
    if isinstance(codegen, _PyTreeCodeGen):
        info = codegen.pytree_info
        in_spec, in_structseqs = _dump_spec(info.in_spec, "inputs")
        out_spec, out_structseqs = _dump_spec(info.out_spec, "outputs")
        pytree = {"orig_args": list(info.orig_args), "in_spec": in_spec, "out_spec": out_spec,
                  "in_structseqs": in_structseqs, "out_structseqs": out_structseqs}
    # what capture and optimize recorded (front end, pipeline, tolerance), plain values only:
    # fxopt.verify reads the tolerance of a loaded module as of the one saved
    info = {k: _plain_meta(v) for k, v in (gm.meta.get("fxopt") or {}).items() if _plain_meta(v) is not None}
    payload = {"format": FORMAT, "nodes": nodes, "tensors": tensors, "packed": packed,
               "modules": modules, "pytree": pytree, "engine": torch.backends.quantized.engine,
               "fxopt_meta": info, "parameters": parameters, "training": gm.training, "subgraphs": subgraphs,
               "tied": _tied_tensors(gm, _stored_tensor_paths(tensors, modules))}
    payload["checksums"] = checksums(payload)
    _write(payload, path)
    _renew_packs(gm, packed)


def _node_record(node: torch.fx.Node, tensors: dict) -> dict:
    """`node` as plain data: its target by name, its arguments (a constant tensor among them
    stored into `tensors`), where it came from."""
    if node.op == "call_method" and not _is_tensor_method(node.target):  # load would refuse the file
        raise SerializationError(f"save: {node_location(node)} calls method {node.target!r}, which is no "
                                 "tensor method fxopt.load may call")
    try:
        args, kwargs = _encode(node.args, tensors), _encode(node.kwargs, tensors)
    except SerializationError as exc:  # which node's argument: the bare type named none
        raise SerializationError(f"save: {node_location(node)}: {str(exc).removeprefix('save: ')}") from None
    return {"name": node.name, "op": node.op, "target": _encode_target(node), "args": args,
            "kwargs": kwargs, "computes": node.meta.get("fxopt.computes"), **_source_record(node),
            **_listing_record(node)}


def _subgraph_record(sub: torch.fx.GraphModule, path: str, tensors: dict) -> dict:
    """A subgraph a higher-order op runs (export's ``with torch.no_grad():`` region) as plain
    data: its nodes, and the subgraphs they read in turn. export passes such a region its
    weights as inputs; one that reads a tensor or calls a module of its own is refused."""
    nodes, subgraphs = [], {}
    for node in sub.graph.nodes:
        if node.op in ("get_attr", "call_module"):
            value = _attr_value(sub, node.target)
            if node.op == "call_module" or not isinstance(value, torch.fx.GraphModule):
                raise SerializationError(
                    f"save: {node_location(node)} in the subgraph '{path}' reads {type(value).__name__} "
                    f"'{node.target}' of its own; fxopt.save stores subgraphs that take their weights as inputs, "
                    "as export writes them")
            subgraphs[node.target] = _subgraph_record(value, f"{path}.{node.target}", tensors)
        nodes.append(_node_record(node, tensors))
    return {"nodes": nodes, "subgraphs": subgraphs}


def _renew_packs(gm: torch.fx.GraphModule, packed: dict[str, dict]) -> None:
    """Put an object decoded from its stored data in place of each one `save` encoded: encoding
    an int8 prepacked weight reads it back (``unpack``), which leaves the live pack on oneDNN's
    slower path (a 4-conv net at batch 1: 0.49 ms after `save`, 0.28 as loaded from the file)."""
    for target, record in packed.items():
        owner_path, _, name = target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        value = _decode_attribute({k: record[k] for k in ("codec", "provider", "data")})
        current = getattr(owner, name)
        if isinstance(current, CodedValue):  # the graph reads the holder itself
            current.value = value
        else:
            setattr(owner, name, value)


def _check_destination(path) -> None:
    """Refuse, before any work, a path no file can be written at (a folder, a missing folder)."""
    if isinstance(path, bytes):
        raise SerializationError(f"save: the path {path!r} is bytes; give a str or a pathlib.Path "
                                 f"({path.decode(errors='replace')!r})")
    if not isinstance(path, (str, os.PathLike)):
        return  # a file object: torch.save writes to it
    target = os.fspath(path)
    if os.path.isdir(target):
        raise SerializationError(f"save: '{target}' is a folder; give the path of a file to write "
                                 f"(e.g. '{os.path.join(target, 'model.pt')}')")
    folder = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(folder):
        raise SerializationError(f"save: cannot write '{target}': the folder '{folder}' does not exist "
                                 "(create it first, e.g. os.makedirs)")


def _write(payload: dict, path) -> None:
    """torch.save, its failure to open or write a path said as fxopt's error naming the path."""
    try:
        torch.save(payload, path)
    except (OSError, RuntimeError) as exc:  # torch reports a refused open as a RuntimeError
        if not isinstance(path, (str, os.PathLike)):
            raise
        raise SerializationError(f"save: cannot write '{os.fspath(path)}': {_os_reason(exc)}; give a path "
                                 "in a folder you can write") from None


def _source_record(node: torch.fx.Node) -> dict:
    """Where `node` came from, as plain data: the model's source lines (``meta["stack_trace"]``)
    and the modules it ran in (``meta["nn_module_stack"]``, each class by its dotted name), which
    errors and `fxopt.verify` name. Empty for a node the front end recorded neither for."""
    record: dict = {}
    if isinstance(node.meta.get("stack_trace"), str):
        record["stack_trace"] = node.meta["stack_trace"]
    stack = node.meta.get("nn_module_stack")
    if isinstance(stack, dict):  # entries of another shape (a front end's own) are not stored
        record["module_stack"] = [[str(key), str(entry[0]), _class_name(entry[1])] for key, entry in stack.items()
                                  if isinstance(entry, (tuple, list)) and len(entry) == 2]
    return record


def _listing_record(node: torch.fx.Node) -> dict:
    """What a listing of `node` shows beyond its op, as plain data: its type as text
    (``f32[2, 8, 6, 6]``: the shapes a graph records are tensors of torch's own) and the
    annotations passes wrote (``fused``, ``prune.kept``) whose values are plain data. A loaded
    graph's dump showed neither: a file one was sent listed bare ops."""
    from .debug.listing import ANNOTATIONS, type_text

    record: dict = {}
    notes = {key: value for key, value in (node.meta.get(ANNOTATIONS) or {}).items()
             if isinstance(key, str) and _is_plain_data(value)}
    if notes:
        record["annotations"] = notes
    if type_text(node):
        record["type"] = type_text(node)
    return record


def _restore_listing(node: torch.fx.Node, rec: dict) -> None:
    """Put back what `_listing_record` stored for `node` (files of earlier versions have none)."""
    from .debug.listing import ANNOTATIONS, SAVED_TYPE

    notes, kind = rec.get("annotations"), rec.get("type")
    if notes is not None:
        if not (isinstance(notes, dict) and _is_plain_data(notes)):
            raise SerializationError(f"load: refusing node '{node.name}': its annotations are not plain data")
        node.meta[ANNOTATIONS] = notes
    if kind is not None:
        if not isinstance(kind, str):
            raise SerializationError(f"load: refusing node '{node.name}': its type is no text")
        node.meta[SAVED_TYPE] = kind


def _class_name(kind: Any) -> str:
    """A module class as export records it in ``nn_module_stack`` ("torch.nn.modules.linear.Linear");
    symbolic tracing records the class itself."""
    return f"{kind.__module__}.{kind.__qualname__}" if isinstance(kind, type) else str(kind)


def _os_reason(exc: Exception) -> str:
    """The operating system's reason in an error from torch.save ("Permission denied")."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = first_line(exc)
    return text.split("strerror:", 1)[1].strip() if "strerror:" in text else text


def _plain_meta(value: Any) -> Any:
    """A recorded value as plain data: a custom `Tolerance` (what `optimize(tolerance=...)`
    records) as its fields, which `fxopt.verify` of the loaded module holds it to; None for what
    is not stored."""
    from .verify import Tolerance

    if isinstance(value, Tolerance):
        return {"tolerance": dataclasses.asdict(value)}
    return value if _is_plain_data(value) else None


def _is_plain_data(value: Any) -> bool:
    """Numbers, strings, None, and lists and str-keyed dicts of them (capture's record of an
    exported graph's inputs)."""
    if isinstance(value, (str, int, float, bool, type(None))):
        return True
    if isinstance(value, list):
        return all(_is_plain_data(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain_data(v) for k, v in value.items())
    return False


def _meta_value(value: Any) -> Any:
    """What `_plain_meta` stored, rebuilt."""
    from .verify import Tolerance

    if isinstance(value, dict) and isinstance(value.get("tolerance"), dict):
        return Tolerance(**value["tolerance"])
    return value


def _stored_tensor_paths(tensors: dict, modules: dict) -> list[str]:
    """The attribute paths of every stored tensor, get_attr targets then module state, in order."""
    paths = [target for target in tensors if not target.startswith("__const_")]
    for target, record in modules.items():
        for kind in ("parameters", "buffers"):
            paths += [f"{target}.{name}" for name, value in record[kind].items() if value is not None]
    return paths


def _tied_tensors(gm: nn.Module, paths: list[str]) -> dict[str, str]:
    """alias path -> the first path holding the very same tensor object (a tied embedding and
    output layer): each path is stored on its own, and `load` makes them one object again."""
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for path in paths:
        value = _attr_value(gm, path)
        if isinstance(value, torch.Tensor):
            canonical = first.setdefault(id(value), path)
            if canonical != path:
                tied[path] = canonical
    return tied


def _check_savable(gm) -> None:
    """save stores a graph: a module fx has not captured has none to store."""
    if not isinstance(gm, torch.fx.GraphModule):
        raise SerializationError(
            f"save: got a {type(gm).__qualname__}, not a torch.fx.GraphModule; fxopt.save stores a captured "
            "graph: pass fxopt.capture(model, example_inputs) or fxopt.optimize(...).module (or keep a "
            "plain module's weights with torch.save(model.state_dict(), path))")


def _attr_value(gm: nn.Module, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _save_attr(gm, node, tensors, packed) -> None:
    value = _attr_value(gm, node.target)
    held = isinstance(value, CodedValue)  # a graph may read the holder itself (a kernel taking it)
    if held:
        value = value.value
    if isinstance(value, torch.Tensor) and not held:
        tensors[node.target] = plain_tensor(value)
    elif (codec := _codec_for(value)) is not None:
        packed[node.target] = {"codec": codec.name, "provider": codec.provider, "data": codec.encode(value),
                               "held": held}
    else:
        raise SerializationError(f"save: cannot store attribute '{node.target}' of type "
                                 f"{type(value).__name__} used by {node_location(node)}")


def plain_tensor(t: torch.Tensor):
    """`t` as data `torch.load(weights_only=True)` reads: a quantized tensor as its integers and scales."""
    t = t.detach()
    if t.is_quantized:
        if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            return {"int_repr": t.int_repr(), "scales": t.q_per_channel_scales(),
                    "zero_points": t.q_per_channel_zero_points(), "axis": t.q_per_channel_axis(),
                    "dtype": str(t.dtype)}
        return {"int_repr": t.int_repr(), "scale": t.q_scale(), "zero_point": t.q_zero_point(),
                "dtype": str(t.dtype)}
    return t


def _dump_spec(spec, what: str) -> tuple[str | None, list]:
    """An exported graph's input or output structure, as text, and where it holds a
    ``torch.return_types`` value (``x.topk(2)``), which pytree cannot write: stored as a tuple,
    and its place and name kept (`_structseqs_as_tuples`). A user class in it (a namedtuple of
    the model's module) has no name `load` may import."""
    if spec is None:
        return None, []
    spec, structseqs = _structseqs_as_tuples(spec)
    try:
        return treespec_dumps(spec), structseqs
    except NotImplementedError as exc:
        raise SerializationError(f"save: the model's {what} hold a class of its own code (a namedtuple?), which "
                                 f"fxopt.load does not import ({first_line(exc)}); return tuples, lists or "
                                 "dicts of tensors instead") from None


def _structseqs_as_tuples(spec: TreeSpec, path: tuple = ()) -> tuple[TreeSpec, list]:
    """`spec` with each ``torch.return_types`` node (a structseq: ``topk``, ``max``) a tuple,
    and ``[path of child indices, its name]`` for each, which `_tuples_as_structseqs` reads."""
    if spec.is_leaf():
        return spec, []
    children, found = [], []
    for i, child in enumerate(spec.children()):
        plain, inner = _structseqs_as_tuples(child, (*path, i))
        children.append(plain)
        found += inner
    kind = spec.type
    if getattr(torch.return_types, getattr(kind, "__name__", ""), None) is kind:
        found.append([list(path), kind.__name__])
        kind = tuple
    return TreeSpec(kind, spec.context, children), found


def _tuples_as_structseqs(spec: TreeSpec, structseqs: list, path: tuple = ()) -> TreeSpec:
    """`spec` with the ``torch.return_types`` nodes `_structseqs_as_tuples` stored as tuples back."""
    if spec.is_leaf():
        return spec
    names = {tuple(at): name for at, name in structseqs}
    kind = spec.type
    if path in names:
        kind = getattr(torch.return_types, names[path]) if names[path] in torch.return_types.__all__ else None
        if not (isinstance(kind, type) and issubclass(kind, tuple)):  # (__all__ lists a function too)
            raise SerializationError(f"load: refusing torch.return_types.{names[path]} (no such structseq)")
    children = [_tuples_as_structseqs(child, structseqs, (*path, i)) for i, child in enumerate(spec.children())]
    return TreeSpec(kind, spec.context, children)


def _save_module(module: nn.Module, node) -> dict:
    cls = type(module)
    if not cls.__module__.startswith("torch.nn.modules") or list(module.children()):
        if hasattr(cls, "save_advice"):  # a pass's own module says why it is not stored, and what to do
            fix = cls.save_advice
        elif cls.__module__.startswith("fxopt."):
            fix = "a module a pass inserted: save before that pass, and run it again after load"
        else:
            fix = "capture with mode='export', which calls no module of the model's own"
        raise SerializationError(f"save: {node_location(node)} calls a {cls.__qualname__}; only torch.nn "
                                 f"leaf modules can be stored ({fix})")
    _refuse_hooks(module, node)
    attrs = {k: v for k, v in vars(module).items() if _is_simple(v)}
    # None entries are kept: Conv3d(bias=False) reads self.bias, so a dropped key breaks forward.
    return {"class": [cls.__module__, cls.__qualname__], "attrs": attrs,
            "parameters": {k: _detached(v) for k, v in module._parameters.items()},
            "requires_grad": {k: v.requires_grad for k, v in module._parameters.items() if v is not None},
            "buffers": {k: _detached(v) for k, v in module._buffers.items()}}


_HOOKS = {"_forward_pre_hooks": "forward pre-hook", "_forward_hooks": "forward hook",
          "_backward_pre_hooks": "backward pre-hook", "_backward_hooks": "backward hook"}


def _refuse_hooks(module: nn.Module, node) -> None:
    """A hook on a module the graph calls is Python code, which the file does not hold: the
    loaded graph would run without it (a forward hook that scales the output: another result)."""
    for attr, kind in _HOOKS.items():
        hooks = getattr(module, attr, None) or {}
        for hook in hooks.values():
            code = getattr(hook, "__code__", None)
            where = f" at {code.co_filename}:{code.co_firstlineno}" if code is not None else ""
            name = getattr(hook, "__qualname__", type(hook).__name__)
            raise SerializationError(
                f"save: {node_location(node)} calls a {type(module).__name__} with a {kind} ({name}{where}); a hook "
                "is Python code, which fxopt.save does not store, so the loaded graph would run without it: "
                "capture with mode='export', which traces forward hooks into the graph, or remove the hook")


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    """`t` without autograd history; a None parameter or buffer stays None."""
    return None if t is None else t.detach()


def _is_simple(v) -> bool:
    if isinstance(v, _SIMPLE):
        return True
    if isinstance(v, (tuple, list)):
        return all(_is_simple(x) for x in v)
    return False


def _encode_target(node):
    """The storable name of a node's target: op schema names for torch ops, a Python name else."""
    if node.op != "call_function":
        return node.target
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        ns, name = target._schema.name.split("::")
        return {"ops": [ns, name, target._overloadname]}
    if isinstance(target, torch._ops.OpOverloadPacket):
        ns, name = target._qualified_op_name.split("::")
        return {"ops": [ns, name, None]}
    if isinstance(target, torch._ops.HigherOrderOperator):
        if target.__name__ not in _HIGHER_ORDER_OPS:
            raise SerializationError(f"save: {node_location(node)} calls the higher-order op {target.__name__}, "
                                     f"which fxopt.load does not run (it runs {', '.join(_HIGHER_ORDER_OPS)})")
        return {"hop": target.__name__}
    name = _python_name(target)
    if name is None:
        module, qualname = _own_name(target)
        why = ""
        own_class = ("a namedtuple" if isinstance(target, type) and issubclass(target, tuple)
                     and hasattr(target, "_fields") else "a dataclass" if dataclasses.is_dataclass(target) else None)
        if own_class:
            why = (f"; it builds {own_class} of the model's code, which fxopt.load does not import "
                   "(it runs no code from the file or the model): return a tuple or a dict instead")
        elif not str(module).startswith(("torch", "fxopt")):  # the model's (torch.fx.wrap keeps one a call)
            why = ("; it is a function of the model's code, which fxopt.load does not import (it runs no code "
                   "from the file or the model): capture the model with mode='export', which records the "
                   "torch operations it runs")
        raise SerializationError(f"save: cannot name the function called by {node_location(node)} "
                                 f"({module}.{qualname}){why}")
    return {"py": list(name)}


# Public namespaces searched, in order, for an alias of a function whose own name does not import
# (torch.nn.functional's boolean_dispatch closures report `boolean_dispatch.<locals>.fn`).
# Entries are (module, attribute prefix); ("torch", "Tensor.") covers tensor methods.
_PUBLIC_NAMESPACES = (("torch.nn.functional", ""), ("torch", ""), ("operator", ""), ("math", ""),
                      ("torch", "Tensor."))


def _python_name(fn) -> tuple[str, str] | None:
    """A (module, qualname) that `load` resolves to exactly `fn`, or None if there is none."""
    for module, qualname in _candidate_names(fn):
        if qualname and _resolves_to(module, qualname, fn):
            return module, qualname
    return None


def _candidate_names(fn):
    """Yield names to try for `fn`: its torch name, its own name, then aliases in public namespaces."""
    # torch.<name> first: C builtins such as torch.relu report a private torch._C module.
    yield "torch", getattr(fn, "__name__", "")
    yield _own_name(fn)
    for module, prefix in _PUBLIC_NAMESPACES:
        alias = _alias(fn, module, prefix)
        if alias is not None:
            yield module, prefix + alias


def _own_name(fn) -> tuple[str, str]:
    """The (module, qualname) a function reports about itself, `_operator` spelled `operator`."""
    module = getattr(fn, "__module__", None) or ""
    qualname = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", "")
    return ("operator" if module == "_operator" else module), qualname


def _resolves_to(module: str, qualname: str, fn) -> bool:
    """Whether `load` would resolve module.qualname to `fn` itself (allow-list rules included)."""
    try:
        return _resolve_python(module, qualname) is fn
    except Exception:  # not importable, not allowed, or no such attribute: not a usable name
        return False


def _alias(fn, module: str, prefix: str) -> str | None:
    """The public attribute name under which namespace `module` (+ `prefix`) holds `fn`, or None."""
    entry = _alias_table(module, prefix).get(id(fn))
    return None if entry is None else entry[0]


@functools.lru_cache(maxsize=None)
def _alias_table(module: str, prefix: str) -> dict[int, tuple[str, object]]:
    """id -> (public name, callable) for one namespace; built once, on first use."""
    owner = importlib.import_module(module)
    for part in filter(None, prefix.split(".")):
        owner = getattr(owner, part)
    # A module's own dict, not getattr over dir(): torch's lazy __getattr__ must not import anything.
    if inspect.ismodule(owner):
        members = vars(owner).items()
    else:
        members = ((k, getattr(owner, k, None)) for k in dir(owner))
    table: dict[int, tuple[str, object]] = {}
    for attr, value in members:
        if not attr.startswith("_") and callable(value):
            # The table holds the value, so its id cannot be reused by another object (getattr on a
            # class may build a fresh bound method each time).
            table.setdefault(id(value), (attr, value))
    return table


def _encode(value, tensors):
    if isinstance(value, torch.fx.Node):
        return {"__node__": value.name}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        return {"__dict__": [[k, _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).replace("torch.", "")}
    if isinstance(value, torch.device):
        return {"__device__": str(value)}
    if isinstance(value, torch.memory_format):
        return {"__memory_format__": str(value).replace("torch.", "")}
    if isinstance(value, torch.layout):
        return {"__layout__": str(value).replace("torch.", "")}
    if isinstance(value, slice):
        return {"__slice__": [_encode(value.start, tensors), _encode(value.stop, tensors),
                              _encode(value.step, tensors)]}
    if value is Ellipsis:
        return {"__ellipsis__": True}
    if isinstance(value, torch.Tensor):
        key = f"__const_{len(tensors)}"
        tensors[key] = plain_tensor(value)
        return {"__tensor__": key}
    if isinstance(value, _SIMPLE):
        return value
    if isinstance(value, complex):  # a complex scalar (`x * 1j`, export's mul.Scalar)
        return {"__complex__": [value.real, value.imag]}
    raise SerializationError(f"save: cannot store argument of type {type(value).__name__}")


# ----- checksums -----------------------------------------------------------------------------
# torch.load does not check the zip entries' CRCs, so a flipped bit in a weight loads as a
# different number. save stores a CRC32 of every part of the payload (one per tensor) and load
# refuses a part that no longer matches, by name. A checksum against damage, not a signature:
# whoever rewrites the file can rewrite its checksums. CRC32, not sha256: ~3x faster, and it
# catches every burst of up to 32 flipped bits.

_CHECKSUM = "crc32"
_WHOLE_SECTIONS = {"nodes": "the node list", "pytree": "the input/output structure",
                   "engine": "the quantized engine", "fxopt_meta": "the recorded pipeline and tolerance table",
                   "parameters": "the parameter table", "tied": "the tied-tensor table",
                   "training": "the training flag", "subgraphs": "the subgraphs of no_grad and autocast regions"}


def checksums(payload: dict) -> dict:
    """The checksum record `save` stores for `payload` (its every part but the checksums)."""
    return {"algorithm": _CHECKSUM, "entries": {key: _crc_of(value) for key, _, value in _checked_parts(payload)}}


def _checked_parts(payload: dict) -> Iterator[tuple[str, str, Any]]:
    """(key, what a mismatch is reported as, value) for each part of a payload a checksum covers."""
    for section, label in _WHOLE_SECTIONS.items():
        if section in payload:  # (a file of an earlier version lacks the later ones; a removed one is missed)
            yield section, label, payload[section]
    for target, value in (payload.get("tensors") or {}).items():
        label = "a constant argument tensor" if target.startswith("__const_") else "tensor"
        yield f"tensors/{target}", f"{label} '{target}'", value
    for target, value in (payload.get("packed") or {}).items():
        yield f"packed/{target}", f"packed attribute '{target}'", value
    for target, record in (payload.get("modules") or {}).items():
        yield (f"modules/{target}", f"module '{target}' (its class or attributes)",
               {k: v for k, v in record.items() if k not in ("parameters", "buffers")})
        for kind in ("parameters", "buffers"):
            for name, value in record.get(kind, {}).items():
                yield f"modules/{target}.{name}", f"tensor '{target}.{name}' (a {kind[:-1]})", value


def _check_checksums(data: dict, path) -> None:
    """Refuse a file whose parts differ from the checksums save stored (none: an older file)."""
    record = data.get("checksums")
    if record is None:
        return  # written before checksums were stored
    try:
        _compare_checksums(record, data, path)
    except SerializationError:
        raise
    except Exception as exc:  # a part of the wrong type: damaged all the same
        raise SerializationError(f"load: refusing {path}: malformed or tampered file "
                                 f"({type(exc).__name__}: {exc})") from None


def _compare_checksums(record: Any, data: dict, path) -> None:
    if not isinstance(record, dict) or record.get("algorithm") != _CHECKSUM:
        raise SerializationError(f"load: refusing {path}: its checksum record is damaged or of an unknown "
                                 f"kind ({_CHECKSUM} expected); save the model again")
    stored, seen = record["entries"], set()
    for key, label, value in _checked_parts(data):
        seen.add(key)
        if stored.get(key) != _crc_of(value):
            raise SerializationError(f"load: refusing {path}: {label} does not match the checksum fxopt.save "
                                     "stored for it (the file was damaged or changed after it was written); "
                                     "save the model again")
    if missing := sorted(set(stored) - seen):
        raise SerializationError(f"load: refusing {path}: '{missing[0]}', which fxopt.save stored, is missing "
                                 "(the file was damaged or changed after it was written); save the model again")


def _crc_of(value: Any) -> int:
    crc = _Crc()
    crc.feed(value)
    return crc.value


class _Crc:
    """A CRC32 of a payload part: its structure, plain values and every tensor's bytes."""

    _TEXT = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.qscheme,
             torch.layout, torch.memory_format)

    def __init__(self) -> None:
        self.value = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)

    def feed(self, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            self._feed_tensor(value)
        elif isinstance(value, dict):
            self.update(f"dict {len(value)};".encode())
            for key, item in value.items():
                self.feed(key)
                self.feed(item)
        elif isinstance(value, (list, tuple)):
            self.update(f"{type(value).__name__} {len(value)};".encode())
            for item in value:
                self.feed(item)
        elif isinstance(value, self._TEXT):
            self.update(f"{type(value).__name__} {value!r};".encode())
        else:  # the repr of another object may hold its address, which differs from run to run
            self.update(f"{type(value).__qualname__};".encode())

    def _feed_tensor(self, t: torch.Tensor) -> None:
        t = t.detach()
        if t.is_quantized:
            self.feed(plain_tensor(t))
            return
        if t.layout != torch.strided:
            t = t.to_dense()
        self.update(f"tensor {t.dtype} {tuple(t.shape)};".encode())
        # the values as they read (strides and offset included), as raw bytes
        flat = t.cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
        if flat.numel() and flat.stride(0) != 1:  # one element of a wider view (the real part of a complex
            flat = flat.clone(memory_format=torch.contiguous_format)  # constant) is "contiguous", yet views no bytes
        self.update(flat.view(torch.uint8).numpy())


# ----- loading --------------------------------------------------------------------------------

def load(path) -> torch.fx.GraphModule:
    """Rebuild a GraphModule saved by `save`; reads with weights_only=True (no code runs).

    Raises SerializationError for a file `save` did not write, or one that names a function
    outside the allowed modules.

        >>> import os, tempfile, torch, fxopt
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU())
        >>> path = os.path.join(tempfile.mkdtemp(), "model.fxopt.pt")
        >>> fxopt.save(fxopt.capture(model, torch.randn(3, 4)), path)
        >>> x = torch.randn(5, 4)
        >>> torch.equal(fxopt.load(path)(x), model(x))
        True
    """
    if isinstance(path, bytes):
        raise SerializationError(f"load: the path {path!r} is bytes; give a str or a pathlib.Path")
    _check_is_file(path)
    try:
        data = torch.load(path, weights_only=True)
    except Exception as exc:  # a foreign pickle, a truncated or a non-torch file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if _is_truncated_archive(path):
            raise SerializationError(f"load: refusing {path}: the file is cut short or damaged (a torch.save "
                                     f"archive without its end: {first.split('. ')[0]}); save the model "
                                     "again, or copy the whole file") from None
        raise SerializationError(f"load: refusing {path}: not an fxopt saved graph ({FORMAT}) "
                                 f"readable with weights-only semantics ({type(exc).__name__}: {first})") from None
    if not isinstance(data, dict) or data.get("format") not in (FORMAT, *_OLD_FORMATS):
        raise SerializationError(f"load: {path} is not an fxopt saved graph ({FORMAT})")
    _check_checksums(data, path)
    try:
        return _rebuild(data)
    except SerializationError as exc:
        raise SerializationError(f"{exc} (in {path})") from None
    except Exception as exc:  # missing keys, wrong types: a tampered or damaged file
        raise SerializationError(f"load: refusing {path}: malformed or tampered file "
                                 f"({type(exc).__name__}: {exc})") from None


def _is_truncated_archive(path) -> bool:
    """Whether `path` starts as the zip archive torch.save writes but its end record (which a
    complete zip file closes with) is missing."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(max(0, os.path.getsize(path) - 65_557))  # the end record sits in the last 64 KiB + 22 bytes
        tail = f.read()
    end = tail.rfind(b"PK\x05\x06")
    return head == b"PK\x03\x04" and (end < 0 or end + 22 > len(tail))


def _rebuild(data: dict) -> torch.fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = nn.Module()
        parameters = data.get("parameters") or {}  # (files of earlier versions: every tensor a buffer)
        for target, value in data["tensors"].items():
            if not target.startswith("__const_"):
                value = tensor_from_plain(value)
                if target in parameters and value.is_floating_point():  # parameters() as it was saved
                    value = nn.Parameter(value, requires_grad=bool(parameters[target]))
                _set_path(root, target, value)
        for target, record in data["packed"].items():
            value = _decode_attribute(record)
            _set_path(root, target, CodedValue(value) if record.get("held") else value)
        for target, record in data["modules"].items():
            _set_path(root, target, _load_module(record))
        _retie(root, data.get("tied") or {})  # (files of earlier versions: nothing tied)
        for target, record in (data.get("subgraphs") or {}).items():  # (earlier files: none)
            _set_path(root, target, _load_subgraph(record, data["tensors"]))
        graph = _graph_from_records(data["nodes"], data["tensors"])
        pytree = data.get("pytree")
        if pytree is not None:
            in_spec = _load_spec(pytree["in_spec"], pytree.get("in_structseqs"))
            out_spec = _load_spec(pytree["out_spec"], pytree.get("out_structseqs"))
            graph._codegen = _PyTreeCodeGen(_PyTreeInfo(pytree["orig_args"], in_spec, out_spec))
        gm = torch.fx.GraphModule(root, graph)
        hold_coded_attributes(gm)  # (GraphModule made its holders plain modules; older files have none)
        set_container_mode(gm, bool(data.get("training", False)))  # (earlier files: captured, so eval)
    if data.get("fxopt_meta"):  # files written before it was stored have none
        gm.meta["fxopt"] = {k: _meta_value(v) for k, v in data["fxopt_meta"].items()}
        upgrade_record(gm.meta["fxopt"].get(INPUTS_KEY))
    return explain_failed_calls(guard_inputs(gm))  # export's guards are code save cannot store: fxopt's stand in


def _load_spec(text: str | None, structseqs: list | None) -> TreeSpec | None:
    """The structure `_dump_spec` stored (files of earlier versions hold no structseqs)."""
    if not text:
        return None
    return _tuples_as_structseqs(treespec_loads(text), structseqs or [])


def _graph_from_records(records: list[dict], tensors: dict) -> torch.fx.Graph:
    """The graph `save` stored as node records, each target checked against the allow-list."""
    graph = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    for rec in records:
        args = _decode(rec["args"], env, tensors)
        kwargs = _decode(rec["kwargs"], env, tensors)
        target = _decode_target(rec["op"], rec["target"])
        _check_node(rec, target, args)
        node = graph.create_node(rec["op"], target, args, kwargs, name=rec["name"])
        if rec.get("computes"):
            node.meta["fxopt.computes"] = rec["computes"]
        _restore_source(node, rec)
        _restore_listing(node, rec)
        env[rec["name"]] = node
    return graph


def _load_subgraph(record: dict, tensors: dict) -> torch.fx.GraphModule:
    """The subgraph `_subgraph_record` stored, with the subgraphs it reads."""
    root = nn.Module()
    for target, sub in record["subgraphs"].items():
        _set_path(root, target, _load_subgraph(sub, tensors))
    return torch.fx.GraphModule(root, _graph_from_records(record["nodes"], tensors))


def _restore_source(node: torch.fx.Node, rec: dict) -> None:
    """Put back the source lines and module paths `_source_record` stored for `node` (files of
    earlier versions have none); data of other types is a damaged or tampered file."""
    trace, stack = rec.get("stack_trace"), rec.get("module_stack")
    if trace is not None:
        if not isinstance(trace, str):
            raise SerializationError(f"load: refusing node '{node.name}': its stack trace is no text")
        node.meta["stack_trace"] = trace
    if stack is not None:
        if not (isinstance(stack, list) and all(isinstance(e, list) and len(e) == 3
                                                and all(isinstance(p, str) for p in e) for e in stack)):
            raise SerializationError(f"load: refusing node '{node.name}': its module stack is not "
                                     "[key, path, class name] texts")
        node.meta["nn_module_stack"] = {key: (path, kind) for key, path, kind in stack}


def tensor_from_plain(value):
    """The tensor `plain_tensor` stored."""
    if isinstance(value, dict):
        dtype = getattr(torch, value["dtype"].replace("torch.", ""))
        if "scales" in value:
            return torch._make_per_channel_quantized_tensor(
                value["int_repr"], value["scales"], value["zero_points"], value["axis"])
        q = torch._make_per_tensor_quantized_tensor(value["int_repr"], value["scale"], value["zero_point"])
        return q if q.dtype == dtype else q
    return value


def _decode_attribute(record: dict):
    """An attribute object stored by a codec; files from before codecs hold int8 packed weights."""
    if "codec" not in record:
        record = {"codec": "int8-packed", "provider": "fxopt.passes.quantize.serialize", "data": record}
    name, provider = record["codec"], record["provider"]
    if name not in _CODECS:
        if not isinstance(provider, str) or not provider.startswith("fxopt."):
            raise SerializationError(f"load: refusing codec provider {provider!r} (fxopt modules only)")
        importlib.import_module(provider)  # registers its codecs
    if name not in _CODECS:
        raise SerializationError(f"load: no codec '{name}' (expected from {provider})")
    return _CODECS[name].decode(record["data"])


def set_container_mode(gm: torch.fx.GraphModule, training: bool) -> None:
    """Give `gm` and the plain `nn.Module` containers on the paths to its leaves (which load
    and GraphModule build fresh, in training mode) the saved root's mode; each leaf module keeps
    its own, as saved."""
    gm.training = training
    for module in gm.modules():
        if type(module) is nn.Module:
            module.training = training


def _load_module(record: dict) -> nn.Module:
    module_name, qualname = record["class"]
    if not module_name.startswith("torch.nn.modules"):
        raise SerializationError(f"load: refusing module class {module_name}.{qualname}")
    cls = _resolve_python(module_name, qualname)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise SerializationError(f"load: {module_name}.{qualname} is not an nn.Module")
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for key, value in record["attrs"].items():
        module.__dict__[key] = value
    # A None entry is registered as None, as the class's own __init__ does (Conv3d(bias=False)).
    requires_grad = record.get("requires_grad") or {}  # (files of earlier versions: none)
    for key, value in record["parameters"].items():
        module._parameters[key] = (None if value is None
                                   else nn.Parameter(value, requires_grad=bool(requires_grad.get(key, False))))
    for key, value in record["buffers"].items():
        module._buffers[key] = value
    if isinstance(module, nn.RNNBase):  # its weak references to the weights are not state: rebuild them
        module._init_flat_weights()
    return module


def _retie(root: nn.Module, tied: dict[str, str]) -> None:
    """Make each alias path hold its canonical path's tensor object, as it did when saved."""
    for alias, canonical in tied.items():
        value = _attr_value(root, canonical)
        *path, attr = alias.split(".")
        owner = _attr_value(root, ".".join(path)) if path else root
        if not isinstance(value, torch.Tensor):
            raise SerializationError(f"load: tied tensor '{alias}' -> '{canonical}' is no tensor")
        if attr in owner._parameters and isinstance(value, nn.Parameter):
            owner._parameters[attr] = value
        elif attr in owner._buffers:
            owner._buffers[attr] = value
        else:
            raise SerializationError(f"load: tied tensor '{alias}' -> '{canonical}' does not name a "
                                     "parameter or buffer of the same kind")
        if isinstance(owner, nn.RNNBase):  # its flat weights still point at the untied copy
            owner._init_flat_weights()


def _set_path(root: nn.Module, target: str, value) -> None:
    *path, attr = target.split(".")
    owner = root
    for part in path:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    if isinstance(value, nn.Module):
        owner.add_module(attr, value)
    elif isinstance(value, nn.Parameter):
        owner.register_parameter(attr, value)
    elif isinstance(value, torch.Tensor) and not value.is_quantized:
        owner.register_buffer(attr, value)
    else:
        setattr(owner, attr, value)


# Functions a graph may call from the builtins, and names never resolved anywhere: a tampered
# file must not reach code execution, files or processes through an allowed module.
_SAFE_BUILTINS = frozenset({"getattr", "len", "min", "max", "abs", "int", "float", "bool", "slice", "range",
                            "tuple", "list", "isinstance", "round", "sum", "pow", "divmod"})
_DENIED_NAMES = frozenset({"load", "save", "exec", "eval", "compile", "open", "system", "popen", "spawn",
                           "import_module", "attrgetter", "methodcaller", "setattr", "delattr", "globals",
                           "locals", "vars", "input", "breakpoint", "exit", "quit", "help", "hub", "jit",
                           "set_default_device", "set_default_dtype", "dump", "calibrate", "distill"})
# Private functions a graph may call all the same: checks that only raise. capture writes a
# torch._assert guard for each non-tensor input it specializes; a loaded graph must keep it.
_SAFE_PRIVATE = frozenset({("torch", "_assert")})
# The higher-order ops a graph may call: export's regions under a grad mode or autocast and its
# torch.cond, which run subgraphs of the file (themselves of allowed targets only) and nothing else.
_HIGHER_ORDER_OPS = ("wrap_with_set_grad_enabled", "wrap_with_autocast", "cond")
_NODE_OPS = ("placeholder", "get_attr", "call_function", "call_module", "call_method", "output")


def _safe_private(module: str, qualname: str) -> bool:
    """A private name a graph may call: a check that only raises, or the torch binding of an ATen
    op (`torch._weight_norm`, which lower-eager writes), which computes tensors and nothing else."""
    if (module, qualname) in _SAFE_PRIVATE:
        return True
    return (module == "torch" and qualname.startswith("_") and not qualname.startswith("__") and "." not in qualname
            and getattr(torch._C._VariableFunctions, qualname, None) is getattr(torch, qualname, False))


def _resolve_python(module: str, qualname: str):
    name = f"{module}.{qualname}"
    if not isinstance(module, str) or not isinstance(qualname, str) or module.split(".")[0] not in _ALLOWED_MODULES:
        raise SerializationError(f"load: refusing to resolve {name} (module not allowed)")
    parts = qualname.split(".")
    private = any(p.startswith("_") for p in parts) and not _safe_private(module, qualname)
    if private or any(p in _DENIED_NAMES for p in parts):
        raise SerializationError(f"load: refusing to resolve {name} (private or unsafe name)")
    if module == "builtins" and qualname not in _SAFE_BUILTINS:
        raise SerializationError(f"load: refusing to resolve {name} (builtin not allowed)")
    obj = importlib.import_module(module)
    for part in parts:
        obj = getattr(obj, part)
        if inspect.ismodule(obj) and obj.__name__.split(".")[0] not in _ALLOWED_MODULES:
            raise SerializationError(f"load: refusing to resolve {name} (reaches module {obj.__name__})")
    if inspect.ismodule(obj):
        raise SerializationError(f"load: refusing to resolve {name} (a module, not a function)")
    return obj


_BINARY = ("and", "or", "xor", "lshift", "rshift", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow",
           "matmul")
# The operator methods eager code calls on tensors (`lower-eager` writes `mask.__and__(m)`): public
# methods are allowed by name, and these are the only dunders, none reaching past the tensor.
_OPERATOR_METHODS = frozenset(
    name for name in (*(f"__{p}{op}__" for op in _BINARY for p in ("", "r", "i")),
                      *(f"__{op}__" for op in ("eq", "ne", "lt", "le", "gt", "ge", "neg", "pos", "abs", "invert",
                                               "getitem", "setitem")))
    if hasattr(torch.Tensor, name))


def _is_tensor_method(name: str) -> bool:
    """Whether a call_method node may call `name`: a public Tensor method or an operator one."""
    return name in _OPERATOR_METHODS or (not name.startswith("_") and hasattr(torch.Tensor, name))


def _check_node(rec: dict, target, args) -> None:
    op = rec["op"]
    if op not in _NODE_OPS:
        raise SerializationError(f"load: refusing node '{rec.get('name')}': unknown op {op!r}")
    if op in ("call_method", "call_module", "get_attr", "placeholder", "output") and not isinstance(target, str):
        raise SerializationError(f"load: refusing node '{rec.get('name')}': target of {op} must be a name")
    if op == "call_method" and not _is_tensor_method(target):
        raise SerializationError(f"load: refusing node '{rec.get('name')}': {target!r} is not a tensor method")
    if op == "call_function":
        if not callable(target):
            raise SerializationError(f"load: refusing node '{rec.get('name')}': target is not callable")
        if target is getattr and len(args) > 1 and (not isinstance(args[1], str) or args[1].startswith("_")):
            raise SerializationError(f"load: refusing node '{rec.get('name')}': getattr of a private attribute")


def _decode_target(op: str, target):
    if not isinstance(target, dict):
        return target
    if "hop" in target:
        if target["hop"] not in _HIGHER_ORDER_OPS:
            raise SerializationError(f"load: refusing higher-order op {target['hop']!r} (it runs "
                                     f"{', '.join(_HIGHER_ORDER_OPS)})")
        return getattr(torch.ops.higher_order, target["hop"])
    if "ops" in target:
        ns, name, overload = target["ops"]
        packet = getattr(getattr(torch.ops, ns), name)
        return packet if overload is None else getattr(packet, overload)
    return _resolve_python(*target["py"])


def _decode(value, env, tensors):
    if isinstance(value, list):
        return [_decode(v, env, tensors) for v in value]
    if isinstance(value, dict):
        if "__node__" in value:
            return env[value["__node__"]]
        if "__tuple__" in value:
            return tuple(_decode(v, env, tensors) for v in value["__tuple__"])
        if "__dict__" in value:
            return {k: _decode(v, env, tensors) for k, v in value["__dict__"]}
        if "__dtype__" in value:
            return getattr(torch, value["__dtype__"])
        if "__device__" in value:
            return torch.device(value["__device__"])
        if "__memory_format__" in value:
            return getattr(torch, value["__memory_format__"])
        if "__layout__" in value:
            return getattr(torch, value["__layout__"])
        if "__slice__" in value:
            return slice(*(_decode(v, env, tensors) for v in value["__slice__"]))
        if "__ellipsis__" in value:
            return Ellipsis
        if "__complex__" in value:
            real, imag = value["__complex__"]
            return complex(float(real), float(imag))
        if "__tensor__" in value:
            return tensor_from_plain(tensors[value["__tensor__"]])
    return value


__all__ = ["AttributeCodec", "CodedValue", "SerializationError", "hold_coded_attributes", "load", "plain_tensor", "register_codec", "save",
           "tensor_from_plain"]
