"""Bring any exported graph into the shape the rewrite needs: opset >= 21 and an IR version runtimes read."""

from __future__ import annotations

import onnx
import onnx.version_converter
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from bq_onnx.config import WeightsConfig
from bq_onnx.errors import ModelError
from bq_onnx.model_io import external_tensors, stream_external_tensors
from bq_onnx.weight_rules import fresh_name

#: DequantizeLinear with block_size and int4 containers need opset 21.
MIN_OPSET = 21
#: The newest IR version the supported onnxruntime releases load (onnx 1.23 would write 14).
MAX_RUNTIME_IR_VERSION = 10


def _min_ir_version(opset: int) -> int:
    for _release, ir_version, op_version, *_ in onnx.helper.VERSION_TABLE:
        if op_version >= opset:
            return ir_version
    return onnx.IR_VERSION


class UpgradeOpsetPass(ir.passes.FunctionalPass):
    """Convert the default-domain opset up to ``target`` with onnx's version converter (external data stays lazy)."""

    def __init__(self, target: int = MIN_OPSET) -> None:
        self.target = target

    def requires(self, model: ir.Model) -> None:
        known = onnx.defs.onnx_opset_version()
        current = model.opset_imports.get("", None)
        if current is None:
            raise ModelError("model has no default-domain opset import")
        if current > known:
            raise ModelError(f"model uses opset {current}, newer than the installed onnx knows ({known})")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        current = model.opset_imports[""]
        proto = ir.serde.serialize_model(model)
        if current < self.target:
            try:
                proto = onnx.version_converter.convert_version(proto, self.target)
            except Exception as exc:  # noqa: BLE001  the converter raises assorted C++ errors
                msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                raise ModelError(f"cannot convert the model from opset {current} to {self.target}: {msg}") from None
        new = ir.serde.deserialize_model(proto)
        stream_external_tensors(new, {t.name: t.base_dir for t in external_tensors(model) if t.base_dir})
        return ir.passes.PassResult(new, modified=current < self.target)

    def ensures(self, model: ir.Model) -> None:
        assert model.opset_imports[""] >= self.target


class SetIrVersionPass(ir.passes.InPlacePass):
    """Set the IR version to the lowest the opsets need, capped at what onnxruntime loads."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        needed = _min_ir_version(model.opset_imports.get("", MIN_OPSET))
        target = max(needed, min(model.ir_version, MAX_RUNTIME_IR_VERSION))
        modified = target != model.ir_version
        model.ir_version = target
        return ir.passes.PassResult(model, modified)


class UniqueInitializerNamesPass(ir.passes.InPlacePass):
    """Give subgraph initializers names no other graph's initializer has: weights are keyed by name (two ``If``
    branches may each hold a ``W``, and lifted ``Constant`` nodes keep their output names)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        seen: set[str] = set()
        modified = False
        for graph in model.graphs():
            for name, value in list(graph.initializers.items()):
                if name not in seen:
                    seen.add(name)
                    continue
                graph.initializers.pop(name)
                value.name = fresh_name(name, seen)
                graph.register_initializer(value)
                seen.add(value.name)
                modified = True
        return ir.passes.PassResult(model, modified)


def prepare_passes(config: WeightsConfig) -> list[ir.passes.PassBase]:
    """Constants to initializers (in whichever graph holds them), unique initializer names, inference
    BatchNormalization folded into its Conv, opset >= 21, a runtime-readable IR version."""
    from bq_onnx.passes.fold_batchnorm import FoldBatchNormPass

    return [
        LiftConstantsToInitializersPass(size_limit=config.min_size),
        UniqueInitializerNamesPass(),
        FoldBatchNormPass(),
        UpgradeOpsetPass(),
        SetIrVersionPass(),
    ]
