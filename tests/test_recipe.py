"""Recipes (issue 20 item 1, first part): ``--config recipe.toml`` holds the options of optimize with the flags'
names and checks, flags override it, ``--print-config`` writes the recipe a run would use, and the API takes it."""

from __future__ import annotations

from pathlib import Path

import pytest

from bq_onnx import recipe
from bq_onnx.api import optimize
from bq_onnx.cli import main
from bq_onnx.config import OptimizeConfig
from bq_onnx.errors import UsageError

LENET = Path(__file__).resolve().parent.parent / "models" / "lenet.onnx"


def _write(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_dumped_recipe_reads_back_to_the_same_configuration(tmp_path):
    config = OptimizeConfig().replace(bits=3.5, exclude=["op:Conv"], batch_axis=["state=1", "sr=none"],
                                      group_size="auto", input_shape=["x=1,3,8,8"], loss="logits=kl",
                                      min_bits=["*head*=6"], quantizer="vq", outliers=0.01, format="compact",
                                      seed=7, holdout=0.5, allowed_bits="2,4,8", granularity="tensor")
    path = _write(tmp_path, recipe.dump(config))
    assert recipe.config_from(path) == config
    assert recipe.config_from(path, bits=5) == config.replace(bits=5)


def test_a_recipe_may_be_one_optimize_table_and_uses_the_flags_checks(tmp_path):
    path = _write(tmp_path, '[optimize]\nbits = 4\ngroup_size = "auto"\nexclude = ["op:Conv"]\n')
    assert recipe.config_from(path) == OptimizeConfig().replace(bits=4, group_size="auto", exclude=["op:Conv"])
    for text, words in [("bitz = 4\n", "unknown option bitz"), ("group_size = -3\n", "must be >= 0"),
                        ("bits = \n", "not a TOML recipe"), ("[posterior]\nmethod = 'kfac'\n", "unexpected table"),
                        ("exclude = ['op:']\n", "empty glob")]:
        with pytest.raises(UsageError, match=words) as exc:
            recipe.config_from(_write(tmp_path, text, "bad.toml"))
        assert str(exc.value).startswith("--config ") and "\n" not in str(exc.value)


def test_cli_recipe_gives_the_flags_output_and_flags_override_it(tmp_path, capsys):
    flags = ["--bits", "5", "--group-size", "64", "--quantizer", "lloyd", "--no-verify", "-q"]
    assert main(["optimize", str(LENET), "-o", str(tmp_path / "flags.onnx"), *flags]) == 0
    path = _write(tmp_path, 'bits = 5\ngroup_size = 64\nquantizer = "lloyd"\n')
    assert main(["optimize", str(LENET), "-o", str(tmp_path / "recipe.onnx"), "--config", str(path),
                 "--no-verify", "-q"]) == 0
    assert (tmp_path / "flags.onnx").read_bytes() == (tmp_path / "recipe.onnx").read_bytes()
    override = _write(tmp_path, 'bits = 3\ngroup_size = 64\nquantizer = "lloyd"\n', "override.toml")
    assert main(["optimize", str(LENET), "-o", str(tmp_path / "override.onnx"), "--config", str(override),
                 "--bits", "5", "--no-verify", "-q"]) == 0
    assert (tmp_path / "override.onnx").read_bytes() == (tmp_path / "flags.onnx").read_bytes()


def test_print_config_writes_the_recipe_and_nothing_else(tmp_path, capsys):
    out = tmp_path / "never.onnx"
    capsys.readouterr()
    assert main(["optimize", str(LENET), "-o", str(out), "--bits", "5", "--exclude", "op:Gemm",
                 "--print-config"]) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    assert "bits = 5" in text and 'exclude = ["op:Gemm"]' in text
    printed = _write(tmp_path, text, "printed.toml")
    assert recipe.config_from(printed) == OptimizeConfig().replace(bits=5, exclude=["op:Gemm"])


def test_cli_bad_recipe_is_one_line_exit_2(tmp_path, capsys):
    path = _write(tmp_path, "bits = 'many'\n")
    capsys.readouterr()
    assert main(["optimize", str(LENET), "-o", str(tmp_path / "x.onnx"), "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --config {path}: ")
    assert main(["optimize", str(LENET), "--config", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_api_takes_a_recipe_path(tmp_path):
    path = _write(tmp_path, "bits = 6\ngroup_size = 64\n")
    a = optimize(LENET, config=path)
    b = optimize(LENET, bits=6, group_size=64)
    assert a.context.config == b.context.config
    assert optimize(LENET, config=path, bits=7).context.config.allocation.bits == 7


# --- provenance in the output and --recipe-from (issue 20 item 1, the rest) ------------------------------------

LENET_CALIB = LENET.with_name("lenet_calib.npz")


def _metadata(path: Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def test_output_records_version_recipe_and_input_hashes(tmp_path):
    import hashlib

    import numpy as np

    from bq_onnx import __version__
    from bq_onnx.calibration import load_calibration
    from bq_onnx.model_io import load_model
    from bq_onnx.provenance import calibration_sha256

    out = tmp_path / "a.onnx"
    assert main(["optimize", str(LENET), "--calib", str(LENET_CALIB), "--bits", "5", "--quantizer", "lloyd",
                 "-o", str(out), "--no-verify", "-q"]) == 0
    meta = _metadata(out)
    assert meta["bq_onnx.version"] == __version__
    assert meta["bq_onnx.model_sha256"] == hashlib.sha256(LENET.read_bytes()).hexdigest()
    assert recipe.config_from_text(meta["bq_onnx.recipe"], "x") == OptimizeConfig().replace(bits=5,
                                                                                             quantizer="lloyd")
    assert meta["bq_onnx.recipe"] == recipe.dump(OptimizeConfig().replace(bits=5, quantizer="lloyd"))
    # the calibration hash covers the samples as loaded: the same samples as a folder of parts hash the same,
    # one changed value does not
    model = load_model(LENET)
    loaded = load_calibration(LENET_CALIB, model)
    assert meta["bq_onnx.calibration_sha256"] == calibration_sha256(loaded)
    arrays = dict(np.load(LENET_CALIB))
    folder = tmp_path / "parts"
    folder.mkdir()
    n = next(iter(arrays.values())).shape[0]
    np.savez(folder / "a.npz", **{k: v[: n // 2] for k, v in arrays.items()})
    np.savez(folder / "b.npz", **{k: v[n // 2:] for k, v in arrays.items()})
    assert calibration_sha256(load_calibration(folder, model)) == meta["bq_onnx.calibration_sha256"]
    changed = {k: v.copy() for k, v in arrays.items()}
    next(iter(changed.values())).flat[0] += 1
    assert calibration_sha256(load_calibration(changed, model)) != meta["bq_onnx.calibration_sha256"]
    # no paths, no times: the same model from another folder gives the same bytes
    assert not any(str(tmp_path) in v or str(LENET.parent) in v for v in meta.values())
    moved = tmp_path / "elsewhere" / "lenet.onnx"
    moved.parent.mkdir()
    moved.write_bytes(LENET.read_bytes())
    again = tmp_path / "b.onnx"
    assert main(["optimize", str(moved), "--calib", str(folder), "--bits", "5", "--quantizer", "lloyd",
                 "-o", str(again), "--no-verify", "-q"]) == 0
    assert again.read_bytes() == out.read_bytes()


def test_without_calibration_the_record_says_none(tmp_path):
    result = optimize(LENET, bits=6)
    assert result.model.metadata_props["bq_onnx.calibration_sha256"] == "none"


def test_inspect_shows_the_provenance_on_both_paths(tmp_path, capsys):
    from bq_onnx.inspect import inspect, inspect_ir

    out = tmp_path / "a.onnx"
    assert main(["optimize", str(LENET), "--bits", "6", "-o", str(out), "--no-verify", "-q"]) == 0
    meta = _metadata(out)
    fast, slow = inspect(out), inspect_ir(out)
    assert fast["provenance"] == slow["provenance"] == {
        "version": meta["bq_onnx.version"], "recipe": meta["bq_onnx.recipe"],
        "model_sha256": meta["bq_onnx.model_sha256"], "calibration_sha256": "none"}
    assert inspect(LENET)["provenance"] is None
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"model sha256 {meta['bq_onnx.model_sha256']}" in text and "  bits = 6" in text


def test_recipe_from_reproduces_the_bytes_and_refuses_other_inputs(tmp_path, capsys):
    import numpy as np

    first = tmp_path / "first.onnx"
    assert main(["optimize", str(LENET), "--calib", str(LENET_CALIB), "--bits", "5.5", "--format", "compact",
                 "--group-size", "64", "-o", str(first), "-q"]) == 0
    again = tmp_path / "again.onnx"
    assert main(["optimize", str(LENET), "--calib", str(LENET_CALIB), "--recipe-from", str(first),
                 "-o", str(again), "-q"]) == 0
    assert again.read_bytes() == first.read_bytes()
    capsys.readouterr()
    assert main(["optimize", str(LENET), "--recipe-from", str(first), "--print-config"]) == 0
    assert capsys.readouterr().out == _metadata(first)["bq_onnx.recipe"]
    # other calibration samples, none, another model, a file without a record: one line, exit 2, no output
    arrays = {k: v.copy() for k, v in np.load(LENET_CALIB).items()}
    next(iter(arrays.values())).flat[0] += 1
    other = tmp_path / "other_calib.npz"
    np.savez(other, **arrays)
    never = tmp_path / "never.onnx"
    cases = [(["--calib", str(other)], "the calibration data have sha256"),
             ([], "give it again with --calib"),
             (["--calib", str(LENET_CALIB), "--config", str(_write(tmp_path, "bits = 5\n"))], "give one")]
    for extra, words in cases:
        capsys.readouterr()
        assert main(["optimize", str(LENET), "--recipe-from", str(first), "-o", str(never), *extra]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
        assert not never.exists()
    digits = LENET.with_name("digits_mlp.onnx")
    assert main(["optimize", str(digits), "--recipe-from", str(first), "-o", str(never)]) == 2
    assert "another model" in capsys.readouterr().err
    assert main(["optimize", str(LENET), "--recipe-from", str(LENET), "-o", str(never)]) == 2
    assert "no bq-onnx provenance" in capsys.readouterr().err
    assert not never.exists()


def test_the_model_hash_covers_its_external_data(tmp_path, capsys):
    import hashlib

    import onnx

    model = tmp_path / "m" / "lenet.onnx"
    model.parent.mkdir()
    onnx.save(onnx.load(str(LENET)), str(model), save_as_external_data=True, all_tensors_to_one_file=True,
              location="lenet.onnx_data", size_threshold=0)
    first = tmp_path / "first.onnx"
    assert main(["optimize", str(model), "--bits", "6", "-o", str(first), "--no-verify", "-q"]) == 0
    data = model.with_name("lenet.onnx_data")
    want = hashlib.sha256(model.read_bytes() + data.read_bytes()).hexdigest()
    assert _metadata(first)["bq_onnx.model_sha256"] == want
    # the same graph with other weights in its data file is another model
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    capsys.readouterr()
    never = tmp_path / "never.onnx"
    assert main(["optimize", str(model), "--recipe-from", str(first), "-o", str(never), "-q"]) == 2
    assert "another model" in capsys.readouterr().err and not never.exists()


def test_a_posterior_file_is_hashed_and_checked_on_rerun(tmp_path, capsys):
    import hashlib

    posterior = tmp_path / "p.npz"
    assert main(["posterior", str(LENET), "--calib", str(LENET_CALIB), "-o", str(posterior), "-q"]) == 0
    first = tmp_path / "first.onnx"
    assert main(["optimize", str(LENET), "--posterior", str(posterior), "--bits", "5", "-o", str(first), "-q",
                 "--no-verify"]) == 0
    assert _metadata(first)["bq_onnx.posterior_sha256"] == hashlib.sha256(posterior.read_bytes()).hexdigest()
    again = tmp_path / "again.onnx"
    assert main(["optimize", str(LENET), "--posterior", str(posterior), "--recipe-from", str(first),
                 "-o", str(again), "-q", "--no-verify"]) == 0
    assert again.read_bytes() == first.read_bytes()
    other = tmp_path / "other.npz"
    assert main(["posterior", str(LENET), "--calib", str(LENET_CALIB), "--method", "activations", "-o", str(other),
                 "-q"]) == 0
    never = tmp_path / "never.onnx"
    for extra, words in [([], "give it again with --posterior"),
                         (["--posterior", str(other)], "another posterior")]:
        capsys.readouterr()
        assert main(["optimize", str(LENET), "--recipe-from", str(first), "-o", str(never), *extra]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
    plain = tmp_path / "plain.onnx"
    assert main(["optimize", str(LENET), "--bits", "5", "-o", str(plain), "-q", "--no-verify"]) == 0
    assert "bq_onnx.posterior_sha256" not in _metadata(plain)
    capsys.readouterr()
    assert main(["optimize", str(LENET), "--recipe-from", str(plain), "--posterior", str(posterior),
                 "-o", str(never)]) == 2
    assert "made without --posterior" in capsys.readouterr().err and not never.exists()


def test_an_api_only_option_is_recorded_as_not_rerunnable(tmp_path, capsys):
    import numpy as np

    labels = np.load(LENET_CALIB.with_name("lenet_data.npz"))["calib_labels"]
    out = tmp_path / "api.onnx"
    optimize(LENET, bits=6, calib=LENET_CALIB, labels=labels, calib_samples=64).save(out, verify=False)
    recorded = _metadata(out)["bq_onnx.recipe"]
    assert recorded.startswith("# not writable as a recipe: labels was given as ndarray")
    never = tmp_path / "never.onnx"
    assert main(["optimize", str(LENET), "--calib", str(LENET_CALIB), "--recipe-from", str(out),
                 "-o", str(never)]) == 2
    err = capsys.readouterr().err
    assert "cannot be repeated from the record (labels was given as ndarray" in err and err.count("\n") == 1
    assert not never.exists()
    with pytest.raises(UsageError, match="cannot be repeated"):
        optimize(LENET, calib=LENET_CALIB, recipe_from=out)
