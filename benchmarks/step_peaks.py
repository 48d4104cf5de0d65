"""Where an optimize run's memory peaks, step by step: ``BQ_ONNX_MEMTRACE`` lines with the kernel's high-water mark
reset after each (``/proc/self/clear_refs``), so each line's ``hwm`` is the peak since the line before, plus lines
around every guard or measuring session (``TempSessions.open``) and every weight's tables. A diagnostic: the reset
also resets ``ru_maxrss``, so the whole run's peak is what :mod:`benchmarks.streaming_memory` measures, not this.

Usage:  python -m benchmarks.step_peaks GIB [optimize options...]   (the model of benchmarks.scale.generate_single;
        the report goes to stdout as JSON, the trace to stderr)
"""

from __future__ import annotations

import importlib
import os
import sys


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError as exc:
        print(f"cannot reset the high-water mark: {exc}", file=sys.stderr)


def main(argv: list[str]) -> int:
    os.environ["BQ_ONNX_MEMTRACE"] = "1"
    import bq_onnx.progress as progress

    original = progress.memtrace

    def trace(step: str) -> None:
        original(step)
        _reset_peak()

    for name in ("bq_onnx.pipeline", "bq_onnx.verify", "bq_onnx.model_io", "bq_onnx.distributed"):
        module = importlib.import_module(name)
        if hasattr(module, "memtrace"):
            module.memtrace = trace
    from bq_onnx.runtimes import sessions
    from bq_onnx.stages import tables

    open_session, tensor = sessions.TempSessions.open, tables.TableRun.tensor

    def traced_open(self, model):
        trace("  session: before")
        session = open_session(self, model)
        trace(f"  session: after (#{self._count})")
        return session

    def traced_tensor(self, info):
        trace(f"  tables: {info.name} before")
        result = tensor(self, info)
        trace(f"  tables: {info.name} after")
        return result

    sessions.TempSessions.open, tables.TableRun.tensor = traced_open, traced_tensor
    from benchmarks.scale import generate_single
    from bq_onnx.cli import main as cli

    model, _ = generate_single(float(argv[0]))
    return cli(["optimize", str(model), "-o", str(model.with_name("model.bq.onnx")), "--force", "--json", *argv[1:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
