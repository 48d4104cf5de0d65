"""Builders of hostile inputs (issue 21): models and data files whose declared sizes are huge while the files
are small, and a runner that executes the command line in a subprocess under an address-space limit, so a
regression that allocates what a file declares fails the test instead of taking the machine."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import make_model

REPO = Path(__file__).resolve().parent.parent
#: address space a command may use in the limited subprocess (python, numpy, onnx and onnxruntime need ~1.5 GB
#: of virtual space to start; what a hostile file declares is many times this)
LIMIT_BYTES = 3 << 30


def matmul_model(weight: onnx.TensorProto, k: int = 16, n: int = 8) -> onnx.ModelProto:
    """``y = Relu(x @ W)`` with ``weight`` as W (any declared shape: the graph's own shapes stay small)."""
    return make_model([helper.make_node("MatMul", ["x", weight.name], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])], [weight])


def external_matmul(folder: Path, w: np.ndarray, batch: int | str, gemm: bool = False) -> Path:
    """``y = x @ W`` (MatMul; ``gemm``: ``Gemm(x, W, transB=1)`` with ``w`` stored ``(N, K)``) saved to
    ``folder/m.onnx`` with ``w`` in external data (``m.onnx.data``), ``batch`` rows of ``x``."""
    k, n = w.shape[::-1] if gemm else w.shape
    node = helper.make_node("Gemm", ["x", "W"], ["y"], transB=1) if gemm else \
        helper.make_node("MatMul", ["x", "W"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, n])],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "m.onnx"
    onnx.save(model, path, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    return path


def good_weight(k: int = 16, n: int = 8, name: str = "W") -> onnx.TensorProto:
    return numpy_helper.from_array(np.random.default_rng(0).standard_normal((k, n)).astype(np.float32), name)


def external_weight(dims: list[int], location: str = "w.bin", offset: str | None = None,
                    length: str | None = None, name: str = "W",
                    data_type: int = TensorProto.FLOAT) -> onnx.TensorProto:
    """A tensor that declares ``dims`` and keeps its data at ``location`` (keys written as given: text)."""
    t = TensorProto(name=name, data_type=data_type, dims=dims, data_location=TensorProto.EXTERNAL)
    entries = [("location", location)] + [(k, v) for k, v in (("offset", offset), ("length", length)) if v is not None]
    for key, value in entries:
        e = t.external_data.add()
        e.key, e.value = key, value
    return t


def write_model(folder: Path, model: onnx.ModelProto, name: str = "m.onnx") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(model.SerializeToString())
    return path


def sparse_file(path: Path, size: int, data: bytes = b"") -> Path:
    """A file of ``size`` bytes that takes no disk space (``data`` at its start)."""
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(size)
    return path


def npy_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    """The bytes of an ``.npy`` header that declares ``shape`` (version 1.0, C order)."""
    header = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode("latin1")
    pad = 64 - (10 + len(header) + 1) % 64
    header += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


def _limit() -> None:  # runs in the child before exec
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT_BYTES, LIMIT_BYTES))


_MANY = """
import contextlib, io, json, sys
from bq_onnx.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def run_limited(commands: list[list[str]], timeout: float = 120) -> list[tuple[int, str]]:
    """``bq-onnx ARGS`` for each of ``commands`` in one subprocess limited to :data:`LIMIT_BYTES` of address
    space (one interpreter start for all); (exit code, stderr) of each."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _MANY, json.dumps(commands)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=_limit, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    return [tuple(r) for r in json.loads(done.stdout.splitlines()[-1])]
