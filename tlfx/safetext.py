"""Escaping for text that comes from other people's files (class names, file names, store and model attributes).

Every value read from a store, a model file, a dataset or a file name passes through one of these before it
reaches a terminal, an HTML page or a Markdown file: markup stays text and control characters stay visible.
"""

from __future__ import annotations

import html as _html
import re

# C0 and C1 controls, DEL, and the Unicode bidirectional overrides/isolates that can reorder a printed line
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_MD_SPECIAL = re.compile(r"([\\`*_\[\]{}<>|#!~])")


def _visible(match: re.Match) -> str:
    c = match.group(0)
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


def terminal(value) -> str:
    """``value`` as one printable line: control characters (ANSI escapes, newlines, bidi overrides) as ``\\xNN``."""
    return _CONTROL.sub(_visible, str(value))


def html(value) -> str:
    """``value`` escaped for HTML text and quoted attribute values, control characters made visible."""
    return _html.escape(terminal(value), quote=True)


def markdown(value) -> str:
    """``value`` as literal text inside a Markdown paragraph or table cell (``|``, markup, newlines escaped)."""
    return _MD_SPECIAL.sub(r"\\\1", terminal(value))
