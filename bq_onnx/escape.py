"""Names are data: what a model calls its tensors, nodes, inputs and outputs is shown, never obeyed.

A model file is written by a stranger, and every name in it is arbitrary text: a newline could forge a second
``error:`` line, an ANSI escape could clear the screen or set the terminal's title. Everything bq-onnx prints for
people (errors, summaries, tables) passes through :func:`escape`; JSON output needs nothing, since ``json.dumps``
escapes control characters itself and keeps the name intact.
"""

from __future__ import annotations


def escape(text: object) -> str:
    """``text`` with every character that is not printable (control characters, line and paragraph separators,
    invisible format characters) written as a Python escape (``\\x1b``, ``\\u2028``); the space stays."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _code(ch) for ch in text)


def _code(ch: str) -> str:
    n = ord(ch)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"
