"""``bq-onnx verify``: does a candidate model (e.g. quantized) still compute what the reference computes?

Both models run on the same calibration inputs in each requested runtime with exact precision settings
(onnxruntime ``session.qdq_matmulnbits_accuracy_level=0``, OpenVINO f32 hints). Per runtime and output:

* ``agreement``: share of positions where the top-1 class (argmax over the last axis) is the same
  (classification outputs only: last axis > 1);
* ``accuracy_reference`` / ``accuracy_candidate``: top-1 accuracy against labels, when given;
* ``kl``: mean KL(reference || candidate) of the softmax over the last axis (classification outputs);
* ``rel_error``: ``||c - r|| / ||r||`` over the whole output;
* ``cosine``: mean cosine similarity of the flattened per-sample outputs (useful for embeddings);
* ``max_abs_error``: for information.

Thresholds (``None`` = not checked): ``min_agreement`` (fraction, default 0.99), ``max_kl``, ``max_rel_error``,
``min_cosine``, ``max_accuracy_drop`` (percentage points, reference minus candidate; needs labels). A runtime
that is not installed is reported as skipped, not failed, unless no requested runtime is available.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bq_onnx.calibration import load_calibration, load_labels
from bq_onnx.config import VerificationConfig
from bq_onnx.errors import DataError, UnsupportedError, UsageError, VerificationError
from bq_onnx.model_io import load_model


class OutputStats:
    """Streaming sums for one output in one runtime (also the guard's held-out fidelity)."""

    def __init__(self) -> None:
        self.samples = 0
        self.positions = 0
        self.agree = 0
        self.kl_sum = 0.0
        self.diff_sq = 0.0
        self.ref_sq = 0.0
        self.cos_sum = 0.0
        self.max_abs = 0.0
        self.correct_ref = 0
        self.correct_cand = 0
        self.labelled = 0
        self.classification = None
        self.shape_error = ""

    def update(self, ref: np.ndarray, cand: np.ndarray, labels: np.ndarray | None) -> None:
        r = np.asarray(ref, dtype=np.float64)
        c = np.asarray(cand, dtype=np.float64)
        if r.shape != c.shape:
            self.shape_error = f"shapes differ: reference {list(r.shape)}, candidate {list(c.shape)}"
            return
        n = r.shape[0] if r.ndim else 1
        self.samples += n
        d = c - r
        self.diff_sq += float(np.sum(d * d))
        self.ref_sq += float(np.sum(r * r))
        self.max_abs = max(self.max_abs, float(np.max(np.abs(d))) if d.size else 0.0)
        rf, cf = r.reshape(n, -1), c.reshape(n, -1)
        norms = np.linalg.norm(rf, axis=1) * np.linalg.norm(cf, axis=1)
        dots = np.sum(rf * cf, axis=1)
        both_zero = (np.linalg.norm(rf, axis=1) == 0) & (np.linalg.norm(cf, axis=1) == 0)
        cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where(both_zero, 1.0, 0.0))
        self.cos_sum += float(np.sum(cos))
        self.classification = r.ndim >= 2 and r.shape[-1] > 1
        if not self.classification:
            return
        top_r, top_c = np.argmax(r, axis=-1), np.argmax(c, axis=-1)
        self.positions += top_r.size
        self.agree += int(np.sum(top_r == top_c))
        log_p = _log_softmax(r)
        log_q = _log_softmax(c)
        self.kl_sum += float(np.sum(np.exp(log_p) * (log_p - log_q)))
        if labels is not None and labels.shape == top_r.shape:
            self.labelled += labels.size
            self.correct_ref += int(np.sum(top_r == labels))
            self.correct_cand += int(np.sum(top_c == labels))

    def result(self) -> dict:
        if self.shape_error:
            return {"error": self.shape_error}
        out = {
            "samples": self.samples,
            "classification": bool(self.classification),
            "rel_error": float(np.sqrt(self.diff_sq / self.ref_sq)) if self.ref_sq > 0 else
            (0.0 if self.diff_sq == 0 else float("inf")),
            "cosine": self.cos_sum / self.samples if self.samples else None,
            "max_abs_error": self.max_abs,
            "agreement": None,
            "kl": None,
            "accuracy_reference": None,
            "accuracy_candidate": None,
        }
        if self.classification and self.positions:
            out["agreement"] = self.agree / self.positions
            out["kl"] = max(self.kl_sum / self.positions, 0.0)
        if self.labelled:
            out["accuracy_reference"] = self.correct_ref / self.labelled
            out["accuracy_candidate"] = self.correct_cand / self.labelled
        return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - np.max(x, axis=-1, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def _check(metrics: dict, thresholds: dict) -> list[tuple[str, str]]:
    """[(metric, detail)] for every threshold this output fails."""
    if "error" in metrics:
        return [("shape", metrics["error"])]
    fails = []
    t = thresholds
    if t["min_agreement"] is not None and metrics["agreement"] is not None \
            and metrics["agreement"] < t["min_agreement"]:
        fails.append(("agreement", f"top-1 agreement {metrics['agreement']:.4f} < {t['min_agreement']:g}"))
    if t["max_kl"] is not None and metrics["kl"] is not None and not metrics["kl"] <= t["max_kl"]:
        fails.append(("kl", f"mean KL {metrics['kl']:.4g} > {t['max_kl']:g}"))
    if t["max_rel_error"] is not None and not metrics["rel_error"] <= t["max_rel_error"]:
        fails.append(("rel_error", f"relative error {metrics['rel_error']:.4g} > {t['max_rel_error']:g}"))
    if t["min_cosine"] is not None and not (metrics["cosine"] is not None and metrics["cosine"] >= t["min_cosine"]):
        fails.append(("cosine", f"mean cosine {metrics['cosine']:.6f} < {t['min_cosine']:g}"))
    if t["max_accuracy_drop"] is not None and metrics["accuracy_reference"] is not None:
        drop = 100.0 * (metrics["accuracy_reference"] - metrics["accuracy_candidate"])
        metrics["accuracy_drop_points"] = drop
        if drop > t["max_accuracy_drop"]:
            fails.append(("accuracy_drop", f"accuracy drop {drop:.2f} points > {t['max_accuracy_drop']:g}"))
    return fails


def verify_models(
    reference: str | os.PathLike,
    candidate: str | os.PathLike,
    calibration,
    *,
    config: VerificationConfig | None = None,
    batch_axis: Mapping[str, int | None] | None = None,
    check: bool = False,
    **options: Any,
) -> dict:
    """Compare ``candidate`` with ``reference`` (paths) on ``calibration`` in each runtime; return the report.

    What runs and the thresholds are a :class:`~bq_onnx.config.VerificationConfig` (``config``, or its fields as
    keywords: ``runtimes``, ``providers``, ``labels`` (a file or an array), ``output``, ``calib_samples``,
    ``batch_size``, ``min_agreement``, ``max_kl``, ...), parsed and checked as the CLI's flags are.
    ``providers``: onnxruntime execution providers (``--ep`` names: cpu, cuda, tensorrt, rocm, migraphx), each
    checked as its own runtime entry; one that is not installed or has no device is skipped with the reason.
    The report has ``passed`` and ``failures`` (one line each); ``check=True`` raises
    :class:`~bq_onnx.errors.VerificationError` with the first failure instead of returning a failed report.
    """
    from bq_onnx.runtimes import get_runtime
    from bq_onnx.runtimes.ort import provider_names

    config = VerificationConfig(**options) if config is None else dataclasses.replace(config, **options)
    output = config.output
    ref_model = load_model(reference)
    cand_model = load_model(candidate)
    calib = load_calibration(calibration, ref_model, max_samples=config.calib_samples, axes=batch_axis)
    calib = load_calibration(calib, cand_model)  # the same samples, sample axes kept
    del ref_model, cand_model
    labels = config.labels
    if isinstance(labels, str):
        labels = load_labels(labels)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim == 0 or labels.shape[0] < calib.num_samples:
            have = labels.shape[0] if labels.ndim else 0
            raise DataError(f"labels: {have} label(s) for {calib.num_samples} calibration sample(s)")
        labels = labels[: calib.num_samples]
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"labels: expected integer class ids, got dtype {labels.dtype}")
    thresholds = {name: getattr(config, name) for name in VerificationConfig.THRESHOLDS}
    report: dict = {
        "reference": os.fspath(reference),
        "candidate": os.fspath(candidate),
        "calibration": calib.source,
        "samples": calib.num_samples,
        "labels": labels is not None,
        "thresholds": thresholds,
        "settings": "exact (onnxruntime accuracy_level 0, OpenVINO f32)",
        "runtimes": [],
        "skipped": [],
        "failures": [],
    }
    for name, provider, label in _targets(config.runtimes, config.providers):
        rt = get_runtime(name, provider)
        ok, why = rt.available()
        if not ok:
            report["skipped"].append({"runtime": label, "reason": why})
            continue
        ref_session = rt.session(reference, exact=True)
        cand_session = rt.session(candidate, exact=True)
        used = getattr(cand_session, "providers", None)
        if provider and used and provider_names([provider])[0] not in used:
            report["skipped"].append({"runtime": label, "reason": f"onnxruntime fell back to {', '.join(used)}"})
            continue
        names = [n for n in ref_session.output_names if n in cand_session.output_names]
        if output is not None:
            if output not in names:
                raise UsageError(f"--output-name '{output}' is not an output of both models "
                                 f"(common outputs: {', '.join(names) or 'none'})")
            names = [output]
        if not names:
            raise UnsupportedError("the reference and the candidate have no output name in common")
        ref_index = [ref_session.output_names.index(n) for n in names]
        cand_index = [cand_session.output_names.index(n) for n in names]
        acc = {n: OutputStats() for n in names}
        start = 0
        for batch in calib.batches(config.batch_size):
            count = len(next(iter(batch.values())))
            batch_labels = labels[start : start + count] if labels is not None else None
            start += count
            r_out = ref_session.run(batch)
            c_out = cand_session.run(batch)
            for n, ri, ci in zip(names, ref_index, cand_index):
                acc[n].update(r_out[ri], c_out[ci], batch_labels)
        del ref_session, cand_session
        outputs = []
        for n in names:
            metrics = {"output": n, **acc[n].result()}
            fails = _check(metrics, thresholds)
            metrics["passed"] = not fails
            metrics["failed"] = [metric for metric, _ in fails]
            for metric, detail in fails:
                report["failures"].append(f"{metric} failed in {label}, output '{n}': {detail}")
            outputs.append(metrics)
        report["runtimes"].append({"runtime": label, "outputs": outputs})
    if not report["runtimes"]:
        reasons = "; ".join(f"{s['runtime']}: {s['reason']}" for s in report["skipped"])
        raise UnsupportedError(f"no requested runtime is available ({reasons})")
    report["passed"] = not report["failures"]
    if check and not report["passed"]:
        raise VerificationError(failure_message(report))
    return report


def _targets(runtimes: Sequence[str], providers: Sequence[str] | None) -> list[tuple[str, str | None, str]]:
    """(runtime, execution provider, label) to check; onnxruntime once per provider."""
    from bq_onnx.runtimes import get_runtime
    from bq_onnx.runtimes.ort import EP_NAMES, provider_names

    short: dict[str, str] = {}
    for name, full in EP_NAMES.items():
        short.setdefault(full, name)
    out = []
    for name in runtimes:
        canonical = get_runtime(name).name
        if canonical == "onnxruntime" and providers:
            for full in provider_names(list(providers)):
                label = "onnxruntime" if full == "CPUExecutionProvider" else f"onnxruntime[{short.get(full, full)}]"
                out.append((canonical, full, label))
        else:
            out.append((canonical, None, canonical))
    return out


def failure_message(report: dict) -> str:
    """One line naming the first failing metric, runtime and output (and how many more failed)."""
    first, rest = report["failures"][0], len(report["failures"]) - 1
    return f"{report['candidate']}: {first}" + (f" (and {rest} more)" if rest else "")
