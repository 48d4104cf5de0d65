"""The Python API; the CLI is a thin layer over these functions and prints what they return."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from bq_onnx import __version__
from bq_onnx.calibration import CalibrationSource
from bq_onnx.context import Context, Settings
from bq_onnx.errors import UnsupportedError, UsageError
from bq_onnx.model_io import check_output_path, load_model, remove_output, save_model
from bq_onnx.pipeline import optimize_passes, run_passes
from bq_onnx.posterior import Posterior
from bq_onnx.quantizers import QUANTIZERS
from bq_onnx.samples import random_feeds
from bq_onnx.sizes import totals

FORMATS = ("native", "compact")
ModelSource = str | os.PathLike | onnx.ModelProto | ir.Model


@dataclasses.dataclass
class OptimizeResult:
    """An optimized model in memory; ``save`` writes it atomically and verifies what it wrote."""

    model: ir.Model
    report: dict
    context: Context
    source: ModelSource
    calibration: CalibrationSource | None = None

    def sample_feeds(self) -> dict[str, np.ndarray]:
        """Inputs for the post-write check: the first calibration samples when there are some (their shapes are
        real), else seeded random inputs (symbolic dimensions set to 2)."""
        if self.calibration is not None:
            from bq_onnx.calibration import load_calibration

            return dict(load_calibration(self.calibration, self.model, max_samples=8).arrays)
        return random_feeds(self.model, seed=self.context.settings.seed)

    def save(
        self,
        path: str | os.PathLike,
        *,
        force: bool = False,
        verify: bool = True,
        feeds: Mapping[str, np.ndarray] | None = None,
    ) -> dict:
        inputs = [self.source] if isinstance(self.source, (str, os.PathLike)) else []
        out = check_output_path(path, inputs, force)
        save_model(self.model, out)
        self.report["output"] = {"path": os.fspath(out), "file_bytes": out.stat().st_size}
        if verify:
            from bq_onnx.verify import verify_written

            feeds = dict(feeds) if feeds is not None else self.sample_feeds()
            try:
                checks = verify_written(out, self.source, self.context, feeds)
            except BaseException:
                remove_output(out)  # never leave an unverified model (or its external data) behind
                raise
            self.report["verification"] = {
                "runtime": "onnxruntime",
                "passed": True,
                "outputs": [dataclasses.asdict(c) for c in checks],
            }
        return self.report


def allocation_report(ctx: Context) -> dict:
    """The budget achieved, the method and its details, and per layer the expected loss around its width."""
    a = ctx.allocation
    numel = sum(t.numel for t in ctx.tables)
    per_layer: dict[str, dict] = {}
    for t in ctx.tables:
        chosen = t.bits.index(ctx.bits[t.name])
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
    payload = sum(t.payload[t.bits.index(ctx.bits[t.name])] for t in ctx.tables)
    meta = sum(t.metadata[t.bits.index(ctx.bits[t.name])] for t in ctx.tables)
    return {
        "method": a.method,
        "budget": a.budget,
        "cost": a.cost,
        "expected_loss": a.loss,
        "target_bits": ctx.settings.bits if ctx.settings.size_mb is None else None,
        "achieved_bits": payload / numel,
        "achieved_bits_with_metadata": (payload + meta) / numel,
        "granularity": f"rows:{ctx.settings.granularity}" if ctx.settings.granularity else "tensor",
        "blocks": len(ctx.tables),
        "details": a.details,
        "layers": per_layer,
    }


def parse_granularity(value: str | int | None) -> int | None:
    """``tensor`` (or None/0) -> None; ``rows:N`` or N -> N output channels per block."""
    if value is None or value == "tensor" or value == 0:
        return None
    text = str(value)
    if text.startswith("rows:"):
        text = text[5:]
    try:
        n = int(text)
    except ValueError:
        raise UsageError(f"--granularity must be 'tensor' or 'rows:N', got {value!r}") from None
    if n < 1:
        raise UsageError(f"--granularity rows:N needs N >= 1, got {n}")
    return n


def parse_min_bits(items: Iterable[str] | Mapping[str, int]) -> tuple[tuple[str, int], ...]:
    """``["fc1*=4", ...]`` or ``{"fc1*": 4}`` -> ((pattern, bits), ...)."""
    pairs = list(items.items()) if isinstance(items, Mapping) else []
    if not isinstance(items, Mapping):
        for item in items:
            pattern, sep, bits = str(item).rpartition("=")
            if not sep or not pattern:
                raise UsageError(f"--min-bits takes PATTERN=BITS, got {item!r}")
            pairs.append((pattern, bits))
    out = []
    for pattern, bits in pairs:
        try:
            value = int(bits)
        except ValueError:
            raise UsageError(f"--min-bits {pattern}: bits must be an integer, got {bits!r}") from None
        if not 0 <= value <= 8:
            raise UsageError(f"--min-bits {pattern}: bits must be in 0..8, got {value}")
        out.append((pattern, value))
    return tuple(out)


def parse_outliers(value: float | str | None) -> float | str:
    """``--outliers``: a fraction in ``[0, 0.1]`` (``0.005`` or ``0.5%``), ``auto`` (the tables try none and
    :data:`bq_onnx.outliers.FRACTIONS`), or None/``none`` = 0."""
    from bq_onnx.outliers import MAX_FRACTION

    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "off", "")):
        return 0.0
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    text = str(value).strip()
    try:
        fraction = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise UsageError(f"--outliers takes a fraction (0.005 or 0.5%), auto or none, got {value!r}") from None
    if isinstance(value, bool) or not 0.0 <= fraction <= MAX_FRACTION:
        raise UsageError(f"--outliers must be a fraction in [0, {MAX_FRACTION}], got {value!r}")
    return fraction


AUTO_GROUPS = (32, 64, 128)
"""``--group-size auto``: the block sizes the tables choose from per tensor and width (64 is the nominal size)."""


def parse_group_size(value: int | str) -> tuple[int, tuple[int, ...]]:
    """``--group-size``: rows per block (0: one block per output channel) or ``auto``; returns (size, choices)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return 64, AUTO_GROUPS
    try:
        if isinstance(value, (bool, float)):
            raise ValueError
        size = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"--group-size takes a number of rows (0 = per channel) or auto, got {value!r}") from None
    return size, ()


def _settings(**kwargs) -> Settings:
    kwargs["outliers"] = parse_outliers(kwargs.get("outliers"))
    kwargs["group_size"], kwargs["group_choices"] = parse_group_size(kwargs.get("group_size", 32))
    s = Settings(**kwargs)
    if isinstance(s.bits, bool) or not isinstance(s.bits, (int, float)) or not 0 <= s.bits <= 8:
        raise UsageError(f"--bits must be a number in 0..8, got {s.bits!r}")
    if s.fixed and not 1 <= s.bits <= 8:
        raise UsageError(f"--bits must be in 1..8 for a fixed width, got {s.bits!r}")
    from bq_onnx.allocation import METHODS as ALLOCATORS

    if s.allocator not in ALLOCATORS:
        raise UsageError(f"--allocator must be one of {', '.join(ALLOCATORS)}, got {s.allocator!r}")
    if not s.allowed_bits or any(not 0 <= b <= 8 for b in s.allowed_bits):
        raise UsageError(f"allowed bit widths must be in 0..8, got {s.allowed_bits!r}")
    if s.tables not in ("closed", "mc"):
        raise UsageError(f"--tables must be closed or mc, got {s.tables!r}")
    if s.size_mb is not None and not s.size_mb > 0:
        raise UsageError(f"--size-mb must be > 0, got {s.size_mb}")
    if s.format not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {s.format!r}")
    if s.quantizer not in QUANTIZERS:
        raise UsageError(f"--quantizer must be one of {', '.join(QUANTIZERS)}, got {s.quantizer!r}")

    if s.group_size < 0:
        raise UsageError(f"--group-size must be >= 0 (0 = one block per output channel), got {s.group_size}")
    if s.min_size < 1:
        raise UsageError(f"--min-size must be >= 1, got {s.min_size}")
    return s


def optimize(
    model: ModelSource,
    *,
    bits: int = 4,
    format: str = "native",
    quantizer: str = "uniform",
    outliers: float | str | None = None,
    group_size: int | str = 32,
    min_size: int = 128,
    keep_fp: Iterable[str] = (),
    seed: int = 0,
    progress: bool = False,
    calib: CalibrationSource | None = None,
    posterior: str | os.PathLike | Posterior | None = None,
    posterior_options: Mapping | None = None,
    allocator: str = "greedy",
    granularity: str | int | None = "rows:8",
    allowed_bits: Iterable[int] | None = None,
    bits_include_metadata: bool = False,
    size_mb: float | None = None,
    min_bits: Iterable[str] | Mapping[str, int] = (),
    allocator_options: Mapping | None = None,
    distill_steps: int = 0,
    distill_lr: float = 1e-3,
    tables: str = "closed",
    target: str | None = None,
    strict_size: bool = False,
) -> OptimizeResult:
    """Quantize every weight of ``model`` (a path, ModelProto or onnx-ir Model; never modified).

    ``group_size`` rows per block along the reduction axis (0: one block per output channel), or ``"auto"``: the
    tables choose 32, 64 or 128 per tensor and width by expected loss against stored bits (scales included).
    ``quantizer``: a scalar method, ``vq`` (vector codebooks of every allowed length d = 2/4/8, the tables choosing
    per tensor and width), ``vq2``/``vq4``/``vq8`` (one length) or ``auto`` (scalar uniform, scalar Lloyd codebook
    and vector codebooks, the tables choosing). ``outliers``: fraction of each tensor's weights kept as sparse fp16
    outliers (counted in the payload), ``"auto"`` (the tables choose none or one of
    :data:`bq_onnx.outliers.FRACTIONS` per tensor and width), default none (``auto`` with ``quantizer="auto"``).
    ``calib`` (calibration data, see :func:`bq_onnx.calibration.load_calibration`) estimates a posterior with
    ``posterior_options`` (fields of :class:`bq_onnx.estimators.PosteriorOptions`: method, loss, labels, ...);
    ``posterior`` gives one instead (a file from ``bq-onnx posterior`` or an external Bayesian network's); with
    both, ``calib`` only serves ``tables="mc"`` and distillation.
    The posterior precision weights each quantizer's error and the expected-loss tables.

    ``bits`` is the average payload bits per quantized weight that ``allocator`` (``greedy``, ``dp``,
    ``quantile-inform``, ``random-bits``, ``selective``, ``uniform``) spends over blocks (whole tensors, or
    ``granularity="rows:N"`` slices of output channels), never exceeding it; ``allocator="uniform"`` with a whole
    ``bits`` is the fixed-width mode. ``bits_include_metadata`` counts scales and codebooks in the budget;
    ``size_mb`` sets a file-size budget instead; ``min_bits`` ({pattern: bits}) sets per-layer floors.
    ``tables="mc"`` (needs ``calib``) measures each block's KL at each width instead of the closed form.
    ``distill_steps`` > 0 (needs ``calib``) tunes scales, offsets and codebooks on the calibration data with the
    codes fixed, minimizing the KL to the FP32 model (step size ``distill_lr`` relative to each tensor's RMS).
    ``target`` (``onnxruntime``, ``tensorrt``, ``rocm``/``migraphx``, ``openvino``; see
    :mod:`bq_onnx.runtimes.profiles`) legalizes the output for that runtime (:mod:`bq_onnx.targets`) and checks
    it with :func:`bq_onnx.validate.validate`; ``strict_size`` keeps only the widths the target executes natively
    (otherwise e.g. 3-bit weights are kept and stored in int4, as the report's messages say).
    """
    settings = _settings(
        bits=bits,
        format=format,
        quantizer=quantizer,
        outliers=("auto" if quantizer == "auto" else 0.0) if outliers is None else outliers,
        group_size=group_size,
        min_size=min_size,
        keep_fp=tuple(keep_fp),
        seed=seed,
        allocator=allocator,
        granularity=parse_granularity(granularity),
        allowed_bits=tuple(sorted(set(allowed_bits))) if allowed_bits is not None else Settings.allowed_bits,
        include_metadata=bits_include_metadata,
        size_mb=size_mb,
        min_bits=parse_min_bits(min_bits),
        tables=tables,
    )
    profile = None
    target_notes: list[str] = []
    if target is not None:
        from bq_onnx.runtimes.profiles import get_profile
        from bq_onnx.targets import legalize_settings

        profile = get_profile(target)
        explicit = frozenset(k for k, v in (("quantizer", quantizer), ("group_size", group_size), ("format", format))
                             if v != Settings.__dataclass_fields__[k].default)
        settings, target_notes = legalize_settings(settings, profile, explicit=explicit, strict_size=strict_size)
        if settings.outliers and not profile.codebooks:
            raise UsageError(f"--outliers: target {profile.name} runs weights only as DequantizeLinear into the "
                             f"consumer; a sparse add in between breaks that (leave --outliers out)")
    elif strict_size:
        raise UsageError("--strict-size needs --target")
    ctx = Context(settings, progress=progress)
    ctx.messages.extend(target_notes)
    posterior_passes: list = []
    if calib is not None and posterior is None:
        from bq_onnx.estimators import PosteriorOptions
        from bq_onnx.passes.posterior import EstimatePosteriorPass

        options = PosteriorOptions(seed=seed, **dict(posterior_options or {}))
        options.check()
        posterior_passes.append(EstimatePosteriorPass(ctx, calib, options))
    elif isinstance(posterior, Posterior):
        ctx.posterior = posterior
        from bq_onnx.passes.posterior import CheckPosteriorPass

        posterior_passes.append(CheckPosteriorPass(ctx, "<Posterior>"))
    elif posterior is not None:
        from bq_onnx.passes.posterior import LoadPosteriorPass

        posterior_passes.append(LoadPosteriorPass(ctx, posterior))
    distill = []
    if distill_steps:
        if distill_steps < 0 or calib is None:
            raise UsageError("--distill-steps needs --calib and a positive number of steps")
        from bq_onnx.passes.distill import DistillPass

        popts = dict(posterior_options or {})
        distill.append(DistillPass(ctx, calib, distill_steps, lr=distill_lr, output=popts.get("output"),
                                   max_samples=popts.get("calib_samples")))
    loaded = load_model(model)  # an IR model is copied: the caller's object stays untouched
    legalize, lower = [], []
    if profile is not None:
        from bq_onnx.targets import LegalizeWeightsPass

        legalize.append(LegalizeWeightsPass(ctx, profile))
        if profile.name == "onnxruntime" and settings.format == "native":
            from bq_onnx.passes.matmulnbits import LowerMatMulNBitsPass

            lower.append(LowerMatMulNBitsPass())
    passes = optimize_passes(ctx, posterior_passes, dict(allocator_options or {}), distill, calibration=calib,
                             output=dict(posterior_options or {}).get("output"), legalize=legalize, lower=lower)
    result = run_passes(loaded, passes)
    if profile is not None:
        from bq_onnx.targets import container_notes
        from bq_onnx.validate import validate

        ctx.messages.extend(container_notes(ctx, profile))
        violations = validate(result, profile)
        if violations:  # legalization should have prevented every one: a bug, reported with the first
            raise UnsupportedError(f"the output breaks target {profile.name} ({len(violations)} violation(s)); "
                                   f"first: {violations[0]}")
    report = {
        "tool": "bq-onnx",
        "version": __version__,
        "input": os.fspath(model) if isinstance(model, (str, os.PathLike)) else "<in-memory model>",
        "settings": dataclasses.asdict(settings)
        | {"keep_fp": list(settings.keep_fp), "min_bits": [list(p) for p in settings.min_bits]},
        "layers": ctx.layers,
        "totals": totals(ctx.layers),
        "messages": ctx.messages,
    }
    if ctx.allocation is not None:
        report["allocation"] = allocation_report(ctx)
    if ctx.distillation is not None:
        report["distillation"] = ctx.distillation
    if ctx.posterior is not None:
        report["posterior"] = {
            "method": ctx.posterior.method,
            "samples": ctx.posterior.samples,
            "prior_precision": ctx.posterior.prior_precision,
            "layers": ctx.posterior.summary(),
        }
    if isinstance(model, (str, os.PathLike)):
        report["input_file_bytes"] = Path(model).stat().st_size
    return OptimizeResult(result, report, ctx, model, calib)
