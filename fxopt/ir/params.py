"""Handles to parameters wherever they live, so passes can read and *replace* them.

In a symbolic graph a conv's weight lives inside its `nn.Conv2d` (`call_module`); in an
export graph it is a `get_attr` node feeding `aten.conv2d`. A `ParamRef` names the owning
module and attribute either way. Replacing goes through `set`, which swaps the attribute for a
new tensor — never an in-place write, so snapshots that share tensors stay valid.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn


@dataclass(frozen=True)
class ParamRef:
    """The attribute `attr` of `owner`, reached from the root as `qualname`."""

    owner: nn.Module
    attr: str
    qualname: str

    def get(self) -> torch.Tensor | None:
        return getattr(self.owner, self.attr, None)

    def set(self, value: torch.Tensor | None) -> None:
        """Replace the tensor, keeping its kind (parameter, buffer or plain attribute)."""
        old = self.get()
        if value is None:
            if self.attr in self.owner._parameters:
                self.owner._parameters[self.attr] = None
            else:
                setattr(self.owner, self.attr, None)
            return
        value = value.detach()
        if self.attr in self.owner._parameters or isinstance(old, nn.Parameter):
            # as trainable as the parameter it replaces (a pruned or folded layer is fine-tuned after)
            trains = old.requires_grad if isinstance(old, nn.Parameter) else True
            self.owner._parameters[self.attr] = nn.Parameter(value, requires_grad=trains and value.is_floating_point())
        elif self.attr in self.owner._buffers:
            self.owner._buffers[self.attr] = value
        else:
            setattr(self.owner, self.attr, value)


def resolve_attr(root: nn.Module, qualname: str) -> tuple[nn.Module, str]:
    """(owning module, last attribute name) for a dotted path such as `layer1.0.conv.weight`."""
    *path, attr = qualname.split(".")
    owner = root
    for part in path:
        owner = getattr(owner, part)
    return owner, attr


def get_attr_value(root: nn.Module, qualname: str) -> Any:
    """The value at a dotted attribute path of `root` (what a `get_attr` node reads)."""
    owner, attr = resolve_attr(root, qualname)
    return getattr(owner, attr)


def ref_for_get_attr(gm: torch.fx.GraphModule, node: torch.fx.Node) -> ParamRef:
    """A `ParamRef` to the tensor a `get_attr` node reads, to read or replace it."""
    owner, attr = resolve_attr(gm, node.target)
    return ParamRef(owner, attr, node.target)


def add_tensor_attr(
    gm: torch.fx.GraphModule, base_name: str, value: torch.Tensor, *, parameter: bool = True,
    requires_grad: bool = False,
) -> str:
    """Store `value` on `gm` under a fresh attribute name derived from `base_name`; return it.

    New tensors live directly on the root, which `get_attr` reaches in symbolic and export
    graphs alike. A floating-point `parameter` made from trainable ones (a folded or pruned
    weight) takes `requires_grad=True`, so the model fine-tunes as the original did.
    """
    base = re.sub(r"\W", "_", base_name).strip("_") or "const"
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    value = value.detach()
    if parameter and value.is_floating_point():
        gm.register_parameter(name, nn.Parameter(value, requires_grad=requires_grad))
    else:
        gm.register_buffer(name, value)
    return name


def attribute_use_counts(gm: torch.fx.GraphModule) -> Counter:
    """How many graph uses each module path and attribute path has.

    A module called at two sites, or a weight read by two ops, counts twice: a pass that
    rewrites its tensors must give one site a private copy first (see `make_private`).
    """
    counts: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[node.target] += 1
            # a call reads the module's tensors too: `self.fc(x)` and `x @ self.fc.weight` share one
            module = gm.get_submodule(node.target)
            for name, _ in [*module.named_parameters(node.target), *module.named_buffers(node.target)]:
                counts[name] += 1
        elif node.op == "get_attr":
            counts[node.target] += max(sum(1 for user in node.users if not _reads_only_its_form(user, node)), 1)
    return counts


def _reads_only_its_form(user: torch.fx.Node, attr: torch.fx.Node) -> bool:
    """A read of the tensor that is no use of its data: its dtype or device (valid whatever a
    pass does to the tensor), or its size passed only to ops that read the tensor itself
    (nanoGPT's ``F.layer_norm(x, self.weight.shape, self.weight, self.bias)``: a pass that
    rewrites the weight rewrites that op)."""
    from .opview import metadata_read, size_read  # opview imports this module

    if metadata_read(user) is attr:
        return True
    read = size_read(user)
    return read is not None and read[0] is attr and bool(user.users) and all(u in attr.users for u in user.users)


def delete_unused_attributes(gm: torch.fx.GraphModule) -> int:
    """Drop the parameters and buffers no node reads, then the submodules no node uses.

    A tensor stays when a `get_attr` reads it (or a module above it) or a `call_module` calls
    its module (or one above it). Rewrites leave such tensors behind at any depth: a folded
    weight on the root, the weight of a `x @ self.weight.T` layer whose bias is still read.
    Returns how many tensors and submodules went.
    """
    used = _used_paths(gm)
    removed = 0
    for prefix, module in list(gm.named_modules()):
        for table in (module._parameters, module._buffers):
            for name in list(table):
                if not _at_or_under(f"{prefix}.{name}" if prefix else name, used):
                    del table[name]
                    removed += 1
    before = sum(1 for _ in gm.modules())
    delete_unused_submodules(gm)
    return removed + before - sum(1 for _ in gm.modules())


def delete_unused_submodules(gm: torch.fx.GraphModule) -> None:
    """Drop the submodules no `get_attr` or `call_module` of `gm`'s graph reaches: neither
    named, nor above a named one, nor inside one. (torch's `delete_all_unused_submodules` drops
    the modules inside a `get_attr`'d one: the branches of a torch.cond nested in a torch.cond
    branch, which only that branch's own graph names: every pipeline then failed, advB B12.)"""
    used = _used_paths(gm)
    for name, _ in list(gm.named_modules()):
        if name and not _at_or_under(name, used) and not any(u.startswith(name + ".") for u in used):
            gm.delete_submodule(name)


def _used_paths(gm: torch.fx.GraphModule) -> set[str]:
    """The attribute paths `gm`'s graph reads (`get_attr`) or calls (`call_module`)."""
    return {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}


def _at_or_under(path: str, used: set[str]) -> bool:
    """Whether `path` is one of `used` or inside one (``a.b.w`` under ``a.b``)."""
    parts = path.split(".")
    return any(".".join(parts[:i]) in used for i in range(1, len(parts) + 1))
