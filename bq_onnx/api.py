"""The Python API; the CLI is a thin layer over these functions and prints what they return."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from bq_onnx import __version__, provenance
from bq_onnx.calibration import Calibration, CalibrationSource, load_calibration
from bq_onnx.config import LimitsConfig, OptimizeConfig
from bq_onnx.context import Context, Derived, is_fixed
from bq_onnx.errors import InputsError, UnsupportedError, UsageError
from bq_onnx.limits import run_limits
from bq_onnx.model_io import load_model, write_output
from bq_onnx.pipeline import optimize_model
from bq_onnx.posterior import Posterior
from bq_onnx.samples import SYMBOLIC_SIZES, has_symbolic_dims, random_feeds
from bq_onnx.sizes import totals
from bq_onnx.writing import Protected, check_output, resolve_output

ModelSource = str | os.PathLike | onnx.ModelProto | ir.Model

#: Samples the post-write check runs (the first ones of ``--verify-inputs`` or of the calibration data).
VERIFY_SAMPLES = 8


@dataclasses.dataclass
class OptimizeResult:
    """An optimized model in memory; ``save`` writes it atomically and verifies what it wrote."""

    model: ir.Model
    report: dict
    context: Context
    source: ModelSource
    calibration: Calibration | None = None  # as loaded once by optimize (a one-shot reader is not read again)
    input_files: tuple[str, ...] = ()  # files the output must never replace (calibration, posterior, labels)
    limits: tuple[float | None, int | None] = (None, None)  # optimize's run_timeout/max_memory (None: as set)

    def protected(self) -> Protected:
        """Every file this result was made from: the model and its external data, calibration, posterior, verify
        inputs and labels (none of them may be written or deleted by :meth:`save`)."""
        protected = Protected()
        if isinstance(self.source, (str, os.PathLike)):
            protected.add_model(self.source)
        for path in (*self.input_files, self.context.config.inputs.verify_inputs):
            protected.add(path)
        labels = self.context.config.posterior.labels
        if isinstance(labels, (str, os.PathLike)):
            protected.add(labels)
        return protected

    def default_output(self) -> Path:
        """``MODEL.bq.onnx`` beside a model file (``model.bq.onnx`` in the current folder for in-memory models)."""
        if isinstance(self.source, (str, os.PathLike)):
            src = Path(self.source)
            return src.with_name(src.name.removesuffix(".onnx") + ".bq.onnx")
        return Path("model.bq.onnx")

    def sample_feeds(self) -> dict[str, np.ndarray]:
        """The first run's inputs of the post-write check (see :meth:`verification_runs`)."""
        return self.verification_runs()[0][0]

    def verification_runs(self) -> tuple[list[dict[str, np.ndarray]], bool]:
        """Inputs for the post-write check, one dict per run (runs of a fixed batch), and whether they are random:
        ``--verify-inputs`` when given, else the first calibration samples (their shapes are real), else seeded
        random inputs (symbolic dimensions set to 2, or to ``--input-shape``)."""
        inputs = self.context.config.inputs
        data = self.calibration
        if inputs.verify_inputs is not None:
            data = load_calibration(inputs.verify_inputs, self.model, axes=dict(inputs.batch_axis))
        if data is not None:
            first = load_calibration(data, self.model, max_samples=VERIFY_SAMPLES)
            return list(first.batches(first.num_samples)), False
        feeds = random_feeds(self.model, seed=self.context.config.quantization.seed, shapes=dict(inputs.input_shape))
        return [feeds], True

    def _verify(self, out: Path, runs: list[dict[str, np.ndarray]], random_inputs: bool, shown: Path) -> list:
        """The post-write check; random inputs the FP32 model cannot run on are made again with larger symbolic
        dimensions (:data:`~bq_onnx.samples.SYMBOLIC_SIZES`) before the first failure is reported."""
        from bq_onnx.verify import verify_written

        inputs = self.context.config.inputs
        sizes = SYMBOLIC_SIZES[1:] if random_inputs and has_symbolic_dims(self.model, dict(inputs.input_shape)) else ()
        first: InputsError | None = None
        for size in (None, *sizes):
            if size is not None:
                runs = [random_feeds(self.model, batch=size, seed=self.context.config.quantization.seed,
                                     shapes=dict(inputs.input_shape))]
            try:
                return verify_written(out, self.source, self.context, runs, random_inputs=random_inputs, shown=shown)
            except InputsError as exc:
                first = first or exc
        assert first is not None
        raise first

    def save(
        self,
        path: str | os.PathLike,
        *,
        force: bool = False,
        verify: bool = True,
        feeds: Mapping[str, np.ndarray] | None = None,
    ) -> dict:
        """Write the model to ``path`` (a file, or a folder: ``<folder>/<model>.bq.onnx``) by the write protocol
        (:mod:`bq_onnx.writing`): staged beside it, verified there, renamed into place only when verification
        passed; ``force`` to replace an existing file. The verification runs under the run limits ``optimize`` was
        given (``run_timeout``, ``max_memory``). Returns the report."""
        with run_limits(*self.limits):
            return self._save(path, force, verify, feeds)

    def _save(self, path: str | os.PathLike, force: bool, verify: bool,
              feeds: Mapping[str, np.ndarray] | None) -> dict:
        protected = self.protected()
        out = check_output(resolve_output(path, self.default_output().name, Path.cwd()), protected, force)
        if verify:  # read before anything is written: bad inputs leave no file behind
            runs, random_inputs = ([dict(feeds)], False) if feeds is not None else self.verification_runs()
        check = (lambda staged: self._verify(staged, runs, random_inputs, out)) if verify else None
        checks = write_output(self.model, out, protected, force, verify=check)
        self.report["output"] = {"path": os.fspath(out), "file_bytes": out.stat().st_size}
        if verify:
            self.report["verification"] = {
                "runtime": "onnxruntime",
                "passed": True,
                "outputs": [dataclasses.asdict(c) for c in checks],
            }
        return self.report


def _recipe(config: OptimizeConfig) -> str:
    """The recipe recorded in the output; an option only the API can give (an array of labels) is named in a
    comment instead (such a recipe does not re-run)."""
    from bq_onnx.recipe import dump

    try:
        return dump(config, leave_out=provenance.NOT_RECORDED)
    except UsageError as exc:
        return f"{provenance.NOT_A_RECIPE} {exc}\n"


def _check_recorded(recipe_from: str | os.PathLike, recorded: dict[str, str], model: ModelSource, model_sha: str,
                    calib_sha: str | None, ctx: Context, posterior_sha: str | None = None) -> None:
    """``--recipe-from``: the model and calibration data must be those the output was made from."""
    where = f"--recipe-from {os.fspath(recipe_from)}"
    name = os.fspath(model) if isinstance(model, (str, os.PathLike)) else "the model"
    if recorded["model_sha256"] != model_sha:
        raise UsageError(f"{where}: {name} has sha256 {model_sha[:16]}..., the output was made from "
                         f"{recorded['model_sha256'][:16]}... (another model)")
    want = recorded["calibration_sha256"]
    if want == provenance.NONE and calib_sha is not None:
        raise UsageError(f"{where}: the output was made without calibration data; leave --calib out")
    if want != provenance.NONE and calib_sha is None:
        raise UsageError(f"{where}: the output was made with calibration data (sha256 {want[:16]}...); give it "
                         f"again with --calib")
    if calib_sha is not None and calib_sha != want:
        raise UsageError(f"{where}: the calibration data have sha256 {calib_sha[:16]}..., the output was made "
                         f"from {want[:16]}... (other samples)")
    had = recorded.get("posterior_sha256")
    if had is None and posterior_sha is not None:
        raise UsageError(f"{where}: the output was made without --posterior; leave it out")
    if had is not None and posterior_sha is None:
        raise UsageError(f"{where}: the output was made with a posterior (sha256 {had[:16]}...); give it again "
                         f"with --posterior")
    if had is not None and posterior_sha != had:
        raise UsageError(f"{where}: the posterior has sha256 {posterior_sha[:16]}..., the output was made from "
                         f"{had[:16]}... (another posterior)")
    if recorded["version"] != __version__:
        ctx.messages.append(f"--recipe-from: the output was written by bq-onnx {recorded['version']}, this is "
                            f"{__version__}: the bytes may differ")


def allocation_report(ctx: Context) -> dict:
    """The budget achieved, the method and its details, and per layer the expected loss around its width."""
    a, bits = ctx.allocation, ctx.bits
    numel = sum(t.numel for t in ctx.tables.blocks)
    per_layer: dict[str, dict] = {}
    for t in ctx.tables.blocks:
        chosen = t.bits.index(bits[t.name])
        row = per_layer.setdefault(t.weight, {"loss": 0.0, "loss_one_bit_less": 0.0, "loss_one_bit_more": 0.0,
                                              "numel": 0, "blocks": 0})
        row["loss"] += float(t.loss[chosen])
        row["loss_one_bit_less"] += float(t.loss[max(chosen - 1, 0)])
        row["loss_one_bit_more"] += float(t.loss[min(chosen + 1, len(t.bits) - 1)])
        row["numel"] += t.numel
        row["blocks"] += 1
    for row in per_layer.values():
        # loss added per weight if the layer lost one bit: how much a bit is worth here
        row["sensitivity"] = (row["loss_one_bit_less"] - row["loss"]) / row["numel"]
    payload = sum(t.payload[t.bits.index(bits[t.name])] for t in ctx.tables.blocks)
    meta = sum(t.metadata[t.bits.index(bits[t.name])] for t in ctx.tables.blocks)
    return {
        "method": a.method,
        "budget": a.budget,
        "cost": a.cost,
        "expected_loss": a.loss,
        "target_bits": ctx.config.allocation.bits if ctx.config.allocation.size_mb is None else None,
        # the headline: bits per weight the file stores (codes in their containers, metadata and the shared
        # constants of the decode), what --bits bounds; the payload-only reading and the metadata beside it
        "achieved_bits": 8 * ctx.stored_bytes / numel if ctx.stored_bytes is not None else (payload + meta) / numel,
        "achieved_payload_bits": payload / numel,
        "achieved_metadata_bits": meta / numel,
        "achieved_bits_with_metadata": (payload + meta) / numel,
        "budget_counts": "size" if ctx.config.allocation.size_mb is not None
        else "payload" if ctx.config.allocation.bits_payload else "stored",
        "granularity": f"rows:{ctx.config.allocation.granularity}" if ctx.config.allocation.granularity else "tensor",
        "blocks": len(ctx.tables.blocks),
        "heads": sorted(ctx.heads),
        "details": a.details,
        "layers": per_layer,
    }


def optimize(
    model: ModelSource,
    config: OptimizeConfig | str | os.PathLike | None = None,
    *,
    calib: CalibrationSource | None = None,
    posterior: str | os.PathLike | Posterior | None = None,
    progress: bool = False,
    recipe_from: str | os.PathLike | None = None,
    run_timeout: float | None = None,
    max_memory: int | str | None = None,
    workers: int | None = None,
    ray: str | bool | None = None,
    **options: Any,
) -> OptimizeResult:
    """Quantize every weight of ``model`` (a path, ModelProto or onnx-ir Model; never modified).

    The options are ``config`` (an :class:`bq_onnx.config.OptimizeConfig`, or the path of a TOML recipe:
    :mod:`bq_onnx.recipe`) and/or keywords named as the CLI's flags
    (``bits=3``, ``allocator="dp"``, ``group_size="auto"``, ``granularity="rows:8"``, ``method="kfac"``...), which
    override it; every option, its default and its meaning is declared once in :mod:`bq_onnx.config`. An unknown
    keyword is a :class:`UsageError`. ``posterior_options`` (a mapping of posterior options) is still accepted.

    ``calib`` (calibration data, see :func:`bq_onnx.calibration.load_calibration`) estimates a posterior with the
    posterior options; ``posterior`` gives one instead (a file from ``bq-onnx posterior`` or an external Bayesian
    network's); with both, ``calib`` only serves ``tables="mc"`` and distillation. The posterior precision weights
    each quantizer's error and the expected-loss tables. ``distill_steps`` > 0 and ``tables="mc"`` need ``calib``.
    ``target`` legalizes the output for that runtime (:mod:`bq_onnx.targets`) and checks it with
    :func:`bq_onnx.validate.validate`.

    The output's ``metadata_props`` record the version, the recipe and the sha256 of the model and of the
    calibration samples (:mod:`bq_onnx.provenance`). ``recipe_from`` (an earlier output, instead of ``config``)
    re-runs the recipe it records; the model and ``calib`` must hash as recorded (else a one-line
    :class:`UsageError`), and the same version then writes the same bytes.

    ``run_timeout`` (seconds) and ``max_memory`` (bytes, ``"2G"``, ``"50%"``) are the CLI's ``--run-timeout`` and
    ``--max-memory`` (:class:`bq_onnx.config.LimitsConfig`, same checks and defaults): they bound every
    onnxruntime/OpenVINO session and run of this call and of the result's :meth:`OptimizeResult.save`, and what a
    model or data file may make bq-onnx allocate; past one, a :class:`~bq_onnx.errors.BqError` with the CLI's exit
    code (10 for a run, 3 or 5 for a file).

    ``workers`` (local processes) or ``ray`` (True: a local Ray instance; or a cluster's address) share out the
    posterior's calibration shards and the expected-loss tables' weights (:mod:`bq_onnx.distributed`); the output
    is the same bytes as without.
    """
    if isinstance(model, (str, os.PathLike)) and Path(model).is_dir():
        raise UsageError(f"{os.fspath(model)}: a folder; bq_onnx.optimize_folder optimizes every model in it")
    given = {k: v for k, v in (("run_timeout", run_timeout), ("max_memory", max_memory)) if v is not None}
    checked = LimitsConfig(**given)  # the flags' parsing and checks; what is not given stays as the caller set it
    limits = (checked.run_timeout if run_timeout is not None else None,
              checked.max_memory if max_memory is not None else None)
    with run_limits(*limits):
        result = _optimize(model, config, calib=calib, posterior=posterior, progress=progress,
                           recipe_from=recipe_from, workers=workers, ray=ray, options=options)
    result.limits = limits
    return result


def _optimize(model: ModelSource, config: OptimizeConfig | str | os.PathLike | None, *, calib: CalibrationSource | None,
              posterior: str | os.PathLike | Posterior | None, progress: bool, recipe_from: str | os.PathLike | None,
              workers: int | None, ray: str | bool | None, options: dict[str, Any]) -> OptimizeResult:
    recorded = None
    if recipe_from is not None:
        if config is not None:
            raise UsageError("--recipe-from and --config: give one (flags still override either)")
        from bq_onnx.recipe import config_from_text

        recorded = provenance.recorded(recipe_from)
        config = config_from_text(recorded["recipe"], f"--recipe-from {os.fspath(recipe_from)}")
    legacy = dict(options.pop("posterior_options", None) or {})
    clash = sorted(set(legacy) & set(options))
    if clash:
        raise UsageError(f"{', '.join(clash)} given both as keyword and in posterior_options")
    if isinstance(config, (str, os.PathLike)):  # a recipe file (bq_onnx.recipe)
        from bq_onnx.recipe import config_from

        config = config_from(config)
    config = (config or OptimizeConfig()).replace(**legacy, **options)
    recipe_text = _recipe(config)  # what was asked, before a target legalizes it
    derived = Derived.from_config(config)
    a = config.allocation
    if is_fixed(config, derived) and not 1 <= a.bits <= 8:
        raise UsageError(f"--bits must be in 1..8 for a fixed width, got {a.bits!r}")
    profile = None
    target_notes: list[str] = []
    if config.target.target is not None:
        from bq_onnx.runtimes.profiles import get_profile
        from bq_onnx.targets import legalize_config

        profile = get_profile(config.target.target)
        config, derived, target_notes = legalize_config(config, derived, profile)
        if derived.outliers and not profile.codebooks:
            raise UsageError(f"--outliers: target {profile.name} runs weights only as DequantizeLinear into the "
                             f"consumer; a sparse add in between breaks that (leave --outliers out)")
    elif config.target.strict_size:
        raise UsageError("--strict-size needs --target")
    ctx = Context(config, derived, progress=progress)
    ctx.messages.extend(target_notes)
    d = config.distillation
    if d.distill_steps and calib is None:
        raise UsageError("--distill-steps needs --calib and a positive number of steps")
    if a.tables in ("mc", "measured") and calib is None:
        raise UsageError(f"--tables {a.tables} needs calibration data (--calib)")
    loaded = load_model(model)  # an IR model is copied: the caller's object stays untouched
    model_sha = provenance.model_sha256(model)
    # read once (a one-shot reader or generator included) and handed to every stage that needs samples
    axes = dict(config.inputs.batch_axis)
    calibration = load_calibration(calib, loaded, axes=axes) if calib is not None else None
    calib_sha = provenance.calibration_sha256(calibration) if calibration is not None else None
    posterior_sha = provenance.posterior_sha256(posterior) if posterior is not None else None
    if recorded is not None:
        _check_recorded(recipe_from, recorded, model, model_sha, calib_sha, ctx, posterior_sha)
    made = provenance.entries(__version__, recipe_text, model_sha, calib_sha, posterior_sha)
    loaded.metadata_props.update(made)  # before the rewrite: --size-mb measures the file with them
    from bq_onnx.distributed import distributed

    with distributed(workers, ray):
        result = optimize_model(loaded, ctx, calibration=calibration, posterior=posterior, profile=profile)
    if profile is not None:
        from bq_onnx.targets import container_notes
        from bq_onnx.validate import validate

        ctx.messages.extend(container_notes(ctx, profile))
        violations = validate(result, profile)
        if violations:  # legalization should have prevented every one: a bug, reported with the first
            raise UnsupportedError(f"the output breaks target {profile.name} ({len(violations)} violation(s)); "
                                   f"first: {violations[0]}")
    result.metadata_props.update(made)
    report = {
        "tool": "bq-onnx",
        "version": __version__,
        "input": os.fspath(model) if isinstance(model, (str, os.PathLike)) else "<in-memory model>",
        "settings": ctx.config.to_report() | {"derived": ctx.derived.to_report()},  # as used (a retry may move them)
        "layers": ctx.layers,
        "totals": totals(ctx.layers),
        "messages": ctx.messages,
    }
    if ctx.allocation is not None:
        report["allocation"] = allocation_report(ctx)
    if ctx.distillation is not None:
        report["distillation"] = ctx.distillation
    if ctx.guard is not None:
        report["guard"] = ctx.guard
    if ctx.exclusions:
        report["exclusions"] = ctx.exclusions
    if ctx.posterior is not None:
        report["posterior"] = {
            "method": ctx.posterior.method,
            "samples": ctx.posterior.samples,
            "prior_precision": ctx.posterior.prior_precision,
            "loss": ctx.posterior.loss,
            "layers": ctx.posterior.summary(),
        }
    if isinstance(model, (str, os.PathLike)):
        from bq_onnx.counting import file_bytes

        report["input_file_bytes"] = file_bytes(model)  # the .onnx file and its external data, as the output counts
    files = tuple(os.fspath(p) for p in (calib, posterior) if isinstance(p, (str, os.PathLike)))
    return OptimizeResult(result, report, ctx, model, calibration, files)
