"""Pages of onnxruntime's mapped weight files handed back (issue 21): resident memory falls, outputs stay."""

from __future__ import annotations

import mmap
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bq_onnx.pages import page_out
from bq_onnx.runtimes.sessions import TempSessions, page_out_sessions

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/maps and madvise are Linux's")


def _resident(path) -> int:
    """Resident bytes of this process's mappings of ``path`` (``/proc/self/smaps``)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if parts and "-" in parts[0] and not parts[0].endswith(":"):
                inside = len(parts) > 5 and parts[5] == str(path)
            elif inside and parts[0] == "Rss:":
                total += int(parts[1]) * 1024
    return total


def _matmul(tmp_path, k: int = 512, n: int = 1024) -> tuple[str, np.ndarray]:
    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k]),
         helper.make_tensor_value_info("W", TensorProto.FLOAT, [k, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])], [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    path = tmp_path / "m.onnx"
    onnx.save(model, path, save_as_external_data=True, location="m.data", size_threshold=0)
    return str(path), w


def test_page_out_drops_a_mapped_files_pages_and_keeps_its_bytes(tmp_path):
    data = np.arange(1 << 20, dtype=np.float32)  # 4 MiB
    path = tmp_path / "w.bin"
    data.tofile(path)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view = np.frombuffer(mapped, dtype=np.float32)
    assert float(view.sum(dtype=np.float64)) == float(data.sum(dtype=np.float64))  # every page read
    assert _resident(path) >= data.nbytes // 2
    assert page_out([tmp_path]) >= data.nbytes
    assert _resident(path) < data.nbytes // 8
    assert np.array_equal(view, data)  # read again from the file
    assert page_out([tmp_path / "elsewhere"]) == 0  # another folder's mappings are left alone
    del view
    mapped.close()


def test_a_session_runs_the_same_after_its_weights_are_paged_out(tmp_path):
    """onnxruntime maps its external data writable and private: the pages it only read go, and its next run reads
    them again from the file, the same output to the bit."""
    import onnxruntime as ort

    path, w = _matmul(tmp_path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((2, w.shape[0])).astype(np.float32)
    before = session.run(None, {"x": x})[0]
    data = tmp_path / "m.data"
    if _resident(data) == 0:
        pytest.skip("this onnxruntime does not map external data")
    page_out([tmp_path])
    assert _resident(data) < w.nbytes // 8
    after = session.run(None, {"x": x})[0]
    assert np.array_equal(before, after)
    np.testing.assert_allclose(after, x.astype(np.float64) @ w.astype(np.float64), rtol=1e-4, atol=1e-4)


def test_page_out_sessions_reaches_the_open_temp_sessions_only():
    import onnx_ir as ir

    k, n = 512, 1024
    w = np.random.default_rng(2).standard_normal((k, n)).astype(np.float32)
    x = ir.Value(name="x", shape=ir.Shape([2, k]), type=ir.TensorType(ir.DataType.FLOAT))
    weight = ir.Value(name="W", shape=ir.Shape([k, n]), type=ir.TensorType(ir.DataType.FLOAT),
                      const_value=ir.tensor(w, name="W"))
    node = ir.node("MatMul", [x, weight], num_outputs=1)
    node.outputs[0].name = "y"
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    # the weight an input too, as the guard's fed session has it: not pre-packed, so read from its mapped file
    graph = ir.Graph([x, weight], node.outputs, nodes=[node], initializers=[weight], opset_imports={"": 21})
    model = ir.Model(graph, ir_version=10)
    sessions = TempSessions()
    try:
        session = sessions.open(model)
        feeds = {"x": np.ones((2, k), np.float32)}
        before = session.run(feeds)[0]
        assert page_out_sessions() > 0  # its weight file is mapped under its folder
        assert np.array_equal(session.run(feeds)[0], before)
    finally:
        sessions.close()
