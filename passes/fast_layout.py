"""Native output laid out so that onnxruntime and OpenVINO run it at FP32 speed or faster (issue 17, item 3).

What the runtimes do with a ``DequantizeLinear`` on a constant weight (measured: ``benchmarks/output_speed.md``):

* onnxruntime never constant-folds a DequantizeLinear (its ConstantFolding skips them unless
  ``session.disable_quant_qdq=1``, which also turns the DQ+MatMul -> MatMulNBits fusion off). A DQ that is not
  fused into MatMulNBits therefore dequantizes its whole weight on every call: Conv, Gemm, Gather tables, weights
  split by width (DQ -> Concat) or transposed after decoding (LeNet 5-7x FP32). The fusion takes
  ``DequantizeLinear(axis=0, block_size=2^k >= 16) -> MatMul`` input B, except when the MatMul's only consumer is a
  Relu or Clip that feeds another node (its QDQ selectors then look for a QuantizeLinear after the "redundant clip"
  and give up): MatMul -> Relu -> MatMul stacks ran 9-89x slower than FP32. The same with a bias between
  (MatMul -> Add -> Relu, a torch Linear exported as MatMul + Add): onnxruntime fuses the three into a float
  FusedGemm first and dequantizes on every call (digits_mlp 4.46x FP32: ``benchmarks/output_speed_bias.md``).
* onnxruntime constant-folds ``Cast``, ``Reshape``, ``Sub`` and ``Mul`` on constants at session creation, and
  OpenVINO reads ``Convert -> Subtract -> Multiply`` on a constant as its own compressed-weight pattern.

So this pass, run after the native rewrite, keeps the DequantizeLinear ops that onnxruntime fuses and writes every
other one as that arithmetic (``(float(codes) - float(zero)) * scale``, per block through a Reshape): the same
numbers bit for bit (small integers convert exactly; one subtraction and one multiplication in float, as the
DequantizeLinear kernels compute), the same stored tensors (codes, zero points and scales keep their bytes and
names; blocked ones are stored with the block axis split, ``[K/B, B, N]`` and ``[K/B, 1, N]``, so that the decode
is OpenVINO's ``Convert -> Subtract -> Multiply -> Reshape`` with nothing in between: a Reshape after the Convert
made OpenVINO decompress a MiniLM embedding table on every call, 1.7x FP32 at batch 8). A Relu (or Clip) that
alone consumes a fused MatMul and feeds another node becomes ``Max(x, 0)`` (``Min(Max(x, lo), hi)``), which does
not block the fusion (NaN inputs aside, the same); so does one behind a bias Add.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_ir as ir

from bq_onnx.ort_fusion import fusable_blocking, sole_matmul_b

#: Code types onnxruntime's DQ+MatMul -> MatMulNBits fusion takes (1.32: 2-, 4- and 8-bit, PR 27614).
FUSED_CODES = frozenset({ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.INT8, ir.DataType.UINT8,
                         ir.DataType.INT2, ir.DataType.UINT2})
_STANDARD = ("", "ai.onnx")
#: Targets whose outputs get this layout (TensorRT and ROCm read QDQ on Conv/Gemm as int8 kernels: left as written).
FAST_LAYOUT_TARGETS = frozenset({"onnxruntime", "openvino"})


def fuses_into_matmul(dq: ir.Node) -> bool:
    """Whether onnxruntime's QDQ fusion turns this DequantizeLinear and the MatMul it feeds into MatMulNBits."""
    codes = dq.inputs[0]
    if not fusable_blocking(dq) or codes is None or codes.const_value is None:
        return False
    if codes.const_value.dtype not in FUSED_CODES or len(codes.const_value.shape) != 2:
        return False
    return sole_matmul_b(dq) is not None


class FastLayoutPass(ir.passes.InPlacePass):
    """Write the DequantizeLinear ops onnxruntime would run on every call as constant-foldable arithmetic, and
    unblock the MatMulNBits fusion behind Relu/Clip (module docstring)."""

    def __init__(self) -> None:
        self._consts: dict[str, ir.Value] = {}
        self._count = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self._consts = {}
        self._count = 0
        modified = False
        fused_matmuls = []
        for node in list(graph):
            if node.op_type != "DequantizeLinear" or node.domain not in _STANDARD:
                continue
            codes = node.inputs[0]
            if codes is None or codes.const_value is None:
                continue  # an activation's DequantizeLinear: not a stored weight
            if fuses_into_matmul(node):
                fused_matmuls.append((next(iter(node.outputs[0].uses())).node, _value_dtype(node.inputs[1])))
                continue
            modified |= self._arithmetic(graph, node)
        for matmul, dtype in fused_matmuls:
            modified |= self._unblock(graph, matmul, dtype)
        return ir.passes.PassResult(model, modified=modified)

    # ------------------------------------------------------------------------------------------- constants

    def _shape(self, graph: ir.Graph, dims: list[int]) -> ir.Value:
        """An int64 shape initializer, one per distinct shape, named by its content."""
        array = np.array(dims, dtype=np.int64)
        name = "bq.const.fold." + hashlib.sha1(array.tobytes()).hexdigest()[:10]
        if name not in self._consts:
            value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
            graph.register_initializer(value)
            self._consts[name] = value
        return self._consts[name]

    def _zero(self, graph: ir.Graph, dtype: ir.DataType, value: float = 0.0) -> ir.Value:
        array = np.array(value, dtype=dtype.numpy())
        name = f"bq.const.fold.{dtype.name.lower()}." + hashlib.sha1(array.tobytes()).hexdigest()[:10]
        if name not in self._consts:
            v = ir.Value(name=name, const_value=ir.tensor(array, name=name))
            graph.register_initializer(v)
            self._consts[name] = v
        return self._consts[name]

    # ---------------------------------------------------------------------------------------------- rewrites

    def _arithmetic(self, graph: ir.Graph, dq: ir.Node) -> bool:
        """``DequantizeLinear(codes, scale, [zero])`` -> ``Mul(Sub(Cast(codes), Cast(zero)), scale)``."""
        codes, scale = dq.inputs[0], dq.inputs[1]
        zero = dq.inputs[2] if len(dq.inputs) > 2 else None
        dtype = _value_dtype(scale)
        if dtype is None or scale is None:
            return False
        shape = [int(d) for d in codes.const_value.shape]
        rank = len(shape)
        attrs = {k: a.value for k, a in dq.attributes.items()}
        axis = int(attrs.get("axis", 1))
        block = int(attrs.get("block_size", 0))
        scale_rank = len(scale.shape) if scale.shape is not None else _const_rank(scale)
        if scale_rank is None:
            return False
        axis = axis + rank if axis < 0 else axis
        nodes: list[ir.Node] = []

        def op(op_type: str, inputs: list[ir.Value], label: str, **attributes: int) -> ir.Value:
            # short unnamed nodes and short value names: six nodes per weight, small models would grow by a third
            node = ir.Node("", op_type, inputs, attributes=[ir.AttrInt64(k, v) for k, v in attributes.items()])
            self._count += 1
            node.outputs[0].name = f"bq.f{self._count}"
            nodes.append(node)
            return node.outputs[0]

        x, param_shape = codes, None
        if scale_rank == 0:
            pass  # per tensor: a scalar scale and zero broadcast as they are
        elif block:
            if rank == 0 or shape[axis] % block:
                return False
            blocked = shape[:axis] + [shape[axis] // block, block] + shape[axis + 1:]
            param_shape = shape[:axis] + [shape[axis] // block, 1] + shape[axis + 1:]
        elif axis != rank - 1:
            param_shape = [1] * rank
            param_shape[axis] = shape[axis]
        # OpenVINO's compressed-weight pattern is Convert -> Subtract -> Multiply on constants of one shape, then
        # a Reshape: the stored codes, zero points and scales take the blocked shape themselves (same bytes, new
        # dims) so that nothing stands between them; a Reshape node is the fallback for shared tensors
        in_place = param_shape is not None and all(
            _can_reshape(v) for v in (codes if block else None, zero, scale) if v is not None)
        if in_place:
            if block:
                _reshape_stored(codes, blocked)
            for v in (zero, scale):
                if v is not None:
                    _reshape_stored(v, param_shape)
        x = op("Cast", [x], "codes", to=dtype.value)
        if block and not in_place:  # after the Cast: onnxruntime has no Reshape kernel for 4-bit types
            x = op("Reshape", [x, self._shape(graph, blocked)], "blocks")
        if zero is not None:
            z = op("Cast", [zero], "zero", to=dtype.value)
            if param_shape is not None and not in_place:
                z = op("Reshape", [z, self._shape(graph, param_shape)], "zero_shape")
            x = op("Sub", [x, z], "centered")
        s = scale if param_shape is None or in_place else \
            op("Reshape", [scale, self._shape(graph, param_shape)], "scale_shape")
        y = op("Mul", [x, s], "scaled")
        if block:
            y = op("Reshape", [y, self._shape(graph, shape)], "weight")
        out = dq.outputs[0]
        y.shape, y.type = ir.Shape(shape), ir.TensorType(dtype)
        graph.insert_before(dq, nodes)
        was_output, name = out.is_graph_output(), out.name
        out.replace_all_uses_with(y, replace_graph_outputs=True)
        graph.remove(dq, safe=True)
        y.name = name if was_output or name else y.name
        return True

    def _unblock(self, graph: ir.Graph, matmul: ir.Node, dtype: ir.DataType | None) -> bool:
        """A Relu/Clip that alone consumes ``matmul`` and feeds another node -> Max (and Min): the fusion stays."""
        out = matmul.outputs[0]
        uses = list(out.uses())
        if len(uses) != 1 or out.is_graph_output():
            return False
        act = uses[0].node
        if act.op_type == "Add" and act.domain in _STANDARD:  # a bias between: MatMul -> Add -> Relu
            bias_out = act.outputs[0]
            bias_uses = list(bias_out.uses())
            if len(bias_uses) != 1 or bias_out.is_graph_output():
                return False
            out, act = bias_out, bias_uses[0].node
        if act.op_type not in ("Relu", "Clip") or act.domain not in _STANDARD:
            return False
        act_out = act.outputs[0]
        if act_out.is_graph_output() or len(list(act_out.uses())) != 1:
            return False  # onnxruntime's selector only treats a single-consumer activation as a redundant clip
        dtype = _value_dtype(out) or _value_dtype(act_out) or dtype  # the MatMul computes in the scale's type
        if dtype is None:
            return False
        base = act.name or act_out.name
        nodes: list[ir.Node] = []
        if act.op_type == "Relu":
            lo, hi = self._zero(graph, dtype), None
        else:
            lo = act.inputs[1] if len(act.inputs) > 1 else None
            hi = act.inputs[2] if len(act.inputs) > 2 else None
            if "min" in act.attributes or "max" in act.attributes:
                return False  # Clip before opset 11: bounds as attributes (the rewrite brings opset 21)
        x = out
        if lo is not None:
            node = ir.Node("", "Max", [x, lo], name=f"{base}.max")
            nodes.append(node)
            x = node.outputs[0]
        if hi is not None:
            node = ir.Node("", "Min", [x, hi], name=f"{base}.min")
            nodes.append(node)
            x = node.outputs[0]
        if not nodes:
            return False
        x.shape, x.type = act_out.shape, act_out.type
        graph.insert_before(act, nodes)
        name = act_out.name
        act_out.replace_all_uses_with(x, replace_graph_outputs=True)
        graph.remove(act, safe=True)
        x.name = name
        for i, node in enumerate(nodes[:-1]):
            node.outputs[0].name = f"{base}.{'max' if i == 0 else 'min'}"
        return True


def _value_dtype(value: ir.Value | None) -> ir.DataType | None:
    """The element type of ``value``: its type, its constant, or the ``to`` of the Cast that makes it."""
    if value is None:
        return None
    if value.type is not None and value.type.dtype is not None:
        return value.type.dtype
    if value.const_value is not None:
        return value.const_value.dtype
    producer = value.producer()
    if producer is not None and producer.op_type == "Cast" and "to" in producer.attributes:
        return ir.DataType(producer.attributes["to"].value)
    return None


def _stored(value: ir.Value) -> ir.Value | None:
    """The initializer behind ``value`` (itself, or the input of the Cast that makes it), when nothing else reads
    it, else None."""
    if value.const_value is not None:
        return value if len(list(value.uses())) == 1 and not value.is_graph_output() else None
    producer = value.producer()
    if producer is not None and producer.op_type == "Cast" and len(list(value.uses())) == 1 and producer.inputs:
        source = producer.inputs[0]
        if source is not None and source.const_value is not None and len(list(source.uses())) == 1:
            return source
    return None


def _can_reshape(value: ir.Value) -> bool:
    return _stored(value) is not None


def _reshape_stored(value: ir.Value, dims: list[int]) -> None:
    """Give the stored tensor behind ``value`` the shape ``dims`` (same elements in the same order)."""
    source = _stored(value)
    assert source is not None
    array = np.asarray(source.const_value.numpy()).reshape(dims)
    source.const_value = ir.tensor(array, name=source.name)
    source.shape = ir.Shape(dims)
    if source is not value:  # the Cast's output
        value.shape = ir.Shape(dims)


def _const_rank(value: ir.Value) -> int | None:
    if value.const_value is not None:
        return len(value.const_value.shape)
    producer = value.producer()
    if producer is not None and producer.op_type == "Cast" and producer.inputs and producer.inputs[0] is not None:
        return _const_rank(producer.inputs[0])
    return None
