"""Running onnx-ir passes the way bq-onnx reports errors: through onnx-ir's ``PassManager``, with an error raised
inside a pass surfacing as itself (a user-facing :class:`bq_onnx.errors.BqError` keeps its one line and exit code)
rather than wrapped in the pass infrastructure's errors."""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir


def run_passes(model: ir.Model, passes: Sequence[ir.passes.PassBase]) -> ir.Model:
    """Run passes in order with onnx-ir's ``PassManager``; an error raised inside a pass surfaces as itself (a
    user-facing :class:`BqError` keeps its one line and exit code), not wrapped in the pass infrastructure's."""
    try:
        return ir.passes.PassManager(passes, steps=1)(model).model
    except (ir.passes.PassError, ir.passes.InvariantError) as exc:
        cause: BaseException = exc
        while isinstance(cause, (ir.passes.PassError, ir.passes.InvariantError)) and cause.__cause__ is not None:
            cause = cause.__cause__
        if cause is exc:
            raise
        raise cause from None
