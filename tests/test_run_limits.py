"""Limits on running untrusted graphs (bq_onnx/limits.py): a Loop that never ends and an Expand to a huge shape
stop with one line and exit 10 in every command that runs the model, nothing written. Each case runs in a
subprocess whose address space is capped, so a regression fails instead of taking the machine."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bq_onnx.errors import EXIT_LIMIT

#: The safety net of every subprocess here: far above what the cases need when the limits hold.
SAFETY_BYTES = 8 * 2**30


def _model(nodes, out, inits) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["h"]), *nodes], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])], [out], [w, *inits])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    onnx.checker.check_model(m)
    return m


def endless_loop() -> onnx.ModelProto:
    """``Loop`` with a trip count of 1e15 around an Add: runs for ever without a limit."""
    body = helper.make_graph(
        [helper.make_node("Add", ["v_in", "one"], ["v_out"]), helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, ["n", 16])],
        [numpy_helper.from_array(np.ones((1, 16), np.float32), "one")])
    return _model([helper.make_node("Loop", ["M", "c", "h"], ["y"], body=body)],
                  helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16]),
                  [numpy_helper.from_array(np.array(10**15, np.int64), "M"),
                   numpy_helper.from_array(np.array(True), "c")])


def huge_expand() -> onnx.ModelProto:
    """``Expand`` of the layer's output ``[n, 16]`` to ``[2^24, n, 16]`` floats (1 GiB per sample), then summed:
    the kernel's OOM killer's work without a memory limit (at bigger sizes)."""
    return _model([helper.make_node("Expand", ["h", "shape"], ["e"]),
                   helper.make_node("ReduceSum", ["e"], ["y"], keepdims=0)],
                  helper.make_tensor_value_info("y", TensorProto.FLOAT, []),
                  [numpy_helper.from_array(np.array([2**24, 1, 1], np.int64), "shape")])


def _bq(args, timeout=240) -> tuple[int, str, float]:
    code = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({SAFETY_BYTES}, {SAFETY_BYTES})); "
            "from bq_onnx.cli import main; sys.exit(main(sys.argv[1:]))")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return proc.returncode, proc.stderr, time.monotonic() - start


def _limit_hit(code, err, fragment):
    assert code == EXIT_LIMIT, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err


@pytest.fixture
def hostile(tmp_path):
    for name, make in (("loop", endless_loop), ("expand", huge_expand)):
        onnx.save(make(), str(tmp_path / f"{name}.onnx"))
    np.savez(tmp_path / "x.npz", x=np.ones((2, 16), np.float32))
    return tmp_path


LIMIT = {"loop": ("--run-timeout", "2", "--run-timeout"), "expand": ("--max-memory", "512M", "--max-memory")}


@pytest.mark.parametrize("case", ["loop", "expand"])
def test_optimize_stops_at_the_limit_and_writes_nothing(hostile, case):
    flag, value, fragment = LIMIT[case]
    model = hostile / f"{case}.onnx"
    before = sorted(p.name for p in hostile.iterdir())
    for extra in ([], ["--calib", hostile / "x.npz"]):  # verification's and the posterior's runs
        code, err, took = _bq(["optimize", model, "--min-size", "1", "--bits", "8", "-q", flag, value, *extra])
        _limit_hit(code, err, fragment)
        assert sorted(p.name for p in hostile.iterdir()) == before  # no output, no temporary file
        if case == "loop":
            assert took < 60


@pytest.mark.parametrize("case", ["loop", "expand"])
@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_verify_and_bench_stop_at_the_limit(hostile, case, runtime):
    pytest.importorskip(runtime)
    flag, value, fragment = LIMIT[case]
    model = hostile / f"{case}.onnx"
    code, err, _ = _bq(["verify", model, model, "--calib", hostile / "x.npz", "--runtime", runtime, flag, value])
    _limit_hit(code, err, fragment)
    code, err, _ = _bq(["bench", model, "--runtime", runtime, "--warmup", "0", "--iterations", "1", "-q", flag,
                        value])
    _limit_hit(code, err, fragment)


def test_limits_restore_the_process_and_cost_little():
    """Outside a run the address-space limit is what it was; one limited block costs microseconds."""
    import resource

    from bq_onnx import limits

    before = resource.getrlimit(resource.RLIMIT_AS)
    with limits.limited("a test"):
        inside = resource.getrlimit(resource.RLIMIT_AS)
    assert resource.getrlimit(resource.RLIMIT_AS) == before
    assert inside[0] != resource.RLIM_INFINITY and (before[0] == resource.RLIM_INFINITY or inside[0] <= before[0])
    start = time.perf_counter()
    for _ in range(2000):
        with limits.limited("a test"):
            pass
    assert (time.perf_counter() - start) / 2000 < 1e-3  # measured about 20 us (README)


def test_a_cancelled_run_raises_a_limit_error_in_the_api(tmp_path):
    from bq_onnx import limits
    from bq_onnx.errors import LimitError
    from bq_onnx.runtimes import get_runtime

    onnx.save(endless_loop(), str(tmp_path / "loop.onnx"))
    session = get_runtime("onnxruntime").session(tmp_path / "loop.onnx")
    with limits.run_limits(timeout=1.0), pytest.raises(LimitError, match="did not finish within 1 s"):
        session.run({"x": np.ones((1, 16), np.float32)})
    assert limits.run_timeout() == limits.DEFAULT_RUN_TIMEOUT


def test_optimize_keywords_bound_optimize_and_save(tmp_path):
    """``optimize(run_timeout=, max_memory=)`` are the flags: checked the same way, applied to optimize's own runs
    and to the result's ``save`` (its verification), restored afterwards."""
    from bq_onnx import budgets, limits, optimize
    from bq_onnx.errors import LimitError, UsageError

    onnx.save(endless_loop(), str(tmp_path / "loop.onnx"))
    model = tmp_path / "loop.onnx"
    with pytest.raises(UsageError, match="--run-timeout must be > 0"):
        optimize(model, run_timeout=-1)
    with pytest.raises(UsageError, match="max-memory"):
        optimize(model, max_memory="lots")
    # without calibration optimize itself runs nothing; the limit then holds in save's verification
    result = optimize(model, min_size=1, bits=8, run_timeout=1.0, max_memory="4G")
    assert limits.run_timeout() == limits.DEFAULT_RUN_TIMEOUT and budgets.memory_budget() != 4 * 2**30
    start = time.monotonic()
    with pytest.raises(LimitError, match="did not finish within 1 s"):
        result.save(tmp_path / "out.onnx")
    assert time.monotonic() - start < 60
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop.onnx"]  # nothing written, no staging left
    np.savez(tmp_path / "x.npz", x=np.ones((2, 16), np.float32))
    with pytest.raises(LimitError, match="did not finish within 1 s"):  # the posterior's runs
        optimize(model, calib=tmp_path / "x.npz", min_size=1, bits=8, run_timeout=1.0)
