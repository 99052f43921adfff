"""What the channel analysis produces: slots, rules, the `ChannelGraph`, the producers'
weight layouts and the op families the rules are written for (see `channel_graph`)."""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import scipy.sparse as sp
import torch
import torch.fx
from scipy.sparse.csgraph import connected_components

from fxopt.ir import ParamRef, bind_arguments, op_view, ref_for_get_attr, spec_for

from .computed_weights import ComputedWeight

ZERO_PRESERVING = frozenset({"relu", "hardtanh", "hardswish", "silu", "gelu", "tanh", "neg", "leaky_relu", "elu",
                             "selu", "celu", "mish", "dropout", "identity", "contiguous", "clone", "to", "abs",
                             "sqrt", "square", "erf", "sin", "sign", "softsign", "shrink", "detach", "round",
                             "floor", "ceil", "trunc", "nan_to_num"})
SPATIAL = frozenset({"max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool", "interpolate"})
# ops that act on each channel on its own: a value whose removed channels are not zero ("dirty")
# may flow through them (the result is dirty too; a product with a clean factor is clean)
CHANNELWISE = ZERO_PRESERVING | SPATIAL | frozenset({
    "softmax", "mean", "reshape", "flatten", "permute", "transpose", "expand", "select", "slice", "getitem",
    "cat", "split", "chunk", "mul", "div", "add", "sub", "sigmoid", "hardsigmoid", "pow", "unsqueeze", "squeeze",
    "pad", "roll", "vector_norm", "prelu", "pixel_shuffle", "pixel_unshuffle", "glu", "matmul",
    "narrow", "index_select", "expand_as", "clamp", "softplus", "flip", "exp", "cos", "rsqrt", "reciprocal",
    "sum", "amax", "amin", "var", "std", "normalize", "where", "masked_fill", "gt", "ge", "lt", "le", "eq", "ne",
    "fill_like", "stack", "unbind", "einsum", "max", "min", "maximum", "minimum", "layer_norm", "rms_norm",
    "log_softmax", "var_mean", "std_mean", "repeat", "repeat_interleave", "reshape_as", "cumsum", "cumprod",
    "index", "tile", "tensor_split", "movedim", "unfold", "grid_sample"})
# ops whose result is a tuple of values (taken apart by getitem)
TUPLE_RESULTS = frozenset({"split", "chunk", "tensor_split", "unbind", "max", "min", "var_mean", "std_mean", "adaptive_max_pool"})
# products: zero on a removed channel where any factor is (a matmul or einsum here keeps
# channels on an axis it does not contract; one contracting them is pinned)
GATING = frozenset({"mul", "matmul", "einsum"})


@dataclass(frozen=True)
class WeightLayout:
    """Where a producer keeps its parameters and which weight axes are its channels.

    `weight` / `bias`: argument names (the op view's parameter names; for a matmul the second
    operand, `other`); `out_axis`: the weight axis of the output channels (what importance
    reads and apply slices as rows); `in_axis`: the axis of the input channels (columns),
    None when the input is not a channel tensor (embedding indices).
    """

    weight: str
    bias: str | None
    out_axis: int
    in_axis: int | None


WEIGHT_LAYOUTS = {
    "conv": WeightLayout("weight", "bias", 0, 1),
    "conv_transpose": WeightLayout("weight", "bias", 1, 0),  # [in, out / groups, *kernel]
    "linear": WeightLayout("weight", "bias", 0, 1),
    "embedding": WeightLayout("weight", None, 1, None),
    "addmm": WeightLayout("mat2", "input", 1, 0),   # bias + x @ W, W: [in, out]
    "matmul": WeightLayout("other", None, 1, 0),    # x @ W, W: [in, out]
}


@dataclass(frozen=True)
class ProducerWeights:
    """A producer's parameter handles (`ParamRef`; a `ComputedWeight` for a weight the graph
    computes from parameters) with its `WeightLayout` axes. `groups`: a
    grouped transposed conv's weight [cin, cout / groups, *k] holds output channel o in entry
    o % (cout / groups) of its out axis, for the rows of o's group only."""

    weight: ParamRef | ComputedWeight
    bias: ParamRef | None
    out_axis: int
    in_axis: int | None
    groups: int = 1

    def out_index(self, channels: np.ndarray) -> np.ndarray:
        """The out-axis entries of output `channels` (the same numbers unless grouped transposed;
        there every group keeps the same positions, see `rule_conv`)."""
        if self.groups == 1:
            return channels
        return np.unique(channels % self.weight.get().shape[self.out_axis])

    def rows(self, w: torch.Tensor) -> torch.Tensor:
        """`w` with one row per output channel on axis 0 (what importance scores)."""
        if self.groups == 1:
            return w.movedim(self.out_axis, 0)
        return w.unflatten(0, (self.groups, -1)).movedim(2, 1).flatten(0, 1)  # [g, cig, cog, k] -> [cout, cig, k]


def param_arg(gm: torch.fx.GraphModule, view, name: str) -> ParamRef | None:
    """The parameter passed as argument `name` of the viewed op, in either front end: the op
    view's own parameter handles, or a `get_attr` operand (the second operand of ``x @ W``)."""
    ref = view.params.get(name)
    if ref is not None or view.node.op not in ("call_function", "call_method"):
        return ref
    spec = spec_for(gm, view.node)
    bound = bind_arguments(view.node, spec) if spec is not None else {}
    value = bound.get(name)
    if isinstance(value, torch.fx.Node) and value.op == "get_attr":
        return ref_for_get_attr(gm, value)
    return None


def producer_weights(gm: torch.fx.GraphModule, node: torch.fx.Node, rule: "Rule") -> ProducerWeights:
    """The weight and bias handles of a producer rule's node, in the rule's weight layout."""
    layout = WEIGHT_LAYOUTS[rule.kind]
    view = op_view(gm, node)
    bias = param_arg(gm, view, layout.bias) if layout.bias else None
    groups = rule.info.get("groups", 1) if rule.kind == "conv_transpose" else 1
    weight = param_arg(gm, view, layout.weight)
    if weight is None:  # the analysis took it as computed from parameters alone (`computed_weights`)
        weight = ComputedWeight(gm, view.attrs[layout.weight], node)
    return ProducerWeights(weight, bias, layout.out_axis, layout.in_axis, groups)


@dataclass
class Slot:
    """One value's channel axis: positions ``base .. base+size`` in the union-find."""

    id: int
    node: str
    axis: int
    size: int
    base: int
    role: str  # producer | param | pinned | pass | junction
    bytes: int = 0
    ndim: int = 0  # the value's rank

    @property
    def label(self) -> str:
        return f"{self.node}:{self.axis}"


@dataclass
class Rule:
    """How one node touches channels; `apply` replays it to rewrite the node.

    - `category`: producer (conv/linear/embedding/addmm/matmul with a parameter weight; its
      `kind` keys `WEIGHT_LAYOUTS`), pass (index maps only, maybe with params:
      batch_norm, depthwise conv), junction (add/sub), param (a get_attr producer), pinned.
    - `inputs`: (input node name, slot id, in_pos, out_pos, out slot id) for each mapped input;
      `consumed`: (input node name, slot id) for inputs whose channels are weight columns.
    - `outputs`: slot ids this node defines (several for split, keyed by getitem node).
    """

    node: str
    kind: str
    category: str
    inputs: list = field(default_factory=list)
    consumed: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    info: dict = field(default_factory=dict)


#: Norms whose statistics run over the channel axis they map channel by channel (with
#: ``exact_norms=false``, or exact by a rescale for RMS): every output channel reads every input one.
CHANNEL_STATISTICS = frozenset({"layer_norm", "rms_norm", "group_norm"})


def reads_across_channels(rule: Rule) -> bool:
    """Whether each output channel of `rule` depends on other input channels than the one its
    index map names (a norm's statistics, ``F.normalize`` over the channels, attention scores)."""
    return bool(rule.info.get("mixes_channels")) or rule.category == "norm" and rule.kind in CHANNEL_STATISTICS


def _component_labels(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """Connected-component label per index 0..n-1 of the undirected links a[i] -- b[i]."""
    links = sp.coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n))
    return connected_components(links, directed=False)[1]


class _ChannelUnions:
    """Channel positions and the "same channel" links between them, solved once at the end.

    Links are only recorded while the graph is walked (nothing reads a class before `finish`),
    then one sparse connected-components call numbers the classes; a per-link Python
    union-find was the largest part of the analysis time on 200-layer CNNs.
    """

    def __init__(self) -> None:
        self.size = 0
        self.links: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, n: int) -> int:
        start, self.size = self.size, self.size + n
        return start

    def union_many(self, a: np.ndarray, b: np.ndarray) -> None:
        self.links.append((np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)))

    def classes(self) -> np.ndarray:
        """Class id per position, numbered 0.. in order of each class's first position."""
        if self.size == 0:
            return np.zeros(0, dtype=np.int64)
        a = np.concatenate([x for x, _ in self.links] + [np.zeros(0, dtype=np.int64)])
        b = np.concatenate([y for _, y in self.links] + [np.zeros(0, dtype=np.int64)])
        labels = _component_labels(a, b, self.size)
        # number classes by their first position (stable ids, as a min-root union-find gave)
        _, first = np.unique(labels, return_index=True)
        order = np.argsort(first)
        rank = np.empty(len(first), dtype=np.int64)
        rank[order] = np.arange(len(first))
        return rank[labels]


@dataclass
class ChannelGraph:
    """Result of the analysis; see the module docstring.

    - `graph`: networkx MultiDiGraph over slot labels (``node:axis``), edges carry `op` and `map`;
    - `slots`, `rules` (by node name), `value_slot` (node name -> slot id or None);
    - `cls`: array position -> class id (dense 0..n_classes-1);
    - `precedence`: set of (class y, class x) pairs: y dead requires x dead;
    - `pinned_nodes`: node name -> reason, for everything the analysis would not reason about;
    - `output_classes`: classes that reach the graph output (pinned);
    - `unread_classes`: classes every reader drops (``h[:, 2:6]`` leaves 0, 1, 6, 7 of 8 out):
      removing them changes no result, so their importance is 0.
    """

    graph: nx.MultiDiGraph
    slots: list[Slot]
    rules: dict[str, Rule]
    value_slot: dict[str, int | None]
    cls: np.ndarray
    n_classes: int
    precedence: set
    pinned_nodes: dict[str, str]
    pinned_classes: np.ndarray
    output_classes: np.ndarray
    module_names: dict[str, str]
    unread_classes: np.ndarray

    def positions(self, slot_id: int) -> np.ndarray:
        s = self.slots[slot_id]
        return self.cls[s.base: s.base + s.size]

    def groups(self) -> list[set[int]]:
        """Pruning groups: classes that share a value or a junction precedence (a layer family,
        a residual stage, a dense block). `scope=local` prunes `ratio` of each group."""
        pairs = [np.array(list(self.precedence), dtype=np.int64).reshape(-1, 2)]
        for s in self.slots:  # chain the classes of each slot
            ids = np.unique(self.positions(s.id))
            pairs.append(np.stack([ids[:-1], ids[1:]], 1))
        pairs = np.concatenate(pairs)
        n = self.n_classes
        labels = _component_labels(pairs[:, 0], pairs[:, 1], n)
        order = np.argsort(labels, kind="stable")
        bounds = np.flatnonzero(np.diff(labels[order])) + 1
        return [set(part.tolist()) for part in np.split(order, bounds)] if n else []


class _Pin(Exception):
    """Raised inside a rule: the node is pinned, with the reason. `hold`: slots whose channels
    must all stay, because the pinned op is not finite on the zeros a re-expansion would give
    it (a divisor, the input of an rsqrt)."""

    def __init__(self, reason: str, hold: tuple[int, ...] = (), conflict: int | None = None) -> None:
        super().__init__(reason)
        self.hold = hold
        self.conflict = conflict  # the slot whose channel axis the op reduces or indexes
