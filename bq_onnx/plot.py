"""The allocation plot: bits per layer (bars) and sensitivity per layer (line, log scale), as a PNG."""

from __future__ import annotations

import os

from bq_onnx.errors import UnsupportedError


def require_matplotlib() -> None:
    """Refuse ``--plot`` before any work when matplotlib is missing (exit 4, nothing written)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    except ImportError:
        raise UnsupportedError("--plot needs matplotlib: pip install 'bq-onnx[plot]' (nothing was written)") from None


def plot_allocation(report: dict, path: str | os.PathLike) -> None:
    """Write ``path`` from an optimize report (needs the ``plot`` extra: matplotlib)."""
    require_matplotlib()
    import matplotlib.pyplot as plt
    layers = report["layers"]
    names = [r["name"] for r in layers]
    bits = [r["bits_per_weight"] for r in layers]
    alloc = report.get("allocation", {}).get("layers", {})
    sensitivity = [alloc.get(n, {}).get("sensitivity") for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names) + 2), 4.2), dpi=120)
    xs = range(len(names))
    ax.bar(xs, bits, color="#4C72B0", label="bits per weight")
    ax.set_ylabel("bits per weight")
    ax.set_ylim(0, 8.5)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    title = f"{report['settings']['allocation']['allocator']} allocation"
    if "allocation" in report:
        title += f": {report['allocation']['achieved_bits']:.3f} bits/weight"
    ax.set_title(title)
    if any(s is not None and s > 0 for s in sensitivity):
        twin = ax.twinx()
        pts = [(x, s) for x, s in zip(xs, sensitivity) if s is not None and s > 0]
        twin.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="#C44E52", label="sensitivity")
        twin.set_yscale("log")
        twin.set_ylabel("sensitivity: loss/weight, 1 bit less", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
