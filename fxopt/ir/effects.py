"""Which nodes must run even when nobody reads their value, and which values a write in
place changes behind the graph's back.

Dead-code removal, constant folding and the passes that erase what their rewrites leave
behind all ask the first question; a pass that copies or narrows values (int8 lowering,
channel pruning) asks the second (`written_in_place`). This module answers both once.

    >>> import torch, torch.fx
    >>> gm = torch.fx.symbolic_trace(lambda x: (x.add_(1), x.t())[0])
    >>> [(n.name, is_effectful(n)) for n in gm.graph.nodes]
    [('x', True), ('add_', True), ('t', False), ('output', True)]
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx

from .bindings import aten_op_of, op_name
from .opview import op_view
from .rewrite import call_as, meta_value, tensor_meta

# Ops that must run even when their value is unused, beyond what fx already knows.
_RANDOM_OR_EFFECTFUL = {
    torch.rand, torch.randn, torch.randint, torch.randperm, torch.rand_like, torch.randn_like,
    torch.randint_like, torch.bernoulli, torch.normal, torch.multinomial, torch.poisson,
}
_RANDOM_METHODS = {"bernoulli", "multinomial"}
_RANDOM_ATEN = (torch.ops.aten.rand, torch.ops.aten.randn, torch.ops.aten.bernoulli, torch.ops.aten.dropout,
                torch.ops.aten.randint, torch.ops.aten.native_dropout, torch.ops.aten.rand_like,
                torch.ops.aten.randn_like, torch.ops.aten.randint_like, torch.ops.aten.multinomial,
                torch.ops.aten.normal, torch.ops.aten.poisson, torch.ops.aten.randperm)


def is_effectful(node: torch.fx.Node) -> bool:
    """True for nodes DCE and folding must keep: side effects, in-place writes, randomness."""
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "call_module" and node.target.startswith("_guards"):
        return True
    if node.is_impure():
        return True
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        schema = target._schema
        return schema.is_mutable or target.overloadpacket.__name__.startswith("_assert") \
            or target.overloadpacket in _RANDOM_ATEN
    if isinstance(target, torch._ops.HigherOrderOperator):
        return _region_is_effectful(node)
    if node.op == "call_method" and isinstance(target, str) and _in_place_name(target):
        return True  # Tensor.add_, Tensor.copy_, ... write in place
    if node.kwargs.get("inplace") is True or _out_nodes(node):
        return True  # F.relu(h, inplace=True), torch.mul(y, 2, out=y)
    if node.op == "call_module":
        # nn.ReLU(inplace=True): `self.act(h)` with its result unused still changes h
        owner = node.graph.owning_module
        return owner is not None and getattr(owner.get_submodule(node.target), "inplace", False) is True
    if node.op == "call_function" and _in_place_name(getattr(target, "__name__", "")):
        return True  # torch.relu_(h), operator.iadd
    if node.op == "call_method":
        return target in _RANDOM_METHODS
    if _draws_at_random(node):
        return True
    return target in _RANDOM_OR_EFFECTFUL if callable(target) and _hashable(target) else False


def _out_nodes(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The tensors an ``out=`` argument writes (one, or a tuple of them)."""
    out = node.kwargs.get("out")
    return [v for v in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(v, torch.fx.Node)]


def _draws_at_random(node: torch.fx.Node) -> bool:
    """A dropout in training mode (``F.dropout(g, p)``: training defaults to True there; the
    alpha and channel dropouts, ``torch.dropout(g, p, True)``) or a training-mode ``F.rrelu``:
    a new draw on every call, which folding would freeze into one."""
    target = node.target
    name = getattr(target, "__name__", "")
    if "dropout" not in name and name != "rrelu":
        return False  # (the name test first: this runs on every node DCE looks at)
    owner = node.graph.owning_module
    view = op_view(owner, node) if owner is not None else None
    if view is not None and view.kind == "dropout":
        return bool(view.attrs.get("training", True)) and view.attrs.get("p", 0.5) != 0
    if target in (torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout):
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train")
        return train is not False
    if name == "rrelu" and getattr(target, "__module__", "").startswith("torch"):
        training = node.args[3] if len(node.args) > 3 else node.kwargs.get("training", False)
        return training is not False
    return False


#: Ops whose result depends on their input's memory order, not only its values: they read
#: strides or memory (`as_strided`, `stride()`), or draw random numbers in memory order (a
#: dropout in training mode, ``rand_like``): on a channels-last value they give other results.
_MEMORY_ORDER_READERS = frozenset({"as_strided", "stride", "data_ptr", "untyped_storage", "numpy", "rand_like",
                                   "randn_like", "randint_like", "bernoulli", "bernoulli_", "uniform_", "normal_",
                                   "exponential_", "random_", "rrelu", "rrelu_", "resize_", "resize_as_", "set_"})


def reads_memory_order(node: torch.fx.Node) -> bool:
    """Whether `node` gives other results on a value of another memory layout than eager's:
    it reads strides or storage, or draws random numbers in memory order (a dropout in training
    mode masks other elements of a channels-last tensor). A pass that hands a value on in
    channels-last (a lowered conv's) gives such readers a row-major copy.

        >>> import torch, torch.fx
        >>> gm = torch.fx.symbolic_trace(lambda x: torch.nn.functional.dropout(x.relu(), 0.5))
        >>> [n.name for n in gm.graph.nodes if reads_memory_order(n)]
        ['dropout']
    """
    owner = node.graph.owning_module
    view = op_view(owner, node) if owner is not None and node.op == "call_module" else None
    if view is not None and view.kind == "dropout":  # an nn.Dropout module (`_draws_at_random` reads calls)
        return bool(view.attrs.get("training", True)) and view.attrs.get("p", 0.5) != 0
    return _draws_at_random(node) or op_name(node) in _MEMORY_ORDER_READERS


def _region_is_effectful(node: torch.fx.Node) -> bool:
    """A higher-order op (export's ``wrap_with_set_grad_enabled`` around a ``torch.no_grad()``
    block) runs a subgraph: effectful when any op in it is, or when no subgraph is found. A
    WGAN critic's ``weight.clamp_`` inside one was folded as a constant, writing the weight."""
    owner = node.graph.owning_module
    regions = [getattr(owner, a.target, None) for a in node.all_input_nodes if a.op == "get_attr"]
    graphs = [r for r in regions if isinstance(r, torch.fx.GraphModule)]
    if not graphs:
        return True
    return any(is_effectful(n) for g in graphs for n in g.graph.nodes if n.op not in ("placeholder", "output"))


#: Tensor methods that write into their tensor, spelled as Python's own hooks: a symbolic trace
#: records ``y.__setitem__(idx, v)`` written that way (not ``operator.setitem``), and fx's
#: `is_impure` knows only the latter.
_IN_PLACE_DUNDERS = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                               "__imod__", "__ipow__", "__imatmul__", "__iand__", "__ior__", "__ixor__",
                               "__ilshift__", "__irshift__"})


def _in_place_name(name: str) -> bool:
    return (name.endswith("_") and not name.endswith("__")) or name in ("iadd", "isub", "imul", "itruediv") \
        or name in _IN_PLACE_DUNDERS


def _hashable(x: Any) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


# Ops whose result shares (or may share) memory with their first input, so writing one writes
# the other: an eval-mode dropout and a cast to the dtype a value has return the value itself.
_VIEW_KINDS = frozenset({"reshape", "permute", "transpose", "flatten", "getitem", "select", "slice",
                         "expand", "split", "chunk", "contiguous", "identity", "unsqueeze", "squeeze", "to",
                         "detach", "narrow", "movedim", "unbind", "tensor_split", "unflatten", "reshape_as",
                         "expand_as"})
_VIEW_METHODS = frozenset({"view", "view_as", "narrow", "squeeze", "unsqueeze", "t", "as_strided",
                           "expand_as", "unflatten", "movedim", "swapaxes", "unbind", "detach", "reshape_as",
                           "diagonal", "unfold", "tensor_split", "moveaxis", "swapdims", "transpose", "permute",
                           "hsplit", "vsplit", "dsplit", "split_with_sizes", "adjoint", "chunk", "split", "select",
                           "expand", "view_as_real", "view_as_complex", "unsqueeze_", "squeeze_",
                           # the tensor itself where nothing changes (on this device, of this dtype)
                           "ravel", "cpu", "cuda", "type", "resolve_conj", "resolve_neg", "broadcast_to"})
# ``y.T``, ``y.mH``, ``y.real``, ``y.data``: attributes that view the tensor (symbolic graphs
# read them with getattr)
_VIEW_ATTRIBUTES = frozenset({"T", "H", "mT", "mH", "real", "imag", "data"})
# ops that return a view of their input for some arguments: an einsum that only permutes
# (``einsum("nchw->nhwc", x)``) is a permute of x, which a later write into x reaches
_MAY_VIEW = _VIEW_KINDS | {"einsum"}
# torch functions returning views that fxopt's op view has no kind for
_VIEW_FUNCTIONS = frozenset({torch.diagonal, torch.hsplit, torch.vsplit, torch.dsplit, torch.split_with_sizes,
                             torch.atleast_1d, torch.atleast_2d, torch.atleast_3d, torch.adjoint, torch.as_strided,
                             torch.view_as_real, torch.view_as_complex, torch.real, torch.imag, torch.swapaxes,
                             torch.swapdims, torch.moveaxis, torch.movedim, torch.narrow, torch.unbind,
                             torch.ravel, torch.broadcast_to, torch.resolve_conj, torch.resolve_neg})
# functional dropouts in eval mode (``torch.dropout(h, p, False)``) return their input itself
_DROPOUT_FUNCTIONS = frozenset({torch.dropout, torch.alpha_dropout, torch.feature_dropout,
                                torch.feature_alpha_dropout})
_INPLACE_FUNCTIONS = (operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv)


def mutated_input(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.Node | None:
    """The value `node` writes into in place, if it does (`x.mul_`, `aten.add_`, `x[i] = v`,
    `F.relu(x, inplace=True)`, `nn.ReLU(inplace=True)`, `torch.mul(y, 2, out=y)`)."""
    first = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else \
        next((v for k in ("input", "tensor", "self") if isinstance(v := node.kwargs.get(k), torch.fx.Node)), None)
    target = node.target
    if node.op == "call_module":
        return first if getattr(gm.get_submodule(target), "inplace", False) is True else None
    if node.op == "call_method":
        return first if target.endswith("_") and not target.endswith("__") or target in _IN_PLACE_DUNDERS else None
    if node.op != "call_function":
        return None
    out = _out_nodes(node)
    if out:  # ``torch.mul(y, 2, out=y)``, ``torch.max(x, 1, out=(values, indices))``
        return out[0]
    if isinstance(target, torch._ops.OpOverload):
        mutable = any(a.alias_info is not None and a.alias_info.is_write for a in target._schema.arguments)
        return first if mutable else None
    name = getattr(target, "__name__", "")
    if target in _INPLACE_FUNCTIONS or (name.endswith("_") and not name.startswith("_")):
        return first
    return first if node.kwargs.get("inplace") is True else None


def written_base(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.Node | None:
    """The value whose memory `node` writes into in place, through any views of it
    (``self.calls.view(-1).add_(1)`` writes the `calls` buffer); None if it writes nothing."""
    target = mutated_input(gm, node)
    while target is not None and is_view(gm, target) and target.args and isinstance(target.args[0], torch.fx.Node):
        target = target.args[0]
    return target


def aliases_of(gm: torch.fx.GraphModule, base: torch.fx.Node) -> set[torch.fx.Node]:
    """`base` and every value that views its memory (views of views, in either IR): a write
    into one of them is seen through all.

    >>> import torch, torch.fx
    >>> gm = torch.fx.symbolic_trace(lambda x: (lambda h: h[:, :2].t() + h.sum())(x * 2))
    >>> sorted(n.name for n in aliases_of(gm, next(n for n in gm.graph.nodes if n.name == "mul")))
    ['getitem', 'mul', 't']
    """
    found: set[torch.fx.Node] = set()
    stack = [base]
    while stack:
        node = stack.pop()
        if node in found:
            continue
        found.add(node)
        stack.extend(u for u in node.users if u.args and u.args[0] is node and is_view(gm, u))
    return found


def is_view(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether `node`'s result shares memory with its first input (a view, an in-place write
    returning its input, an eval-mode dropout)."""
    if node.op == "call_method" and node.target in _VIEW_METHODS:
        return True
    if node.op == "call_function" and (node.target is getattr and len(node.args) == 2
                                       and node.args[1] in _VIEW_ATTRIBUTES
                                       or _hashable(node.target) and node.target in _VIEW_FUNCTIONS):
        return True
    if node.op == "call_function" and _hashable(node.target) and node.target in _DROPOUT_FUNCTIONS:
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p")
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train")
        return train is False or p == 0
    overload = aten_op_of(node)
    writes = mutated_input(gm, node) is not None
    if writes and overload is None and node.op != "call_module":
        # ``t.mul_(0)`` returns t itself: ``z.detach().mul_(0).add_(1)`` writes z twice (the
        # second write, taken as one into a fresh value, was made out of place and dropped)
        return True
    if overload is not None:  # an ATen op says it in its schema: a result aliasing its input, not written
        returns = overload._schema.returns
        if bool(returns) and returns[0].alias_info is not None and not returns[0].alias_info.is_write:
            return True
    view = op_view(gm, node)
    if view is not None and view.kind == "dropout":  # in eval mode it returns its input itself
        off = not view.attrs.get("training", True) or view.attrs.get("p", 0.5) == 0
        return off and not writes  # (an in-place one is taken as the write it names)
    return overload is None and view is not None and view.kind in _VIEW_KINDS


def functionalize_writes(gm: torch.fx.GraphModule) -> int:
    """Rewrite in-place writes into an intermediate nothing else aliases as the out-of-place op,
    its later readers reading the op's result (what torch.export does), so passes that copy or
    narrow values need not hold the written value back. Returns how many were rewritten.

    Rewritten: ``h.add_(x)``, ``torch.relu_(h)``, ``F.relu(h, inplace=True)`` where `h` is
    computed in the graph, is no view, and every reader of `h` before the write is a known op
    that makes no view of it (a view, or what an unknown op returned, would see the write;
    readers after it read the result). A graph input written so (``x.mul_(2)`` before the first
    conv) is rewritten too where no other input could share its memory (no other input of its
    dtype, nor one whose value is unknown): its last value is copied back into it at the end
    (``x.copy_(...)``), so the caller's tensor changes as it did. Kept: writes into parameters
    and views, ``copy_``/``fill_``/``zero_`` (no out-of-place method), and modules with
    ``inplace=True``.

    >>> import torch, torch.fx
    >>> gm = torch.fx.symbolic_trace(lambda x: (lambda h: (h.add_(1), h * 2)[1])(x * 3))
    >>> functionalize_writes(gm), [n.target for n in gm.graph.nodes if n.op != "placeholder"][:3]
    (1, [<built-in function mul>, 'add', <built-in function mul>])
    """
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    newer: dict[torch.fx.Node, torch.fx.Node] = {}  # a value written -> the out-of-place result
    for node in list(gm.graph.nodes):
        target = mutated_input(gm, node)
        if target is None or target.op == "get_attr" or is_view(gm, target) or not _out_of_place(node) \
                or target.op == "placeholder" and not _input_is_apart(target):
            continue
        before = [u for u in target.users if order[u] < order[node]]
        if any((view := op_view(gm, u)) is None or view.kind in _MAY_VIEW or is_view(gm, u) for u in before):
            continue  # a view taken before the write sees it; so might what an unknown op returned
        _make_out_of_place(node)
        for user in [u for u in target.users if order[u] > order[node]]:
            user.replace_input_with(target, node)
        newer[target] = node
    _write_back_inputs(gm, newer)
    if newer:
        gm.recompile()
    return len(newer)


def _input_is_apart(placeholder: torch.fx.Node) -> bool:
    """Whether no other graph input can share `placeholder`'s memory (``m(x, x)``, where a write
    into one input changes the other): every other input is recorded as a tensor of another
    dtype or as a plain scalar."""
    meta = tensor_meta(placeholder)
    if meta is None:
        return False
    for other in placeholder.graph.find_nodes(op="placeholder"):
        if other is placeholder:
            continue
        other_meta = tensor_meta(other)
        if other_meta is not None:
            if other_meta[1] == meta[1]:
                return False
            continue
        recorded = [other.meta[key] for key in ("val", "tensor_meta") if key in other.meta]
        if not recorded or not isinstance(recorded[0], (int, float, bool, str, type(None))):
            return False  # nothing recorded, or a container that may hold the same tensor
    return True


def _write_back_inputs(gm: torch.fx.GraphModule, newer: dict[torch.fx.Node, torch.fx.Node]) -> None:
    """Copy each functionalized input's last value back into it before the graph returns: the
    caller's tensor ends as eager left it."""
    output = next(iter(gm.graph.find_nodes(op="output")))
    for placeholder in [n for n in newer if n.op == "placeholder"]:
        last = newer[placeholder]
        while last in newer:
            last = newer[last]
        with gm.graph.inserting_before(output):
            gm.graph.call_method("copy_", (placeholder, last))


def _out_of_place(node: torch.fx.Node) -> bool:
    """Whether `node`'s in-place write has an out-of-place twin `_make_out_of_place` can call,
    computing the same shape and dtype (an in-place op keeps its target's dtype where the
    out-of-place one promotes: ``h.add_(float64)``, ``int32.cumsum_(1)``)."""
    return _has_twin(node) and _twin_keeps_the_value_kind(node)


def _twin_keeps_the_value_kind(node: torch.fx.Node) -> bool:
    """The twin run once on meta tensors of the recorded shapes; True where nothing is
    recorded (a bare symbolic trace: the twin of an arithmetic write, as before)."""
    target, twin_kwargs = _twin(node)
    try:
        args = torch.fx.node.map_arg(node.args, meta_value)
        kwargs = torch.fx.node.map_arg(twin_kwargs, meta_value)
    except LookupError:
        return True
    try:
        got = call_as(node.op, target, args, kwargs)
    except Exception:  # noqa: BLE001 - no meta kernel: not proven the same, keep the write
        return False
    want = args[0]
    return isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor) and got.dtype == want.dtype \
        and got.shape == want.shape


def _has_twin(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        name = node.target
        return name.endswith("_") and not name.endswith("__") and callable(getattr(torch.Tensor, name[:-1], None))
    if node.op != "call_function" or isinstance(node.target, torch._ops.OpOverload):
        return False
    if node.kwargs.get("inplace") is True:
        return True
    return _twin_namespace(node.target) is not None


#: Where an in-place function ``f_`` has its out-of-place twin ``f`` (``torch.relu_``,
#: ``F.leaky_relu_``, ``F.hardtanh_``).
_TWIN_NAMESPACES = (torch, torch.nn.functional)


def _twin_namespace(target: Any) -> Any:
    name = getattr(target, "__name__", "")
    if not name.endswith("_") or name.startswith("_"):
        return None
    return next((ns for ns in _TWIN_NAMESPACES if getattr(ns, name, None) is target
                 and callable(getattr(ns, name[:-1], None))), None)


def _twin(node: torch.fx.Node) -> tuple[Any, dict]:
    """(target, kwargs) of the out-of-place call of an in-place write `_has_twin` accepts."""
    if node.op == "call_method":
        return node.target[:-1], dict(node.kwargs)
    if node.kwargs.get("inplace") is True:
        return node.target, {**node.kwargs, "inplace": False}
    return getattr(_twin_namespace(node.target), node.target.__name__[:-1]), dict(node.kwargs)


def _make_out_of_place(node: torch.fx.Node) -> None:
    node.target, node.kwargs = _twin(node)


def written_in_place(gm: torch.fx.GraphModule, floating_only: bool = False) -> dict[str, str]:
    """Nodes whose memory is written in place where another reader sees the write: passes that
    copy or narrow values (int8 lowering, channel pruning) must leave them as they are.
    `floating_only`: only writes into floating-point values (a pass that touches only those can
    ignore an integer index built in place, as BEiT's relative position index is).

    A write through a view (`y[:, :2].mul_(2)`) changes every alias of `y`: the base, its other
    views, and what reads them afterwards. Returns node name -> reason, for the pass stats.
    A write nobody else can see is no hazard: `relu_(conv(x))` or ResNet's `out += identity`,
    where the written value is an intermediate whose every other reader ran before the write,
    computes what the out-of-place op would (torch.export keeps such ops as `aten.relu_`).
    """
    alias_of: dict[torch.fx.Node, torch.fx.Node] = {}  # node -> the base it views
    for node in gm.graph.nodes:
        if is_view(gm, node) and node.args and isinstance(node.args[0], torch.fx.Node):
            alias_of[node] = alias_of.get(node.args[0], node.args[0])
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    bases = {}
    for node in gm.graph.nodes:
        target = mutated_input(gm, node)
        if target is None:
            continue
        base = alias_of.get(target, target)
        if floating_only and not _is_floating(base):
            continue
        if not _write_is_private(node, target, base, alias_of, order):
            bases.setdefault(base, node)
    if not bases:
        return {}
    out: dict[str, str] = {}
    for node in gm.graph.nodes:
        base = alias_of.get(node, node)
        if base in bases:
            writer = bases[base]
            out[node.name] = f"written in place by '{writer.name}' (directly or through a view)"
            for user in node.users:
                out.setdefault(user.name, f"reads '{node.name}', which '{writer.name}' writes in place")
    return out


def _is_floating(node: torch.fx.Node) -> bool:
    """Whether `node`'s recorded value is a floating-point tensor (unknown counts as floating)."""
    meta = tensor_meta(node)
    return meta is None or meta[1].is_floating_point


def _write_is_private(writer: torch.fx.Node, target: torch.fx.Node, base: torch.fx.Node,
                      alias_of: dict[torch.fx.Node, torch.fx.Node], order: dict[torch.fx.Node, int]) -> bool:
    """Whether `writer`'s in-place write into `target` (`base` or a view of it) is invisible
    except through `writer`'s own result: `base` is an intermediate (not an input, a parameter
    or a buffer); `target` has no views of its own; a view is reached from `base` by a chain of
    views each read by the next alone (a TCN's `relu_(conv(x)[:, :, :-pad])`, nn.ReLU(inplace=True)
    after the chomp); and `target` is read by nothing that runs after the write."""
    if base.op in ("placeholder", "get_attr") or not writer.args or writer.args[0] is not target:
        return False
    if any(user in alias_of and user.args[0] is target for user in target.users):
        return False  # a view of the written value sees the write
    node = target
    while node is not base:
        parent = node.args[0]
        if len(parent.users) != 1:
            return False
        node = parent
    return all(order[user] < order[writer] for user in target.users if user is not writer)


_DETACHES = (torch.ops.aten.detach_.default, torch.ops.aten.detach.default)
# op kinds that may return their input itself (a cast to the dtype it has, an eval dropout)
_HANDS_BACK = {"to", "contiguous", "dropout", "identity", "expand", "flatten", "unflatten"}


def fresh_literal_constants(gm: torch.fx.GraphModule) -> int:
    """Give a symbolic graph's literal tensors a fresh copy per call where the forward may write
    them. torch.fx stores ``torch.tensor([...])`` built in forward as one constant
    (``_tensor_constant0``); eager builds a new tensor every call. A write into it, directly or
    through an op that may hand it back (``.to(x.device)``, a view), then accumulates from call
    to call. A ``clone()`` after the constant is what export's ``lift_fresh_copy`` does.
    Returns how many were given one."""
    cloned = 0
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or not str(node.target).startswith("_tensor_constant"):
            continue
        reached, stack = set(), [node]
        while stack:  # the constant and what may be it: results of ops that may hand it back
            value = stack.pop()
            if value in reached:
                continue
            reached.add(value)
            stack.extend(u for u in value.users if u.args[:1] == (value,) and _may_hand_back(gm, u))
        if not any(mutated_input(gm, u) in reached or u.op == "output" for value in reached for u in value.users):
            continue
        with gm.graph.inserting_after(node):
            fresh = gm.graph.call_method("clone", (node,))
        node.replace_all_uses_with(fresh, delete_user_cb=lambda user: user is not fresh)
        cloned += 1
    if cloned:
        gm.recompile()
    return cloned


def _may_hand_back(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether `node` may return its first operand, or a view of it, or write it: anything but
    an op the op view knows to compute a new value (``rsqrt(c)``, ``c * 2``)."""
    view = op_view(gm, node)
    return view is None or view.kind in _HANDS_BACK or is_view(gm, node) or mutated_input(gm, node) is not None


def drop_fresh_copies(gm: torch.fx.GraphModule) -> int:
    """Read a literal tensor constant directly where torch.export copies it. A forward that
    builds a tensor from a literal (``x.index_select(1, torch.tensor([1, 0, 3, 2]))``) exports
    as ``detach_(lift_fresh_copy(c))``: a fresh copy of the stored constant, which analyses
    take for a value computed in the graph (prune pinned a constant channel permutation). Where
    every reader takes the copy as a further operand (no op that may hand it back, no output),
    nothing can write it and the constant is the same value. Returns how many were dropped.
    """
    dropped = 0
    for node in list(gm.graph.nodes):
        source = node.args[0] if node.args else None
        if aten_op_of(node) is not torch.ops.aten.lift_fresh_copy.default or not (
                isinstance(source, torch.fx.Node) and source.op == "get_attr"):
            continue
        chain = [node]
        while len(chain[-1].users) == 1 and aten_op_of(next(iter(chain[-1].users))) in _DETACHES:
            chain.append(next(iter(chain[-1].users)))
        if any(user.op == "output" or (user.args[:1] == (chain[-1],) and _may_hand_back(gm, user))
               for user in chain[-1].users):
            # an op that may hand its first operand back (``c.type_as(x)``, an eval dropout, a
            # view) gives it to a write or the caller to change: the copy must stay
            continue
        chain[-1].replace_all_uses_with(source)
        for link in reversed(chain):
            gm.graph.erase_node(link)
        dropped += 1
    if dropped:
        gm.recompile()
    return dropped


__all__ = ["aliases_of", "drop_fresh_copies", "fresh_literal_constants", "functionalize_writes", "is_effectful",
           "mutated_input", "written_in_place"]
