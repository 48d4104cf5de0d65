"""The post-write check of big codebook weights: their decode computed by numpy from the written file's tensors.

onnxruntime decodes a codebook weight (``Cast`` of the codes to int32, ``Gather`` of the fp16 codebook, ``Cast``,
``Mul`` by the scales expanded to every row, ``Add`` of the offsets) through about 3-4x the weight's float32
bytes of intermediates, even unfolded and without the arena: a 256 MiB weight took the check's candidate session
to 1223 MiB (``benchmarks/streaming_memory.md``), past issue 21's bound of 1.5 x model + 1 GiB from about 0.33 GiB.

Where the written model's codebook decodes make more than :data:`CANDIDATE_DECODE_BYTES` of floats, the candidate
that verification runs is the written file with the biggest of them replaced by their result, computed here from
the codes, codebook, scales and offsets read back from the written file (blocks of rows, about 16 MiB of floats at
a time, straight to a temporary data file) by the graph's own operations in its order: the fp16 codebook entry as
float32, times the fp16 scale as float32, plus the fp16 offset as float32, each rounded once as onnxruntime does
(``tests/test_streaming_verify.py`` compares them bit for bit). Only these decode nodes are replaced (found by
their shape, ``RewriteNativePass.emit``'s, whatever weight or piece of one they decode), with the ``Concat`` that
joins a weight's pieces when all of them are such decodes; every other node of the file, the layout ops included,
still runs in onnxruntime, and the same decode nodes run there
at smaller sizes (every test model). A decode of another shape (vector codebooks, outliers, packed codes) is never
replaced.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from bq_onnx.qtensor import num_blocks

#: Float bytes of codebook decodes the candidate session may compute itself (about 4x that transiently); above
#: it, the biggest are replaced by their numpy decode until the rest fit. 128 MiB: at most ~0.5 GiB of transient,
#: inside the bound's 1 GiB at any model size (a 128 MiB weight measured +405 MiB in its session).
CANDIDATE_DECODE_BYTES = 128 << 20
#: Floats decoded per step (a block of whole rows).
SLICE_BYTES = 16 << 20

_CODE_TYPES = (ir.DataType.UINT4, ir.DataType.UINT8)


@dataclasses.dataclass
class CodebookDecode:
    """One decode in the written graph: ``value = Cast(Gather(codebook, Cast(codes))) * scale [+ offset]``, the
    fp16 scales and offsets ``(nb, N)`` repeated to every row of their block of ``block`` rows."""

    value: ir.Value
    codes: ir.Value
    codebook: ir.Value
    scale: ir.Value
    offset: ir.Value | None
    block: int

    @property
    def nbytes(self) -> int:
        k, n = self.codes.const_value.shape
        return k * n * 4


def _producer(value: ir.Value | None, op_type: str, to: ir.DataType | None = None) -> ir.Node | None:
    node = value.producer() if value is not None else None
    if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx"):
        return None
    return node if to is None or node.attributes.get_int("to") == to else None


def _initializer(value: ir.Value | None, dtype: ir.DataType | tuple) -> ir.Value | None:
    if value is None or value.producer() is not None or value.const_value is None:
        return None
    kinds = dtype if isinstance(dtype, tuple) else (dtype,)
    return value if value.const_value.dtype in kinds else None


def _expanded(value: ir.Value, k: int) -> tuple[ir.Value, int] | None:
    """The fp16 ``(nb, N)`` initializer that ``expand_blocks(Cast(...))`` repeats to ``value`` and its block
    rows (``k`` when there is one block: a ``(1, N)`` row that broadcasts)."""
    block = k
    while (node := value.producer()) is not None and node.op_type in ("Reshape", "Expand", "Slice"):
        if node.op_type == "Expand":
            shape = _initializer(node.inputs[1], ir.DataType.INT64)
            if shape is None or shape.const_value.shape != (3,):
                return None
            block = int(shape.const_value.numpy()[1])
        value = node.inputs[0]
    cast = _producer(value, "Cast", ir.DataType.FLOAT)
    scale = _initializer(cast.inputs[0], ir.DataType.FLOAT16) if cast is not None else None
    return None if scale is None else (scale, block)


def find_decode(node: ir.Node) -> CodebookDecode | None:
    """The codebook decode whose last node (its ``Mul``, or the ``Add`` of offsets after it) is ``node``, when it
    has exactly the native format's shape and consistent sizes; None for anything else."""
    offset = None
    if node.op_type == "Add" and node.domain in ("", "ai.onnx"):
        mul = _producer(node.inputs[0], "Mul")
        added = _expanded(node.inputs[1], -1) if mul is not None else None
        if added is None:
            return None
        offset, offset_block = added
    elif node.op_type == "Mul" and node.domain in ("", "ai.onnx"):
        mul = node
    else:
        return None
    level = _producer(mul.inputs[0], "Cast", ir.DataType.FLOAT)
    gather = _producer(level.inputs[0], "Gather") if level is not None else None
    if gather is None or gather.attributes.get_int("axis", 0) != 0:
        return None
    index = _producer(gather.inputs[1], "Cast", ir.DataType.INT32)
    codebook = _initializer(gather.inputs[0], ir.DataType.FLOAT16)
    codes = _initializer(index.inputs[0], _CODE_TYPES) if index is not None else None
    if codebook is None or codes is None or len(codes.const_value.shape) != 2:
        return None
    k, n = codes.const_value.shape
    scaled = _expanded(mul.inputs[1], k)
    if scaled is None or len(codebook.const_value.shape) != 1:
        return None
    scale, block = scaled
    if offset is not None and offset_block not in (-1, block):
        return None
    nb = num_blocks(k, block)
    if block < 1 or scale.const_value.shape != (nb, n) or (offset is not None and offset.const_value.shape != (nb, n)):
        return None
    return CodebookDecode(node.outputs[0], codes, codebook, scale, offset, block)


@dataclasses.dataclass
class Replacement:
    """A value to replace by its numpy decode: one decode's, or a ``Concat`` of decodes along the columns (a
    weight stored in pieces: the join is done here too, row by row, instead of a second copy in the runtime)."""

    value: ir.Value
    parts: list[CodebookDecode]

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes for d in self.parts)

    @property
    def shape(self) -> tuple[int, int]:
        return self.parts[0].codes.const_value.shape[0], sum(d.codes.const_value.shape[1] for d in self.parts)

    def rows(self):
        """The decoded ``(K, N)`` value, a block of whole rows at a time (float32)."""
        step = max(1, SLICE_BYTES // (4 * self.shape[1]))
        for pieces in zip(*(_rows(d, step) for d in self.parts)):
            yield pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=1)


def _joined(node: ir.Node, decodes: dict[int, CodebookDecode]) -> list[CodebookDecode] | None:
    """The decodes a ``Concat`` along the columns of 2-D values joins, when all its inputs are decodes."""
    if node.op_type != "Concat" or node.domain not in ("", "ai.onnx") or node.attributes.get_int("axis") not in (1, -1):
        return None
    parts = [decodes.get(id(v)) for v in node.inputs]
    if not parts or any(d is None for d in parts) or len({d.codes.const_value.shape[0] for d in parts}) != 1:
        return None
    return parts


def big_decodes(graph: ir.Graph, limit: int | None = None) -> list[Replacement]:
    """The codebook decodes of the main ``graph`` to replace: the biggest first, until the rest make at most
    ``limit`` float bytes (default :data:`CANDIDATE_DECODE_BYTES`)."""
    limit = CANDIDATE_DECODE_BYTES if limit is None else limit
    found = [d for node in graph if (d := find_decode(node)) is not None]
    inner = {id(d.value.producer().inputs[0]) for d in found if d.offset is not None}  # an Add's Mul is not one
    decodes = {id(d.value): d for d in found if id(d.value) not in inner}
    replacements, joined = [], set()
    for node in graph:
        parts = _joined(node, decodes)
        if parts is not None and all(len(d.value.uses()) == 1 for d in parts):
            replacements.append(Replacement(node.outputs[0], parts))
            joined.update(id(d.value) for d in parts)
    replacements += [Replacement(d.value, [d]) for key, d in decodes.items() if key not in joined]
    if any(r.value.name is None or r.value in graph.outputs for r in replacements):
        return []
    replacements.sort(key=lambda r: r.nbytes, reverse=True)
    rest = sum(r.nbytes for r in replacements)
    chosen = []
    for r in replacements:
        if rest <= limit:
            break
        chosen.append(r)
        rest -= r.nbytes
    return chosen


def _rows(d: CodebookDecode, step: int):
    """Decode ``d`` from the written tensors, ``step`` rows at a time (float32)."""
    codes = d.codes.const_value.numpy()  # 1 byte per code: a quarter of the float weight
    k, n = codes.shape
    g = d.block
    table = d.codebook.const_value.numpy().astype(np.float32)
    scale = d.scale.const_value.numpy()
    offset = None if d.offset is None else d.offset.const_value.numpy()
    for start in range(0, k, step):
        stop = min(start + step, k)
        b0, b1 = start // g, -(-stop // g)
        rows = np.arange(start, stop) // g - b0  # each row's block among this slice's
        x = table[codes[start:stop].astype(np.intp)]
        x *= scale[b0:b1].astype(np.float32)[rows]
        if offset is not None:
            x += offset[b0:b1].astype(np.float32)[rows]
        yield x


def decoded_candidate(path: str | os.PathLike, folder: str | os.PathLike, limit: int | None = None) -> Path | None:
    """The written model at ``path`` with its big codebook decodes (:func:`big_decodes`) replaced by their
    numpy decode, written into ``folder`` (the file's other tensors copied there by chunks); None when there is
    none to replace (run the written file itself)."""
    model = ir.load(os.fspath(path))
    chosen = big_decodes(model.graph, limit)
    if not chosen:
        return None
    folder = Path(folder)
    data_name = "candidate.onnx.data"
    ours = set()
    with open(folder / data_name, "wb") as data:
        for r in chosen:
            data.write(b"\0" * (-data.tell() % 4096))
            offset = data.tell()
            for x in r.rows():  # whole rows: straight to the file
                x.tofile(data)
            shape = list(r.shape)
            tensor = ir.ExternalTensor(data_name, offset, data.tell() - offset, ir.DataType.FLOAT,
                                       shape=ir.Shape(shape), name=r.value.name, base_dir=folder)
            name = r.value.name
            r.value.name = f"{name}.bq_decoded_in_graph"  # detached below; frees the name
            new = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(shape),
                           const_value=tensor)
            ir.convenience.replace_all_uses_with(r.value, new)
            model.graph.register_initializer(new)
            ours.add(name)
        RemoveUnusedNodesPass()(model)
        for graph in model.graphs():
            for key, value in graph.initializers.items():
                tensor = value.const_value
                if key in ours or not isinstance(tensor, ir.ExternalTensor):
                    continue
                data.write(b"\0" * (-data.tell() % 4096))  # the written file's other tensors, by chunks
                offset = data.tell()
                tensor.tofile(data)
                value.const_value = ir.ExternalTensor(data_name, offset, tensor.nbytes, tensor.dtype,
                                                      shape=ir.Shape(tensor.shape), name=key, base_dir=folder)
    out = folder / "candidate.onnx"
    ir.save(model, out)
    return out
