"""Fast start (issue 13 item 6): ``bq-onnx inspect`` of a bq-onnx output reads it with onnx's protobuf classes
alone (no numpy, onnx package or onnx-ir), and says exactly what the IR path says."""

from __future__ import annotations

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


def test_inspect_of_a_float_model_still_surveys_on_the_ir():
    """The weight survey needs onnx-ir: a float model takes that path (and its checks)."""
    assert "onnx_ir" in _loaded_after(f"import bq_onnx\nbq_onnx.inspect({str(LENET)!r})")


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
