"""Render DOT to SVG with Graphviz's `dot`, when it is installed; never fail a dump over it.

    >>> from pathlib import Path
    >>> import tempfile
    >>> dot_file = Path(tempfile.mkdtemp()) / "g.dot"
    >>> _ = dot_file.write_text("digraph { a -> b }")
    >>> svg, note = render_svg(dot_file)
    >>> (svg is not None and svg.exists()) or note.startswith("svg skipped")
    True
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

DEFAULT_TIMEOUT_S = 30.0


def render_svg(dot_file: Path, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[Path | None, str]:
    """(the .svg path, "") when `dot` rendered it, else (None, why it was skipped)."""
    exe = shutil.which("dot")
    if exe is None:
        return None, "svg skipped: Graphviz `dot` is not on PATH (install graphviz to get drawings)"
    svg_file = dot_file.with_suffix(".svg")
    try:
        subprocess.run([exe, "-Tsvg", str(dot_file), "-o", str(svg_file)], check=True,
                       capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        svg_file.unlink(missing_ok=True)
        return None, f"svg skipped: `dot` took longer than {timeout_s:g} s (lower collapse_threshold)"
    except (subprocess.CalledProcessError, OSError) as exc:
        svg_file.unlink(missing_ok=True)
        detail = getattr(exc, "stderr", b"") or b""
        reason = detail.decode(errors="replace").strip().splitlines()[:1] or [str(exc)]
        return None, f"svg skipped: `dot` failed: {reason[0]}"
    return svg_file, ""
