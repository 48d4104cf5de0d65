"""Plain-text tables for the terminal (aligned columns, right-aligned numbers)."""

from __future__ import annotations

from collections.abc import Sequence

from bq_onnx.escape import escape


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def render(headers: Sequence[str], rows: Sequence[Sequence[object]], footer: Sequence[object] | None = None) -> str:
    cells = [[escape(c) for c in r] for r in rows]  # cells hold names from the model: shown, never obeyed
    all_rows = [list(headers), *cells] + ([[escape(c) for c in footer]] if footer else [])
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(headers))]
    numeric = [all(_is_number(r[i]) for r in cells) and bool(cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [line(all_rows[0]), rule, *(line(r) for r in cells)]
    if footer:
        out += [rule, line(all_rows[-1])]
    return "\n".join(out)


def _is_number(text: str) -> bool:
    head = text.split(" ")[0]
    try:
        float(head)
    except ValueError:
        return head in ("-", "")
    return True
