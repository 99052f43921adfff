"""Patterns written as plain Python functions.

`pattern_from_function(fn)` traces `fn` with torch.fx and turns its ops into an `Op` tree by
their op-view kinds, so the function matches every spelling of the same ops:

- parameters without a default are tensors (`Var`);
- parameters with a numeric default are scalar operands (`Const`), e.g. an attention scale;
- a parameter passed as an op's weight or bias (`F.linear(x, w, b)`) binds that op's
  parameter, whether the graph holds it in a module (`nn.Linear`) or as a `get_attr`;
- literal non-tensor arguments written in the call (`softmax(s, dim=-1)`, `x / 8.0`, each
  axis of `x.permute(0, 2, 1)`) must be equal in the graph, and arguments left out must have
  their defaults there (`F.gelu(x)` is not `gelu(x, approximate="tanh")`), where fxopt can
  read them; a weight or bias left out must be absent too (`F.linear(x, w)` does not match a
  linear with a bias: the replacement could not take it);
- a scalar operand keeps its side: `1.0 - x` does not match `x - 1.0`.

    >>> import torch, torch.nn.functional as F
    >>> from fxopt.patterns import pattern_from_function
    >>> def linear_relu(x, w, b):
    ...     return F.relu(F.linear(x, w, b))
    >>> pattern_from_function(linear_relu)
    relu(linear(x))
"""
from __future__ import annotations

import inspect
import numbers
import operator
from typing import Any, Callable

import torch
import torch.fx

from ..ir import aten_op_of, bind_arguments, op_view, size_read, spec_for, symbolic_sizes, tensor_meta, written_arguments
from .core import Const, Op, PatternNode, Var, _is_export_graph, _same


def pattern_from_function(fn: Callable[..., Any]) -> PatternNode:
    """An `Op` tree equivalent to `fn`; see the module docstring for the conventions."""
    if not (inspect.isfunction(fn) or inspect.ismethod(fn)):
        raise TypeError(f"pattern_from_function takes a Python function (a def or a lambda) written with "
                        f"the ops to match, got {type(fn).__name__}")
    sig = inspect.signature(fn)
    consts = {name for name, p in sig.parameters.items()
              if p.default is not inspect.Parameter.empty and isinstance(p.default, numbers.Number)}
    gm = torch.fx.symbolic_trace(fn)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    root = output.args[0]
    if not isinstance(root, torch.fx.Node):
        raise ValueError(f"pattern function {fn.__name__} must return one tensor")
    counter = [0]
    return _convert(gm, root, consts, counter, fn.__name__, {})


def _convert(gm, node: torch.fx.Node, consts: set, counter: list, fname: str,
             converted: dict[torch.fx.Node, PatternNode]) -> PatternNode:
    """The pattern of `node`: one object for a value the function reads at several places
    (`converted`), which matches one node of the graph."""
    if node not in converted:
        converted[node] = _convert_one(gm, node, consts, counter, fname, converted)
    return converted[node]


def _convert_one(gm, node: torch.fx.Node, consts: set, counter: list, fname: str,
                 converted: dict[torch.fx.Node, PatternNode]) -> PatternNode:
    if node.op == "placeholder":
        if node.target in consts:
            raise ValueError(f"pattern function {fname}: scalar parameter '{node.target}' can only be "
                             "an operand of an elementwise op")
        return Var(node.target)
    view = op_view(gm, node)
    if view is None:
        raise ValueError(f"pattern function {fname}: '{node.format_node()}' is not an op fxopt's op "
                         "view knows; patterns match op kinds (see fxopt.ir.SPECS)")
    spec = spec_for(gm, node)
    written = written_arguments(node, spec)
    inputs: list[PatternNode] = []
    scalar = None
    params: dict[str, str] = {}
    attrs: dict[str, Any] = {}
    at_default: dict[str, Any] = {}  # written as the default (F.softmax's dtype=None): read like one left out
    scalar_first = False
    input_nodes: list[torch.fx.Node] = []  # the function's values behind `inputs`, in order
    size_entries: list[tuple[str, int | None, torch.fx.Node]] = []  # (argument, position or None, size read)
    for key, value in written.items():
        if key in spec.param_args and isinstance(value, torch.fx.Node) and value.op == "placeholder":
            params[key] = value.target
        elif key in spec.tensor_args:
            if isinstance(value, torch.fx.Node) and value.op == "placeholder" and value.target in consts:
                scalar = Const(value.target)
            elif isinstance(value, torch.fx.Node):
                inputs.append(_convert(gm, value, consts, counter, fname, converted))
                input_nodes.append(value)
            elif isinstance(value, (list, tuple)) and value:  # ``torch.cat([a, b], 1)``: each one an input
                if not all(isinstance(v, torch.fx.Node) and not (v.op == "placeholder" and v.target in consts)
                           for v in value):
                    raise ValueError(f"pattern function {fname}: '{node.name}' takes a list of tensors, and only "
                                     f"tensor parameters or ops may be in it, got {value!r}")
                inputs += [_convert(gm, v, consts, counter, fname, converted) for v in value]
                input_nodes += list(value)
            elif isinstance(value, numbers.Number):
                scalar = Const(f"_literal{counter[0]}", check=_equals(value), literal=value)
                counter[0] += 1
            scalar_first = scalar_first or (scalar is not None and not inputs and key == spec.tensor_args[0])
        elif isinstance(value, torch.fx.Node) and key not in _NEVER_COMPARED:
            # one computed argument (``x.narrow(0, 0, x.size(0))``, ``x.reshape(x.shape)``): a
            # size read of the op's input, as a list entry is (an adversary's no-op narrow and
            # reshape matched other sizes, unconstrained)
            size_entries.append((key, None, value))
        elif key in _NEVER_COMPARED or isinstance(value, torch.fx.Node) or key not in view.attrs:
            continue  # (the view reads a key it drops as another: var's `unbiased` as `correction`)
        elif _holds_node(value):  # ``x.view(x.size(0), -1)``: the sizes read in the graph may be anything
            attrs[key] = _literals_equal(value)
            size_entries += [(key, i, v) for i, v in enumerate(value) if isinstance(v, torch.fx.Node)]
        elif (default := _default_of(node, spec, key)) is not _UNKNOWN and _same(value, default, key):
            at_default[key] = view.attrs.get(key, value)
        else:
            attrs[key] = view.attrs.get(key, value)  # as the op view spells it (a pool's stride None: its kernel)
    # What the function itself fixes, no argument of it can change (relu6's bounds, conv2d's
    # `transposed`, zeros_like's fill value): the ops of its kind that differ there compute
    # other things (hardtanh(-2, 2), conv_transpose2d, ones_like).
    attrs.update({key: value for key, value in spec.defaults.items()
                  if key not in spec.arg_names and key not in written and key not in attrs})
    # and what changes the op beyond its kind, as the call computes it (var's correction)
    attrs.update({key: view.attrs[key] for key in spec.modifiers if key in view.attrs and key not in attrs})
    counter[0] += 1
    name = f"{view.kind}_{counter[0]}" if params else None
    commutative = view.kind in ("add", "mul") and len(inputs) == 2
    left_out = [key for key in spec.param_args if key not in written]
    defaults = {key: view.attrs.get(key, default) for key in _argument_names(spec)
                if key not in written and key not in attrs and key not in spec.param_args
                and key not in _NOT_CONSTRAINED_WHEN_LEFT_OUT
                and (default := _default_of(node, spec, key)) is not _UNKNOWN}  # (sdpa's attn_mask too)
    defaults.update(at_default)
    schema_only = frozenset(defaults) - set(spec.arg_names) - set(at_default)
    checks = [_as_written(left_out, defaults, schema_only)] if left_out or defaults else []
    if size_entries:
        checks.append(_sizes_of_own_inputs(_size_sources(node, size_entries, input_nodes, fname)))
    check = checks[0] if len(checks) == 1 else _all_checks(checks) if checks else None
    return Op(view.kind, *inputs, name=name, scalar=scalar, attrs=attrs, params=params,
              commutative=commutative, scalar_first=scalar_first, check=check)


def _as_written(params_left_out: list[str], defaults: dict[str, Any],
                schema_only: frozenset[str] = frozenset()) -> Callable[[Any], bool | str]:
    """An op check: the graph's op computes what the pattern function's call does where the
    call leaves arguments out. It has none of the weights/biases left out (a replacement
    written without them would drop them), and the other arguments left out have their
    defaults there (``F.gelu(x)`` is not ``gelu(x, approximate="tanh")``, ``clamp(x, min=0)``
    not ``clamp(x, 0, 6)``: a replacement would compute the defaults' numbers)."""
    def check(view) -> bool | str:
        node = view.node
        module = node.graph.owning_module.get_submodule(node.target) if node.op == "call_module" else None
        spec = spec_for(node.graph.owning_module, node)
        bound = bind_arguments(node, spec) if module is None else {}
        for key in params_left_out:
            if view.param(key) is not None or isinstance(bound.get(key), torch.fx.Node):
                return f"it has a {key} the pattern function leaves out (take it as a parameter to bind it)"
        # A Python call or a module (whose forward passes its own) without the argument takes
        # the default; an ATen op without it may hold it elsewhere (an upsample's mode in its
        # target): not known to agree.
        overload = aten_op_of(node)
        takes_default = overload is None
        schema = {spec.renames.get(a.name, a.name) for a in overload._schema.arguments} if overload is not None else set()
        for key, default in defaults.items():
            got = view.attrs.get(key, bound.get(key, getattr(module, key, default if takes_default else _UNKNOWN)))
            if got is _UNKNOWN and key in schema_only and key not in schema:
                continue  # an argument of other overloads (`sum`'s `dtype`), which this one has not
            if got is _UNKNOWN:
                return (f"it has no argument '{key}' fxopt can read, and the pattern function leaves {key} out "
                        f"(its default is {default!r}), so they may compute different things")
            if not _same(got, default, key):
                return (f"its {key} is {got!r}, and the pattern function leaves {key} out (its default is "
                        f"{default!r}): write {key}= in the pattern's call to match that value")
        return True

    return check


def _all_checks(checks: list[Callable[[Any], bool | str]]) -> Callable[[Any], bool | str]:
    """An op check passing where every one of `checks` does (the first refusal's reason)."""
    def check(view) -> bool | str:
        for one in checks:
            verdict = one(view)
            if verdict is not True:
                return verdict
        return True

    return check


def _size_sources(node: torch.fx.Node, entries: list[tuple[str, int | None, torch.fx.Node]],
                  input_nodes: list[torch.fx.Node], fname: str) -> list[tuple[str, int | None, int, int | None]]:
    """(argument, position in it or None for the whole argument, input, axis or None for the
    whole size) for each size a pattern call reads: the position of the op's input whose size it
    reads. A size of any other value is refused: the match binds only
    the op's inputs, so neither the graph's read nor the replacement could be tied to it."""
    sources = []
    for key, position, entry in entries:
        read = _size_source(entry) if position is not None else _size_source(entry) or _whole_size(entry)
        where = key if position is None else f"{key}[{position}]"
        if read is None:
            raise ValueError(f"pattern function {fname}: {where} of '{node.name}' is computed by "
                             f"'{entry.format_node()}'; a pattern may compute a size only as a size read of the "
                             "op's input (x.size(0), x.shape[0])")
        tensor, axis = read
        if tensor not in input_nodes:
            raise ValueError(f"pattern function {fname}: {where} of '{node.name}' reads the size "
                             f"of '{tensor.name}', which is not an input of that op; a pattern may read the sizes "
                             f"of the op's own inputs only (x.view(x.size(0), -1)), which the match binds")
        sources.append((key, position, input_nodes.index(tensor), axis))
    return sources


def _sizes_of_own_inputs(sources: list[tuple[str, int | None, int, int | None]]) -> Callable[[Any], bool | str]:
    """An op check: each size the pattern reads of the op's input is a size of the graph op's
    input at that axis — the same read (``h.view(h.size(0), -1)``), or one export proved equal
    (its symbolic ``s0``, read of the model's input). ``h.view(y.size(0), -1)`` reads another
    value's size, which a replacement computing ``h.flatten(1)`` would not (a shape error or
    other numbers)."""
    def check(view) -> bool | str:
        node = view.node
        bound = bind_arguments(node, spec_for(node.graph.owning_module, node)) if node.op != "call_module" else {}
        for key, position, index, axis in sources:
            written = view.attrs.get(key, bound.get(key))
            entry = written if position is None else \
                written[position] if isinstance(written, (list, tuple)) and position < len(written) else None
            tensor = view.inputs[index] if index < len(view.inputs) else None
            if not isinstance(tensor, torch.fx.Node) or not _reads_size_of(entry, tensor, axis):
                what = f"'{entry.name}'" if isinstance(entry, torch.fx.Node) else repr(entry)
                name = getattr(tensor, "name", tensor)
                wants = f"the whole size of its input '{name}'" if axis is None \
                    else f"a size of its input '{name}' at axis {axis}"
                where = key if position is None else f"{key}[{position}]"
                return f"its {where} is {what}, not {wants} as the pattern reads"
        return True

    return check


def _reads_size_of(entry: Any, tensor: torch.fx.Node, axis: int | None) -> bool:
    """`entry` is `tensor`'s size at `axis` (None: its whole size): read of it, or export's
    symbol for that size; a whole size also as export writes it, one entry per axis (its
    static sizes as numbers: an export graph runs at those only)."""
    meta = tensor_meta(tensor)
    if axis is None:
        if isinstance(entry, torch.fx.Node):
            return _whole_size(entry) == (tensor, None)
        return meta is not None and _is_export_graph(tensor) and isinstance(entry, (list, tuple)) \
            and len(entry) == len(meta[0]) and all(
                _reads_size_of(e, tensor, i) if isinstance(e, torch.fx.Node)
                else e == meta[0][i] and i not in symbolic_sizes(tensor) for i, e in enumerate(entry))
    if not isinstance(entry, torch.fx.Node):
        return False
    read = _size_source(entry)
    ndim = len(meta[0]) if meta is not None else None
    if read is not None and read[0] is tensor and _axis(read[1], ndim) == _axis(axis, ndim):
        return True
    symbol = entry.meta.get("val")  # export's size reads keep their SymInt
    return isinstance(symbol, torch.SymInt) and ndim is not None \
        and symbolic_sizes(tensor).get(_axis(axis, ndim)) == str(symbol.node.expr)


def _whole_size(node: torch.fx.Node) -> tuple[torch.fx.Node, None] | None:
    """(tensor, None) where `node` is a tensor's whole size (``x.size()``, ``x.shape``)."""
    read = size_read(node)
    return read if read is not None and read[1] is None else None


def _axis(axis: Any, ndim: int | None) -> Any:
    return axis % ndim if isinstance(axis, int) and ndim else axis


def _size_source(node: torch.fx.Node) -> tuple[torch.fx.Node, int] | None:
    """(tensor, axis) where `node` reads one size of a tensor (``x.size(1)``, ``x.shape[1]``,
    ATen's sym_size), else None."""
    read = size_read(node)
    if read is not None and read[1] is not None:
        return read
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int) \
            and isinstance(node.args[0], torch.fx.Node) and (whole := size_read(node.args[0])) is not None \
            and whole[1] is None:
        return whole[0], node.args[1]
    return None


def _argument_names(spec) -> list[str]:
    """Every argument an op of the row may take: its Python order, then its ATen schemas'
    (keyword-only ones too: `sum`'s `dtype`)."""
    names = list(spec.arg_names)
    for overload in _overloads(spec):
        names += [n for a in overload._schema.arguments if (n := spec.renames.get(a.name, a.name)) not in names]
    return names


def _overloads(spec) -> list:
    return [getattr(packet, name) if hasattr(packet, "overloads") else packet
            for packet in spec.aten for name in (packet.overloads() if hasattr(packet, "overloads") else [None])]


def _default_of(node: torch.fx.Node, spec, key: str) -> Any:
    """The value an argument left out of a pattern function's call takes: the op view's own
    default, the Python function's, or the ATen schema's (methods have no Python signature);
    `_UNKNOWN` where none says (then it stays unconstrained)."""
    if key in spec.defaults:
        return spec.defaults[key]
    renamed = {canonical: original for original, canonical in spec.renames.items()}
    if node.op == "call_function":
        try:
            parameter = inspect.signature(node.target).parameters.get(renamed.get(key, key))
        except (TypeError, ValueError):
            parameter = None
        if parameter is not None and parameter.default is not inspect.Parameter.empty:
            return parameter.default
    for argument in (a for overload in _overloads(spec) for a in overload._schema.arguments):
        if spec.renames.get(argument.name, argument.name) == key and argument.has_default_value():
            return argument.default_value
    return _UNKNOWN


_UNKNOWN = object()


def _holds_node(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and any(isinstance(v, torch.fx.Node) or _holds_node(v) for v in value)


def _literals_equal(written: tuple | list) -> Callable[[Any], bool]:
    """An attrs predicate for a sequence mixing values computed in the graph with literals
    (``x.view(x.size(0), -1)``): as long, equal where the pattern wrote a literal, and computed
    where it computes one: a size read of the same axis where it reads one (``x.size(0)`` is
    not a 2, nor ``x.size(1)``)."""
    def entry_matches(got: Any, want: Any) -> bool:
        if not isinstance(want, torch.fx.Node):
            return _same(got, want)
        # which size it reads, the op check says (`_sizes_of_own_inputs`: the same read, at
        # any spelling of the axis, or export's same symbol at another axis of another value)
        return isinstance(got, torch.fx.Node)

    def check(got: Any) -> bool:
        return isinstance(got, (list, tuple)) and len(got) == len(written) \
            and all(entry_matches(g, w) for g, w in zip(got, written))

    check.__name__ = f"literals_of_{tuple(_entry_name(w) for w in written)}"
    entries = ", ".join(str(_entry_name(w)) for w in written)
    check.description = f"[{entries}] (each size(d) a read of the op's input's size at axis d)"
    return check


def _size_axis(node: torch.fx.Node) -> int | None:
    """The axis whose size `node` reads (``x.size(1)``, ``x.shape[1]``, ATen's sym_size), else None."""
    read = _size_source(node)
    return read[1] if read is not None else None


def _entry_name(value: Any) -> Any:
    if not isinstance(value, torch.fx.Node):
        return value
    axis = _size_axis(value)
    return f"size({axis})" if axis is not None else "?"


# Arguments never compared: they do not change any op's value (momentum: the running statistics'
# update, which eval graphs never run; `_stacklevel`: where softmax's deprecation warning points).
_NEVER_COMPARED = {"inplace", "momentum", "_stacklevel"}
# Arguments a pattern call that leaves them out does not constrain: where the value lives and how
# it is laid out (`memory_format`, `device`), hints to a kernel (`cudnn_enable`, einsum's `path`,
# repeat_interleave's `output_size`), what only gradients read (`padding_idx`). Written ones are
# compared: an adaptive pool's `output_size` is the whole op.
_NOT_CONSTRAINED_WHEN_LEFT_OUT = _NEVER_COMPARED | {
    "memory_format", "out", "copy", "non_blocking", "device", "layout", "pin_memory", "cudnn_enable",
    "cudnn_enabled", "implicit", "path", "output_size", "padding_idx", "scale_grad_by_freq", "sparse",
    "unbiased"}  # (var/std's unbiased: the view reads it as the correction it stands for, compared instead)


def _equals(value: Any) -> Callable[[Any], bool]:
    def check(got: Any) -> bool:
        return isinstance(got, numbers.Number) and abs(float(got) - float(value)) <= 1e-6 * max(1.0, abs(value))

    check.__name__ = f"equals_{value}"
    return check
