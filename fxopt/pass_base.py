"""The pass contract: a pass is a dataclass whose fields are its options.

A pass has a class-level `name` (its name in pipeline text), typed options as dataclass fields,
and `preserves`: the analyses still valid after it changed the graph. `run(gm, ctx)` edits `gm`
(a private copy the manager owns) and returns a `PassResult`.

Rules every pass keeps, so the manager can promise the user's model is never touched:
- edit the graph and replace module attributes freely, but never write into an existing
  tensor in place (the manager shares tensors between its snapshot and the working copy and
  refuses a pass that bumps a tensor's version counter);
- record what changed in `PassResult.modified`; return stats worth printing.

Example — a pass that counts nodes and changes nothing::

    >>> import dataclasses, torch
    >>> from fxopt.pass_base import Pass, PassResult
    >>> @dataclasses.dataclass
    ... class CountNodes(Pass):
    ...     name = "count-nodes"
    ...     op: str = "call_function"
    ...     def run(self, gm, ctx):
    ...         n = sum(node.op == self.op for node in gm.graph.nodes)
    ...         return PassResult(gm, modified=False, stats={"count": n})
    >>> CountNodes.from_options({"op": "placeholder"}).op
    'placeholder'
"""
from __future__ import annotations

import dataclasses
import decimal
import enum
import functools
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch.fx

from .errors import PipelineError, did_you_mean

if TYPE_CHECKING:
    from .analysis import AnalysisManager
    from .calibration import ReadWhenUsed, StreamedBatches


@dataclass
class PassResult:
    """What a pass hands back: the module, whether it changed, and counters for the report.

    `modified=True` makes the manager recompile the module and drop the analyses the pass
    does not preserve; `stats` land in the pass's `PassRecord`.

        >>> import dataclasses, torch, fxopt
        >>> @dataclasses.dataclass
        ... class DropReLU(fxopt.Pass):
        ...     name = "drop-relu"
        ...     def run(self, gm, ctx):
        ...         relus = [n for n in gm.graph.nodes if n.target == torch.relu]
        ...         for n in relus:
        ...             n.replace_all_uses_with(n.args[0])
        ...             gm.graph.erase_node(n)
        ...         return fxopt.PassResult(gm, modified=bool(relus), stats={"removed": len(relus)})
        >>> gm = torch.fx.symbolic_trace(lambda x: torch.relu(x) + 1)
        >>> record = fxopt.PassManager([DropReLU()]).run(gm, (torch.randn(3),)).records[0]
        >>> record.modified, record.stats, record.nodes_before, record.nodes_after
        (True, {'removed': 1}, 4, 3)
    """

    module: torch.fx.GraphModule
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What the manager gives every pass besides the module.

    `example_inputs` are positional args (a tuple) and `example_kwargs` keyword args for the
    module; `calibration` holds `(args, kwargs)` pairs, one per batch, or is None when the
    user gave none: a list, a `fxopt.calibration.StreamedBatches` that reads a DataLoader
    again on each iteration (take its `len`, iterate it; never index it or hold it whole), or a
    `fxopt.calibration.ReadWhenUsed` (a generator, read into memory when first used);
    `reference` is the captured, unoptimized module for passes that compare against it.

        >>> import dataclasses, torch, fxopt
        >>> @dataclasses.dataclass
        ... class Inspect(fxopt.Pass):
        ...     name = "inspect"
        ...     def run(self, gm, ctx):
        ...         shapes = ctx.analyses.get(fxopt.ShapeAnalysis)   # runs on ctx.example_inputs
        ...         return fxopt.PassResult(gm, modified=False, stats={
        ...             "inputs": len(ctx.example_inputs), "out": tuple(shapes["output"].shape)})
        >>> res = fxopt.optimize(torch.nn.Linear(4, 2), torch.randn(3, 4), [Inspect()])
        >>> res.passes[0].stats
        {'inputs': 1, 'out': (3, 2)}
    """

    analyses: "AnalysisManager"
    example_inputs: tuple = ()
    example_kwargs: dict = field(default_factory=dict)
    calibration: list | StreamedBatches | ReadWhenUsed | None = None
    reference: torch.fx.GraphModule | None = None
    verbose: bool = False


@dataclass
class Pass:
    """Base of every pass. Subclasses are dataclasses; their fields are the pass options.

    Register one with `fxopt.register_pass` to name it in pipeline text, with its options:

        >>> import dataclasses, torch, fxopt
        >>> @fxopt.register_pass
        ... @dataclasses.dataclass
        ... class CountOps(fxopt.Pass):
        ...     name = "count-ops"
        ...     op: str = "call_function"
        ...     def run(self, gm, ctx):
        ...         n = sum(node.op == self.op for node in gm.graph.nodes)
        ...         return fxopt.PassResult(gm, modified=False, stats={"count": n})
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        >>> res = fxopt.optimize(model, torch.randn(2, 4), "count-ops{op=call_module},dce")
        >>> res.passes[0].stats, res.pipeline
        ({'count': 2}, 'count-ops{op=call_module},dce')
        >>> fxopt.unregister_pass("count-ops")
    """

    name: ClassVar[str] = ""
    #: Analyses (by name) still valid after this pass modified the graph.
    preserves: ClassVar[frozenset[str]] = frozenset()
    #: How verification holds this pass: "exact", "float", "int8" or "lossy" (fxopt.verify).
    tolerance: ClassVar[str] = "exact"
    #: Whether the pass reads the shapes recorded on the nodes (a batchnorm's channels, a
    #: layer's width): `PassManager.run` warns when such a pass runs on a graph without them.
    reads_shapes: ClassVar[bool] = True

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    # ----- options ------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.check_option_types()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """The option types are checked after a subclass's own `__post_init__` (which may
        normalize a value: one string for a tuple of them), so a pass built in Python is held to
        its option types however it validates the rest; a TypeError from its own checks (``"3" <
        1``) becomes the type check's error."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is not None and not getattr(own, "_checks_option_types", False):
            @functools.wraps(own)
            def __post_init__(self, *args: Any, **kw: Any) -> None:
                try:
                    own(self, *args, **kw)
                except TypeError:
                    self.check_option_types()  # say which option has the wrong type
                    raise
                self.check_option_types()

            __post_init__._checks_option_types = True  # type: ignore[attr-defined]
            cls.__post_init__ = __post_init__  # type: ignore[method-assign]

    def check_option_types(self) -> None:
        """Raise a ValueError naming the pass and the option when an option's value is not of
        its declared type: pipeline text converts text (``fold_bn=false``), but a pass built in
        Python takes the value as given, and ``Fuse(fold_bn="false")`` would read as true.

            >>> import fxopt
            >>> fxopt.get_pass("fuse")(fold_bn="false")
            Traceback (most recent call last):
            ...
            ValueError: pass 'fuse' option 'fold_bn' must be True or False, got 'false' (str)
        """
        hints = _option_hints(type(self))
        for f in dataclasses.fields(self):
            if f.init and f.name in hints:
                value = getattr(self, f.name)
                if not option_value_fits(value, hints[f.name]):
                    raise ValueError(f"pass '{self.name}' option '{f.name}' must be {_expected(hints[f.name])}, "
                                     f"got {value!r} ({type(value).__name__})")
                texts = [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)] \
                    if isinstance(value, (tuple, list)) else []
                if any("'" in t and '"' in t for t in texts):
                    # optimize records every pipeline as text, which would fail after the work is done
                    raise ValueError(f"pass '{self.name}' option '{f.name}': {value!r} holds both ' and \" marks, "
                                     "which pipeline text (the record of every run) cannot write; use one kind")

    @classmethod
    def option_specs(cls) -> dict[str, str]:
        """Option name -> readable type, for help text and error messages."""
        hints = typing.get_type_hints(cls)
        return {f.name: _type_label(hints[f.name]) for f in dataclasses.fields(cls) if f.init}

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "Pass":
        """Build the pass from option values (strings from pipeline text, or Python values)."""
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        values = {}
        for key, raw in options.items():
            if key not in fields:
                # options are dataclass fields: a subclass without @dataclass has only its base's
                hint = "" if "__dataclass_fields__" in cls.__dict__ else (
                    f" ({cls.__name__} is not a @dataclasses.dataclass, so its attributes are no options)")
                valid = did_you_mean(key, fields) if fields else "; it takes no options"
                raise PipelineError(f"pass '{cls.name}' has no option '{key}'" + valid + hint)
            try:
                values[key] = coerce_option(raw, hints[key])
            except (TypeError, ValueError) as exc:
                # `;` separates options in some tools' specs; pipeline text joins them with `,`
                hint = " (options are separated by ',')" if isinstance(raw, str) and ";" in raw else ""
                raise PipelineError(f"pass '{cls.name}' option '{key}': {exc}{hint}") from None
        try:
            instance = cls(**values)
        except (TypeError, ValueError) as exc:
            raise PipelineError(f"pass '{cls.name}': {exc}") from None
        return instance

    def options(self) -> dict[str, Any]:
        """The options that differ from their defaults (what pipeline text prints)."""
        out = {}
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else object()
            )
            if value != default:
                out[f.name] = value
        return out

    def __str__(self) -> str:
        from .pipeline import format_pass

        return format_pass(self)


def coerce_option(raw: Any, annotation: Any) -> Any:
    """Turn `raw` (often a string from pipeline text) into a value of `annotation`.

    Supports bool, int, float, str, Literal[...], Enum, Optional[X], X | None, and
    tuple[X, ...] / list[X] (text form `[a,b]` or `a;b`). Text in quotes (`'a,b'`, `"none"`)
    is that text. An int may be written as any number text that is exactly one (`4e6`, `8.0`).
    """
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if raw is None or (isinstance(raw, str) and raw.strip().lower() == "none"):
            if type(None) in args:
                return None
        if isinstance(raw, str) and _is_quoted(raw) and str in args:
            return raw[1:-1]  # quoted text is that text, not a number: output='1' is the key '1'
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce_option(raw, arg)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors))
    if isinstance(raw, str) and _is_quoted(raw) and origin not in (tuple, list):
        raw = raw[1:-1]  # quoted text stands for itself: 'a,b' is the text a,b, 'none' no None
    if origin is Literal:
        for choice in args:
            if raw == choice or (isinstance(raw, str) and str(choice) == raw):
                return choice
        raise ValueError(f"{raw!r} is not one of: {', '.join(map(str, args))}")
    if origin in (tuple, list):
        item_type = args[0] if args else str
        items = _split_list(raw) if isinstance(raw, str) else list(raw)
        values = [coerce_option(item, item_type) for item in items]
        return tuple(values) if origin is tuple else values
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        try:
            return raw if isinstance(raw, annotation) else annotation(raw)
        except ValueError:
            valid = ", ".join(str(m.value) for m in annotation)
            raise ValueError(f"{raw!r} is not one of: {valid}") from None
    if annotation is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean (true/false), got {raw!r}")
    if annotation in (int, float):
        if isinstance(raw, bool):
            raise ValueError(f"expected {annotation.__name__}, got a boolean")
        try:
            value = annotation(raw)
        except (TypeError, ValueError):
            value = _integral(raw) if annotation is int else None
            if value is None:
                raise ValueError(f"expected {annotation.__name__}, got {raw!r}") from None
        if annotation is int and isinstance(raw, float) and raw != value:
            raise ValueError(f"expected an integer, got {raw!r}")
        if isinstance(raw, str) and math.isinf(value) and raw.strip().lstrip("+-").lower() not in ("inf", "infinity"):
            raise ValueError(f"{raw!r} is beyond a float's range (it reads as an infinity); write inf where that is meant")
        return value
    if annotation is str:
        if not isinstance(raw, str):
            raise ValueError(f"expected text, got {raw!r}")
        return raw
    if annotation is Any:
        return raw
    raise TypeError(f"unsupported option type {annotation!r}")


def text_can_write(annotation: Any) -> bool:
    """Whether pipeline text can write a value of `annotation` (what `coerce_option` converts)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return all(a is type(None) or text_can_write(a) for a in args)
    if origin is Literal:
        return True
    if origin in (tuple, list):
        return all(a is Ellipsis or text_can_write(a) for a in args) if args else True
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return True
    return annotation in (bool, int, float, str, Any)


def option_value_fits(value: Any, annotation: Any) -> bool:
    """Whether a Python value is of an option's declared type: exactly a bool for bool (not
    the text "false"), a number but not a bool for int and float, text for str, one of the
    choices of a Literal; containers item by item. Types it does not know (a callable) fit."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(option_value_fits(value, arg) for arg in args)
    if annotation is type(None):
        return value is None
    if origin is Literal:
        return any(value == choice and type(value) is type(choice) for choice in args)
    if origin in (tuple, list):
        return isinstance(value, (tuple, list)) and all(option_value_fits(v, args[0] if args else Any)
                                                         for v in value)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        try:
            annotation(value)
        except (ValueError, TypeError):
            return isinstance(value, annotation)
        return True
    return True


def _expected(annotation: Any) -> str:
    """What an option must be, in words: "True or False", "an integer", "one of: a, b"."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_expected(a) for a in typing.get_args(annotation))
    if origin is Literal:
        return "one of: " + ", ".join(map(repr, typing.get_args(annotation)))
    words = {bool: "True or False", int: "an integer", float: "a number", str: "text (a str)",
             type(None): "None"}
    return words.get(annotation) or f"a {_type_label(annotation)}"


_HINTS: dict[type, dict[str, Any]] = {}


def _option_hints(cls: type) -> dict[str, Any]:
    """The type hints of a pass class's options, resolved once per class ({} when a hint names
    something that cannot be resolved: then nothing is checked)."""
    if cls not in _HINTS:
        try:
            _HINTS[cls] = typing.get_type_hints(cls)
        except Exception:  # noqa: BLE001  (a local class's annotation text; option_specs says more)
            _HINTS[cls] = {}
    return _HINTS[cls]


def _integral(text: Any) -> int | None:
    """The integer text such as ``4e6`` or ``8.0`` writes exactly, or None (``8.5``, ``1e``)."""
    if not isinstance(text, str):
        return None
    try:
        number = decimal.Decimal(text.strip().replace("_", ""))
    except decimal.InvalidOperation:
        return None
    if not number.is_finite() or number.adjusted() > 18 or number != number.to_integral_value():
        return None  # (an exponent past 10**18 is no option value, and int() of 1e999999999 never ends)
    return int(number)


def _split_list(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if "[" in without_quotes(text) or "]" in without_quotes(text):
        raise ValueError(f"an item of [{text}] holds a bracket: lists do not nest; quote an item that holds one "
                         "(['[b]'])")
    sep = ";" if ";" in without_quotes(text) else ","
    items, current, quote = [], [], None
    for ch in text:
        if quote is not None:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == sep:
            items.append("".join(current))
            current = []
            continue
        current.append(ch)
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def without_quotes(text: str) -> str:
    """`text` without its quoted parts (pipeline text and option values look past them).

        >>> without_quotes("ignore=['a,b'],ratio=0.5")
        'ignore=[],ratio=0.5'
    """
    out, quote = [], None
    for ch in text:
        if quote is not None:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        else:
            out.append(ch)
    return "".join(out)


def _is_quoted(text: str) -> bool:
    return len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" and text[0] not in text[1:-1]


#: Characters pipeline text gives a meaning to, or that a bare option value would lose.
_NEEDS_QUOTES = set(",;{}[]=\'\"")


def quote_option(value: str) -> str:
    """A text option as pipeline text writes it: bare when it reads back as itself, else in
    quotes (``'a,b'``; 'none' too, which an optional option reads as None, and text that reads as a
    number, which an ``int | str`` option would read as one).

        >>> quote_option("fc"), quote_option("a,b"), quote_option("none"), quote_option(" x ")
        ('fc', "'a,b'", "'none'", "' x '")
    """
    if (value and value == value.strip() and not (_NEEDS_QUOTES & set(value)) and value.lower() != "none"
            and not _reads_as_number(value)):
        return value
    for mark in ("'", '"'):
        if mark not in value:
            return f"{mark}{value}{mark}"
    raise ValueError(f"option text {value!r} holds both quote marks; pipeline text cannot write it")


def _reads_as_number(text: str) -> bool:
    """Whether an option of type `int | str` would read `text` as a number (so it is quoted)."""
    try:
        float(text)
    except ValueError:
        return _integral(text) is not None
    return True


def _type_label(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return "|".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_label(a) for a in args)
    if origin in (tuple, list):
        return f"list of {_type_label(args[0]) if args else 'str'}"
    if annotation is type(None):
        return "none"
    return getattr(annotation, "__name__", str(annotation))
