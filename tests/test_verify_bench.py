"""`bq-onnx verify` (candidate vs reference on calibration data) and `bq-onnx bench` (latency, memory)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import bq_onnx
from bq_onnx.cli import main
from tests.conftest import MODELS

LENET = MODELS / "lenet.onnx"


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err, expected, fragment):
    assert code == expected, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("verify")
    with np.load(MODELS / "lenet_data.npz") as d:
        np.savez(folder / "calib.npz", input=d["test_input"][:200])
        np.save(folder / "labels.npy", d["test_labels"][:200])
    bq_onnx.optimize(LENET, bits=2, allocator="uniform").save(folder / "lenet2.onnx")
    bq_onnx.optimize(LENET, bits=4, allocator="uniform").save(folder / "lenet4.onnx")
    return folder


def test_verify_model_against_itself_passes_in_both_runtimes(data, capsys):
    code, out, err = _run(["verify", LENET, LENET, "--calib", data / "calib.npz", "--labels", data / "labels.npy",
                           "--runtime", "onnxruntime,openvino", "--max-kl", "1e-9", "--max-rel-error", "1e-6",
                           "--min-cosine", "0.999999", "--max-accuracy-drop", "0", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["passed"] and report["samples"] == 200 and report["skipped"] == []
    assert [r["runtime"] for r in report["runtimes"]] == ["onnxruntime", "openvino"]
    for r in report["runtimes"]:
        (o,) = r["outputs"]
        assert o["output"] == "logits" and o["classification"]
        assert o["agreement"] == 1.0 and o["kl"] < 1e-9 and o["rel_error"] < 1e-6
        assert o["cosine"] == pytest.approx(1.0)
        assert o["accuracy_reference"] == o["accuracy_candidate"] > 0.9
    code, out, _ = _run(["verify", LENET, LENET, "--calib", data / "calib.npz"], capsys)
    assert code == 0 and "agreement" in out and "passed" in out


def test_verify_2bit_fails_strict_threshold_and_passes_loose_ones(data, capsys):
    common = ["verify", LENET, data / "lenet2.onnx", "--calib", data / "calib.npz", "--labels", data / "labels.npy",
              "--runtime", "onnxruntime,openvino"]
    code, out, err = _run([*common, "--max-kl", "1e-6"], capsys)
    _one_line_error(code, err, 6, "kl failed in onnxruntime, output 'logits'")
    assert "FAIL: kl" in out
    code, out, err = _run([*common, "--min-agreement", "0.9", "--max-kl", "0.5", "--max-rel-error", "2",
                           "--min-cosine", "0.5", "--max-accuracy-drop", "10", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    for r in report["runtimes"]:
        o = r["outputs"][0]
        assert 0 < o["kl"] < 0.5 and o["rel_error"] > 0 and o["cosine"] < 1
        assert o["accuracy_reference"] > 0.9 and o["accuracy_candidate"] > 0.8
        assert "accuracy_drop_points" in o


def test_verify_api_and_check(data):
    from bq_onnx.compare import verify_models
    from bq_onnx.errors import VerificationError

    report = verify_models(LENET, data / "lenet4.onnx", data / "calib.npz", min_agreement=0.95)
    assert report["passed"] and report["runtimes"][0]["runtime"] == "onnxruntime"
    with pytest.raises(VerificationError, match="rel_error failed in onnxruntime"):
        verify_models(LENET, data / "lenet2.onnx", data / "calib.npz", max_rel_error=1e-9, check=True)
    # the config's fields as keywords, parsed as the flags are: a labels file, comma-separated names
    from bq_onnx.config import VerificationConfig
    from bq_onnx.errors import UsageError

    report = verify_models(LENET, LENET, data / "calib.npz", labels=data / "labels.npy", runtimes="onnxruntime",
                           providers="cpu", batch_size=50, calib_samples=100)
    out = report["runtimes"][0]["outputs"][0]
    assert report["samples"] == 100 and out["accuracy_reference"] == out["accuracy_candidate"] is not None
    same = verify_models(LENET, LENET, data / "calib.npz", config=VerificationConfig(batch_size=50, calib_samples=100,
                                                                                     labels=str(data / "labels.npy")))
    assert same["runtimes"] == report["runtimes"]
    with pytest.raises(UsageError, match="--batch-size must be >= 1"):
        verify_models(LENET, LENET, data / "calib.npz", batch_size=0)


def test_verify_bad_inputs_are_one_line_errors(data, tmp_path, capsys):
    code, _, err = _run(["verify", LENET, LENET, "--calib", MODELS / "digits_mlp_calib.npz"], capsys)
    _one_line_error(code, err, 5, "expects rank 4")
    code, _, err = _run(["verify", LENET, tmp_path / "missing.onnx", "--calib", data / "calib.npz"], capsys)
    _one_line_error(code, err, 3, "no such file")
    np.save(tmp_path / "few.npy", np.zeros(10, dtype=np.int64))
    code, _, err = _run(["verify", LENET, LENET, "--calib", data / "calib.npz", "--labels", tmp_path / "few.npy"],
                        capsys)
    _one_line_error(code, err, 5, "10 label(s) for 200")
    code, _, err = _run(["verify", LENET, LENET, "--calib", data / "calib.npz", "--output-name", "nope"], capsys)
    _one_line_error(code, err, 2, "--output-name 'nope'")


def test_verify_unavailable_runtime_is_skipped_unless_it_is_the_only_one(data, capsys, monkeypatch):
    from bq_onnx.runtimes.ov import OpenVinoRuntime

    monkeypatch.setattr(OpenVinoRuntime, "available", lambda self: (False, "openvino is not installed (test)"))
    code, out, err = _run(["verify", LENET, LENET, "--calib", data / "calib.npz", "--calib-samples", "20",
                           "--runtime", "onnxruntime,openvino"], capsys)
    assert code == 0, err
    assert "skipped openvino: openvino is not installed (test)" in out
    code, _, err = _run(["verify", LENET, LENET, "--calib", data / "calib.npz", "--runtime", "openvino"], capsys)
    _one_line_error(code, err, 4, "no requested runtime is available")


def test_verify_execution_providers_each_checked_missing_ones_skipped(data, capsys):
    """--ep cpu,cuda,tensorrt: CPU runs; GPU providers without onnxruntime-gpu are skipped with the reason."""
    import onnxruntime

    code, out, err = _run(["verify", LENET, data / "lenet4.onnx", "--calib", data / "calib.npz", "--calib-samples",
                           "50", "--ep", "cpu,cuda,tensorrt", "--min-agreement", "0.9", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    have = set(onnxruntime.get_available_providers())
    checked = [r["runtime"] for r in report["runtimes"]]
    skipped = {s["runtime"]: s["reason"] for s in report["skipped"]}
    assert checked[0] == "onnxruntime"
    for ep, full in (("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider")):
        if full not in have:
            assert f"onnxruntime[{ep}]" in skipped and full in skipped[f"onnxruntime[{ep}]"]
    code, _, err = _run(["verify", LENET, LENET, "--calib", data / "calib.npz", "--ep", "rocm"], capsys)
    if "ROCMExecutionProvider" not in have:
        _one_line_error(code, err, 4, "no requested runtime is available")
    code, _, err = _run(["verify", LENET, LENET, "--calib", data / "calib.npz", "--ep", "warp"], capsys)
    _one_line_error(code, err, 2, "unknown execution provider 'warp'")


def test_ort_providers_map_and_report_missing_ones():
    from bq_onnx.errors import UsageError
    from bq_onnx.runtimes.ort import OnnxRuntime, provider_names

    assert provider_names("cpu") == ["CPUExecutionProvider"]
    assert provider_names(["cuda", "tensorrt", "rocm", "migraphx"]) == [
        "CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider", "MIGraphXExecutionProvider"]
    assert OnnxRuntime().available() == (True, "")
    ok, why = OnnxRuntime(providers=["FooExecutionProvider"]).available()
    assert not ok and "FooExecutionProvider not available" in why
    with pytest.raises(UsageError, match="unknown execution provider"):
        provider_names("warp-drive")


def test_bench_two_models_two_batches(data, capsys):
    code, out, err = _run(["bench", LENET, data / "lenet4.onnx", "--batch", "1,2", "--iterations", "5",
                           "--warmup", "1", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert not report["exact"] and "fast" in report["settings"] and report["skipped"] == []
    rows = report["results"]
    assert [(r["model"].endswith("lenet4.onnx"), r["batch"]) for r in rows] == [
        (False, 1), (False, 2), (True, 1), (True, 2)]
    for r in rows:
        assert r["status"] == "ok" and r["runtime"] == "onnxruntime" and r["provider"] == "CPUExecutionProvider"
        lat = r["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
        assert r["session_create_s"] > 0 and r["throughput_per_s"] > 0 and r["peak_rss_mib"] > 10
        assert r["latency_ratio"] > 0 and r["memory_ratio"] > 0
    assert rows[0]["latency_ratio"] == rows[0]["memory_ratio"] == 1.0


def test_bench_table_exact_openvino_and_missing_provider_skipped(data, capsys):
    code, out, err = _run(["bench", LENET, "--runtime", "onnxruntime,openvino", "--ep", "cuda", "--iterations",
                           "3", "--warmup", "1", "--exact", "--calib", data / "calib.npz"], capsys)
    assert code == 0, err
    assert "skipped onnxruntime CUDAExecutionProvider: onnxruntime CUDAExecutionProvider not available" in out
    lines = out.splitlines()
    assert "p50 ms" in lines[0] and "mem/base" in lines[0]
    assert any(line.startswith("lenet.onnx") and "openvino" in line and line.endswith("ok") for line in lines)
    assert "settings: exact" in out and "inputs: calibration data" in out


def test_bench_bad_inputs(tmp_path, capsys):
    code, _, err = _run(["bench", tmp_path / "missing.onnx"], capsys)
    _one_line_error(code, err, 3, "no such file")
    code, _, err = _run(["bench", LENET, "--batch", "0"], capsys)
    _one_line_error(code, err, 2, "--batch")
    code, _, err = _run(["bench", LENET, "--calib", MODELS / "digits_mlp_calib.npz"], capsys)
    _one_line_error(code, err, 5, "expects rank 4")


def test_progress_bars_show_total_and_unit(capsys):
    """A long step's bar says done/total in its own unit ("10/10 tensors", never tqdm's "10tensor"), and a batch
    loop counts samples (the sum of the batch sizes), the total known before the first item."""
    from bq_onnx.progress import progress

    assert list(progress(iter(range(10)), "loss tables", True)) == list(range(10))
    err = capsys.readouterr().err
    assert "0/10 tensors" in err and "tensor " not in err and "<" in err, err  # ETA field: elapsed<remaining
    assert list(progress([3, 3, 2], "posterior", True, unit="samples", size=lambda n: n)) == [3, 3, 2]
    err = capsys.readouterr().err
    assert "0/8 samples" in err and "samples/s" in err, err
    assert list(progress(range(2), "x", False)) == [0, 1] and capsys.readouterr().err == ""
