"""Pipeline text: `name{key=value,...}` joined by commas, MLIR style, and its printer.

The text round-trips: `parse_pipeline(format_pipeline(p))` builds the same passes, so a
pipeline can be stored in a report or a crash reproducer and run again.

    >>> from fxopt.pipeline import split_pipeline
    >>> split_pipeline("fuse, prune{ratio=0.5,ignore=[fc,head]}, dce")
    [('fuse', {}), ('prune', {'ratio': '0.5', 'ignore': '[fc,head]'}), ('dce', {})]
"""
from __future__ import annotations

import unicodedata
from typing import Any, Sequence

from .errors import PipelineError
from .pass_base import Pass, quote_option, without_quotes


def is_pass_name(name: str) -> bool:
    """Whether pipeline text can spell `name`: letters, digits, '-', '_' and '.'."""
    return bool(name) and all(c.isalnum() or c in "-_." for c in name)


def split_pipeline(text: str) -> list[tuple[str, dict[str, str]]]:
    """Parse pipeline text into (pass name, raw option strings) pairs, checking syntax only."""
    steps = []
    chunks = _split_top_level(text, ",", where=text)
    if len(chunks) > 1 and not any(c.strip() for c in chunks):
        # (a leading or trailing comma is let through for text joined from parts; here no part has a pass)
        raise PipelineError(f"pipeline '{text}' has commas and no pass: for an empty pipeline (capture and "
                            "verify only) give ''")
    for position, chunk in enumerate(chunks, 1):
        chunk = chunk.strip()
        if not chunk:
            if len(chunks) == 1 or (position == len(chunks) and text.strip().endswith(",")) \
                    or (position == 1 and text.strip().startswith(",")):
                continue  # an empty pipeline, or a trailing or leading comma (pipelines joined by text)
            raise PipelineError(f"empty item at position {position} of pipeline '{text}' (two commas in a "
                                "row?); remove it or put a pass there")
        if "{" in chunk:
            if not chunk.endswith("}"):
                raise PipelineError(f"in '{chunk}': options must end with '}}'")
            name, body = chunk[:-1].split("{", 1)
            options = _split_options(body, chunk)
        else:
            name, options = chunk, {}
        name = name.strip()
        if not is_pass_name(name):
            raise PipelineError(_bad_name(name, text))
        steps.append((name, options))
    return steps


def _split_options(body: str, chunk: str) -> dict[str, str]:
    """`key=value` items of one pass's `{...}`, by key (a trailing comma is allowed)."""
    if "}" in without_quotes(body):
        raise PipelineError(f"in '{chunk}': a pass takes one {{...}} of options; put them all in it, "
                            "separated by ','")
    items = _split_top_level(body, ",", where=chunk)
    options: dict[str, str] = {}
    for position, item in enumerate(items, 1):
        if not item.strip():
            if position == len(items) or len(items) == 1:
                continue  # `{}` or a trailing comma
            raise PipelineError(f"in '{chunk}': empty option at position {position} (two commas in a row?)")
        if "=" not in item:
            decimal = position > 1 and item.strip().isdigit() and items[position - 2].strip()[-1:].isdigit()
            hint = " (a decimal comma? numbers are written with '.', as 0.5)" if decimal else ""
            raise PipelineError(f"in '{chunk}': option '{item.strip()}' needs key=value{hint}")
        key, value = (part.strip() for part in item.split("=", 1))
        if not key:
            raise PipelineError(f"in '{chunk}': option '{item.strip()}' has no name before '='")
        if key in options:
            raise PipelineError(f"in '{chunk}': option '{key}' is given twice")
        options[key] = value
    return options


_CONTROL_NAMES = {"\t": "TAB", "\n": "LINE FEED", "\r": "CARRIAGE RETURN"}


def _bad_name(name: str, text: str) -> str:
    """Why `name` is no pass name, naming the first character pipeline text cannot hold."""
    if not name:
        return f"a pass name is missing in pipeline '{text}' (options '{{...}}' follow a pass name)"
    bad = next(c for c in name if not (c.isalnum() or c in "-_."))
    what = f"'{bad}'" if bad.isprintable() and not bad.isspace() else repr(bad)
    char = f"{what} (U+{ord(bad):04X} {unicodedata.name(bad, _CONTROL_NAMES.get(bad, 'a control character'))})"
    hint = (": separate passes with ','" if bad.isspace() or unicodedata.category(bad).startswith(("P", "Z", "C"))
            else "")
    return (f"bad pass name '{name}' in pipeline '{text}': it holds {char}; pass names are letters, digits, "
            f"'-', '_' and '.'{hint}")


def parse_pipeline(pipeline: str | Sequence[Pass | str]) -> list[Pass]:
    """Build passes from pipeline text, or from a list mixing Pass objects and text.

    Raises PipelineError for a syntax error, an unknown pass or option (with the closest
    names), or an option value of the wrong type.

        >>> import fxopt
        >>> passes = fxopt.parse_pipeline("fuse, prune{ratio=0.25,ignore=[fc]}")
        >>> [type(p).__name__ for p in passes], passes[1].ratio, passes[1].ignore
        (['Fuse', 'Prune'], 0.25, ('fc',))
    """
    from .registry import get_pass

    if isinstance(pipeline, str):
        return [get_pass(name).from_options(opts) for name, opts in split_pipeline(pipeline)]
    if not isinstance(pipeline, Sequence):
        raise PipelineError(f"a pipeline is text (\"fuse,quantize\") or a list of passes, got {pipeline!r}")
    passes: list[Pass] = []
    for item in pipeline:
        if isinstance(item, Pass):
            passes.append(item)
        elif isinstance(item, str):
            passes.extend(parse_pipeline(item))
        else:
            raise PipelineError(f"pipeline items must be Pass objects or text, got {item!r}")
    return passes


def format_pass(p: Pass) -> str:
    options = p.options()
    if not options:
        return p.name
    return p.name + "{" + ",".join(f"{k}={_format_value(v)}" for k, v in options.items()) + "}"


def format_pipeline(passes: Sequence[Pass]) -> str:
    """Text that `parse_pipeline` turns back into the same passes (options at their
    default are left out).

        >>> import fxopt
        >>> fxopt.format_pipeline(fxopt.parse_pipeline("dce,prune{ratio=0.5,round_to=8}"))
        'dce,prune{round_to=8}'
    """
    return ",".join(format_pass(p) for p in passes)


def _format_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if hasattr(value, "value") and not isinstance(value, (int, float, str)):
        return str(value.value)  # Enum
    if isinstance(value, str):
        return quote_option(value)
    return str(value)


def _split_top_level(text: str, sep: str, where: str) -> list[str]:
    """Split on `sep` outside {} and [] brackets and quoted text ('a,b' or "a,b")."""
    parts, current = [], []
    pairs = {"{": "}", "[": "]"}
    stack: list[str] = []
    quote = None
    for ch in text:
        if quote is not None:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in pairs:
            stack.append(pairs[ch])
        elif ch in pairs.values():
            if not stack:
                raise PipelineError(f"unbalanced '{ch}' in '{where}'")
            if stack[-1] != ch:
                raise PipelineError(f"in '{where}': '{ch}' before the '{stack[-1]}' that closes an open "
                                    f"'{_OPENS[stack[-1]]}'")
            stack.pop()
        if ch == sep and not stack and quote is None:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if quote is not None:
        other = "\"" if quote == "'" else "'"
        raise PipelineError(f"missing closing {quote} in '{where}' (a {quote} opens quoted text; put text that "
                            f"holds one in {other} marks: {other}it{quote}s{other})")
    if stack:
        raise PipelineError(f"missing '{stack[-1]}' in '{where}'")
    parts.append("".join(current))
    return parts


_OPENS = {"}": "{", "]": "["}


