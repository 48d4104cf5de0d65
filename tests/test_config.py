"""Options are declared once (bq_onnx/config.py): the CLI, the API and the pipeline follow that one declaration."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import bq_onnx
from bq_onnx import config as cfg
from bq_onnx.cli import _parser
from bq_onnx.errors import UsageError
from bq_onnx.flags import PREFIX, given
from tests.conftest import MODELS

REPO = Path(__file__).resolve().parent.parent
FIRST_PARTY = ("bq_onnx", "passes", "runtimes")
CONCERNS = (*cfg.concern_types().values(), cfg.VerificationConfig, cfg.BenchConfig)

# Second declarations that stay for now, as (file, name, default), each as often as it occurs. Exactly these.
ALLOWED = [
]
HELPER_PARAMETERS_NOT_SCANNED = {"seed"}
"""``seed=0`` is every random helper's conventional default (quantizers, vector, allocation, samples); the
pipeline always passes the option's value. Dataclass fields and argparse defaults named ``seed`` are scanned."""


def _defaults() -> dict[str, set]:
    """Option name -> the values that would repeat its default (the typed default and its CLI text)."""
    out: dict[str, set] = {}
    for concern in CONCERNS:
        for name, opt in concern.options().items():
            if opt.default is None or opt.default is False or opt.default == ():
                continue  # "absent" is not a choice worth declaring
            out.setdefault(name, set()).add(opt.default)
            out[name].add(opt.shown_default())
    return out


def _literal(node: ast.AST):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError):
        return _literal  # not a literal: never equal to a default


def _declarations(tree: ast.AST):
    """(name, default value) for every parameter default, class-body field, DEFAULT_X constant and argparse
    ``default=`` in a module."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            a = node.args
            positional = a.posonlyargs + a.args
            pairs = [*zip(positional[len(positional) - len(a.defaults):], a.defaults),
                     *zip(a.kwonlyargs, a.kw_defaults)]
            for arg, default in pairs:
                if default is not None and arg.arg not in HELPER_PARAMETERS_NOT_SCANNED:
                    yield arg.arg, _literal(default)
        elif isinstance(node, ast.ClassDef):
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
                    yield stmt.target.id, _literal(stmt.value)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name.startswith("DEFAULT_"):
                yield name.removeprefix("DEFAULT_").lower(), _literal(node.value)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            flags = [_literal(x) for x in node.args]
            long = [f for f in flags if isinstance(f, str) and f.startswith("--")]
            keywords = {k.arg: k.value for k in node.keywords}
            if long and "default" in keywords:
                dest = _literal(keywords["dest"]) if "dest" in keywords else long[0][2:].replace("-", "_")
                yield dest, _literal(keywords["default"])


def test_no_option_default_is_declared_twice():
    defaults = _defaults()
    found = []
    for package in FIRST_PARTY:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel == "bq_onnx/config.py":
                continue
            for name, value in _declarations(ast.parse(path.read_text())):
                if name in defaults and value is not _literal and value in defaults[name] \
                        and value is not None and value is not False:
                    found.append((rel, name, value))
    found_n, allowed_n = Counter(found), Counter(ALLOWED)
    assert found_n == allowed_n, (f"defaults declared again outside bq_onnx/config.py: {found_n - allowed_n}; "
                                  f"allowed but no longer there (shorten ALLOWED): {allowed_n - found_n}")


def test_optimize_declares_no_option_of_its_own():
    params = inspect.signature(bq_onnx.optimize).parameters
    # recipe_from: where the options come from (an earlier output's recipe), like config; not an option itself
    # workers, ray: where the posterior's shards run (like progress, they never change the output's bytes)
    # run_timeout, max_memory: the run limits every command takes (LimitsConfig, declared once there; not recorded)
    assert set(params) == {"model", "config", "calib", "posterior", "progress", "recipe_from", "workers", "ray",
                           "run_timeout", "max_memory", "options"}
    limits = {f.name for f in dataclasses.fields(cfg.LimitsConfig)}
    assert limits == {"run_timeout", "max_memory"}
    assert not set(params) & set(cfg.option_names())
    assert params["options"].kind is inspect.Parameter.VAR_KEYWORD


def test_cli_parser_imports_no_numeric_or_runtime_library():
    code = ("import sys, bq_onnx.cli as c; p = c._parser(); "
            "[a.choices[n].format_help() for a in p._subparsers._group_actions for n in a.choices]; "
            "print(','.join(m for m in ('numpy', 'onnx', 'onnx_ir', 'onnxruntime', 'openvino') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert proc.stdout.strip() == ""


def test_option_names_match_the_registries():
    from bq_onnx import allocation, loss_spec, quantizers
    from bq_onnx.autodiff.loss import LOSS_KINDS
    from bq_onnx.estimators.registry import METHODS

    assert cfg.QUANTIZERS == quantizers.QUANTIZERS
    assert cfg.ALLOCATORS == allocation.METHODS
    assert tuple(m for m in METHODS if m != "external") == cfg.POSTERIOR_METHODS
    assert tuple(k for k in loss_spec.KINDS if k != "auto") == LOSS_KINDS


def test_every_option_has_help_and_a_parser():
    for concern in CONCERNS:
        assert concern.title and concern.__doc__
        for f in dataclasses.fields(concern):
            opt = f.metadata["option"]
            assert opt.help and not opt.help.endswith("."), f.name
            assert getattr(concern(), f.name) == opt.default  # the default parses to itself


def test_flags_parse_to_the_same_config_as_keywords():
    args = _parser().parse_args(["optimize", "m.onnx", "--bits", "3", "--granularity", "tensor", "--min-bits",
                                 "fc*=5", "--min-bits", "conv1*=6", "--allowed-bits", "4,2,3", "--outliers", "0.5%",
                                 "--group-size", "auto", "--keep-fp", "*emb*", "--calib-samples", "64", "--seed", "2",
                                 "--bits-include-metadata", "--method", "kfac"])
    options = {}
    for concern in cfg.concern_types().values():
        options.update(given(args, concern))
    from_flags = cfg.OptimizeConfig.from_options(**options)
    from_keywords = cfg.OptimizeConfig.from_options(
        bits=3, granularity=None, min_bits={"fc*": 5, "conv1*": 6}, allowed_bits=[2, 3, 4, 4], outliers=0.005,
        group_size="auto", keep_fp=["*emb*"], calib_samples=64, seed=2, bits_include_metadata=True, method="kfac")
    assert from_flags == from_keywords
    assert from_flags.distillation.calib_samples == 64 and from_flags.quantization.seed == 2
    unset = _parser().parse_args(["optimize", "m.onnx"])
    assert all(getattr(unset, k) is None for k in vars(unset) if k.startswith(PREFIX))  # defaults live in config


def test_shared_options_have_one_value():
    c = cfg.OptimizeConfig(posterior=cfg.PosteriorConfig(output="logits", seed=3))
    assert c.allocation.output == c.distillation.output == "logits"
    assert c.quantization.seed == c.distillation.seed == 3
    with pytest.raises(UsageError, match="different values"):
        cfg.OptimizeConfig(posterior=cfg.PosteriorConfig(seed=3), quantization=cfg.QuantizerConfig(seed=4))


@pytest.mark.parametrize(("options", "fragment"), [
    ({"bitz": 3}, "unknown option bitz"),
    ({"bits": "x"}, "--bits takes a number"),
    ({"bits": 9}, "--bits must be a number in 0..8"),
    ({"granularity": "rows:0"}, "--granularity rows:N needs N >= 1"),
    ({"allocator": "magic"}, "--allocator must be one of"),
    ({"min_size": 0}, "--min-size must be >= 1"),
    ({"group_size": -1}, "--group-size must be >= 0"),
    ({"min_bits": ["fc"]}, "--min-bits takes PATTERN=BITS"),
])
def test_bad_options_are_one_line_usage_errors(options, fragment):
    with pytest.raises(UsageError, match=fragment) as info:
        bq_onnx.optimize(MODELS / "lenet.onnx", **options)
    assert "\n" not in str(info.value)


def test_config_object_and_keywords_give_the_same_model():
    import onnx_ir as ir

    by_keywords = bq_onnx.optimize(MODELS / "lenet.onnx", bits=6, allocator="dp", granularity="tensor")
    config = cfg.OptimizeConfig(allocation=cfg.AllocationConfig(bits=6, allocator="dp", granularity="tensor"))
    by_config = bq_onnx.optimize(MODELS / "lenet.onnx", config=config)
    assert ir.serde.serialize_model(by_keywords.model) == ir.serde.serialize_model(by_config.model)
    settings = by_config.report["settings"]
    assert settings["allocation"]["allocator"] == "dp" and settings["derived"]["group_size"] == 32
    assert by_config.context.config == config.replace(rounding="nearest")  # as used: auto, without --calib


def _declared_dests(parser) -> dict[str, str]:
    """Flag -> argparse destination, for every optional flag of a subcommand's parser."""
    return {s: a.dest for a in parser._actions for s in a.option_strings if s.startswith("--")}


def test_verify_and_bench_flags_come_from_the_declarations():
    sub = next(a for a in _parser()._subparsers._group_actions).choices
    verify, bench = _declared_dests(sub["verify"]), _declared_dests(sub["bench"])
    for flag, field in {"--runtime": "runtimes", "--ep": "providers", "--batch-size": "batch_size",
                        "--labels": "labels", "--output-name": "output", "--calib-samples": "calib_samples"}.items():
        assert verify[flag] == PREFIX + field and field in cfg.VerificationConfig.options(), flag
    for flag, field in {"--runtime": "runtimes", "--ep": "providers", "--batch": "batches"}.items():
        assert bench[flag] == PREFIX + field and field in cfg.BenchConfig.options(), flag
    # one declaration each: the runtimes and providers of both commands are the same Option objects
    v, b = cfg.VerificationConfig.options(), cfg.BenchConfig.options()
    assert v["runtimes"] is b["runtimes"] is cfg.RUNTIMES and v["providers"] is b["providers"] is cfg.EPS
    assert v["calib_samples"] is cfg.CALIB_SAMPLES and v["labels"].parse is cfg.LABELS.parse
    # the API takes the config or its fields, with no default of its own
    from bq_onnx.bench import benchmark
    from bq_onnx.compare import verify_models

    for fn, names in ((verify_models, v), (benchmark, b)):
        params = inspect.signature(fn).parameters
        assert "config" in params and not set(params) & set(names), fn.__name__


def test_verify_and_bench_flags_parse_to_the_same_config_as_keywords():
    args = _parser().parse_args(["verify", "r.onnx", "c.onnx", "--calib", "d.npz", "--runtime", "onnxruntime,openvino",
                                 "--ep", "cpu,cuda", "--batch-size", "8", "--labels", "l.npy", "--max-kl", "0.1"])
    assert cfg.VerificationConfig(**given(args, cfg.VerificationConfig)) == cfg.VerificationConfig(
        runtimes=["onnxruntime", "openvino"], providers=("cpu", "cuda"), batch_size=8, labels="l.npy", max_kl=0.1)
    unset = _parser().parse_args(["verify", "r.onnx", "c.onnx", "--calib", "d.npz"])
    assert cfg.VerificationConfig(**given(unset, cfg.VerificationConfig)) == cfg.VerificationConfig()
    assert cfg.VerificationConfig().runtimes == ("onnxruntime",) and cfg.VerificationConfig().batch_size == 64
    args = _parser().parse_args(["bench", "m.onnx", "--batch", "1,8", "--ep", "cuda", "--runtime", "openvino"])
    assert cfg.BenchConfig(**given(args, cfg.BenchConfig)) == cfg.BenchConfig(
        batches=(1, 8), providers=("cuda",), runtimes=("openvino",))
    for bad, fragment in (({"batches": "0"}, "--batch values must be >= 1"), ({"batches": "x"}, "--batch takes"),
                          ({"runtimes": ""}, "--runtime needs at least one runtime")):
        with pytest.raises(UsageError, match=fragment):
            cfg.BenchConfig(**bad)
