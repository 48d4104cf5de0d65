"""The second hardening round (issue 21, and issue 22's memory maps): hostile models and data files get one line
with their documented exit code, never an internal error, a kill by the kernel or a SIGBUS.

Sizes are declared, never real: a file that claims gigabytes holds bytes (or is sparse). The cases that would
allocate what they declare if a check regressed run in a subprocess under ``RLIMIT_AS`` (:mod:`tests.hostile`),
so a regression fails here instead of taking the machine.
"""

from __future__ import annotations

import errno
import os
import zipfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bq_onnx import budgets
from bq_onnx.cli import main
from bq_onnx.errors import DataError, ModelError, UsageError
from bq_onnx.model_io import load_model
from tests.hostile import (
    external_weight,
    good_weight,
    matmul_model,
    npy_header,
    run_limited,
    sparse_file,
    write_model,
)

GOOD = good_weight().raw_data  # 16x8 float32: 512 bytes


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "internal error" not in err, err
    return lines[0]


def _optimize(src, capsys, *extra) -> tuple[int, str]:
    out = src.parent / "out.onnx"
    code = main(["optimize", str(src), "-o", str(out), "-q", "--min-size", "16", "--allocator", "uniform",
                 "--bits", "8", *extra])
    err = capsys.readouterr().err
    if code != 0:
        assert not out.exists()
    return code, err


# --- models: sizes before allocation ----------------------------------------------------------------------------

HUGE = {
    # [2^32, 2^32] float32 is 2^66 bytes: numpy's int64 product wraps to 0
    "2^32 x 2^32 over an empty file": ([2**32, 2**32], 0, "more elements than a C size"),
    "2^32 x 2^32 over 8 KiB": ([2**32, 2**32], 8192, "more elements than a C size"),
    # 4 * (2^62 + 1) wraps modulo 2^64 to 4 elements (16 bytes): the file holds 64
    "dims wrapping to 4 elements": ([4, 2**62 + 1], 64, "more elements than a C size"),
    # fits a C size, not the budget: refused before the file (8 KiB) is even looked at for its length
    "2^40 x 64 over 8 KiB": ([2**40, 64], 8192, "memory budget"),
}


def test_huge_declared_tensors_are_refused_before_allocation(tmp_path):
    """Every command that reads a model (as the model, verify's reference or candidate, a bench model)."""
    good = write_model(tmp_path / "good", matmul_model(good_weight()))
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.zeros((4, 16), np.float32))
    commands = []
    for i, (dims, size, _) in enumerate(HUGE.values()):
        folder = tmp_path / str(i)
        folder.mkdir()
        sparse_file(folder / "w.bin", size)
        src = write_model(folder, matmul_model(external_weight(dims)))
        commands += [["optimize", str(src), "-o", str(folder / "out.onnx"), "-q", "--min-size", "16"],
                     ["validate", str(src), "--target", "onnxruntime"],
                     ["inspect", str(src)],
                     ["posterior", str(src), "--calib", str(calib), "-o", str(folder / "p.npz"), "-q"],
                     ["verify", str(good), str(src), "--calib", str(calib)],
                     ["verify", str(src), str(good), "--calib", str(calib)],
                     ["bench", str(good), str(src), "--iterations", "2", "--warmup", "1"]]
    results = run_limited(commands)
    per_case = len(commands) // len(HUGE)
    for i, (case, (_, _, words)) in enumerate(HUGE.items()):
        for command, (code, err) in zip(commands[per_case * i:], results[per_case * i:per_case * (i + 1)]):
            assert code == 3, (case, command[0], err)
            assert words in _one_line(err), (case, command[0])
        assert sorted(os.listdir(tmp_path / str(i))) == ["m.onnx", "w.bin"]


def test_inline_tensor_without_its_data_is_refused(tmp_path, capsys):
    t = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[4096, 4096])  # 64 MiB declared, nothing held
    code, err = _optimize(write_model(tmp_path, matmul_model(t)), capsys)
    assert code == 3 and "holds 0" in _one_line(err)


def test_budget_refuses_a_model_and_max_memory_sets_it(tmp_path, capsys):
    folder = tmp_path / "m"
    (folder).mkdir()
    (folder / "w.bin").write_bytes(GOOD)
    src = write_model(folder, matmul_model(external_weight([16, 8])))
    code, err = _optimize(src, capsys, "--max-memory", "256")  # the weight needs 512 bytes
    assert code == 3 and "memory budget of 256 bytes" in _one_line(err)
    code, err = _optimize(src, capsys, "--max-memory", "64M")  # room for onnxruntime's first session (threads)
    assert code == 0, err


def test_max_memory_parsing():
    assert budgets.parse_memory("4G") == 4 << 30
    assert budgets.parse_memory("1.5GB") == 1_500_000_000
    assert budgets.parse_memory("512MiB") == 512 << 20
    assert budgets.parse_memory(1000) == 1000
    assert 0 < budgets.parse_memory("50%") <= budgets.available_memory()
    for bad in ("4Q", "-1G", "0", "", "1e9", "\u0664G", True):
        with pytest.raises(UsageError):
            budgets.parse_memory(bad)


def test_checked_product_never_wraps():
    assert budgets.checked_product([2**32, 2**32]) is None
    assert budgets.checked_product([4, 2**62 + 1]) is None
    assert budgets.checked_product([2**31, 2**31]) == 2**62
    assert budgets.checked_product([3, -1]) is None
    assert budgets.nbytes([2**61], 32) is None  # 2^63 bytes: past a C size
    assert budgets.nbytes([7], 4) == 4  # packed int4


def test_a_single_big_tensor_is_read_once_not_mapped_or_copied(tmp_path):
    """A 1 GiB weight (a sparse file) loads and is read under an address-space limit far below what reading
    it twice (or keeping a mapping beside the copy) would need."""
    folder = tmp_path / "big"
    folder.mkdir()
    k, n = 2**15, 2**13  # 2^28 float32 = 1 GiB
    sparse_file(folder / "w.bin", k * n * 4)
    src = write_model(folder, matmul_model(external_weight([k, n]), k=k, n=n))
    script = (
        "import resource, sys; from bq_onnx.model_io import load_model; from bq_onnx import budgets;"
        "budgets.set_max_memory('2G'); m = load_model(sys.argv[1]); w = m.graph.initializers['W'].const_value;"
        "a = w.numpy(); assert a.shape == (32768, 8192) and not a.any(); del a; b = w.numpy(); del b;"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    import subprocess
    import sys

    from tests.hostile import LIMIT_BYTES, REPO

    def limit():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (LIMIT_BYTES, LIMIT_BYTES))

    result = subprocess.run([sys.executable, "-c", script, str(src)], capture_output=True, text=True, timeout=120,
                            preexec_fn=limit, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    assert result.returncode == 0, result.stderr
    peak = int(result.stdout.split()[-1]) * 1024
    assert peak < 1.5 * 2**30 + 2**29, peak  # one copy of the tensor plus the interpreter


# --- models: one line each --------------------------------------------------------------------------------------


def _external_case(tmp_path, *, location="w.bin", offset=None, length=None, data=GOOD):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "w.bin").write_bytes(data)
    return write_model(folder, matmul_model(external_weight([16, 8], location, offset, length)))


KEYS = {
    "offset with spaces": dict(offset=" 0 "),
    "Arabic-Indic digit offset": dict(offset="\u0660"),
    "length with a plus sign": dict(length="+512"),
    "length with underscores": dict(length="5_12"),
    "negative offset": dict(offset="-1"),
    "hex offset": dict(offset="0x0"),
    "NUL in the location": dict(location="w\0.bin"),
    "newline in the location": dict(location="w.bin\nerror: forged"),
}


@pytest.mark.parametrize("case", list(KEYS))
def test_external_data_keys_are_parsed_strictly(tmp_path, capsys, case):
    code, err = _optimize(_external_case(tmp_path, **KEYS[case]), capsys)
    assert code == 3, err
    _one_line(err)


def test_strict_keys_still_accept_plain_decimal(tmp_path, capsys):
    code, err = _optimize(_external_case(tmp_path, offset="0", length="512"), capsys)
    assert code == 0, err


def test_hard_linked_external_data_is_refused(tmp_path, capsys):
    outside = tmp_path / "secret.bin"
    outside.write_bytes(GOOD)
    folder = tmp_path / "m"
    folder.mkdir()
    os.link(outside, folder / "w.bin")
    code, err = _optimize(write_model(folder, matmul_model(external_weight([16, 8]))), capsys)
    assert code == 3 and "hard links" in _one_line(err)


def test_data_file_truncated_after_loading_is_exit_3_not_sigbus(tmp_path):
    src = _external_case(tmp_path)
    model = load_model(src)
    os.truncate(src.parent / "w.bin", 100)  # truncated between the check and the read
    with pytest.raises(ModelError, match="ends after 100 bytes"):
        model.graph.initializers["W"].const_value.numpy()


def test_truncated_while_mapped_is_one_line_in_a_subprocess(tmp_path):
    """The whole command: a data file truncated after loading, while the tensor is read (a memory map would
    die of SIGBUS here; reads give exit 3)."""
    src = _external_case(tmp_path)
    script = ("import os, sys; from bq_onnx.model_io import load_model; from bq_onnx.errors import BqError\n"
              "m = load_model(sys.argv[1]); os.truncate(sys.argv[2], 0)\n"
              "try: m.graph.initializers['W'].const_value.numpy()\n"
              "except BqError as e: print('error:', e, file=sys.stderr); sys.exit(e.exit_code)\n")
    import subprocess
    import sys

    from tests.hostile import REPO

    result = subprocess.run([sys.executable, "-c", script, str(src), str(src.parent / "w.bin")],
                            capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 3, (result.returncode, result.stderr)
    _one_line(result.stderr)


def test_string_initializer_and_string_output(tmp_path, capsys):
    model = matmul_model(good_weight())
    model.graph.initializer.append(helper.make_tensor("S", TensorProto.STRING, [2], [b"a", b"b"]))
    model.graph.node.append(helper.make_node("Identity", ["S"], ["s_out"]))
    model.graph.output.append(helper.make_tensor_value_info("s_out", TensorProto.STRING, [2]))
    code, err = _optimize(write_model(tmp_path, model), capsys)
    assert code == 0, err


def test_string_tensor_with_wrong_count_is_refused(tmp_path, capsys):
    model = matmul_model(good_weight())
    model.graph.initializer.append(TensorProto(name="S", data_type=TensorProto.STRING, dims=[2**40],
                                               string_data=[b"a"]))
    code, err = _optimize(write_model(tmp_path, model), capsys)
    assert code == 3 and "'S'" in _one_line(err)


def _loop_model() -> onnx.ModelProto:
    """A Loop whose body reads an outer weight W and an outer activation."""
    from onnx import numpy_helper

    rng = np.random.default_rng(0)
    info = helper.make_tensor_value_info
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("MatMul", ["xr", "W"], ["m"]),
         helper.make_node("Add", ["m", "v_in"], ["a"]), helper.make_node("Relu", ["a"], ["v_out"])],
        "body", [info("i", TensorProto.INT64, []), info("cond_in", TensorProto.BOOL, []),
                 info("v_in", TensorProto.FLOAT, ["b", 16])],
        [info("cond_out", TensorProto.BOOL, []), info("v_out", TensorProto.FLOAT, ["b", 16])])
    weights = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), name) for name in "WV"]
    weights += [numpy_helper.from_array(np.array(2, np.int64), "trip"), numpy_helper.from_array(np.array(True), "c")]
    from tests.conftest import make_model

    return make_model([helper.make_node("MatMul", ["x", "V"], ["x1"]), helper.make_node("Relu", ["x1"], ["xr"]),
                       helper.make_node("Loop", ["trip", "c", "x"], ["y"], body=body)],
                      [info("x", TensorProto.FLOAT, ["b", 16])], [info("y", TensorProto.FLOAT, ["b", 16])], weights)


def test_loop_body_reading_an_outer_weight_with_calib(tmp_path, capsys):
    src = write_model(tmp_path, _loop_model())
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32))
    code, err = _optimize(src, capsys, "--calib", str(tmp_path / "c.npz"))
    assert code == 0, err


# --- calibration data -------------------------------------------------------------------------------------------


@pytest.fixture
def model(tmp_path):
    return write_model(tmp_path / "model", matmul_model(good_weight()))


def _calib(model, capsys, calib, *extra) -> tuple[int, str]:
    return _optimize(model, capsys, "--calib", str(calib), *extra)


def _zip_member(path, name: str, header: bytes, data: bytes = b"", declared: int | None = None):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(name, header + data)
    if declared is not None:  # rewrite the member's declared uncompressed size (local header and directory)
        raw = bytearray(path.read_bytes())
        real = (len(header) + len(data)).to_bytes(4, "little")
        for sig, at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
            i = raw.index(sig)
            assert raw[i + at:i + at + 4] == real
            raw[i + at:i + at + 4] = declared.to_bytes(4, "little")
        path.write_bytes(bytes(raw))
    return path


def test_npz_bomb_is_refused_without_inflating(model, tmp_path, capsys):
    """A 64 MiB member of zeros (about 64 KiB compressed) against a 16 MiB budget; in a 3 GB subprocess the
    same file declaring 2.5 GiB (a real bomb would inflate to it) is refused from the header alone."""
    header = npy_header((16 * 2**20, 1))
    bomb = _zip_member(tmp_path / "bomb.npz", "x.npy", header, bytes(64 << 20))
    assert bomb.stat().st_size < 1 << 20
    code, err = _calib(model, capsys, bomb, "--max-memory", "16M")
    assert code == 5 and "memory budget" in _one_line(err)
    header = npy_header((5 * 2**27, 1))  # 2.5 GiB declared
    big = _zip_member(tmp_path / "big.npz", "x.npy", header, bytes(4096), declared=len(header) + 5 * 2**29)
    [(code, err)] = run_limited([["optimize", str(model), "-o", str(tmp_path / "o.onnx"), "--calib", str(big), "-q",
                                  "--min-size", "16"]])
    assert code == 5 and "memory budget" in _one_line(err)


def test_npz_member_whose_header_lies_about_its_size(model, tmp_path, capsys):
    lie = _zip_member(tmp_path / "lie.npz", "x.npy", npy_header((2**40, 64)), bytes(256))
    code, err = _calib(model, capsys, lie)
    assert code == 5 and "but its zip member holds 256 bytes" in _one_line(err)


def test_npy_header_declaring_2_40_by_64_over_256_bytes(model, tmp_path, capsys):
    folder = tmp_path / "calib"
    folder.mkdir()
    (folder / "x.npy").write_bytes(npy_header((2**40, 64)) + bytes(256))
    code, err = _calib(model, capsys, folder)
    assert code == 5 and "holds 256 bytes" in _one_line(err)
    (folder / "x.npy").write_bytes(npy_header((2**62, 2**62)) + bytes(256))
    code, err = _calib(model, capsys, folder)
    assert code == 5 and "C size" in _one_line(err)


def test_npy_renamed_npz(model, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((4, 16), np.float32))
    os.rename(tmp_path / "x.npy", tmp_path / "x.npz")
    code, err = _calib(model, capsys, tmp_path / "x.npz")
    assert code == 5 and "an .npy array named .npz" in _one_line(err)


def test_pickled_array_is_refused(model, tmp_path, capsys):
    np.savez(tmp_path / "p.npz", x=np.array([{"a": 1}], dtype=object))
    code, err = _calib(model, capsys, tmp_path / "p.npz")
    assert code == 5 and "pickle" in _one_line(err)


def test_calib_naming_a_fifo_or_dev_zero(model, tmp_path, capsys):
    fifo = tmp_path / "calib.npz"
    os.mkfifo(fifo)
    code, err = _calib(model, capsys, fifo)  # opening it would block forever
    assert code == 5 and "FIFO" in _one_line(err)
    code, err = _calib(model, capsys, "/dev/zero")
    assert code == 5 and "character device" in _one_line(err)
    code = main(["posterior", str(model), "--calib", "/dev/zero", "-o", str(tmp_path / "p.npz")])
    assert code == 5 and "character device" in _one_line(capsys.readouterr().err)


def test_calibration_values_near_float32_max(model, tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    x[0, 0] = 3e38
    np.savez(tmp_path / "big.npz", x=x)
    code, err = _calib(model, capsys, tmp_path / "big.npz")
    assert code == 5 and "'x'" in _one_line(err)


def test_full_tmpdir_while_spilling(model, tmp_path, capsys, monkeypatch):
    """Calibration parts beyond the spill size go to TMPDIR; a full one is one line (exit 7), not a traceback."""
    folder = tmp_path / "parts"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        np.savez(folder / f"{i}.npz", x=rng.standard_normal((4, 16)).astype(np.float32))
    monkeypatch.setenv("BQ_ONNX_CALIB_SPILL_MB", "0")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "save", full)
    code, err = _calib(model, capsys, folder)
    assert code == 7 and "No space left on device" in _one_line(err)


def test_labels_from_a_fifo(model, tmp_path, capsys):
    np.savez(tmp_path / "c.npz", x=np.zeros((4, 16), np.float32))
    os.mkfifo(tmp_path / "labels.npy")
    code, err = _calib(model, capsys, tmp_path / "c.npz", "--labels", str(tmp_path / "labels.npy"), "--loss", "ce")
    assert code == 5, err
    _one_line(err)


def test_data_budget_counts_the_whole_source(tmp_path):
    from bq_onnx.data_files import read_npz

    np.savez(tmp_path / "a.npz", x=np.zeros(1000, np.float32), y=np.zeros(1000, np.float32))  # 8000 bytes
    with budgets.memory_limit(6000), pytest.raises(DataError, match="memory budget"):
        read_npz(tmp_path / "a.npz")
    with budgets.memory_limit(9000):
        assert set(read_npz(tmp_path / "a.npz")) == {"x", "y"}


@pytest.mark.parametrize("dtype, shape", [("INT4", (6, 8)), ("UINT4", (47,)), ("FLOAT", (3, 2)), ("FLOAT16", (12,)),
                                          ("INT8", (4, 6)), ("FLOAT", (0, 3))])
def test_reads_match_onnx_ir_mapped_reads(tmp_path, dtype, shape):
    """The pread reader gives what onnx-ir's memory-mapped reader gives (values, dtype, packed bytes)."""
    import onnx_ir as ir

    from bq_onnx.model_io import StreamedExternalTensor

    raw = np.random.default_rng(0).integers(0, 256, size=24, dtype=np.uint8)
    (tmp_path / "d.bin").write_bytes(bytes(8) + raw.tobytes())

    def tensor():
        return ir.ExternalTensor("d.bin", 8, None, getattr(ir.DataType, dtype), shape=ir.Shape(shape), name="x",
                                 base_dir=str(tmp_path))

    mapped, streamed = tensor(), tensor()
    streamed.__class__ = StreamedExternalTensor
    want, got = mapped.numpy(), streamed.numpy()
    assert want.dtype == got.dtype and want.shape == got.shape
    assert np.array_equal(want.astype(np.float64), got.astype(np.float64))
    assert streamed.tobytes() == (mapped.tobytes() if want.size else b"")


def test_random_inputs_of_a_huge_declared_input_shape(tmp_path, capsys):
    model = matmul_model(good_weight())
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2**40  # x: [2^40, 16], static
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 2**40
    code, err = _optimize(write_model(tmp_path, model), capsys)
    assert code == 3 and "random verification inputs" in _one_line(err)
    code, err = _optimize(write_model(tmp_path, matmul_model(good_weight())), capsys,
                          "--input-shape", f"x={2**62},16")
    assert code == 2 and "C size" in _one_line(err)


# --- outputs ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [201, 255, 256, 4000])
@pytest.mark.parametrize("command", ["optimize", "posterior"])
def test_output_name_over_name_max(model, tmp_path, capsys, command, length):
    """A file name the file system cannot hold (over NAME_MAX, 255 bytes, or too long for the data file's suffix
    beside it) is one line and exit 7 before any work, for every command that writes; nothing is created."""
    out = tmp_path / ("o" * (length - 5) + ".onnx")
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32))
    before = sorted(os.listdir(tmp_path))
    extra = ["--calib", str(calib), "--method", "activations"] if command == "posterior" else ["--min-size", "16"]
    code = main([command, str(model), "-o", str(out), "-q", *extra])
    err = capsys.readouterr().err
    assert code == 7 and "file name too long" in _one_line(err), err
    assert sorted(os.listdir(tmp_path)) == before


def test_a_big_weight_is_designed_by_column_slices_with_the_same_result(monkeypatch):
    """Plain uniform grids are designed slice by slice of output channels above ``COLUMN_CHUNK_BYTES`` (the
    quantizers' temporaries are about 5x what they quantize: 40 GiB for one 8 GiB tensor): byte-identical to the
    whole-tensor design, with temporaries of one slice."""
    import tracemalloc

    from bq_onnx import quantizers, weights

    w = np.random.default_rng(0).standard_normal((4096, 1000), dtype=np.float32)
    monkeypatch.setattr(weights, "COLUMN_CHUNK_BYTES", 1 << 20)
    for bits, block in ((4, 32), (3, 4096), (8, 100)):
        spec = quantizers.candidates("uniform", "0", bits, w.size)[0]
        assert quantizers.column_separable(spec, bits)
        whole = quantizers.quantize_spec(w, bits, spec, block, None, seed=0)
        tracemalloc.start()
        sliced = weights._by_columns(w, bits, spec, block, 0)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        for field in ("codes", "scale", "zero_point", "offset", "codebook", "outlier_index"):
            a, b = getattr(whole, field), getattr(sliced, field)
            assert (a is None and b is None) or np.array_equal(a, b), field
        assert (sliced.shape, sliced.symmetric, sliced.kind) == (whole.shape, whole.symmetric, whole.kind)
        assert peak < w.nbytes, peak  # codes (a byte each) twice while joined, one slice of temporaries
    assert not quantizers.column_separable(quantizers.candidates("uniform", "0.01", 4, w.size)[0], 4)


@pytest.mark.parametrize(("quantizer", "outliers"), [("uniform", "0"), ("uniform", "0.01"), ("lloyd", "0"),
                                                     ("vq2", "0")])
def test_a_big_tensor_is_dequantized_by_column_slices_with_the_same_values(monkeypatch, quantizer, outliers):
    """Verification decodes every quantized weight: slice by slice of columns above ``DEQUANTIZE_CHUNK_BYTES``,
    equal to the whole-tensor decode, holding little beyond the float32 result (the whole decode: ~5x it)."""
    import tracemalloc

    from bq_onnx import qtensor, quantizers

    w = np.random.default_rng(0).standard_normal((2048, 1500), dtype=np.float32)
    qt = quantizers.quantize_spec(w, 3, quantizers.candidates(quantizer, outliers, 3, w.size)[0], 32, None)
    whole = qt.dequantize()
    monkeypatch.setattr(qtensor, "DEQUANTIZE_CHUNK_BYTES", 1 << 19)
    tracemalloc.start()
    sliced = qt.dequantize()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert sliced.dtype == np.float32 and np.array_equal(sliced, whole)
    assert peak < 1.3 * w.nbytes, peak


SLICED = [("lloyd", "0", 3, 32), ("lloyd-l1", "0", 4, 48), ("lloyd", "0.01", 3, 32), ("uniform", "0.01", 4, 32),
          ("uniform-sym", "0.005", 3, 1000), ("nf", "0.01", 4, 64), ("lloyd", "0.02", 2, 1000),
          ("gaussian", "0.01", 3, 30)]


@pytest.mark.parametrize(("quantizer", "outliers", "bits", "block"), SLICED)
def test_lloyd_and_outlier_designs_by_column_slices_are_the_whole_designs(monkeypatch, quantizer, outliers, bits,
                                                                          block):
    """Lloyd codebooks and outliers over a big weight are designed slice by slice of output channels (issue 21:
    on the whole tensor they hold 5x and 12x the weight in temporaries): the same bytes as the whole-tensor design,
    with ragged last blocks, all-zero blocks, tied errors, the fitting subsample and double-quantized scales."""
    import dataclasses

    from bq_onnx import quantizers
    from bq_onnx.quantizers import lloyd, sliced

    monkeypatch.setattr(lloyd, "LLOYD_FIT_SAMPLE", 5000)  # the seeded subsample is drawn (300000 elements here)
    w = np.random.default_rng(0).standard_normal((1000, 300), dtype=np.float32)
    w[:64, 5:9] = 0  # blocks without a real element
    w[::9] = np.round(w[::9])  # equal errors: the outliers' ties go to the lower index
    w[100, 7] = 40.0
    spec = quantizers.candidates(quantizer, outliers, bits, w.size)[0]
    assert sliced.supported(spec, bits)
    for double in (False, True) if quantizer == "uniform" else (False,):
        design = dataclasses.replace(spec, double_scales=double)
        whole = quantizers.quantize_spec(w, bits, design, block, None, seed=3)
        by_slices = sliced.quantize_by_columns(w, bits, design, block, 3, 1000 * 4 * 7)  # slices of 7 columns
        for field in ("codes", "scale", "zero_point", "offset", "codebook", "outlier_index", "outlier_value",
                      "scale_code", "super_scale"):
            a, b = getattr(whole, field), getattr(by_slices, field)
            assert (a is None and b is None) or (a.dtype == b.dtype and np.array_equal(a, b)), field
        assert (whole.kind, whole.method, whole.shape, whole.symmetric) == (by_slices.kind, by_slices.method,
                                                                            by_slices.shape, by_slices.symmetric)
    assert not sliced.supported(quantizers.candidates("uniform", "0", bits, w.size)[0], bits)  # _by_columns' case
    assert not sliced.supported(quantizers.candidates("vq2", "0.01", 3, w.size)[0], 3)


@pytest.mark.parametrize(("quantizer", "outliers"), [("lloyd", "0"), ("lloyd", "0.01"), ("uniform", "0.01")])
def test_sliced_designs_hold_one_slice_of_temporaries(monkeypatch, quantizer, outliers):
    """Peak traced memory of the sliced design: the codes (a byte per weight), per-block scales and the outlier
    buffer beside one slice's temporaries, about 0.5 byte per weight byte plus a fixed part (the whole-tensor
    design: 5.4x the weight for Lloyd, 10.7x with outliers, 11.6x for uniform with outliers)."""
    import tracemalloc

    from bq_onnx import quantizers
    from bq_onnx.quantizers import lloyd, sliced

    monkeypatch.setattr(lloyd, "LLOYD_FIT_SAMPLE", 1 << 14)  # the fitting sample is a fixed cost, not the weight's
    w = np.random.default_rng(0).standard_normal((4096, 1500), dtype=np.float32)  # 23 MiB
    spec = quantizers.candidates(quantizer, outliers, 4, w.size)[0]
    tracemalloc.start()
    sliced.quantize_by_columns(w, 4, spec, 32, 0, 1 << 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1.25 * w.nbytes, peak / w.nbytes
