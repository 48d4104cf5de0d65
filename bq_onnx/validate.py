"""Static validation of a model against a target's capability profile (pure graph inspection, no runtime).

``validate(model, "tensorrt")`` lists every :class:`Violation`: a ``code`` (stable, for tools and tests), the
node or tensor it concerns and a one-line message. Codes:

``opset``              default-domain opset outside the target's range
``custom-domain``      a node in a domain the target does not read (model-local functions aside)
``local-function``     model-local functions the target cannot read (OpenVINO: inline them first)
``container``          a DequantizeLinear code type the target does not execute (e.g. int2)
``zero-point``         a non-zero (or non-constant) zero point on a symmetric-only target
``block-size``         a DequantizeLinear block_size the target does not accept
``block-axis``         blocked DequantizeLinear on an axis the target does not accept
``block-divisibility`` the blocked axis is not a multiple of the block size
``int4-per-axis``      int4 without blocks where the target needs blocked int4
``int4-consumer``      an int4 DequantizeLinear feeds (through Transpose/Reshape/Slice/Cast...) an op the target
                       does not run on int4 weights (TensorRT: MatMul/Gemm only)
``odd-last-dim``       int4 codes with an odd last dimension
``codebook``           a Gather-based codebook decode where the target needs uniform grids
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

import numpy as np
import onnx
import onnx_ir as ir

from bq_onnx.runtimes.base import Capabilities
from bq_onnx.runtimes.profiles import get_profile

#: ops that only move or re-type a weight between its DequantizeLinear and the op that consumes it
PASS_THROUGH = frozenset({"Transpose", "Reshape", "Slice", "Cast", "Squeeze", "Unsqueeze", "Identity", "Flatten",
                          "Expand", "Concat"})
CONTAINERS = {
    ir.DataType.INT4: "int4",
    ir.DataType.UINT4: "uint4",
    ir.DataType.INT8: "int8",
    ir.DataType.UINT8: "uint8",
    ir.DataType.INT2: "int2",
    ir.DataType.UINT2: "uint2",
    ir.DataType.INT16: "int16",
    ir.DataType.UINT16: "uint16",
    ir.DataType.INT32: "int32",
    ir.DataType.FLOAT8E4M3FN: "float8e4m3fn",
    ir.DataType.FLOAT8E5M2: "float8e5m2",
}
INT_CODES = frozenset({ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT2,
                       ir.DataType.UINT2})


@dataclasses.dataclass(frozen=True)
class Violation:
    code: str
    name: str  # node or tensor
    message: str

    def __str__(self) -> str:
        return f"[{self.code}] {self.name}: {self.message}"


def _load(model: str | os.PathLike | onnx.ModelProto | ir.Model) -> ir.Model:
    """The IR of ``model``; a file is read like every input (sizes, external data and the memory budget checked,
    external data read without memory maps) but not refused for what this validator reports (an opset)."""
    if isinstance(model, ir.Model):
        return model
    from bq_onnx.model_io import load_model

    return load_model(model, check_graph=False)


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is not None:
        return np.asarray(value.const_value.numpy())
    node = value.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        return np.asarray(node.attributes["value"].as_tensor().numpy())
    return None


def _dtype(value: ir.Value) -> ir.DataType | None:
    if value.dtype is not None:
        return value.dtype
    return value.const_value.dtype if value.const_value is not None else None


def _shape(value: ir.Value) -> tuple | None:
    shape = value.shape if value.shape is not None else (value.const_value.shape if value.const_value else None)
    if shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in shape)


def _final_consumers(value: ir.Value, seen: set | None = None) -> list[ir.Node]:
    """The nodes that use ``value``, looking through pass-through ops (data input only)."""
    seen = set() if seen is None else seen
    out = []
    for use in value.uses():
        node = use.node
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in PASS_THROUGH and node.domain in ("", "ai.onnx") and use.idx == 0:
            for o in node.outputs:
                out.extend(_final_consumers(o, seen))
        else:
            out.append(node)
    return out


def _nodes(graph: Iterable[ir.Node]) -> Iterable[ir.Node]:
    for node in graph:
        yield node
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield from _nodes(attr.value)
            elif attr.type == ir.AttributeType.GRAPHS:
                for g in attr.value:
                    yield from _nodes(g)


def _check_dq(node: ir.Node, p: Capabilities) -> list[Violation]:
    out: list[Violation] = []
    name = node.name or (node.outputs[0].name if node.outputs else "?")
    x = node.inputs[0]
    if x is None:
        return out
    dtype = _dtype(x)
    kind = CONTAINERS.get(dtype, str(dtype)) if dtype is not None else None
    if kind is not None and kind not in p.containers:
        out.append(Violation("container", x.name or name, f"{kind} DequantizeLinear codes: {p.name} executes "
                                                          f"{', '.join(sorted(p.containers))}"))
    zp = node.inputs[2] if len(node.inputs) > 2 else None
    if p.symmetric_only and zp is not None:
        value = _const(zp)
        if value is None or np.any(value.astype(np.int64) != 0):
            out.append(Violation("zero-point", zp.name or name, f"{p.name} needs symmetric weights (zero point 0 "
                                                                f"or absent)"))
    shape = _shape(x)
    rank = len(shape) if shape is not None else None
    block = node.attributes.get_int("block_size", 0)
    axis = node.attributes.get_int("axis", 1)
    if rank and axis < 0:
        axis += rank
    scale = node.inputs[1] if len(node.inputs) > 1 else None
    scale_shape = _shape(scale) if scale is not None else None
    per_tensor = scale_shape is not None and (len(scale_shape) == 0 or scale_shape == (1,))
    if block:
        if p.block_sizes is not None and block not in p.block_sizes:
            out.append(Violation("block-size", name, f"block_size {block}: {p.name} accepts "
                                                     f"{', '.join(map(str, sorted(p.block_sizes)))}"))
        if axis not in p.block_axes:
            out.append(Violation("block-axis", name, f"blocked on axis {axis}: {p.name} blocks on axis "
                                                     f"{', '.join(map(str, sorted(p.block_axes)))} only"))
        dim = shape[axis] if shape is not None and 0 <= axis < len(shape) else None
        if p.divisible_blocks and dim is not None and dim % block:
            out.append(Violation("block-divisibility", name, f"axis {axis} has {dim} elements, not a multiple of "
                                                             f"block_size {block}"))
    int4 = kind in ("int4", "uint4")
    if int4 and not block and p.int4_blocked_only and not per_tensor:
        out.append(Violation("int4-per-axis", name, f"{p.name} needs int4 weights blocked (block_size "
                                                    f"{'/'.join(map(str, sorted(p.block_sizes or [])))})"))
    if int4 and p.even_last_dim and shape and shape[-1] is not None and shape[-1] % 2:
        out.append(Violation("odd-last-dim", x.name or name, f"int4 codes of shape {list(shape)}: {p.name} needs an "
                                                             f"even last dimension"))
    if int4 and p.int4_ops is not None:
        for consumer in _final_consumers(node.outputs[0]):
            if consumer.op_type not in p.int4_ops:
                out.append(Violation("int4-consumer", name, f"int4 weights feed {consumer.op_type} "
                                                            f"'{consumer.name}': {p.name} runs int4 only into "
                                                            f"{', '.join(sorted(p.int4_ops))}"))
    return out


def _is_codebook(node: ir.Node) -> bool:
    """Gather(float table initializer, Cast(integer code initializer)): a codebook decode, scalar or vector
    (vector indices wider than 8 bits are uint16)."""
    if node.op_type != "Gather" or len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return False
    table, index = node.inputs[0], node.inputs[1]
    if _const(table) is None or not (_dtype(table) or ir.DataType.UNDEFINED).is_floating_point():
        return False
    src = index.producer()
    if src is not None and src.op_type == "Cast" and src.inputs[0] is not None:
        index = src.inputs[0]
    return index.const_value is not None and _dtype(index) in INT_CODES | {ir.DataType.UINT16}


def validate(model: str | os.PathLike | onnx.ModelProto | ir.Model, target: str | Capabilities) -> list[Violation]:
    """Every way ``model`` breaks ``target``'s profile (empty: none found)."""
    p = get_profile(target)
    m = _load(model)
    out: list[Violation] = []
    version = m.opset_imports.get("", m.opset_imports.get("ai.onnx"))
    if version is not None and not p.opsets[0] <= version <= p.opsets[1]:
        out.append(Violation("opset", "<model>", f"default opset {version}: {p.name} reads {p.opsets[0]}.."
                                                 f"{p.opsets[1]}"))
    functions = {(f.domain, f.name) for f in m.functions.values()}
    if m.functions and not p.local_functions:
        hint = " (inline them first: the openvino adapter does)" if p.name == "openvino" else ""
        out.append(Violation("local-function", ", ".join(sorted(f"{d}.{n}" for d, n in functions)),
                             f"{len(functions)} model-local function(s): {p.name} does not read them{hint}"))
    bodies = [m.graph, *(f for f in m.functions.values())]
    flagged_domains: set[str] = set()
    for body in bodies:
        for node in _nodes(body):
            domain = node.domain or ""
            if (domain, node.op_type) in functions:
                continue
            if domain not in p.domains and domain not in flagged_domains:
                flagged_domains.add(domain)
                out.append(Violation("custom-domain", node.name or node.op_type,
                                     f"op {domain}.{node.op_type}: {p.name} reads domains "
                                     f"{', '.join(repr(d) for d in sorted(p.domains))}"))
            if domain in ("", "ai.onnx") and node.op_type == "DequantizeLinear":
                out.extend(_check_dq(node, p))
            elif not p.codebooks and domain in ("", "ai.onnx") and _is_codebook(node):
                out.append(Violation("codebook", node.name or node.inputs[0].name,
                                     f"codebook (Gather) decode: {p.name} needs uniform symmetric grids"))
    return out
