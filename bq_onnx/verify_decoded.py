"""The post-write check of big codebook weights: their decode computed by numpy from the written file's tensors.

onnxruntime decodes a codebook weight (``Cast`` of the codes to int32, ``Gather`` of the fp16 codebook, ``Cast``,
``Mul`` by the scales expanded to every row, ``Add`` of the offsets) through about 3-4x the weight's float32
bytes of intermediates, even unfolded and without the arena: a 256 MiB weight took the check's candidate session
to 1223 MiB (``benchmarks/streaming_memory.md``), past issue 21's bound of 1.5 x model + 1 GiB from about 0.33 GiB.

Where the written model's codebook decodes make more than :data:`CANDIDATE_DECODE_BYTES` of floats, the candidate
that verification runs is the written file with the biggest of them replaced by their result, computed here from
the codes, codebook, scales and offsets read back from the written file (blocks of rows, about 16 MiB of floats at
a time, straight to a temporary data file) by the graph's own operations in its order: the fp16 codebook entry as
float32, times the fp16 scale as float32, plus the fp16 offset as float32, each rounded once as onnxruntime does.
Every other node of the file still runs in onnxruntime, and the same decode nodes run there at smaller sizes
(every test model); a decode of another shape (vector codebooks, outliers, packed codes) is never replaced.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from bq_onnx.context import Context
from bq_onnx.qtensor import QuantizedTensor, num_blocks

#: Float bytes of codebook decodes the candidate session may compute itself (about 4x that transiently); above
#: it, the biggest are replaced by their numpy decode until the rest fit. 128 MiB: at most ~0.5 GiB of transient,
#: inside the bound's 1 GiB at any model size (a 128 MiB weight measured +405 MiB in its session).
CANDIDATE_DECODE_BYTES = 128 << 20
#: Floats decoded per step (a block of whole rows).
SLICE_BYTES = 16 << 20

_CODE_TYPES = (ir.DataType.UINT4, ir.DataType.UINT8)
_LAYOUT_OPS = ("Reshape", "Transpose", "Cast")  # restore_layout and the cast to the weight's own dtype


@dataclasses.dataclass
class CodebookDecode:
    """One weight's decode in the written graph: ``Cast(Gather(codebook, Cast(codes))) * scale [+ offset]``,
    then layout ops, yielding ``value`` (named as the weight)."""

    value: ir.Value
    codes: ir.Value
    codebook: ir.Value
    scale: ir.Value
    offset: ir.Value | None

    @property
    def nbytes(self) -> int:
        k, n = self.codes.const_value.shape
        return k * n * 4


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def _initializer(value: ir.Value | None, dtype: ir.DataType | tuple) -> ir.Value | None:
    if value is None or value.producer() is not None or value.const_value is None:
        return None
    kinds = dtype if isinstance(dtype, tuple) else (dtype,)
    return value if value.const_value.dtype in kinds else None


def _expanded_initializer(value: ir.Value) -> ir.Value | None:
    """The fp16 ``(nb, N)`` initializer that ``expand_blocks(Cast(...))`` repeats to ``value``."""
    while (node := value.producer()) is not None and node.op_type in ("Reshape", "Expand", "Slice"):
        value = node.inputs[0]
    cast = _producer(value, "Cast")
    return _initializer(cast.inputs[0], ir.DataType.FLOAT16) if cast is not None else None


def find_decode(graph: ir.Graph, name: str, qt: QuantizedTensor) -> CodebookDecode | None:
    """The codebook decode that computes weight ``name`` in the written main ``graph``, when it has exactly the
    native format's shape (``RewriteNativePass.emit``) and ``qt``'s sizes; None for anything else."""
    if qt.kind != "codebook" or qt.outlier_index is not None or qt.double_scales:
        return None
    value = next((o for node in graph for o in node.outputs if o.name == name), None)
    if value is None or value in graph.outputs:
        return None
    x = value
    while (node := x.producer()) is not None and node.op_type in _LAYOUT_OPS:  # up to the Mul or Add
        x = node.inputs[0]
    offset = None
    add = _producer(x, "Add")
    if add is not None:
        offset = _expanded_initializer(add.inputs[1])
        x = add.inputs[0]
        if offset is None:
            return None
    mul = _producer(x, "Mul")
    if mul is None:
        return None
    scale = _expanded_initializer(mul.inputs[1])
    level = _producer(mul.inputs[0], "Cast")
    gather = _producer(level.inputs[0], "Gather") if level is not None else None
    if scale is None or gather is None or gather.attributes.get_int("axis", 0) != 0:
        return None
    index = _producer(gather.inputs[1], "Cast")
    codebook = _initializer(gather.inputs[0], ir.DataType.FLOAT16)
    codes = _initializer(index.inputs[0], _CODE_TYPES) if index is not None else None
    if codebook is None or codes is None:
        return None
    k, n = qt.shape
    nb = num_blocks(k, qt.block_size)
    shapes = (tuple(codes.const_value.shape), tuple(scale.const_value.shape),
              None if offset is None else tuple(offset.const_value.shape))
    if shapes != ((k, n), (nb, n), None if offset is None else (nb, n)) or len(codebook.const_value.shape) != 1:
        return None
    return CodebookDecode(value, codes, codebook, scale, offset)


def big_decodes(graph: ir.Graph, ctx: Context, limit: int | None = None) -> list[CodebookDecode]:
    """The codebook decodes to replace: the biggest first, until the rest make at most ``limit`` float bytes
    (default :data:`CANDIDATE_DECODE_BYTES`)."""
    limit = CANDIDATE_DECODE_BYTES if limit is None else limit
    found = [d for name, qt in ctx.quantized.items() if isinstance(qt, QuantizedTensor)
             and (d := find_decode(graph, name, qt)) is not None]
    found.sort(key=lambda d: d.nbytes, reverse=True)
    rest = sum(d.nbytes for d in found)
    chosen = []
    for d in found:
        if rest <= limit:
            break
        chosen.append(d)
        rest -= d.nbytes
    return chosen


def _rows(d: CodebookDecode, block_size: int):
    """The decoded ``(K, N)`` view, a block of whole rows at a time (float32), from the written tensors."""
    codes = d.codes.const_value.numpy()  # 1 byte per code: a quarter of the float weight
    k, n = codes.shape
    table = d.codebook.const_value.numpy().astype(np.float32)
    scale = d.scale.const_value.numpy()
    offset = None if d.offset is None else d.offset.const_value.numpy()
    step = max(1, SLICE_BYTES // (4 * n * block_size)) * block_size
    for start in range(0, k, step):
        stop = min(start + step, k)
        b0, b1 = start // block_size, -(-stop // block_size)
        rows = np.repeat(np.arange(b0, b1), block_size)[: stop - start] - b0  # each row's block
        x = table[codes[start:stop].astype(np.intp)]
        x *= scale[b0:b1].astype(np.float32)[rows]
        if offset is not None:
            x += offset[b0:b1].astype(np.float32)[rows]
        yield x


def write_decoded(d: CodebookDecode, ctx: Context, data, name: str, base_dir: Path) -> ir.ExternalTensor:
    """Append weight ``name``'s decode to the open ``data`` file (4 KiB aligned); its tensor there."""
    info = ctx.weight(name)
    np_dtype = d.value.dtype.numpy() if d.value.dtype is not None else np.float32
    layout = info.layout
    data.write(b"\0" * (-data.tell() % 4096))
    offset = data.tell()
    qt = ctx.quantized[name]
    if len(layout.shape) == 2 and not layout.needs_transpose and tuple(layout.shape) == tuple(qt.shape):
        for x in _rows(d, qt.block_size):  # the view is the weight: rows go straight to the file
            x.astype(np_dtype, copy=False).tofile(data)
    else:
        view = np.concatenate(list(_rows(d, qt.block_size)), axis=0)
        np.ascontiguousarray(layout.from_view(view).astype(np_dtype, copy=False)).tofile(data)
        del view
    nbytes = data.tell() - offset
    dtype = d.value.dtype if d.value.dtype is not None else ir.DataType.FLOAT
    return ir.ExternalTensor(Path(data.name).name, offset, nbytes, dtype, shape=ir.Shape(list(layout.shape)),
                             name=name, base_dir=base_dir)


def decoded_candidate(path: str | os.PathLike, ctx: Context, folder: str | os.PathLike,
                      limit: int | None = None) -> Path | None:
    """The written model at ``path`` with its big codebook decodes (:func:`big_decodes`) replaced by their
    numpy decode, written into ``folder`` (the file's other tensors copied there by chunks); None when there is
    none to replace (run the written file itself)."""
    model = ir.load(os.fspath(path))
    chosen = big_decodes(model.graph, ctx, limit)
    if not chosen:
        return None
    folder = Path(folder)
    with open(folder / "candidate.onnx.data", "wb") as data:
        for d in chosen:
            name = d.value.name
            tensor = write_decoded(d, ctx, data, name, folder)
            d.value.name = f"{name}.bq_decoded_in_graph"  # detached below; frees the name
            new = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(list(tensor.shape)),
                           const_value=tensor)
            ir.convenience.replace_all_uses_with(d.value, new)
            model.graph.register_initializer(new)
        RemoveUnusedNodesPass()(model)
        ours = {d.value.name.removesuffix(".bq_decoded_in_graph") for d in chosen}
        for graph in model.graphs():
            for key, value in graph.initializers.items():
                tensor = value.const_value
                if key in ours or not isinstance(tensor, ir.ExternalTensor):
                    continue
                data.write(b"\0" * (-data.tell() % 4096))  # the written file's other tensors, by chunks
                offset = data.tell()
                tensor.tofile(data)
                value.const_value = ir.ExternalTensor(Path(data.name).name, offset, tensor.nbytes,
                                                      tensor.dtype, shape=ir.Shape(tensor.shape), name=key,
                                                      base_dir=folder)
    out = folder / "candidate.onnx"
    ir.save(model, out)
    return out
