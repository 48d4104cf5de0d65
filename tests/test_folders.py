"""Folders (issue 20 item 3): ``bq-onnx optimize DIR -o OUTDIR`` on a real optimum export and on any folder.

The optimum export is made here: a T5 with tiny dimensions and random weights (no download), exported by optimum's
ONNX exporter to ``encoder_model.onnx`` + ``decoder_model.onnx`` + ``config.json`` + generation and tokenizer
files; the encoder is then moved to external data as optimum writes it for large models. Skipped (with the reason)
only when torch, transformers or optimum's ONNX exporter are not installed (``pip install -e ".[test]"`` has them).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bq_onnx import optimize_folder
from bq_onnx.cli import main
from bq_onnx.errors import OutputError, UnsupportedError, UsageError

MODELS = Path(__file__).resolve().parent.parent / "models"


def _tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (hidden ones included)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def t5_export(tmp_path_factory) -> Path:
    """A real optimum export of a tiny random T5 (encoder and decoder files), encoder weights in external data."""
    pytest.importorskip("torch", reason="torch not installed (pip install torch==2.13.0; the test extra has it)")
    transformers = pytest.importorskip("transformers", reason="transformers not installed (the test extra has it)")
    exporters = pytest.importorskip("optimum.exporters.onnx",
                                    reason="optimum ONNX exporter not installed (optimum-onnx)")
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers

    base = tmp_path_factory.mktemp("t5")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                                   num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    transformers.T5ForConditionalGeneration(config).save_pretrained(base / "hf")
    words = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *(f"w{i}" for i in range(61))])}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(base / "hf")
    export = base / "export"
    exporters.main_export(str(base / "hf"), output=str(export), task="text2text-generation", opset=17,
                          device="cpu", do_validation=False)
    encoder = onnx.load(str(export / "encoder_model.onnx"))
    onnx.save(encoder, str(export / "encoder_model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="encoder_model.onnx_data", size_threshold=0)
    return export


@pytest.fixture(scope="module")
def t5_calib(t5_export, tmp_path_factory) -> dict[str, Path]:
    """Calibration data per model (the decoder's random verification inputs would hold all-zero masks: NaN)."""
    base = tmp_path_factory.mktemp("calib")
    files = {}
    for name in ("encoder_model", "decoder_model"):
        files[name] = base / f"{name}.npz"
        np.savez(files[name], **_feeds(_session(t5_export / f"{name}.onnx"), seed=1, batch=16))
    return files


def _feeds(session: ort.InferenceSession, seed: int, batch: int = 2, length: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in session.get_inputs():
        if "ids" in i.name:
            feeds[i.name] = rng.integers(2, 64, (batch, length)).astype(np.int64)
        elif "mask" in i.name:
            feeds[i.name] = np.ones((batch, length), np.int64)
        else:  # encoder_hidden_states
            feeds[i.name] = rng.standard_normal((batch, length, 32)).astype(np.float32)
    return feeds


def test_an_optimum_export_is_optimized_into_a_folder_that_loads_the_same(t5_export, t5_calib, tmp_path, capsys):
    expected = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "encoder_model.onnx", "encoder_model.onnx_data", "decoder_model.onnx"}
    assert expected <= set(_tree(t5_export)), sorted(_tree(t5_export))
    before = _tree(t5_export)
    out = tmp_path / "out"
    assert main(["optimize", str(t5_export), "-o", str(out), "--bits", "6", "--json",
                 *(f"--calib={n}={f}" for n, f in t5_calib.items())]) == 0
    report = json.loads(capsys.readouterr().out)
    assert _tree(t5_export) == before  # the input folder is never written
    written = _tree(out)
    # other files copied byte for byte; each model beside its own external data, none of the input's
    for name in expected - {"encoder_model.onnx", "encoder_model.onnx_data", "decoder_model.onnx"}:
        assert written[name] == before[name]
    assert "encoder_model.onnx_data" not in written and not any(n.startswith(".bq-tmp") for n in written)
    data = [n for n in written if n.startswith("encoder_model.onnx.") and n.endswith(".data")]
    assert len(data) == 1
    proto = onnx.load(str(out / "encoder_model.onnx"), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {data[0]}
    assert set(report["models"]) == {"encoder_model", "decoder_model"} and report["budget"] == "per-model"
    for name in t5_calib:  # each with its own calibration data
        assert report["models"][name]["posterior"]["samples"] > 0
    assert sorted(report["copied"]) == sorted(expected - {"encoder_model.onnx", "encoder_model.onnx_data",
                                                          "decoder_model.onnx"})
    for name, r in report["models"].items():
        assert r["verification"]["passed"] and r["allocation"]["achieved_bits"] <= 6 + 1e-9
        assert r["output"]["path"] == os.fspath(out / f"{name}.onnx")
    # the quantized pair computes what the float pair does, on inputs the calibration never saw
    for name in ("encoder_model", "decoder_model"):
        ref, new = _session(t5_export / f"{name}.onnx"), _session(out / f"{name}.onnx")
        feeds = _feeds(ref, seed=7)
        a, b = ref.run(None, feeds)[0].ravel(), new.run(None, feeds)[0].ravel()
        assert np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.98, name
        assert os.stat(out / f"{name}.onnx").st_mode & 0o777 == 0o666 & ~_umask()


def test_optimum_loads_the_output_folder(t5_export, t5_calib, tmp_path):
    onnxruntime_models = pytest.importorskip("optimum.onnxruntime", reason="optimum.onnxruntime not installed")
    out = tmp_path / "out"
    optimize_folder(t5_export, bits=8, calib=t5_calib).save(out)
    model = onnxruntime_models.ORTModelForSeq2SeqLM.from_pretrained(out, use_cache=False)
    reference = onnxruntime_models.ORTModelForSeq2SeqLM.from_pretrained(t5_export, use_cache=False)
    ids = np.array([[5, 9, 12, 1]], np.int64)
    import torch

    got = model.generate(torch.from_numpy(ids), max_new_tokens=4, do_sample=False)
    want = reference.generate(torch.from_numpy(ids), max_new_tokens=4, do_sample=False)
    assert got.shape == want.shape and got.shape[1] > 1


def test_a_shared_budget_spends_the_bits_across_the_models(t5_export, t5_calib):
    # without the guard: what it writes (repaired, or uniform) is measured, not the allocator's least expected loss
    per_model = optimize_folder(t5_export, bits=5.5, calib=t5_calib, no_guard=True)
    shared = optimize_folder(t5_export, bits=5.5, calib=t5_calib, shared_budget=True, no_guard=True)
    numel = {n: r.report["totals"]["numel"] for n, r in shared.results.items()}
    split = shared.report["split"]
    # the shares add up to the one budget, each model kept its own, and the total is within it
    assert sum(split[n] * numel[n] for n in numel) == pytest.approx(5.5 * sum(numel.values()))
    assert len(set(round(b, 6) for b in split.values())) > 1
    for name, r in shared.results.items():
        assert r.context.config.allocation.bits == pytest.approx(split[name])
        assert r.report["allocation"]["achieved_bits"] <= split[name] + 1e-9
    assert shared.report["totals"]["achieved_bits"] <= 5.5 + 1e-9
    # spent together, the expected loss over both models is no larger than each model spending alone
    loss = {k: sum(r.report["allocation"]["expected_loss"] for r in v.results.values())
            for k, v in (("per_model", per_model), ("shared", shared))}
    assert loss["shared"] <= loss["per_model"] * (1 + 1e-6), loss


def _umask() -> int:
    from bq_onnx.writing import output_mode

    return 0o666 & ~output_mode()


@pytest.fixture
def plain_folder(tmp_path) -> Path:
    """Any folder: two repository models (one in a subfolder) and a file to copy."""
    folder = tmp_path / "pipeline"
    (folder / "head").mkdir(parents=True)
    (folder / "lenet.onnx").write_bytes((MODELS / "lenet.onnx").read_bytes())
    (folder / "head" / "digits.onnx").write_bytes((MODELS / "digits_mlp.onnx").read_bytes())
    (folder / "notes.txt").write_text("kept\n")
    return folder


def test_bad_folder_runs_are_one_line_and_write_nothing(plain_folder, tmp_path, capsys):
    before = _tree(plain_folder)
    out = tmp_path / "out"
    calib = str(MODELS / "lenet_calib.npz")
    cases = [(["-o", str(plain_folder / "inside")], 7, "inside the input folder"),
             (["-o", str(plain_folder)], 7, "inside the input folder"),
             (["-o", str(out), "--calib", f"nosuch={calib}"], 2, "no model named 'nosuch'"),
             (["-o", str(out), "--calib", f"lenet={calib}", "--calib", f"lenet={calib}"], 2, "given twice"),
             (["-o", str(out), "--shared-budget", "--allocator", "uniform"], 2, "--shared-budget needs"),
             (["-o", str(out), "--recipe-from", str(MODELS / "lenet.onnx")], 2, "re-runs one model")]
    for extra, code, words in cases:
        capsys.readouterr()
        assert main(["optimize", str(plain_folder), *extra, "-q"]) == code, extra
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
        assert not out.exists() and _tree(plain_folder) == before
    assert main(["optimize", str(MODELS / "lenet.onnx"), "--shared-budget", "-o", str(out / "x.onnx")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no models\n")
    assert main(["optimize", str(empty), "-o", str(out)]) == 4
    # an existing output folder holding a file to write: refused without --force before any work
    out.mkdir()
    (out / "lenet.onnx").write_bytes(b"mine")
    (out / "other.txt").write_text("untouched")
    capsys.readouterr()
    assert main(["optimize", str(plain_folder), "-o", str(out), "--bits", "6", "-q"]) == 7
    assert "exists; pass --force" in capsys.readouterr().err
    assert (out / "lenet.onnx").read_bytes() == b"mine" and not (out / "head").exists()
    # with --force: the named files replaced, other files kept
    assert main(["optimize", str(plain_folder), "-o", str(out), "--bits", "6", "--force", "-q"]) == 0
    assert (out / "other.txt").read_text() == "untouched" and (out / "notes.txt").read_text() == "kept\n"
    assert onnx.load(str(out / "head" / "digits.onnx")).metadata_props
    assert _tree(plain_folder) == before


def test_nothing_appears_unless_every_model_verified(plain_folder, tmp_path, monkeypatch):
    from bq_onnx.api import OptimizeResult
    from bq_onnx.errors import VerificationError

    real = OptimizeResult._verify

    def fail_digits(self, out, *args, **kwargs):
        if "digits" in str(self.source):
            raise VerificationError("digits: injected mismatch")
        return real(self, out, *args, **kwargs)

    monkeypatch.setattr(OptimizeResult, "_verify", fail_digits)
    result = optimize_folder(plain_folder, bits=6)
    with pytest.raises(VerificationError):
        result.save(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]  # no output, no staging folder


def test_api_folder_names_and_errors(plain_folder, tmp_path):
    calib = {"lenet": MODELS / "lenet_calib.npz"}
    result = optimize_folder(plain_folder, bits=6, calib=calib)
    assert set(result.results) == {"lenet", "head/digits"} and result.report["copied"] == ["notes.txt"]
    assert result.results["lenet"].calibration is not None and result.results["head/digits"].calibration is None
    report = result.save(tmp_path / "out")
    assert report["output"]["model_bytes"] < report["totals"]["input_model_bytes"]
    assert sorted(_tree(tmp_path / "out")) == ["head/digits.onnx", "lenet.onnx", "notes.txt"]
    with pytest.raises(UsageError, match="no model named 'x'"):
        optimize_folder(plain_folder, calib={"x": "y.npz"})
    with pytest.raises(OutputError, match="inside the input folder"):
        result.save(plain_folder / "out")
    with pytest.raises(UnsupportedError, match="no .onnx model"):
        optimize_folder(_empty(tmp_path))
    import bq_onnx

    with pytest.raises(UsageError, match="optimize_folder"):
        bq_onnx.optimize(plain_folder)


def _empty(tmp_path: Path) -> Path:
    folder = tmp_path / "nothing"
    folder.mkdir()
    return folder


def test_each_model_of_a_shared_budget_re_runs_alone_byte_identically(plain_folder, tmp_path):
    calib = {"lenet": MODELS / "lenet_calib.npz", "head/digits": MODELS / "digits_mlp_calib.npz"}
    out = tmp_path / "out"
    result = optimize_folder(plain_folder, bits=5, calib=calib, shared_budget=True)
    result.save(out, verify=False)
    for name, data in calib.items():
        again = tmp_path / f"{name.replace('/', '_')}.onnx"
        assert main(["optimize", str(plain_folder / f"{name}.onnx"), "--calib", str(data), "--recipe-from",
                     str(out / f"{name}.onnx"), "-o", str(again), "--no-verify", "-q"]) == 0
        assert again.read_bytes() == (out / f"{name}.onnx").read_bytes(), name
        meta = {p.key for p in onnx.load(str(again)).metadata_props}
        assert "bq_onnx.posterior_sha256" not in meta  # the run's own posterior, reused, is not an input
