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
