"""External tensors are copied to another file by chunks, never read whole (issue 21: the streaming bound).

Writing verification's reference read each external weight whole and copied it again (``tobytes``): two copies
of a 1 GiB weight at once broke the bound of 1.5 x model + 1 GiB (``benchmarks/streaming_memory.py``).
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from bq_onnx import model_io
from bq_onnx.errors import ModelError
from bq_onnx.model_io import StreamedExternalTensor, load_model
from bq_onnx.verify import write_reference


def _external_model(tmp_path, values: np.ndarray):
    """MatMul(x, W) with W in ``w.bin`` at offset 8 (something before it in the file)."""
    (tmp_path / "w.bin").write_bytes(bytes(8) + values.tobytes())
    w = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=list(values.shape))
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "w.bin"), ("offset", "8"), ("length", str(values.nbytes))):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, values.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, values.shape[1]])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, str(tmp_path / "m.onnx"))
    return tmp_path / "m.onnx"


@pytest.fixture
def values():
    """Over verify.INLINE_BYTES (1.25 MiB), so the reference keeps it external."""
    return np.random.default_rng(0).standard_normal((640, 512)).astype(np.float32)


def test_tofile_copies_the_bytes_by_chunks(tmp_path, values, monkeypatch):
    reads = []
    plain = model_io.read_external

    def counted(path, offset, count, name):
        reads.append(count)
        return plain(path, offset, count, name)

    monkeypatch.setattr(model_io, "COPY_CHUNK", 1 << 16)
    monkeypatch.setattr(model_io, "read_external", counted)
    tensor = load_model(_external_model(tmp_path, values)).graph.initializers["W"].const_value
    assert isinstance(tensor, StreamedExternalTensor)
    out = io.BytesIO(b"head")
    out.seek(4)
    tensor.tofile(out)
    assert out.getvalue() == b"head" + values.tobytes()
    assert max(reads) == 1 << 16 and sum(reads) == values.nbytes and len(reads) == 20  # none over COPY_CHUNK


def test_tofile_of_a_data_file_truncated_meanwhile_is_a_model_error(tmp_path, values):
    tensor = load_model(_external_model(tmp_path, values)).graph.initializers["W"].const_value
    with open(tmp_path / "w.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ModelError, match="ends after"):
        tensor.tofile(io.BytesIO())


def test_reference_copies_external_weights_without_reading_them_whole(tmp_path, values, monkeypatch):
    """The float reference gets the input's external weight by :meth:`StreamedExternalTensor.tofile`: the
    same bytes at a page-aligned offset, and ``tobytes``/``numpy`` (the whole tensor in memory) never called."""

    def whole(self):
        raise AssertionError("the whole tensor was read")

    model = load_model(_external_model(tmp_path, values))
    monkeypatch.setattr(StreamedExternalTensor, "tobytes", whole)
    monkeypatch.setattr(StreamedExternalTensor, "numpy", whole)
    folder = tmp_path / "ref"
    folder.mkdir()
    path = write_reference(model, None, folder, dequantized=False)
    monkeypatch.undo()
    written = ir.load(path).graph.initializers["W"].const_value
    assert isinstance(written, ir.ExternalTensor) and written.offset % 4096 == 0
    assert np.array_equal(written.numpy(), values)
