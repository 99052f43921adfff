"""The semantic op view: one record for an op, whichever IR spelled it.

`op_view(gm, node)` recognizes a node as, say, a conv — `call_module(nn.Conv2d)`,
`call_function(F.conv2d)`, `aten.conv2d` or `aten.convolution` — and returns an `OpView`:
the op kind, its tensor inputs, handles to its parameters, and its attributes under one set
of names. Passes match on `view.kind`, never on raw targets, so each pass works on symbolic
and torch.export graphs alike.

    >>> import torch, torch.fx
    >>> from fxopt.ir import op_view
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2)))
    >>> view = op_view(gm, next(n for n in gm.graph.nodes if n.op == "call_module"))
    >>> view.kind, view.attrs["stride"], tuple(view.param("weight").shape)
    ('conv', (2, 2), (8, 3, 3, 3))

The table below is data: one `OpSpec` per kind lists its spellings. Extending fxopt to a new
op is a row, not a new code path.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .bindings import aten_op_of
from .params import ParamRef, ref_for_get_attr

aten = torch.ops.aten


@dataclass
class OpView:
    """A node seen as a semantic op.

    - `kind`: canonical op name (`conv`, `linear`, `batch_norm`, `relu`, `add`, ...).
    - `inputs`: the activation tensors it consumes (nodes), in order.
    - `params`: name -> ParamRef for weights/biases/statistics it owns or reads via get_attr.
    - `attrs`: everything else under canonical names (stride, groups, eps, dim, ...).
    - `module`: the nn.Module for `call_module` nodes, else None.
    """

    node: torch.fx.Node
    kind: str
    inputs: list[torch.fx.Node]
    params: dict[str, ParamRef] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    module: nn.Module | None = None

    def param(self, name: str) -> torch.Tensor | None:
        ref = self.params.get(name)
        return None if ref is None else ref.get()

    def computed(self, name: str) -> torch.fx.Node | None:
        """The graph value a parameter argument reads where it is no stored tensor (a
        batchnorm's weight computed from an input: FiLM-style conditioning); None where it is
        stored, or not given. `param` returns None for both: a pass that folds the op must ask."""
        value = self.attrs.get(name)
        return value if isinstance(value, torch.fx.Node) else None

    @property
    def input(self) -> torch.fx.Node | None:
        return self.inputs[0] if self.inputs else None


@dataclass(frozen=True)
class OpSpec:
    """One op kind and how each IR spells it.

    `arg_names` gives the positional order for Python callables and `call_method` targets
    (ATen overloads carry their own schema). `tensor_args` are the argument names that hold
    activations, `param_args` the ones that may hold parameters.
    """

    kind: str
    functions: tuple = ()
    methods: tuple[str, ...] = ()
    aten: tuple = ()
    modules: tuple[type, ...] = ()
    arg_names: tuple[str, ...] = ("input",)
    tensor_args: tuple[str, ...] = ("input",)
    param_args: tuple[str, ...] = ()
    defaults: dict = field(default_factory=dict)
    module_attrs: Callable[[nn.Module], dict] | None = None
    #: ATen schema argument names -> canonical names, where an overload's schema differs from
    #: the Python spelling (aten.mm/bmm call `x @ W`'s W `mat2`, torch.matmul calls it `other`)
    renames: dict = field(default_factory=dict)
    #: arguments that change what the op computes beyond its kind, with their neutral value
    #: (add's `alpha`, div's `rounding_mode`): a pattern that does not name one in `attrs`
    #: matches only the neutral value, so no rewrite drops it
    modifiers: dict = field(default_factory=dict)
    #: the argument that collects the remaining positional args of a Python call
    #: (``torch.einsum(eq, a, b)``, ``x.permute(0, 2, 1)``), where one sequence in that place
    #: is taken as it is (`_holds_sequence`)
    varargs: str | None = None


def _conv_attrs(m: nn.Module) -> dict:
    return dict(
        stride=m.stride, padding=integer_padding(m.padding, m.kernel_size, m.dilation),
        dilation=m.dilation, groups=m.groups,
        transposed=isinstance(m, nn.modules.conv._ConvTransposeNd),
        output_padding=getattr(m, "output_padding", 0), dim=len(m.kernel_size),
        padding_mode=m.padding_mode,
    )


def integer_padding(padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> Any:
    """A conv's string padding as the integers it stands for, where there are such integers:
    ``"valid"`` is 0, ``"same"`` is ``d·(k−1)/2`` per side when that is whole (an odd total pads
    one side more, which no integer padding says, so the string stays). Kernels, fusions and
    int8 lowering all take integers; Hugging Face's EfficientNet writes every conv with "same".

        >>> integer_padding("same", (3, 5), (1, 1)), integer_padding("valid", (3, 3), (1, 1))
        ((1, 2), (0, 0))
        >>> integer_padding("same", (2, 2), (1, 1))
        'same'
    """
    if padding == "valid":
        return (0,) * len(kernel)
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        if all(t % 2 == 0 for t in totals):
            return tuple(t // 2 for t in totals)
    return padding


def _bn_attrs(m: nn.Module) -> dict:
    return dict(eps=m.eps, training=m.training or m.running_mean is None, momentum=m.momentum)


_VARIANCES = ("var", "std", "var_mean", "std_mean")
_ELEMENTWISE = dict(arg_names=("input", "other", "alpha"), tensor_args=("input", "other"))
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVT_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")

SPECS: tuple[OpSpec, ...] = (
    OpSpec("conv", functions=(F.conv1d, F.conv2d, F.conv3d), aten=(aten.conv1d, aten.conv2d, aten.conv3d),
           modules=(nn.Conv1d, nn.Conv2d, nn.Conv3d), arg_names=_CONV_ARGS, param_args=("weight", "bias"),
           defaults=dict(bias=None, stride=1, padding=0, dilation=1, groups=1, transposed=False,
                         output_padding=0, padding_mode="zeros"),
           module_attrs=_conv_attrs),
    OpSpec("conv", functions=(F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d),
           aten=(aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d),
           modules=(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), arg_names=_CONVT_ARGS,
           param_args=("weight", "bias"),
           defaults=dict(bias=None, stride=1, padding=0, dilation=1, groups=1, transposed=True,
                         output_padding=0, padding_mode="zeros"),
           module_attrs=_conv_attrs),
    OpSpec("conv", aten=(aten.convolution,), param_args=("weight", "bias"),
           arg_names=("input", "weight", "bias", "stride", "padding", "dilation", "transposed",
                      "output_padding", "groups"), defaults=dict(padding_mode="zeros")),
    OpSpec("linear", functions=(F.linear,), aten=(aten.linear,), modules=(nn.Linear,),
           arg_names=("input", "weight", "bias"), param_args=("weight", "bias"), defaults=dict(bias=None)),
    # addmm(bias, x, W) = bias + x @ W: a linear layer with its weight stored [in, out] (Hugging
    # Face GPT-2's Conv1D). Its own kind, not `linear`: passes matching linear assume [out, in].
    # ATen's names: `input` is the bias, `mat1` the activation, `mat2` the weight.
    OpSpec("addmm", functions=(torch.addmm,), methods=("addmm",), aten=(aten.addmm,),
           arg_names=("input", "mat1", "mat2", "beta", "alpha"), tensor_args=("mat1",),
           param_args=("input", "mat2"), defaults=dict(beta=1, alpha=1), modifiers=dict(beta=1, alpha=1)),
    OpSpec("batch_norm", functions=(F.batch_norm,), aten=(aten.batch_norm, aten._native_batch_norm_legit_no_training),
           modules=(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm),
           arg_names=("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
           param_args=("weight", "bias", "running_mean", "running_var"),
           defaults=dict(weight=None, bias=None, training=False, momentum=0.1, eps=1e-5),
           module_attrs=_bn_attrs),
    OpSpec("layer_norm", functions=(F.layer_norm,), aten=(aten.layer_norm,), modules=(nn.LayerNorm,),
           arg_names=("input", "normalized_shape", "weight", "bias", "eps"), param_args=("weight", "bias"),
           defaults=dict(weight=None, bias=None, eps=1e-5),
           module_attrs=lambda m: dict(normalized_shape=m.normalized_shape, eps=m.eps)),
    OpSpec("rms_norm", functions=(F.rms_norm,), aten=(aten.rms_norm,), modules=(nn.RMSNorm,),
           arg_names=("input", "normalized_shape", "weight", "eps"), param_args=("weight",),
           defaults=dict(weight=None, eps=None),
           module_attrs=lambda m: dict(normalized_shape=m.normalized_shape, eps=m.eps)),
    OpSpec("group_norm", functions=(F.group_norm,), aten=(aten.group_norm,), modules=(nn.GroupNorm,),
           arg_names=("input", "num_groups", "weight", "bias", "eps"), param_args=("weight", "bias"),
           defaults=dict(weight=None, bias=None, eps=1e-5),
           module_attrs=lambda m: dict(num_groups=m.num_groups, eps=m.eps)),
    # statistics per sample and channel; `use_input_stats` False reads the running ones (eval
    # with `track_running_stats`), like batch_norm
    OpSpec("instance_norm", functions=(F.instance_norm,), aten=(aten.instance_norm,),
           modules=(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d),
           arg_names=("input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps"),
           param_args=("weight", "bias", "running_mean", "running_var"),
           defaults=dict(running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                         momentum=0.1, eps=1e-5),
           module_attrs=lambda m: dict(use_input_stats=m.training or not m.track_running_stats, eps=m.eps)),
    OpSpec("relu", functions=(F.relu, torch.relu, torch.relu_), methods=("relu", "relu_"),
           aten=(aten.relu, aten.relu_), modules=(nn.ReLU,)),
    # relu6 is hardtanh(0, 6): its own row, so its clamp bounds are not hardtanh's defaults (-1, 1)
    OpSpec("hardtanh", functions=(F.relu6,), aten=(aten.relu6,), arg_names=("input", "inplace"),
           defaults=dict(min_val=0.0, max_val=6.0, inplace=False)),
    OpSpec("hardtanh", functions=(F.hardtanh,), aten=(aten.hardtanh, aten.hardtanh_),
           modules=(nn.Hardtanh, nn.ReLU6), arg_names=("input", "min_val", "max_val"),
           defaults=dict(min_val=-1.0, max_val=1.0),
           module_attrs=lambda m: dict(min_val=m.min_val, max_val=m.max_val)),
    OpSpec("hardswish", functions=(F.hardswish,), aten=(aten.hardswish, aten.hardswish_), modules=(nn.Hardswish,)),
    OpSpec("silu", functions=(F.silu,), aten=(aten.silu, aten.silu_), modules=(nn.SiLU,)),
    OpSpec("gelu", functions=(F.gelu,), aten=(aten.gelu,), modules=(nn.GELU,), arg_names=("input", "approximate"),
           defaults=dict(approximate="none"), module_attrs=lambda m: dict(approximate=m.approximate)),
    OpSpec("sigmoid", functions=(torch.sigmoid, F.sigmoid, torch.sigmoid_, torch.special.expit),
           methods=("sigmoid", "sigmoid_"), aten=(aten.sigmoid, aten.sigmoid_, aten.special_expit),
           modules=(nn.Sigmoid,)),
    OpSpec("tanh", functions=(torch.tanh, F.tanh, torch.tanh_), methods=("tanh", "tanh_"), aten=(aten.tanh, aten.tanh_),
           modules=(nn.Tanh,)),
    OpSpec("neg", functions=(torch.neg, operator.neg, torch.negative), methods=("neg", "negative"),
           aten=(aten.neg, aten.negative)),
    OpSpec("hardsigmoid", functions=(F.hardsigmoid,), aten=(aten.hardsigmoid, aten.hardsigmoid_),
           modules=(nn.Hardsigmoid,)),
    OpSpec("leaky_relu", functions=(F.leaky_relu,), aten=(aten.leaky_relu, aten.leaky_relu_),
           modules=(nn.LeakyReLU,), arg_names=("input", "negative_slope"), defaults=dict(negative_slope=0.01),
           module_attrs=lambda m: dict(negative_slope=m.negative_slope)),
    OpSpec("elu", functions=(F.elu,), aten=(aten.elu, aten.elu_), modules=(nn.ELU,),
           arg_names=("input", "alpha"), defaults=dict(alpha=1.0), module_attrs=lambda m: dict(alpha=m.alpha),
           modifiers=dict(alpha=1.0, scale=1, input_scale=1)),
    OpSpec("selu", functions=(F.selu,), aten=(aten.selu,), modules=(nn.SELU,)),
    OpSpec("celu", functions=(F.celu,), aten=(aten.celu,), modules=(nn.CELU,), arg_names=("input", "alpha"),
           defaults=dict(alpha=1.0), module_attrs=lambda m: dict(alpha=m.alpha), modifiers=dict(alpha=1.0)),
    OpSpec("mish", functions=(F.mish,), aten=(aten.mish, aten.mish_), modules=(nn.Mish,)),
    OpSpec("clamp", functions=(torch.clamp_min, torch.clamp_min_), methods=("clamp_min", "clamp_min_"),
           aten=(aten.clamp_min, aten.clamp_min_),
           arg_names=("input", "min"), defaults=dict(max=None)),
    OpSpec("clamp", functions=(torch.clamp_max, torch.clamp_max_), methods=("clamp_max", "clamp_max_"),
           aten=(aten.clamp_max, aten.clamp_max_),
           arg_names=("input", "max"), defaults=dict(min=None)),
    # more unary math: f(0) = 0 (abs .. softsign), f(0) finite but not 0 (exp, cos), f(0)
    # infinite (rsqrt, reciprocal)
    *(OpSpec(name, functions=(getattr(torch, name), *filter(None, [getattr(torch, f"{name}_", None)]), *functions),
             methods=(name, f"{name}_", *methods),
             aten=(getattr(aten, name), getattr(aten, f"{name}_"), *aliases),
             defaults=dict(decimals=0) if name == "round" else {})  # round(x, decimals=1) is another op
      for name, functions, methods, aliases in (
          ("abs", (torch.absolute,), ("absolute", "absolute_"), (aten.absolute, aten.absolute_)),
          ("erf", (torch.special.erf,), (), (aten.special_erf,)),
          ("trunc", (torch.fix, torch.fix_), ("fix", "fix_"), (aten.fix, aten.fix_)),
          *((name, (), (), ()) for name in ("sqrt", "square", "sin", "sign", "exp", "cos", "rsqrt", "reciprocal",
                                            "round", "floor", "ceil")))),
    OpSpec("softsign", functions=(F.softsign,), modules=(nn.Softsign,)),
    # NaN and ±inf replaced, every finite value (0 too) kept
    OpSpec("nan_to_num", functions=(torch.nan_to_num, torch.nan_to_num_), methods=("nan_to_num", "nan_to_num_"),
           aten=(aten.nan_to_num, aten.nan_to_num_), arg_names=("input", "nan", "posinf", "neginf"),
           defaults=dict(nan=0.0, posinf=None, neginf=None)),
    # `soft` tells them apart: a pattern written with one must not match the other
    *(OpSpec("shrink", functions=(function,), aten=(aten_op,), modules=(module,), arg_names=("input", "lambd"),
             defaults=dict(soft=soft, lambd=0.5), modifiers=dict(lambd=0.5),
             module_attrs=lambda m, soft=soft: dict(soft=soft, lambd=m.lambd))
      for function, aten_op, module, soft in ((F.softshrink, aten.softshrink, nn.Softshrink, True),
                                             (F.hardshrink, aten.hardshrink, nn.Hardshrink, False))),
    OpSpec("clamp", functions=(torch.clamp, torch.clip), methods=("clamp", "clip", "clamp_", "clip_"),
           aten=(aten.clamp, aten.clamp_, aten.clip, aten.clip_), arg_names=("input", "min", "max"),
           defaults=dict(min=None, max=None)),
    OpSpec("softplus", functions=(F.softplus,), aten=(aten.softplus,), modules=(nn.Softplus,),
           arg_names=("input", "beta", "threshold"), defaults=dict(beta=1.0, threshold=20.0),
           module_attrs=lambda m: dict(beta=m.beta, threshold=m.threshold)),
    # a slope per channel (or one for all): `weight` has 1 or C entries, on axis 1
    OpSpec("prelu", functions=(F.prelu, torch.prelu), aten=(aten.prelu, aten._prelu_kernel), modules=(nn.PReLU,),
           arg_names=("input", "weight"), param_args=("weight",)),
    OpSpec("add", functions=(operator.add, operator.iadd, torch.add), methods=("add", "add_"),
           aten=(aten.add, aten.add_), defaults=dict(alpha=1), modifiers=dict(alpha=1), **_ELEMENTWISE),
    OpSpec("sub", functions=(operator.sub, operator.isub, torch.sub, torch.subtract),
           methods=("sub", "sub_", "subtract", "subtract_"), aten=(aten.sub, aten.sub_, aten.subtract, aten.subtract_),
           defaults=dict(alpha=1), modifiers=dict(alpha=1), **_ELEMENTWISE),
    # export writes `3 - x` as rsub(x, 3) = 3 - x: the same sub with its operands named back
    OpSpec("sub", aten=(aten.rsub,), renames={"self": "other", "other": "input"},
           defaults=dict(alpha=1), modifiers=dict(alpha=1), **_ELEMENTWISE),
    OpSpec("mul", functions=(operator.mul, operator.imul, torch.mul, torch.multiply),
           methods=("mul", "mul_", "multiply", "multiply_"), aten=(aten.mul, aten.mul_, aten.multiply, aten.multiply_),
           **_ELEMENTWISE),
    OpSpec("div", functions=(operator.truediv, operator.itruediv, torch.div, torch.divide, torch.true_divide),
           methods=("div", "div_", "divide", "divide_", "true_divide", "true_divide_"),
           aten=(aten.div, aten.div_, aten.divide, aten.divide_, aten.true_divide, aten.true_divide_),
           modifiers=dict(rounding_mode=None), **_ELEMENTWISE),
    OpSpec("pow", functions=(torch.pow, operator.pow, operator.ipow), methods=("pow", "pow_"), aten=(aten.pow, aten.pow_),
           arg_names=("input", "exponent"), tensor_args=("input", "exponent")),
    OpSpec("matmul", functions=(torch.matmul, operator.matmul, torch.bmm, torch.mm), methods=("matmul", "bmm"),
           aten=(aten.matmul, aten.bmm, aten.mm), arg_names=("input", "other"), tensor_args=("input", "other"),
           renames={"mat2": "other"}),
    # beta * input + alpha * (batch1 @ batch2): Bloom's ALiBi bias added to q @ kᵀ in one call
    OpSpec("baddbmm", functions=(torch.baddbmm,), methods=("baddbmm",), aten=(aten.baddbmm,),
           arg_names=("input", "batch1", "batch2", "beta", "alpha"), tensor_args=("input", "batch1", "batch2"),
           defaults=dict(beta=1, alpha=1)),
    OpSpec("cat", functions=(torch.cat, torch.concat, torch.concatenate), aten=(aten.cat, aten.concat, aten.concatenate),
           arg_names=("tensors", "dim"),
           tensor_args=("tensors",), defaults=dict(dim=0)),
    # torch.dropout(x, p, train) and its kin name the flag `train`, as the aten ops do
    OpSpec("dropout", functions=(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                                 F.feature_alpha_dropout, torch.dropout, torch.alpha_dropout,
                                 torch.feature_dropout, torch.feature_alpha_dropout, torch.dropout_,
                                 torch.alpha_dropout_, torch.feature_dropout_, torch.feature_alpha_dropout_),
           aten=(aten.dropout, aten.feature_dropout, aten.alpha_dropout, aten.dropout_, aten.feature_dropout_,
                 aten.alpha_dropout_, aten.feature_alpha_dropout, aten.feature_alpha_dropout_),
           modules=(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout),
           arg_names=("input", "p", "training"), defaults=dict(p=0.5, training=True), renames={"train": "training"},
           module_attrs=lambda m: dict(p=m.p, training=m.training)),
    OpSpec("identity", modules=(nn.Identity,), aten=(aten.alias,)),
    # dtype / device / layout conversion; `Tensor.type` is not listed: with no argument it
    # returns a string
    # a cast: `x.to(torch.float64)` (a device or another tensor in that place: `_cast_attrs`),
    # and the methods that name their dtype
    OpSpec("to", methods=("to",), aten=(aten.to, aten._to_copy), arg_names=("input", "dtype")),
    *(OpSpec("to", methods=(method,), defaults=dict(dtype=dtype))
      for method, dtype in (("float", torch.float32), ("double", torch.float64), ("half", torch.float16),
                            ("bfloat16", torch.bfloat16))),
    # `x.type_as(y)`: a cast to y's dtype (Gemma's RMSNorm); y is read for its dtype only
    OpSpec("to", methods=("type_as",), aten=(aten.type_as,), arg_names=("input", "other")),
    # export's check of a value's dtype/device (and, when given, sizes/strides); no output
    OpSpec("assert_metadata", aten=(aten._assert_tensor_metadata,),
           arg_names=("input", "size", "stride", "dtype", "device", "layout"),
           defaults=dict(size=None, stride=None)),
    OpSpec("contiguous", methods=("contiguous",), aten=(aten.contiguous,)),
    # the value itself, cut from autograd (a straight-through estimator's ``(q - h).detach()``):
    # an alias in the forward, never dropped (training through the graph needs it)
    OpSpec("detach", functions=(torch.detach,), methods=("detach",), aten=(aten.detach,)),
    # a copy, never an alias (unlike contiguous, which may return its input)
    OpSpec("clone", functions=(torch.clone,), methods=("clone",), aten=(aten.clone,)),
    OpSpec("flatten", functions=(torch.flatten,), methods=("flatten",), aten=(aten.flatten,),
           modules=(nn.Flatten,), arg_names=("input", "start_dim", "end_dim"),
           defaults=dict(start_dim=0, end_dim=-1),
           module_attrs=lambda m: dict(start_dim=m.start_dim, end_dim=m.end_dim)),
    OpSpec("reshape", functions=(torch.reshape,), methods=("reshape", "view"),
           aten=(aten.reshape, aten.view, aten._unsafe_view), arg_names=("input", "shape"),
           varargs="shape", renames={"size": "shape"}),
    OpSpec("unflatten", functions=(torch.unflatten,), methods=("unflatten",), aten=(aten.unflatten,),
           modules=(nn.Unflatten,), arg_names=("input", "dim", "sizes"),
           module_attrs=lambda m: dict(dim=m.dim, sizes=tuple(m.unflattened_size))),
    # im2col: channel c of the input gives the rows c·k .. (c+1)·k - 1 of the output, k the
    # kernel's positions (not Tensor.unfold, a sliding window over one axis)
    OpSpec("unfold", functions=(F.unfold,), aten=(aten.im2col,), modules=(nn.Unfold,),
           arg_names=("input", "kernel_size", "dilation", "padding", "stride"),
           defaults=dict(dilation=1, padding=0, stride=1),
           module_attrs=lambda m: dict(kernel_size=m.kernel_size, dilation=m.dilation, padding=m.padding,
                                       stride=m.stride)),
    # every channel sampled at the same grid positions
    OpSpec("grid_sample", functions=(F.grid_sample,), aten=(aten.grid_sampler, aten.grid_sampler_2d,
                                                            aten.grid_sampler_3d),
           arg_names=("input", "grid"), tensor_args=("input", "grid")),
    OpSpec("movedim", functions=(torch.movedim, torch.moveaxis), methods=("movedim", "moveaxis"),
           aten=(aten.movedim, aten.moveaxis), arg_names=("input", "source", "destination")),
    OpSpec("permute", functions=(torch.permute,), methods=("permute",), aten=(aten.permute,),
           arg_names=("input", "dims"), varargs="dims"),
    # ``x.t()``: a 2-D transpose, nothing for 1-D: transpose(0, -1) either way
    OpSpec("transpose", functions=(torch.t,), methods=("t",), aten=(aten.t,), arg_names=("input", "dim0", "dim1"),
           defaults=dict(dim0=0, dim1=-1)),
    # ``x.mT``: the last two axes swapped (read as an attribute in symbolic graphs, `_ATTRIBUTE_OPS`)
    OpSpec("transpose", aten=(aten.mT,), arg_names=("input",), defaults=dict(dim0=-2, dim1=-1)),
    OpSpec("transpose", functions=(torch.transpose, torch.swapaxes, torch.swapdims),
           methods=("transpose", "swapaxes", "swapdims"), aten=(aten.transpose, aten.swapaxes, aten.swapdims),
           arg_names=("input", "dim0", "dim1"), renames={"axis0": "dim0", "axis1": "dim1"}),
    OpSpec("max_pool", functions=(F.max_pool1d, F.max_pool2d, F.max_pool3d),
           aten=(aten.max_pool1d, aten.max_pool2d, aten.max_pool3d),
           modules=(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d), arg_names=("input", "kernel_size", "stride",
                                                                         "padding", "dilation", "ceil_mode"),
           defaults=dict(return_indices=False)),  # the ATen ops of this row return no indices
    OpSpec("avg_pool", functions=(F.avg_pool1d, F.avg_pool2d, F.avg_pool3d),
           aten=(aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d),
           modules=(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d),
           arg_names=("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                      "divisor_override"),
           defaults=dict(stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None),
           modifiers=dict(count_include_pad=True, divisor_override=None),
           module_attrs=lambda m: dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                                       ceil_mode=m.ceil_mode, count_include_pad=m.count_include_pad,
                                       divisor_override=getattr(m, "divisor_override", None))),
    OpSpec("adaptive_avg_pool", functions=(F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d),
           aten=(aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d),
           modules=(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d),
           arg_names=("input", "output_size"), module_attrs=lambda m: dict(output_size=m.output_size)),
    # ATen's op (and `return_indices=True`) gives (values, indices)
    OpSpec("adaptive_max_pool", functions=(F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d),
           aten=(aten.adaptive_max_pool1d, aten.adaptive_max_pool2d, aten.adaptive_max_pool3d),
           modules=(nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d),
           arg_names=("input", "output_size", "return_indices"), defaults=dict(return_indices=False),
           module_attrs=lambda m: dict(output_size=m.output_size, return_indices=m.return_indices)),
    OpSpec("mean", functions=(torch.mean,), methods=("mean",), aten=(aten.mean,), arg_names=("input", "dim", "keepdim"),
           defaults=dict(dim=None, keepdim=False)),
    # reductions over axes besides mean and the p-norms (`dim` None: every axis)
    OpSpec("sum", functions=(torch.sum,), methods=("sum",), aten=(aten.sum,), arg_names=("input", "dim", "keepdim"),
           defaults=dict(dim=None, keepdim=False)),
    *(OpSpec(name, functions=(getattr(torch, name),), methods=(name,), aten=(getattr(aten, name),),
             arg_names=("input", "dim", "keepdim"), defaults=dict(dim=None, keepdim=False))
      for name in ("amax", "amin")),
    # variance / standard deviation over axes, and as (value, mean) tuples; `unbiased` is read
    # as the `correction` it stands for (True: 1, False: 0), the one attribute views have
    *(OpSpec(name, functions=(getattr(torch, name),), methods=(name,) if name in ("var", "std") else (),
             aten=(getattr(aten, name),), arg_names=("input", "dim", "unbiased", "keepdim"),
             defaults=dict(dim=None, keepdim=False), modifiers=dict(correction=1))
      for name in _VARIANCES),
    # copies of the entries: each `repeats` times in a row along `dim` (None: of the flattened
    # input), or the whole tensor tiled `repeats[i]` times along axis i
    OpSpec("repeat_interleave", functions=(torch.repeat_interleave,), methods=("repeat_interleave",),
           aten=(aten.repeat_interleave,), arg_names=("input", "repeats", "dim"), defaults=dict(dim=None)),
    OpSpec("repeat", methods=("repeat",), aten=(aten.repeat,), arg_names=("input", "repeats"), varargs="repeats"),
    # repeat with `repeats` padded with 1s in front to the input's rank
    OpSpec("tile", functions=(torch.tile,), methods=("tile",), aten=(aten.tile,), arg_names=("input", "repeats"),
           varargs="repeats", renames={"dims": "repeats"}),
    # a reshape to `other`'s shape; other's values are not read
    OpSpec("reshape_as", methods=("reshape_as", "view_as"), aten=(aten.reshape_as, aten.view_as),
           arg_names=("input", "other"), tensor_args=("input", "other")),
    # x / max(‖x‖_p over `dim`, eps)
    OpSpec("normalize", functions=(F.normalize,), arg_names=("input", "p", "dim", "eps"),
           defaults=dict(p=2.0, dim=1, eps=1e-12)),
    # the condition selects `input` where true, `other` elsewhere (either may be a number)
    OpSpec("where", functions=(torch.where,), aten=(aten.where,), arg_names=("condition", "input", "other"),
           tensor_args=("condition", "input", "other")),
    *(OpSpec(name, functions=(getattr(operator, name), getattr(torch, name), *[getattr(torch, a) for a in alias]),
             methods=(name, *alias), aten=(getattr(aten, name), *[getattr(aten, a) for a in alias]),
             arg_names=("input", "other"), tensor_args=("input", "other"))
      for name, alias in (("gt", ("greater",)), ("ge", ("greater_equal",)), ("lt", ("less",)),
                          ("le", ("less_equal",)), ("eq", ()), ("ne", ("not_equal",)))),
    # a new tensor of the input's shape, filled with one value
    OpSpec("fill_like", functions=(torch.zeros_like,), aten=(aten.zeros_like,), defaults=dict(fill_value=0)),
    OpSpec("fill_like", functions=(torch.ones_like,), aten=(aten.ones_like,), defaults=dict(fill_value=1)),
    OpSpec("fill_like", functions=(torch.full_like,), aten=(aten.full_like,), arg_names=("input", "fill_value")),
    # a new tensor of the given sizes with the input's dtype and device (none of its values)
    *(OpSpec("new_fill", methods=(method,), aten=(getattr(aten, method),), arg_names=("input", "size"),
             varargs="size", defaults=dict(fill_value=fill))
      for method, fill in (("new_zeros", 0), ("new_ones", 1), ("new_empty", None))),
    OpSpec("new_fill", methods=("new_full",), aten=(aten.new_full,), arg_names=("input", "size", "fill_value")),
    # max/min over an axis give (values, indices); of two tensors, the elementwise extremum
    # (`torch.max(x, y)` binds y as `dim`, so `dim` is a tensor argument too)
    *(OpSpec(name, functions=(getattr(torch, name),), methods=(name,), aten=(getattr(aten, name),),
             arg_names=("input", "dim", "keepdim"), tensor_args=("input", "other", "dim"),
             defaults=dict(dim=None, keepdim=False))
      for name in ("max", "min")),
    *(OpSpec(name, functions=(getattr(torch, name),), methods=(name,), aten=(getattr(aten, name),),
             arg_names=("input", "other"), tensor_args=("input", "other"))
      for name in ("maximum", "minimum")),
    OpSpec("stack", functions=(torch.stack,), aten=(aten.stack,), arg_names=("tensors", "dim"),
           tensor_args=("tensors",), defaults=dict(dim=0)),
    OpSpec("unbind", functions=(torch.unbind,), methods=("unbind",), aten=(aten.unbind,), arg_names=("input", "dim"),
           defaults=dict(dim=0)),
    # einsum(equation, *operands) or einsum(equation, [operands]): `varargs` collects them
    OpSpec("einsum", functions=(torch.einsum,), aten=(aten.einsum,), arg_names=("equation", "tensors"),
           tensor_args=("tensors",), varargs="tensors"),
    OpSpec("masked_fill", functions=(torch.masked_fill,), methods=("masked_fill", "masked_fill_"),
           aten=(aten.masked_fill, aten.masked_fill_),
           arg_names=("input", "mask", "value"), tensor_args=("input", "mask")),
    OpSpec("softmax", functions=(F.softmax, torch.softmax, torch.special.softmax), methods=("softmax",),
           aten=(aten.softmax, aten._softmax, aten.special_softmax),
           modules=(nn.Softmax,), arg_names=("input", "dim"), module_attrs=lambda m: dict(dim=m.dim)),
    OpSpec("log_softmax", functions=(F.log_softmax, torch.log_softmax), methods=("log_softmax",),
           aten=(aten.log_softmax, aten._log_softmax), modules=(nn.LogSoftmax,), arg_names=("input", "dim"),
           module_attrs=lambda m: dict(dim=m.dim)),
    OpSpec("embedding", functions=(F.embedding,), aten=(aten.embedding,), modules=(nn.Embedding,),
           arg_names=("input", "weight"), param_args=("weight",)),
    OpSpec("interpolate", functions=(F.interpolate,),
           aten=(aten.upsample_nearest1d, aten.upsample_nearest2d, aten.upsample_nearest3d,
                 aten._upsample_nearest_exact1d, aten._upsample_nearest_exact2d, aten._upsample_nearest_exact3d,
                 aten.upsample_linear1d, aten.upsample_bilinear2d, aten.upsample_trilinear3d,
                 aten.upsample_bicubic2d, aten._upsample_bilinear2d_aa, aten._upsample_bicubic2d_aa),
           modules=(nn.Upsample,), arg_names=("input", "size", "scale_factor", "mode")),
    OpSpec("sdpa", functions=(F.scaled_dot_product_attention,), aten=(aten.scaled_dot_product_attention,),
           arg_names=("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
           tensor_args=("query", "key", "value", "attn_mask")),
    OpSpec("getitem", functions=(operator.getitem,), arg_names=("input", "index")),
    OpSpec("split", functions=(torch.split,), methods=("split",), aten=(aten.split, aten.split_with_sizes),
           arg_names=("input", "split_size", "dim"), defaults=dict(dim=0)),
    OpSpec("chunk", functions=(torch.chunk,), methods=("chunk",), aten=(aten.chunk,),
           arg_names=("input", "chunks", "dim"), defaults=dict(dim=0)),
    # pieces by a count (the first `n % count` one longer) or at split points
    OpSpec("tensor_split", functions=(torch.tensor_split,), methods=("tensor_split",), aten=(aten.tensor_split,),
           arg_names=("input", "indices_or_sections", "dim"), defaults=dict(dim=0),
           renames={"sections": "indices_or_sections", "indices": "indices_or_sections",
                    "tensor_indices_or_sections": "indices_or_sections"}),
    OpSpec("expand", methods=("expand",), aten=(aten.expand,), arg_names=("input", "size"), varargs="size"),
    OpSpec("flip", functions=(torch.flip,), methods=("flip",), aten=(aten.flip,), arg_names=("input", "dims"),
           varargs="dims"),
    # the shape comes from `other`, whose values are not read
    OpSpec("expand_as", methods=("expand_as",), aten=(aten.expand_as,), arg_names=("input", "other"),
           tensor_args=("input", "other")),
    OpSpec("select", functions=(torch.select,), methods=("select",), aten=(aten.select,),
           arg_names=("input", "dim", "index")),
    OpSpec("glu", functions=(F.glu,), aten=(aten.glu,), modules=(nn.GLU,), arg_names=("input", "dim"),
           defaults=dict(dim=-1), module_attrs=lambda m: dict(dim=m.dim)),
    OpSpec("pixel_shuffle", functions=(F.pixel_shuffle,), aten=(aten.pixel_shuffle,), modules=(nn.PixelShuffle,),
           arg_names=("input", "upscale_factor"), module_attrs=lambda m: dict(upscale_factor=m.upscale_factor)),
    OpSpec("pixel_unshuffle", functions=(F.pixel_unshuffle,), aten=(aten.pixel_unshuffle,),
           modules=(nn.PixelUnshuffle,), arg_names=("input", "downscale_factor"),
           module_attrs=lambda m: dict(downscale_factor=m.downscale_factor)),
    OpSpec("roll", functions=(torch.roll,), methods=("roll",), aten=(aten.roll,),
           arg_names=("input", "shifts", "dims"), defaults=dict(dims=None)),
    # running sums and products along one axis (Mamba's and linear attention's scans over time)
    OpSpec("cumsum", functions=(torch.cumsum,), methods=("cumsum",), aten=(aten.cumsum,),
           arg_names=("input", "dim")),
    OpSpec("cumprod", functions=(torch.cumprod,), methods=("cumprod",), aten=(aten.cumprod,),
           arg_names=("input", "dim")),
    # p-norms over axes (GRN's torch.norm(x, p=2, dim=(1, 2), keepdim=True))
    # (torch.norm's `p` is vector_norm's `ord`: one name, so the two spellings compare)
    OpSpec("vector_norm", functions=(torch.norm,), methods=("norm",), arg_names=("input", "ord", "dim", "keepdim"),
           defaults=dict(ord="fro", dim=None, keepdim=False), renames={"p": "ord"}),
    OpSpec("vector_norm", functions=(torch.linalg.vector_norm,), aten=(aten.linalg_vector_norm,),
           arg_names=("input", "ord", "dim", "keepdim"), defaults=dict(ord=2, dim=None, keepdim=False)),
    OpSpec("unsqueeze", functions=(torch.unsqueeze,), methods=("unsqueeze",), aten=(aten.unsqueeze,),
           arg_names=("input", "dim")),
    # `dim` absent: every size-1 axis goes
    OpSpec("squeeze", functions=(torch.squeeze,), methods=("squeeze",), aten=(aten.squeeze,),
           arg_names=("input", "dim"), defaults=dict(dim=None)),
    OpSpec("pad", functions=(F.pad,), aten=(aten.pad, aten.constant_pad_nd),
           modules=tuple(getattr(nn, f"{kind}Pad{n}d") for kind in ("Constant", "Zero", "Reflection", "Replication",
                                                                     "Circular") for n in (1, 2, 3)),
           arg_names=("input", "pad", "mode", "value"), defaults=dict(mode="constant", value=None),
           module_attrs=lambda m: _pad_attrs(m)),
    OpSpec("slice", aten=(aten.slice,), arg_names=("input", "dim", "start", "end", "step"),
           defaults=dict(dim=0, start=None, end=None, step=1)),
    OpSpec("narrow", functions=(torch.narrow,), methods=("narrow",), aten=(aten.narrow,),
           arg_names=("input", "dim", "start", "length")),
    # gathers and scatter-adds by an index tensor (prune's own adapters among them)
    OpSpec("index_select", functions=(torch.index_select,), methods=("index_select",), aten=(aten.index_select,),
           arg_names=("input", "dim", "index"), param_args=("index",)),
    OpSpec("index_add", functions=(torch.index_add,), methods=("index_add",), aten=(aten.index_add,),
           arg_names=("input", "dim", "index", "source", "alpha"), tensor_args=("input", "source"),
           param_args=("index",), defaults=dict(alpha=1), modifiers=dict(alpha=1)),
    # export's advanced indexing ``x[i0, :, i2]``: `indices` one optional index tensor per axis
    OpSpec("index", aten=(aten.index,), arg_names=("input", "indices")),
)

# Index the table once: target -> spec.
_BY_FUNCTION: dict[Any, OpSpec] = {}
_BY_METHOD: dict[str, OpSpec] = {}
_BY_ATEN_PACKET: dict[Any, OpSpec] = {}
_BY_MODULE: dict[type, OpSpec] = {}
for _spec in SPECS:
    for _f in _spec.functions:
        _BY_FUNCTION.setdefault(_f, _spec)
    for _m in _spec.methods:
        _BY_METHOD.setdefault(_m, _spec)
    for _a in _spec.aten:
        _BY_ATEN_PACKET.setdefault(_a, _spec)
    for _t in _spec.modules:
        _BY_MODULE.setdefault(_t, _spec)

#: Attribute reads a symbolic trace keeps as ``getattr(x, name)`` that compute an op.
_ATTRIBUTE_OPS: dict[str, OpSpec] = {"mT": _BY_ATEN_PACKET[aten.mT]}

_SCHEMA_RENAMES = {"self": "input", "train": "training", "axis": "dim"}  # (`axis`: torch's numpy spelling)


def spec_for(gm: torch.fx.GraphModule, node: torch.fx.Node) -> OpSpec | None:
    """The table row that matches `node`, or None if fxopt has no view of it."""
    if node.op == "call_module":
        return _module_spec(gm.get_submodule(node.target))
    overload = aten_op_of(node) if node.op in ("call_function", "call_method") else None
    if overload is not None:  # an ATen op, called directly or through its eager binding
        return _BY_ATEN_PACKET.get(overload.overloadpacket)
    if node.op == "call_method":
        return _BY_METHOD.get(node.target)
    if node.op == "call_function":
        target = node.target
        if target is getattr and len(node.args) == 2 and isinstance(node.args[1], str):
            return _ATTRIBUTE_OPS.get(node.args[1])
        try:
            return _BY_FUNCTION.get(target)
        except TypeError:  # unhashable target
            return None
    return None


def _module_spec(module: nn.Module) -> OpSpec | None:
    """The row of the nearest table type `module` is an instance of, if it keeps that type's
    forward: `nn.MultiheadAttention`'s out_proj (a `NonDynamicallyQuantizableLinear`) is a
    linear. A parametrized module (weight_norm) computes its weight, and a module with forward
    hooks must be called (a rewrite into other ops would skip them): no row."""
    if parametrize.is_parametrized(module) or module._forward_hooks or module._forward_pre_hooks:
        return None
    for cls in type(module).__mro__:
        spec = _BY_MODULE.get(cls)
        if spec is not None:
            return spec if type(module).forward is cls.forward else None
    return None


def op_view(gm: torch.fx.GraphModule, node: torch.fx.Node) -> OpView | None:
    """The semantic view of `node`, or None when the node is no op fxopt knows."""
    spec = spec_for(gm, node)
    if spec is None:
        return None
    if node.op == "call_module":
        return _module_view(gm, node, spec)
    args = bind_arguments(node, spec)
    if spec.kind == "reshape" and any(names_a_dtype(a) for a in (*node.args[1:], *node.kwargs.values())):
        return None  # ``h.view(torch.int32)`` reinterprets the bytes: no reshape, no op fxopt knows
    view = _build_view(gm, node, spec, args)
    if view.kind == "matmul":
        return _matmul_as_linear(gm, view, args) or view
    return view


def names_a_dtype(value: Any) -> bool:
    """A dtype written in the graph (`torch.int32`) or read off a tensor (`h.dtype`)."""
    return isinstance(value, torch.dtype) or isinstance(value, torch.fx.Node) and metadata_read(value) is not None \
        and value.args[1:] == ("dtype",)


def size_read(node: torch.fx.Node) -> tuple[Any, Any] | None:
    """``(tensor, axis)`` when `node` reads a tensor's size — ``x.size(d)`` or ATen's
    ``sym_size(x, d)`` — or ``(tensor, None)`` for the whole size (``x.size()``, ``x.shape``);
    None for any other node. Passes that must know which values are shapes, not activations,
    ask here, so a new spelling is one line.

        >>> import torch, torch.fx
        >>> gm = torch.fx.symbolic_trace(lambda x: x.view(x.size(0), x.shape[1], -1))
        >>> [(n.name, size_read(n)) for n in gm.graph.nodes if size_read(n)]
        [('size', (x, 0)), ('getattr_1', (x, None))]
    """
    if node.op == "call_method" and node.target == "size" and node.args:
        return node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if node.op == "call_function" and node.args:
        if node.target is getattr and len(node.args) == 2 and node.args[1] == "shape":
            return node.args[0], None
        if node.target is aten.sym_size.int and len(node.args) == 2:
            return node.args[0], node.args[1]
    return None


# What a tensor's device, dtype and rank say does not change when its sizes do.
_METADATA_ATTRS = frozenset({"device", "dtype", "ndim", "layout", "is_cuda", "requires_grad"})
_METADATA_METHODS = frozenset({"dim", "get_device", "is_floating_point", "is_complex", "is_contiguous"})


def metadata_read(node: torch.fx.Node) -> Any:
    """The tensor whose size-independent metadata `node` reads — ``x.device``, ``x.dtype``,
    ``x.ndim``, ``x.dim()``, ``x.get_device()`` and the like — or None for any other node.
    Such a read stays valid when a pass reshapes or narrows the tensor, unlike `size_read`.

        >>> import torch, torch.fx
        >>> gm = torch.fx.symbolic_trace(lambda x: torch.arange(3, device=x.device) + x.dim())
        >>> [(n.name, metadata_read(n).name) for n in gm.graph.nodes if metadata_read(n) is not None]
        [('getattr_1', 'x'), ('dim', 'x')]
    """
    if node.op == "call_method" and node.target in _METADATA_METHODS and len(node.args) == 1:
        return node.args[0]
    if (node.op == "call_function" and node.target is getattr and len(node.args) == 2
            and node.args[1] in _METADATA_ATTRS):
        return node.args[0]
    return None


def bind_arguments(node: torch.fx.Node, spec: OpSpec) -> dict[str, Any]:
    """Positional and keyword args of a call_function/call_method node under canonical names,
    with the defaults of those not written."""
    overload = aten_op_of(node)
    renames = {**_SCHEMA_RENAMES, **spec.renames}
    bound = dict(spec.defaults)
    if overload is not None:
        bound.update({renames.get(a.name, a.name): a.default_value for a in overload._schema.arguments
                      if a.has_default_value()})
    bound.update(written_arguments(node, spec))
    return bound


def written_arguments(node: torch.fx.Node, spec: OpSpec) -> dict[str, Any]:
    """The args a call_function/call_method node writes, under canonical names: positional
    ones by the ATen schema or `spec.arg_names`, spread ones collected (`OpSpec.varargs`:
    ``x.permute(0, 2, 1)`` writes ``dims=(0, 2, 1)``), keyword ones renamed.

        >>> import torch, torch.fx
        >>> gm = torch.fx.symbolic_trace(lambda x: x.permute(0, 2, 1))
        >>> node = next(n for n in gm.graph.nodes if n.op == "call_method")
        >>> written_arguments(node, spec_for(gm, node))
        {'input': x, 'dims': (0, 2, 1)}
    """
    overload = aten_op_of(node)
    renames = {**_SCHEMA_RENAMES, **spec.renames}
    names = ([renames.get(a.name, a.name) for a in overload._schema.arguments] if overload is not None
             else list(spec.arg_names))
    positional = list(node.args)
    if overload is None and spec.varargs is not None and len(positional) > names.index(spec.varargs):
        at = names.index(spec.varargs)
        rest = positional[at:]
        if not (len(rest) == 1 and _holds_sequence(rest[0])):
            positional[at:] = [tuple(rest)]
    written = dict(zip(names, positional))
    for key, value in node.kwargs.items():
        written[renames.get(key, key)] = value
    return written


def _cast_attrs(node: torch.fx.Node) -> dict[str, Any]:
    """``x.to(...)``'s positional arguments by what they are: ``x.to("cpu", torch.float64)``,
    ``x.to(torch.float64)``, ``x.to(y)`` (y's dtype and device: `other`)."""
    found: dict[str, Any] = {"dtype": node.kwargs.get("dtype")}
    for value in node.args[1:]:
        if isinstance(value, torch.dtype):
            found["dtype"] = value
        elif isinstance(value, (str, torch.device)):
            found["device"] = value
        elif isinstance(value, torch.fx.Node):
            found["other"] = value
    return found


def _holds_sequence(value: Any) -> bool:
    """Whether one argument in a varargs place is the whole sequence: a list or tuple, or a node
    that yields one (``x.view(y.size())``, ``x.expand(y.shape)``); a number or a node reading one
    size (``x.repeat(n)``) is one entry of it."""
    if isinstance(value, (list, tuple)):
        return True
    if not isinstance(value, torch.fx.Node):
        return False
    read = size_read(value)
    if read is not None:
        return read[1] is None
    example = value.meta.get("val", value.meta.get("example_value"))
    return isinstance(example, (list, tuple, torch.Size))


def _build_view(gm: torch.fx.GraphModule, node: torch.fx.Node, spec: OpSpec, args: dict) -> OpView:
    inputs: list[torch.fx.Node] = []
    for name in spec.tensor_args:
        value = args.get(name)
        if isinstance(value, torch.fx.Node):
            inputs.append(value)
        elif isinstance(value, (list, tuple)):
            inputs.extend(v for v in value if isinstance(v, torch.fx.Node))
    params: dict[str, ParamRef] = {}
    for name in spec.param_args:
        value = args.get(name)
        if isinstance(value, torch.fx.Node) and value.op == "get_attr":
            params[name] = ref_for_get_attr(gm, value)
    # Tensor slots holding a scalar (`x + 1.0`) stay visible as attributes: passes must see them.
    skip = {name for name in spec.tensor_args if _holds_node(args.get(name))} | set(params)
    attrs = {k: _normalize_attr(spec, k, v) for k, v in args.items() if k not in skip}
    if spec.kind == "conv":
        weight = params.get("weight")
        w = weight.get() if weight is not None else None
        attrs.setdefault("dim", (w.dim() - 2) if w is not None else None)
        attrs["transposed"] = bool(attrs.get("transposed", False))
        if attrs.get("dim"):
            for key in ("stride", "dilation", "output_padding"):
                attrs[key] = _as_tuple(attrs.get(key, 0), attrs["dim"])
            padding = attrs.get("padding", 0)
            attrs["padding"] = (integer_padding(padding, tuple(w.shape[2:]), attrs["dilation"])
                                if isinstance(padding, str) and w is not None else _as_tuple(padding, attrs["dim"]))
    if spec.kind in ("max_pool", "avg_pool") and attrs.get("stride") in (None, [], ()):
        # a pool's stride defaults to its kernel (export writes the default as `[]`)
        attrs["stride"] = attrs.get("kernel_size")
    if spec.kind == "to" and node.op == "call_method" and node.target == "to":
        attrs.update(_cast_attrs(node))
    if spec.kind == "vector_norm" and attrs.get("ord") == "fro":
        attrs["ord"] = 2  # torch.norm's default: over the axes given, the 2-norm of their entries
    if spec.kind in _VARIANCES:
        unbiased, correction = attrs.pop("unbiased", None), attrs.get("correction")
        attrs["correction"] = correction if correction is not None else 0 if unbiased is False else 1
    return OpView(node, spec.kind, inputs, params, attrs)


# `W.T`, `W.t()`, `W.mT` and their ATen spellings: the transpose of a 2-D tensor, no arguments;
# the conjugate ones (`W.H`, `W.adjoint()`) are transposes of a real W.
_TRANSPOSE_METHODS = ("t", "numpy_T", "adjoint")
_TRANSPOSE_ATTRS = ("T", "mT", "H", "mH")
_TRANSPOSE_ATEN = (aten.t, aten.numpy_T, aten.mT, aten.mH, aten.matrix_H, aten.adjoint)
# `W.movedim(0, 1)`: moving one axis of two is a transpose
_MOVE_METHODS = ("movedim", "moveaxis")
_MOVE_ATEN = (aten.movedim, aten.moveaxis)


def transposed_parameter(gm: torch.fx.GraphModule, node: Any) -> torch.fx.Node | None:
    """The `get_attr` node of a 2-D parameter when `node` is that parameter transposed, else None."""
    if not isinstance(node, torch.fx.Node) or node.op not in ("call_function", "call_method") or not node.args:
        return None
    source = node.args[0]
    if not isinstance(source, torch.fx.Node) or source.op != "get_attr":
        return None
    if not _is_plain_transpose(node) and not _moves_one_of_two_axes(node):
        view = op_view(gm, node)  # transpose/permute: the table binds their axes in every IR
        if view is None or view.kind not in ("transpose", "permute") or not _swaps_2d(view):
            return None
    value = ref_for_get_attr(gm, source).get()
    return source if isinstance(value, torch.Tensor) and value.dim() == 2 and not value.is_complex() else None


def _is_plain_transpose(node: torch.fx.Node) -> bool:
    """`W.T`, `W.t()`, `W.mT`, `W.H`, `torch.t(W)` and their ATen forms: no axes to read."""
    overload = aten_op_of(node)
    if overload is not None:
        return overload.overloadpacket in _TRANSPOSE_ATEN
    if node.op == "call_method":
        return node.target in _TRANSPOSE_METHODS
    return node.target in (torch.t, torch.adjoint) or (node.target is getattr and len(node.args) == 2
                                                       and node.args[1] in _TRANSPOSE_ATTRS)


def _moves_one_of_two_axes(node: torch.fx.Node) -> bool:
    """`W.movedim(0, 1)` / `torch.moveaxis(W, 1, 0)`, axes of either sign, as plain integers."""
    overload = aten_op_of(node)
    moves = (overload.overloadpacket in _MOVE_ATEN if overload is not None
             else node.target in _MOVE_METHODS if node.op == "call_method"
             else node.target in (torch.movedim, torch.moveaxis))
    axes = [*node.args[1:], *node.kwargs.values()]
    return moves and len(axes) == 2 and all(type(a) is int for a in axes) and axes[0] % 2 != axes[1] % 2


def _swaps_2d(view: OpView) -> bool:
    """`transpose(w, 0, 1)` / `permute(w, (1, 0))`, axes of either sign: a 2-D transpose."""
    if view.kind == "transpose":
        dims = (view.attrs.get("dim0"), view.attrs.get("dim1"))
    else:
        dims = tuple(view.attrs.get("dims") or ())
    if len(dims) != 2 or not all(isinstance(d, int) for d in dims):
        return False
    first, second = (d % 2 for d in dims)
    return (first, second) == (1, 0) if view.kind == "permute" else first != second


def _matmul_as_linear(gm: torch.fx.GraphModule, view: OpView, args: dict) -> OpView | None:
    """`x @ W.T` with W a 2-D parameter [out, in] (Falcon's, and many hand-written layers)
    is a linear layer: viewed as one, it is pruned, quantized and lowered like nn.Linear."""
    x, weight = args.get("input"), transposed_parameter(gm, args.get("other"))
    if weight is None or not isinstance(x, torch.fx.Node):
        return None
    return OpView(view.node, "linear", [x], {"weight": ref_for_get_attr(gm, weight)}, {})


def _pad_attrs(m: nn.Module) -> dict:
    """F.pad's arguments of an `nn.*PadNd` module (a symbolic graph keeps it a module call; an
    export graph has the aten pad already)."""
    padding = nn.modules.padding
    mode = ("constant" if isinstance(m, padding._ConstantPadNd) else
            "reflect" if isinstance(m, padding._ReflectionPadNd) else
            "replicate" if isinstance(m, padding._ReplicationPadNd) else "circular")
    return dict(pad=tuple(m.padding), mode=mode, value=getattr(m, "value", None))


def _module_view(gm: torch.fx.GraphModule, node: torch.fx.Node, spec: OpSpec) -> OpView:
    module = gm.get_submodule(node.target)
    params = {
        name: ParamRef(module, name, f"{node.target}.{name}")
        for name in spec.param_args
        if getattr(module, name, None) is not None
    }
    attrs = spec.module_attrs(module) if spec.module_attrs else {}
    inputs = [a for a in node.args if isinstance(a, torch.fx.Node)]
    return OpView(node, spec.kind, inputs, params, attrs, module=module)


# ATen schemas give memory_format defaults as c10::MemoryFormat integers.
_MEMORY_FORMATS = {0: torch.contiguous_format, 1: torch.preserve_format, 2: torch.channels_last,
                   3: torch.channels_last_3d}


def _holds_node(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(isinstance(v, torch.fx.Node) for v in value)
    return isinstance(value, torch.fx.Node)


def _normalize_attr(spec: OpSpec, key: str, value: Any) -> Any:
    if spec.kind == "batch_norm" and key == "training" and value is None:
        return False
    if key == "memory_format" and isinstance(value, int) and not isinstance(value, bool):
        return _MEMORY_FORMATS.get(value, value)
    return value


def _as_tuple(value: Any, n: int) -> Any:
    if isinstance(value, str):  # padding="same"/"valid"
        return value
    if isinstance(value, (list, tuple)):
        return tuple(value) if len(value) == n else tuple(value) * (n // max(len(value), 1))
    return (value,) * n
