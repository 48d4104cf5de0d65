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
from bq_onnx.errors import UsageError
from bq_onnx.model_io import check_output_path, load_model, save_model
from bq_onnx.pipeline import optimize_passes, run_passes
from bq_onnx.posterior import Posterior
from bq_onnx.quantizers import METHODS
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

            feeds = dict(feeds) if feeds is not None else random_feeds(self.model, seed=self.context.settings.seed)
            try:
                checks = verify_written(out, self.source, self.context, feeds)
            except BaseException:
                out.unlink(missing_ok=True)  # never leave an unverified model behind
                raise
            self.report["verification"] = {
                "runtime": "onnxruntime",
                "passed": True,
                "outputs": [dataclasses.asdict(c) for c in checks],
            }
        return self.report


def _settings(**kwargs) -> Settings:
    s = Settings(**kwargs)
    if not isinstance(s.bits, int) or not 1 <= s.bits <= 8:
        raise UsageError(f"--bits must be an integer in 1..8, got {s.bits!r}")
    if s.format not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {s.format!r}")
    if s.quantizer not in METHODS:
        raise UsageError(f"--quantizer must be one of {', '.join(METHODS)}, got {s.quantizer!r}")
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
    group_size: int = 32,
    min_size: int = 128,
    keep_fp: Iterable[str] = (),
    seed: int = 0,
    progress: bool = False,
    calib: CalibrationSource | None = None,
    posterior: str | os.PathLike | Posterior | None = None,
    posterior_options: Mapping | None = None,
) -> OptimizeResult:
    """Quantize every weight of ``model`` (a path, ModelProto or onnx-ir Model; never modified).

    ``group_size`` rows per block along the reduction axis (0: one block per output channel).
    ``calib`` (calibration data, see :func:`bq_onnx.calibration.load_calibration`) estimates a posterior with
    ``posterior_options`` (fields of :class:`bq_onnx.estimate.PosteriorOptions`: method, loss, labels, ...);
    ``posterior`` gives one instead (a file from ``bq-onnx posterior`` or an external Bayesian network's).
    The posterior precision weights each quantizer's error.
    """
    settings = _settings(
        bits=bits,
        format=format,
        quantizer=quantizer,
        group_size=group_size,
        min_size=min_size,
        keep_fp=tuple(keep_fp),
        seed=seed,
    )
    ctx = Context(settings, progress=progress)
    if calib is not None and posterior is not None:
        raise UsageError("give calibration data or a posterior, not both")
    posterior_passes: list = []
    if calib is not None:
        from bq_onnx.estimate import PosteriorOptions
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
    loaded = load_model(model)
    if isinstance(model, ir.Model):  # the caller's object stays untouched
        loaded = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    result = run_passes(loaded, optimize_passes(ctx, posterior_passes))
    report = {
        "tool": "bq-onnx",
        "version": __version__,
        "input": os.fspath(model) if isinstance(model, (str, os.PathLike)) else "<in-memory model>",
        "settings": dataclasses.asdict(settings) | {"keep_fp": list(settings.keep_fp)},
        "layers": ctx.layers,
        "totals": totals(ctx.layers),
        "messages": ctx.messages,
    }
    if ctx.posterior is not None:
        report["posterior"] = {
            "method": ctx.posterior.method,
            "samples": ctx.posterior.samples,
            "prior_precision": ctx.posterior.prior_precision,
            "layers": ctx.posterior.summary(),
        }
    if isinstance(model, (str, os.PathLike)):
        report["input_file_bytes"] = Path(model).stat().st_size
    return OptimizeResult(result, report, ctx, model)
