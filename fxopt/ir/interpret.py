"""Run a GraphModule node by node, on the same inputs its forward takes.

Graphs from torch.export take flattened (pytree) inputs and rebuild structured outputs; graphs
from symbolic tracing take the forward's own arguments. `flatten_inputs` hides the difference,
so analyses (shapes, calibration) and verification (per-node values) work on both.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Callable, Collection, Iterator

import torch
import torch.fx
from torch.fx.graph import _PyTreeCodeGen

from .effects import mutated_input


def flatten_inputs(gm: torch.fx.GraphModule, args: tuple, kwargs: dict | None = None) -> list:
    """The values the graph's placeholders receive for `gm(*args, **kwargs)`."""
    kwargs = kwargs or {}
    codegen = gm.graph._codegen
    if isinstance(codegen, _PyTreeCodeGen) and codegen.pytree_info is not None:
        return _flatten_pytree_inputs(gm, codegen.pytree_info, args, kwargs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = list(args)
    for node in placeholders[len(values):]:
        name = node.target.lstrip("*")
        if name in kwargs:
            values.append(kwargs[name])
        elif node.args:
            values.append(node.args[0])  # the default value fx recorded
        else:
            raise TypeError(f"missing input '{name}' for {type(gm).__name__}")
    return values


def _flatten_pytree_inputs(gm: torch.fx.GraphModule, info: Any, args: tuple, kwargs: dict) -> list:
    """Bind (args, kwargs) to the forward's names and flatten them as its generated code does.

    A torch.export module's forward takes the original argument names and flattens them with
    `tree_flatten_spec(([positional...], {keyword: ...}), in_spec)`; calling
    `process_inputs(*args)` instead would drop keyword arguments (or reject them).
    """
    from torch.fx import _pytree as fx_pytree

    names = list(info.orig_args)
    if names and names[0] == "self":
        names = names[1:]
    if len(args) > len(names):
        raise TypeError(f"{type(gm).__name__} takes {len(names)} inputs ({', '.join(names)}), got {len(args)}")
    bound = dict(zip(names, args))
    for key, value in kwargs.items():
        if key not in names:
            raise TypeError(f"unexpected input '{key}'; the graph takes: {', '.join(names)}")
        if key in bound:
            raise TypeError(f"input '{key}' given twice")
        bound[key] = value
    missing = [n for n in names if n not in bound]
    if missing:
        raise TypeError(f"missing input(s) {', '.join(missing)} for {type(gm).__name__}")
    spec = info.in_spec
    if (spec.type is tuple and spec.num_children == 2 and spec.child(0).type is tuple
            and spec.child(1).type is dict):
        count = spec.child(0).num_children
        tree: Any = (
            [bound[n] for n in names[:count]],
            {k: bound[v] for k, v in zip(spec.child(1).context, names[count:])},
        )
    else:
        tree = [bound[n] for n in names]
    return list(fx_pytree.tree_flatten_spec(tree, spec))


class _ObservingInterpreter(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, observe: Callable[[torch.fx.Node, Any], Any] | None,
                 private_buffers: bool = False):
        super().__init__(gm, garbage_collect_values=observe is None)
        self._observe = observe
        self._private: dict[str, torch.Tensor] | None = {} if private_buffers else None
        self._private_modules: dict[str, torch.nn.Module] = {}
        self._written = _parameters_written(gm) if private_buffers else set()

    def fetch_attr(self, target: str) -> Any:
        value = super().fetch_attr(target)
        if self._private is not None and isinstance(value, torch.Tensor) \
                and (not isinstance(value, torch.nn.Parameter) or target in self._written):
            # a stateful graph (export's `copy_` into a buffer) writes into its own copy
            if target not in self._private:
                self._private[target] = value.clone()
            return self._private[target]
        return value

    def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        if self._private is None:
            return super().call_module(target, args, kwargs)
        # Modules that update their buffers when run (observers, training-mode batchnorm)
        # run as private copies, so observing the graph leaves its state untouched.
        module = self._private_modules.get(target)
        if module is None:
            module = self.fetch_attr(target)
            # nn.Embedding(max_norm=...) renormalizes the rows it looks up, in its weight
            if any(True for _ in module.buffers()) or getattr(module, "max_norm", None) is not None:
                module = copy.deepcopy(module)
            self._private_modules[target] = module
        return module(*args, **kwargs)

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        if self._observe is None:
            return value
        replaced = self._observe(n, value)
        return value if replaced is None else replaced


@contextmanager
def same_random_draws(seed: int = 0) -> Iterator[None]:
    """Run the block from torch's generators seeded with `seed`, then give the caller's state back.

    Two runs compared with each other (a model and its graph) each start here, so a forward
    that draws random numbers (noise injection, `torch.rand_like`, dropout in training mode)
    draws the same ones in both, in the order it makes them.

    >>> with same_random_draws():
    ...     a = torch.rand(2)
    >>> with same_random_draws():
    ...     b = torch.rand(2)
    >>> torch.equal(a, b)
    True
    """
    # the CUDA generators too, once CUDA is in use (forking them would initialize it otherwise)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def fresh_inputs(args: tuple, kwargs: dict | None = None) -> tuple[tuple, dict]:
    """Copies of the tensors in `args` / `kwargs` (structure kept), for one run of a model.

    A model that writes into its inputs (`x.add_(1)`) then changes neither the caller's
    tensors nor what the next run (the other side of a comparison) sees.

    >>> x = torch.zeros(2)
    >>> (y,), _ = fresh_inputs((x,))
    >>> _ = y.add_(1); x.tolist()
    [0.0, 0.0]
    """
    clone = lambda v: v.clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
    new_args, new_kwargs = torch.utils._pytree.tree_map(clone, (tuple(args), dict(kwargs or {})))
    return new_args, new_kwargs


def _parameters_written(gm: torch.fx.GraphModule) -> set[str]:
    """`get_attr` targets the graph writes into in place, directly or through an alias (export's
    ``embedding_renorm_(detach(weight))`` for ``nn.Embedding(max_norm=...)``, a symbolic
    ``self.w.clamp_(...)``), or inside a region export wraps in a submodule of its own
    (``wrap_with_set_grad_enabled(False, body, weight)`` for a ``torch.no_grad()`` block)."""
    written = set()
    for node in gm.graph.nodes:
        for operand in _written_operands(gm, node):
            source = _alias_source(operand)
            if source.op == "get_attr":
                written.add(source.target)
    return written


def _written_operands(gm: torch.fx.GraphModule, node: torch.fx.Node) -> list[torch.fx.Node]:
    """The values `node` writes into in place: its mutated input, or the operands a wrapped
    region (a higher-order op calling a submodule graph) passes to placeholders it writes."""
    target = mutated_input(gm, node)
    if target is not None:
        return [target]
    if node.op != "call_function":
        return []
    for i, arg in enumerate(node.args):
        body = getattr(gm, arg.target, None) if isinstance(arg, torch.fx.Node) and arg.op == "get_attr" else None
        if isinstance(body, torch.fx.GraphModule):
            placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
            operands = node.args[i + 1:]
            hit = {_alias_source(t) for n in body.graph.nodes for t in _written_operands(body, n)}
            return [operands[k] for k, ph in enumerate(placeholders)
                    if ph in hit and k < len(operands) and isinstance(operands[k], torch.fx.Node)]
    return []


def _alias_source(node: torch.fx.Node, hops: int = 3) -> torch.fx.Node:
    """The value `node` is a view or detached alias of: up to `hops` single-input ops back."""
    while node.op not in ("get_attr", "placeholder") and hops > 0 and len(node.all_input_nodes) == 1:
        node, hops = node.all_input_nodes[0], hops - 1
    return node


def run_graph(
    gm: torch.fx.GraphModule,
    args: tuple,
    kwargs: dict | None = None,
    observe: Callable[[torch.fx.Node, Any], Any] | None = None,
    *,
    private_buffers: bool = False,
) -> Any:
    """Run `gm` like `gm(*args, **kwargs)`, calling `observe(node, value)` after every node.

    `observe` may return a replacement value for the node (used by calibration and
    fault-injection tests); returning None keeps the computed value. The structured output
    (dict, dataclass, tuple) is rebuilt exactly as the module's own forward would.
    With `private_buffers`, buffers read through `get_attr` are cloned first, so a graph that
    writes into its buffers (export's `copy_` for mutated state) leaves the module untouched —
    analyses and verification use this to observe without changing anything.
    """
    flat = flatten_inputs(gm, args, kwargs)
    if observe is None and not private_buffers:
        interp = torch.fx.Interpreter(gm)
    else:
        interp = _ObservingInterpreter(gm, observe, private_buffers)
    out = interp.run(*flat, enable_io_processing=False)
    return gm.graph._codegen.process_outputs(out)


def node_values(
    gm: torch.fx.GraphModule,
    args: tuple,
    kwargs: dict | None = None,
    names: Collection[str] | None = None,
) -> dict[str, Any]:
    """Each node's value (by node name) as it was right after the node ran, for one run.

    `names` keeps only those nodes' values (memory grows with what is kept; all by default).
    The graph runs on copies of the inputs, so one that writes into its inputs leaves the
    caller's alone.

    Values are snapshots: an in-place op that runs later (`nn.ReLU(inplace=True)`, `F.relu_`,
    `x.add_`, a write into a view, a leaf module writing into its input) does not change what
    was recorded for an earlier node, say the batchnorm output a `relu_` overwrites. Copying
    every value would double the memory of a run, and spotting in-place ops in the graph misses
    views and module internals, so writes are detected instead: each one bumps the version
    counter a tensor shares with its views. A kept value whose version moved after it was
    recorded is copied when recorded in a second run; with no such value there is no second
    run and nothing is copied. (Writes autograd cannot see, through `.data`, go unnoticed;
    inference tensors have no version counter and are always copied.)
    """
    wanted = None if names is None else set(names)
    copied: set[str] = set()
    while True:  # twice at most, unless what gets written depends on the run
        values, written = _record_values(gm, args, kwargs, wanted, copied)
        if not written:
            return values
        copied |= written  # disjoint from `copied` before: this terminates
        del values  # freed before the next run


def _record_values(
    gm: torch.fx.GraphModule, args: tuple, kwargs: dict | None, wanted: set[str] | None, copied: set[str]
) -> tuple[dict[str, Any], set[str]]:
    """One run of `node_values`: the values (those in `copied` copied when recorded) and the
    names of the other kept values that a later node wrote into."""
    values: dict[str, Any] = {}
    versions: dict[str, tuple[int, ...]] = {}

    def keep(node: torch.fx.Node, value: Any) -> None:
        if wanted is not None and node.name not in wanted:
            return
        tensors = _tensor_leaves(value)
        if node.name in copied or any(t.is_inference() for t in tensors):
            values[node.name] = _copy_tensors(value)
        else:
            values[node.name] = value
            if tensors:
                versions[node.name] = tuple(t._version for t in tensors)

    run_graph(gm, *fresh_inputs(args, kwargs), keep, private_buffers=True)
    written = {name for name, seen in versions.items()
               if tuple(t._version for t in _tensor_leaves(values[name])) != seen}
    return values, written


def _tensor_leaves(value: Any) -> list[torch.Tensor]:
    return [v for v in torch.utils._pytree.tree_leaves(value) if isinstance(v, torch.Tensor)]


def _copy_tensors(value: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, value)


class BufferState:
    """The values of a module's buffers: whether a run wrote them, and putting them back.

    A forward that updates a step counter or a running average changes its module each time it
    runs; capture and verification compare runs from one state and leave the module in it.

        >>> import torch
        >>> counter = torch.nn.Module(); counter.register_buffer("steps", torch.zeros(()))
        >>> state = BufferState(counter); counter.steps += 1
        >>> state.changed(), (state.restore(), counter.steps.item())[1]
        (['steps'], 0.0)
    """

    def __init__(self, *modules: torch.nn.Module) -> None:
        seen: set[int] = set()
        self._buffers = []
        for module in modules:
            for name, b in module.named_buffers():
                if id(b) not in seen:
                    seen.add(id(b))
                    self._buffers.append((name, b, b.detach().clone()))

    def changed(self) -> list[str]:
        """Names of the buffers whose values differ from the snapshot."""
        return [name for name, b, saved in self._buffers if not _same_values(b, saved)]

    def restore(self) -> None:
        """Write the snapshot back into the buffers a run changed (the tensors stay the same
        objects). Only those: a write into an unchanged buffer (an int8 model's bias, shared
        with the verification reference) is what the write guards refuse."""
        with torch.no_grad():
            for _, b, saved in self._buffers:
                if not _same_values(b, saved):
                    b.copy_(saved)


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    if torch.equal(a, b):
        return True
    return a.is_floating_point() and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)
