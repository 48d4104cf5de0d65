"""Exclusions like the peers' (issue 20 item 2): ``--exclude``/``--only`` by weight name, node name, op type or
subgraph path; ``--keep-fp`` as weight-name exclusion; a pattern that matches nothing is a usage error; the report
says what each pattern did."""

from __future__ import annotations

import json

import onnx
import pytest

from bq_onnx.cli import main
from bq_onnx.config import WeightsConfig
from bq_onnx.errors import UnsupportedError, UsageError
from bq_onnx.exclusions import Exclusions, Pattern, Target, matches
from bq_onnx.model_io import load_model
from bq_onnx.pass_manager import run_passes
from bq_onnx.passes.prepare import prepare_passes
from bq_onnx.stages.weights import find_weights
from tests.conftest import mixed_model
from tests.test_every_weight import if_model, nested_model
from tests.test_weight_chains import transposed_model


def _found(proto: onnx.ModelProto, **options):
    config = WeightsConfig(**options)
    model = run_passes(load_model(proto), prepare_passes(config))
    return find_weights(model, config)


def _quantized(proto: onnx.ModelProto, **options) -> list[str]:
    return sorted(w.name for w in _found(proto, **options).weights)


def test_patterns_parse_by_kind_and_bare_globs_are_weight_names():
    assert Pattern.parse("--exclude", "op:Conv") == Pattern("--exclude", "op:Conv", "op", "Conv")
    assert Pattern.parse("--exclude", "node:/head/*").kind == "node"
    assert Pattern.parse("--exclude", "graph:If:*").glob == "If:*"
    assert Pattern.parse("--exclude", "onnx::MatMul_12") == Pattern("--exclude", "onnx::MatMul_12", "weight",
                                                                     "onnx::MatMul_12")
    assert Pattern.parse("--only", "*.bias").kind == "weight"
    with pytest.raises(UsageError, match="empty glob"):
        Pattern.parse("--exclude", "op:")


def test_matching_reads_names_readers_and_scopes():
    target = Target("head.weight", "Loop:body/body", (("MatMul", "/head/MatMul"), ("Transpose", "t")))
    assert matches(Pattern.parse("-", "op:MatMul"), target)
    assert matches(Pattern.parse("-", "op:Trans*"), target)
    assert not matches(Pattern.parse("-", "op:Conv"), target)
    assert matches(Pattern.parse("-", "node:/head/*"), target)
    assert not matches(Pattern.parse("-", "node:/tail/*"), target)
    assert matches(Pattern.parse("-", "*.weight"), target)
    assert matches(Pattern.parse("-", "graph:Loop:*"), target)
    assert not matches(Pattern.parse("-", "graph:If:*"), target)


def test_exclude_by_op_type_node_name_and_weight_name():
    everything = ["C", "D", "E", "W1", "W2"]
    assert _quantized(mixed_model(), min_size=16) == everything
    assert _quantized(mixed_model(), min_size=16, exclude=("op:Conv",)) == ["D", "E", "W1", "W2"]
    assert _quantized(mixed_model(), min_size=16, exclude=("op:Conv*",)) == ["E", "W1", "W2"]
    assert _quantized(mixed_model(), min_size=16, exclude=("weight:W?",)) == ["C", "D", "E"]
    assert _quantized(mixed_model(), min_size=16, exclude=("op:Gemm", "op:Gather")) == ["C", "D", "W1"]


def test_only_is_the_inverse_and_combines_with_exclude():
    assert _quantized(mixed_model(), min_size=16, only=("op:Conv*",)) == ["C", "D"]
    assert _quantized(mixed_model(), min_size=16, only=("op:Conv*",), exclude=("D",)) == ["C"]
    found = _found(mixed_model(), min_size=16, only=("op:MatMul",))
    skipped = {c.name: c.skipped for c in found.candidates if c.skipped}
    assert skipped["C"] == "not matched by --only"


def test_node_names_and_subgraph_paths(tmp_path):
    proto = mixed_model()
    for node in proto.graph.node:
        node.name = f"/head/{node.op_type}" if node.op_type in ("Gemm", "MatMul") else f"/body/{node.op_type}"
    assert _quantized(proto, min_size=16, exclude=("node:/head/*",)) == ["C", "D", "E"]
    assert _quantized(proto, min_size=16, only=("node:/head/*",)) == ["W1", "W2"]
    inner = _quantized(nested_model(), min_size=16)  # every weight lives in a subgraph
    assert len(inner) >= 2 and _quantized(nested_model(), min_size=16, only=("graph:?*",)) == inner
    deepest = _quantized(nested_model(), min_size=16, exclude=("graph:*/*/*",))
    assert deepest and set(deepest) < set(inner)
    with pytest.raises(UnsupportedError, match="kept all 2 in float"):
        _found(nested_model(), min_size=16, exclude=("graph:?*",))
    branch = _quantized(if_model(), min_size=16, exclude=("graph:If:branch/then_branch",))
    assert branch == ["W_else"]


def test_a_weight_read_through_a_layout_op_matches_its_final_reader():
    assert _quantized(transposed_model(), min_size=16) != []
    assert _quantized(transposed_model(), min_size=16, only=("op:MatMul",)) == \
        _quantized(transposed_model(), min_size=16)


def test_keep_fp_stays_an_alias_of_weight_name_exclusion():
    assert _quantized(mixed_model(), min_size=16, keep_fp=("W*",)) == \
        _quantized(mixed_model(), min_size=16, exclude=("weight:W*",))
    found = _found(mixed_model(), min_size=16, keep_fp=("W*",))
    assert {c.name: c.skipped for c in found.candidates}["W1"] == "kept in floating point (--keep-fp)"


@pytest.mark.parametrize("option", [{"exclude": ("op:Softmax",)}, {"only": ("node:nothing*",)},
                                    {"keep_fp": ("*typo*",)}, {"exclude": ("graph:If:*",)}])
def test_a_pattern_matching_nothing_is_a_usage_error(option):
    with pytest.raises(UsageError, match="matches no weight") as exc:
        _found(mixed_model(), min_size=16, **option)
    assert exc.value.exit_code == 2 and "\n" not in str(exc.value)


def test_the_record_lists_what_each_pattern_did():
    ex = Exclusions(exclude=("op:Conv",), only=("op:Conv*", "op:MatMul"))
    for target in (Target("C", "", (("Conv", "c"),)), Target("D", "", (("ConvTranspose", "d"),)),
                   Target("W", "", (("MatMul", "m"),)), Target("E", "", (("Gather", "g"),))):
        ex.reason(target)
    ex.check()
    rows = ex.report()
    assert rows == [
        {"option": "--exclude", "pattern": "op:Conv", "kind": "op", "excluded": ["C"]},
        {"option": "--only", "pattern": "op:Conv*", "kind": "op", "selected": ["C", "D"]},
        {"option": "--only", "pattern": "op:MatMul", "kind": "op", "selected": ["W"]},
        {"option": "--only", "pattern": None, "kind": None, "excluded": ["E"]},
    ]


def test_cli_reports_exclusions_in_json_and_summary(tmp_path, capsys):
    src = tmp_path / "mixed.onnx"
    onnx.save(mixed_model(), str(src))
    out = tmp_path / "out.onnx"
    argv = ["optimize", str(src), "-o", str(out), "--min-size", "16", "--exclude", "op:Conv", "--only",
            "op:Conv*", "--only", "W1", "--bits-payload", "--no-verify"]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(layer["name"] for layer in report["layers"]) == ["D", "W1"]
    assert {(r["option"], r["pattern"]): r.get("excluded", r.get("selected")) for r in report["exclusions"]} == {
        ("--exclude", "op:Conv"): ["C"], ("--only", "op:Conv*"): ["C", "D"], ("--only", "W1"): ["W1"],
        ("--only", None): ["W2", "E"]}  # in the graph's order
    assert main([*argv, "--force"]) == 0
    text = capsys.readouterr().out
    assert "note: --exclude op:Conv kept 1 weight(s) in float: 'C'" in text


def test_cli_pattern_matching_nothing_exits_2_in_one_line_and_writes_nothing(tmp_path, capsys):
    src = tmp_path / "mixed.onnx"
    onnx.save(mixed_model(), str(src))
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(src), "-o", str(out), "--min-size", "16", "--exclude", "op:Softmax"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --exclude op:Softmax: matches no weight")
    assert not out.exists()


def test_help_says_how_patterns_match(capsys):
    with pytest.raises(SystemExit):
        main(["optimize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--exclude PATTERN" in text and "--only PATTERN" in text
    assert "op (that node's op type)" in text
