"""Every user option, declared once: its type, default, check and help, grouped by concern.

The CLI's flags (:mod:`bq_onnx.cli`), the API's keywords (:func:`bq_onnx.optimize`) and the pipeline's reads all
come from the frozen dataclasses here. A field's :class:`bq_onnx.options.Option` (in its metadata) says how CLI
text or an API value becomes the typed value, how it is checked and what ``--help`` says. An option several
concerns read (the seed, the model output the loss reads, the number of calibration samples) is one
:class:`Option` object held by each of them; :class:`OptimizeConfig` keeps their values equal.

Standard library only at module level: the CLI builds its parser from these classes without numpy or onnx.

Over 500 lines on purpose: every option of every concern in one file is what lets a reader (and
``tests/test_config.py``) see that each default is declared once.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

from bq_onnx.budgets import DEFAULT_FRACTION, parse_memory
from bq_onnx.errors import UsageError
from bq_onnx.exclusions import HELP as PATTERN_HELP
from bq_onnx.exclusions import Pattern
from bq_onnx.limits import DEFAULT_RUN_TIMEOUT
from bq_onnx.loss_spec import FORMS, LossTerm, parse_loss
from bq_onnx.options import Concern, Option, above, at_least, number, option, text

FORMATS: tuple[str, ...] = ("native", "compact")
SCALE_STORAGE: tuple[str, ...] = ("double", "fp16")
"""How the compact format stores uniform scales: ``double`` = a byte code per block times an fp16 super scale per
output channel (QLoRA's double quantization), ``fp16`` = one fp16 scale per block."""
QUANTIZERS: tuple[str, ...] = ("uniform", "uniform-sym", "percentile", "gaussian", "nf", "lloyd", "lloyd-l1",
                               "vq", "vq2", "vq4", "vq8", "auto")
"""The names ``--quantizer`` accepts (the registry in :mod:`bq_onnx.quantizers` implements them; a test checks
that the two agree)."""
ALLOCATORS: tuple[str, ...] = ("uniform", "greedy", "dp", "quantile-inform", "random-bits", "selective")
POSTERIOR_METHODS: tuple[str, ...] = ("laplace", "fisher-mc", "hutchinson", "kfac", "activations")
TABLES: tuple[str, ...] = ("closed", "mc", "measured")
AUTO_GROUPS: tuple[int, ...] = (32, 64, 128)
"""``--group-size auto``: the block sizes the tables choose from per tensor and width (64 is the nominal size)."""
ROUNDINGS: tuple[str, ...] = ("auto", "nearest", "gptq", "gptq-plain")
"""The names ``--rounding`` accepts (:mod:`bq_onnx.rounding`)."""
COMPENSATING: tuple[str, ...] = ("gptq", "gptq-plain")
"""The roundings that compensate errors (``auto`` is one of these or nearest once the pipeline resolved it; where
it was not resolved, as in a bare :class:`bq_onnx.context.Context`, it rounds to nearest)."""
MAX_OUTLIERS = 0.1
"""The largest ``--outliers`` fraction: beyond it a wider grid is cheaper than the sparse list."""

# --- the parsing of CLI strings, with the fields that take them ----------------------------------------------


def _patterns(value: Any, flag: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(p, str) for p in items):
        raise UsageError(f"{flag} takes glob patterns, got {value!r}")
    return tuple(items)


def _exclusion_patterns(value: Any, flag: str) -> tuple[str, ...]:
    """Glob patterns with an optional ``weight:``/``node:``/``op:``/``graph:`` prefix (:mod:`bq_onnx.exclusions`)."""
    patterns = _patterns(value, flag)
    for p in patterns:
        Pattern.parse(flag, p)
    return patterns


def parse_bit_list(value: Any, flag: str = "--allowed-bits") -> tuple[int, ...]:
    """``"2,3,4"`` or ``[4, 2, 3]`` -> the sorted distinct widths."""
    try:
        items = [int(b) for b in value.split(",") if b.strip()] if isinstance(value, str) else [int(b) for b in value]
    except (TypeError, ValueError):
        raise UsageError(f"{flag} takes comma-separated integers, got {value!r}") from None
    return tuple(sorted(set(items)))


def parse_granularity(value: Any, flag: str = "--granularity") -> int | None:
    """``tensor`` (or None/0) -> None; ``rows:N`` or N -> N output channels per block."""
    if value is None or value == "tensor" or value == 0:
        return None
    text = str(value)
    if text.startswith("rows:"):
        text = text[5:]
    try:
        n = int(text)
    except ValueError:
        raise UsageError(f"{flag} must be 'tensor' or 'rows:N', got {value!r}") from None
    if n < 1:
        raise UsageError(f"{flag} rows:N needs N >= 1, got {n}")
    return n


def parse_min_bits(value: Any, flag: str = "--min-bits") -> tuple[tuple[str, int], ...]:
    """``["fc1*=4", ...]``, ``{"fc1*": 4}`` or ``(("fc1*", 4), ...)`` -> ((pattern, bits), ...)."""
    pairs: list = list(value.items()) if isinstance(value, Mapping) else []
    if not isinstance(value, Mapping):
        for item in [value] if isinstance(value, str) else value:
            if isinstance(item, (tuple, list)) and len(item) == 2:
                pairs.append(tuple(item))
                continue
            pattern, sep, bits = str(item).rpartition("=")
            if not sep or not pattern:
                raise UsageError(f"{flag} takes PATTERN=BITS, got {item!r}")
            pairs.append((pattern, bits))
    out = []
    for pattern, bits in pairs:
        try:
            width = int(bits)
        except ValueError:
            raise UsageError(f"{flag} {pattern}: bits must be an integer, got {bits!r}") from None
        if not (0 <= width <= 8 or width == 16):
            raise UsageError(f"{flag} {pattern}: bits must be in 0..8 or 16 (float16), got {width}")
        out.append((pattern, width))
    return tuple(out)


def parse_outliers(value: Any, flag: str = "--outliers") -> float | str:
    """A fraction in ``[0, MAX_OUTLIERS]`` (``0.005`` or ``0.5%``), ``auto`` (the tables try none and
    :data:`bq_onnx.outliers.FRACTIONS`), or None/``none`` = 0."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "off", "")):
        return 0.0
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    text = str(value).strip()
    try:
        fraction = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise UsageError(f"{flag} takes a fraction (0.005 or 0.5%), auto or none, got {value!r}") from None
    if isinstance(value, bool) or not 0.0 <= fraction <= MAX_OUTLIERS:
        raise UsageError(f"{flag} must be a fraction in [0, {MAX_OUTLIERS}], got {value!r}")
    return fraction


def _outliers_or_default(value: Any, flag: str) -> float | str | None:
    return None if value is None else parse_outliers(value, flag)


def _group(value: Any, flag: str) -> int | str:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        if isinstance(value, (bool, float)):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise UsageError(f"{flag} takes a number of rows (0 = per channel) or auto, got {value!r}") from None


def parse_group_size(value: int | str) -> tuple[int, tuple[int, ...]]:
    """``--group-size``: rows per block (0: one block per output channel) or ``auto``; returns (size, choices)."""
    size = _group(value, "--group-size")
    return (64, AUTO_GROUPS) if size == "auto" else (size, ())


def _labels(value: Any, flag: str) -> Any:
    """A labels file (.npy/.npz, read when the estimator needs it) or the labels themselves (an array)."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _mapping(value: Any, flag: str) -> Mapping | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise UsageError(f"{flag} takes a mapping, got {value!r}")
    return MappingProxyType(dict(value))


def _pairs(value: Any, flag: str, form: str) -> list[tuple[str, Any]]:
    """``["a=1", ...]``, ``{"a": 1}`` or ``(("a", 1), ...)`` -> [(name, raw value), ...]."""
    if isinstance(value, Mapping):
        return list(value.items())
    out = []
    for item in [value] if isinstance(value, str) else value:
        if isinstance(item, (tuple, list)) and len(item) == 2:
            out.append((item[0], item[1]))
            continue
        name, sep, raw = str(item).rpartition("=")
        if not sep or not name:
            raise UsageError(f"{flag} takes {form}, got {item!r}")
        out.append((name, raw))
    return out


def parse_batch_axes(value: Any, flag: str = "--batch-axis") -> tuple[tuple[str, int | None], ...]:
    """``["state=1", "sr=none"]`` or ``{"state": 1, "sr": None}`` -> ((input, axis or None), ...)."""
    out = []
    for name, raw in _pairs(value, flag, "INPUT=AXIS or INPUT=none"):
        if raw is None or str(raw).strip().lower() == "none":
            out.append((str(name), None))
            continue
        try:
            axis = int(raw)
        except (TypeError, ValueError):
            raise UsageError(f"{flag} {name}: the axis must be an integer or none, got {raw!r}") from None
        if axis < 0:
            raise UsageError(f"{flag} {name}: the axis must be >= 0, got {axis}")
        out.append((str(name), axis))
    return tuple(out)


def parse_input_shapes(value: Any, flag: str = "--input-shape") -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``["images=1,3,640,640"]`` or ``{"images": (1, 3, 640, 640)}`` -> ((input, dims), ...)."""
    out = []
    for name, raw in _pairs(value, flag, "NAME=D,D,..."):
        try:
            dims = tuple(int(d) for d in (raw.split(",") if isinstance(raw, str) else raw) if str(d).strip())
        except (TypeError, ValueError):
            raise UsageError(f"{flag} {name}: dimensions must be comma-separated integers, got {raw!r}") from None
        if any(d < 1 for d in dims):
            raise UsageError(f"{flag} {name}: dimensions must be >= 1, got {raw!r}")
        out.append((str(name), dims))
    return tuple(out)


def parse_names(value: Any, flag: str) -> tuple[str, ...]:
    """``"onnxruntime,openvino"`` or ``["onnxruntime"]`` -> the names in order (None or "" -> none)."""
    items = [] if value is None else value.split(",") if isinstance(value, str) else list(value)
    if not all(isinstance(n, str) for n in items):
        raise UsageError(f"{flag} takes comma-separated names, got {value!r}")
    return tuple(n.strip() for n in items if n.strip())


def parse_int_list(value: Any, flag: str) -> tuple[int, ...]:
    """``"1,8"`` or ``[1, 8]`` -> the integers in order."""
    try:
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(int(b) for b in items if not isinstance(b, str) or b.strip())
    except (TypeError, ValueError):
        raise UsageError(f"{flag} takes comma-separated integers, got {value!r}") from None


def _path(value: Any, flag: str) -> str | None:
    return None if value is None else os.fspath(value)


def _bits(v: float) -> str | None:
    return None if 0 <= v <= 8 else "must be a number in 0..8"


def _widths(v: tuple[int, ...]) -> str | None:
    return None if v and all(0 <= b <= 8 or b == 16 for b in v) else "must be widths in 0..8 or 16 (float16)"


# --- options more than one concern reads: one declaration each ---------------------------------------------

SEED = Option(0, "seed for the random choices of the quantizers, the posterior estimator (probes, sampled labels) "
               "and distillation")
OUTPUT = Option(None, "model output a plain --loss KIND reads (default: the first float output)", flag="--output-name",
                parse=lambda v, f: None if v is None else text(v, f))
CALIB_SAMPLES = Option(None, "use only the first N calibration samples", check=at_least(1), metavar="N",
                       parse=lambda v, f: None if v is None else number(int)(v, f))
LOSS = Option(
    None, "the loss the posterior, --tables mc and distillation fit: KIND (on --output-name, default the first float "
    "output) or OUTPUT=KIND[:WEIGHT] per output, repeatable (a weighted sum), OUTPUT@START:STOP=KIND[:WEIGHT] on a "
    "slice of the output's last axis (e.g. scores@4:=kl). Kinds: kl (to the FP32 distribution over the last axis), "
    "ce (labels), mse (0.5|y-t|^2), smse (each channel divided by its FP32 std), cosine (1-cos per last-axis row), "
    "auto. Default auto: kl where the FP32 output is a distribution or a linear layer's class logits, cosine for "
    "unit-norm rows, else smse (see bq_onnx/estimators/loss_plan.py)", parse=lambda v, f: parse_loss(v, f),
    metavar=FORMS.replace(" or ", "|").replace(" ", ""), repeat=True, show="auto")
RUNTIMES = Option(("onnxruntime",), "comma-separated: onnxruntime,openvino", flag="--runtime", metavar="RUNTIME",
                  parse=parse_names, check=lambda v: None if v else "needs at least one runtime")
EPS = Option(("cpu",), "onnxruntime execution providers, comma-separated, each run separately: cpu, cuda, tensorrt, "
             "rocm, migraphx (default cpu); one not installed or without a device is skipped with the reason",
             flag="--ep", metavar="EP", parse=parse_names)
LABELS = Option(None, "labels .npy/.npz (key 'labels') for --loss ce/mse", metavar="FILE", parse=_labels)


# --- the concerns ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InputsConfig(Concern):
    """How the model's inputs are read from data: sample axes, and the inputs the post-write check runs on."""

    title: ClassVar[str] = "model inputs"
    batch_axis: tuple[tuple[str, int | None], ...] = option(
        (), "the axis along which INPUT's calibration samples are stacked (default: the batch dimension found in "
        "the graph); none = given once and shared by every sample (repeatable)", parse=parse_batch_axes,
        metavar="INPUT=AXIS|none", repeat=True)
    verify_inputs: str | None = option(None, "inputs for the post-write check only (.npz keyed by input name, or a "
                                       "folder), instead of the calibration samples or random inputs",
                                       parse=_path, metavar="FILE")
    input_shape: tuple[tuple[str, tuple[int, ...]], ...] = option(
        (), "the shape of input NAME's random verification inputs (sets its symbolic dimensions; repeatable)",
        parse=parse_input_shapes, metavar="NAME=D,D,...", repeat=True)


@dataclasses.dataclass(frozen=True)
class WeightsConfig(Concern):
    """Which tensors are weights."""

    title: ClassVar[str] = "weights"
    min_size: int = option(128, "tensors with fewer elements are not weights (they stay in float)", check=at_least(1))
    keep_fp: tuple[str, ...] = option((), "glob of weight names to keep in float (repeatable; the same as "
                                      "--exclude weight:PATTERN)", parse=_patterns, metavar="PATTERN", repeat=True)
    exclude: tuple[str, ...] = option((), f"keep the weights PATTERN matches in float (repeatable); {PATTERN_HELP}; "
                                      "a pattern that matches no weight is an error", parse=_exclusion_patterns,
                                      metavar="PATTERN", repeat=True)
    only: tuple[str, ...] = option((), "quantize only the weights some PATTERN matches (repeatable; the inverse of "
                                   "--exclude, which still applies)", parse=_exclusion_patterns, metavar="PATTERN",
                                   repeat=True)


@dataclasses.dataclass(frozen=True)
class QuantizerConfig(Concern):
    """How each block of weights becomes codes: the quantizer family, outliers, block size."""

    title: ClassVar[str] = "quantizer"
    quantizer: str = option(
        "uniform", "quantizer family; vq = vector codebooks (d = 2/4/8, chosen per tensor and width), vq2/vq4/vq8 = "
        "one length, auto = the best of uniform, lloyd and vq per tensor and width", choices=QUANTIZERS)
    outliers: float | str | None = option(
        None, "keep this fraction of each tensor's weights (e.g. 0.005 or 0.5%) as sparse fp16 outliers, counted in "
        "the payload; auto = the tables choose none, 0.25% or 1% per tensor and width", parse=_outliers_or_default,
        metavar="FRACTION|auto", show="none; auto with --quantizer auto")
    group_size: int | str = option(
        32, "rows per block along the reduction axis; 0 = per channel; auto = the tables choose 32, 64 or 128 per "
        "tensor and width (expected loss against stored bits, scales included)", parse=_group, metavar="ROWS|auto",
        check=lambda v: "must be >= 0 (0 = one block per output channel)" if v != "auto" and v < 0 else None)
    rounding: str = option(
        "auto", "how weights are rounded onto the designed grid: nearest level; gptq = rows in order, each "
        "row's rounding error compensated on the rows after it through the layer inputs' second moment, weighted "
        "by the posterior precision; gptq-plain = the same without the posterior (GPTQ's own metric). MatMul, Gemm "
        "and Conv weights; needs --calib, else nearest. auto = gptq where --calib leaves 16 samples or more after the "
        "guard's hold-out (the guard also measures nearest), else nearest",
        choices=ROUNDINGS)
    seed: int = SEED.field()


@dataclasses.dataclass(frozen=True)
class FormatConfig(Concern):
    """How the codes are stored in the written model."""

    title: ClassVar[str] = "storage format"
    format: str = option(
        "native", "native: standard DequantizeLinear (int4/int8 containers, runs compressed); compact: exact b-bit "
        "packing decoded by a model-local function (smallest file)", choices=FORMATS)
    scales: str = option(
        "double", "compact: how uniform scales are stored; double = an 8-bit code per block times an fp16 super scale "
        "per output channel (tensors with at least 3 blocks per channel), fp16 = an fp16 scale per block. The native "
        "format always stores fp16 scales", choices=SCALE_STORAGE)


@dataclasses.dataclass(frozen=True)
class AllocationConfig(Concern):
    """How the bit budget is spent over blocks, and the expected-loss tables it is spent on."""

    title: ClassVar[str] = "bit allocation"
    bits: float = option(6, "average stored bits per quantized weight, the budget the allocator spends: codes as "
                         "the format stores them (int4/int8 containers in native, packed in compact) plus scales, "
                         "zero points and codebooks", check=_bits)
    allocator: str = option("greedy", "how the budget is spent; uniform = the same width everywhere",
                            choices=ALLOCATORS)
    granularity: int | None = option(8, "allocation block: slices of N output channels (rows:N) or tensor",
                                     parse=parse_granularity, show="rows:8", metavar="rows:N|tensor")
    allowed_bits: tuple[int, ...] = option(
        (2, 3, 4, 5, 6, 7, 8), "widths the allocator may use; 0 (a block stored as its mean) and 1 only when listed "
        "here (--allocator selective adds 0 when this is not given): far outside what the expected-loss tables "
        "model, so the guard measures them; 16 stores a tensor as fp16 (counted 16 bits; for tiny sensitive "
        "tensors whose 8-bit scales cost more than the bits saved)",
        parse=parse_bit_list, check=_widths, metavar="B,B,...")
    bits_payload: bool = option(False, "--bits counts payload bits only (the grid's width per weight, the papers' "
                                "reading): no container padding, no scales")
    bits_include_metadata: bool = option(False, "kept for old scripts: --bits counts stored bits, metadata "
                                         "included, by default now; with --allocator uniform and a whole --bits it "
                                         "makes --bits that stored budget instead of the fixed grid width")
    size_mb: float | None = option(None, "file-size budget in MB instead of --bits", check=above(0))
    min_bits: tuple[tuple[str, int], ...] = option((), "per-layer minimum bits (repeatable)", parse=parse_min_bits,
                                                   metavar="PATTERN=N", repeat=True)
    tables: str = option("closed", "expected-loss tables: closed form from the posterior; mc: the --loss "
                         "measured per block and width on --calib (slow; validates the closed form); measured: the "
                         "closed form with each tensor's loss measured alone on --calib at the three widths around "
                         "the budget (a few runs per tensor), the rest interpolated", choices=TABLES)
    output: str | None = OUTPUT.field()
    loss: tuple[LossTerm, ...] | None = LOSS.field()
    allocator_options: Mapping | None = option(None, "extra keywords for the allocation method (API only)",
                                               parse=_mapping, flag=None)

    def validate(self) -> None:
        default = type(self).options()["allowed_bits"].default
        if self.allocator == "selective" and self.allowed_bits == default:
            # selective encoding (papers/000) skips unimportant blocks, stored as their mean: it needs 0 bits,
            # not 1 (an encoded block is quantized as any other)
            object.__setattr__(self, "allowed_bits", selective_widths(default))
        low = min(self.allowed_bits)
        if self.size_mb is None and self.bits < low:
            raise UsageError(
                f"--bits {self.bits:g} is below the smallest allowed width ({low}): 0 and 1 bit are far outside "
                f"what the loss tables model, so they are opt-in; give --bits {low} or more, or list them in "
                f"--allowed-bits (e.g. 0,{','.join(map(str, default))}) to let blocks be dropped, measured by the "
                f"guard")


@dataclasses.dataclass(frozen=True)
class PosteriorConfig(Concern):
    """How the posterior is estimated from calibration data (the fields of the estimator's options)."""

    title: ClassVar[str] = "posterior (optional: weights each quantizer's error by the posterior precision)"
    method: str = option("laplace", "posterior estimator", choices=POSTERIOR_METHODS)
    loss: tuple[LossTerm, ...] | None = LOSS.field()
    labels: Any = LABELS.field()
    output: str | None = OUTPUT.field()
    prior_precision: float = option(1e-4, "precision of the Gaussian prior per weight", check=above(0))
    probes: int = option(4, "Rademacher probes per batch (hutchinson)", check=at_least(1))
    mc_samples: int = option(1, "sampled labels per input (fisher-mc)", check=at_least(1))
    calib_samples: int | None = CALIB_SAMPLES.field()
    batch_size: int = option(32, "calibration samples per gradient or forward run (laplace/fisher-mc form "
                             "per-sample gradients from batched runs where exact)", check=at_least(1))
    seed: int = SEED.field()
    cache: str | None = option(None, "folder of gradient graphs kept between runs, keyed by a content hash of the "
                               "model, loss, weights and bq-onnx version (a damaged entry is rebuilt); off without it",
                               metavar="DIR", parse=lambda v, f: None if v is None else text(v, f))

    def validate(self) -> None:
        kinds = [t.kind for t in self.loss or ()]
        if "ce" in kinds and self.labels is None:
            raise UsageError("--loss ce needs labels (--labels)")
        if self.labels is not None and len(kinds) > 1:
            raise UsageError("--labels go with one --loss term, got several")


@dataclasses.dataclass(frozen=True)
class DistillConfig(Concern):
    """Tuning scales and codebooks on calibration data after quantizing (codes fixed)."""

    title: ClassVar[str] = "distillation"
    distill_steps: int = option(0, "after quantizing, tune scales/codebooks for N steps on --calib (codes fixed)",
                                check=at_least(0), metavar="N")
    distill_lr: float = option(1e-3, "step size relative to each tensor's RMS", check=above(0), flag=None)
    output: str | None = OUTPUT.field()
    loss: tuple[LossTerm, ...] | None = LOSS.field()
    calib_samples: int | None = CALIB_SAMPLES.field()
    seed: int = SEED.field()


@dataclasses.dataclass(frozen=True)
class TargetConfig(Concern):
    """The runtime the output is legalized for."""

    title: ClassVar[str] = "target runtime"
    target: str | None = option(None, "legalize the output for a runtime: onnxruntime, tensorrt, rocm (migraphx), "
                                "openvino; the written model is then checked by `bq-onnx validate`", metavar="NAME")
    strict_size: bool = option(False, "with --target: allow only the widths the target executes natively (e.g. 4 "
                               "and 8), not 3 bits stored in int4")


def _share(v: float) -> str | None:
    return None if 0 <= v < 1 else "must be a fraction in [0, 1)"


@dataclasses.dataclass(frozen=True)
class GuardConfig(Concern):
    """The measured check of the allocation on held-out calibration data, against uniform at the same budget."""

    title: ClassVar[str] = "guard (the allocation measured on held-out data; a missed target exits 9)"
    no_guard: bool = option(False, "skip the held-out check of the allocation against the uniform one the budget "
                            "buys (and its repairs)")
    holdout: float = option(0.25, "share of the --calib samples held out for the guard (never used by the "
                            "posterior, the tables or distillation); 0 = measure on the calibration samples",
                            check=_share, metavar="FRACTION")
    max_loss: float | None = option(None, "exit 9, nothing written, when the mean held-out loss (the --loss "
                                    "against FP32) is above this", check=at_least(0))
    min_cosine: float | None = option(None, "exit 9, nothing written, when an output's mean cosine to FP32 on "
                                      "held-out data is below this")
    min_agreement: float | None = option(None, "exit 9, nothing written, when an output's top-1 agreement with "
                                         "FP32 on held-out data is below this (classification outputs)")
    seed: int = SEED.field()


@dataclasses.dataclass(frozen=True)
class VerificationConfig(Concern):
    """What ``bq-onnx verify`` runs (runtimes, providers, samples, labels) and the thresholds a candidate model
    must meet against its reference."""

    title: ClassVar[str] = "thresholds (a failing one exits 6)"
    THRESHOLDS: ClassVar[tuple[str, ...]] = ("min_agreement", "max_kl", "max_rel_error", "min_cosine",
                                             "max_accuracy_drop")
    """The fields that are thresholds (the report lists them); the others say what runs."""

    min_agreement: float | None = option(0.99, "minimum top-1 agreement, fraction (classification outputs only)")
    max_kl: float | None = option(None, "maximum mean KL(reference || candidate) (default: not checked)")
    max_rel_error: float | None = option(None, "maximum ||c - r|| / ||r|| (default: not checked)")
    min_cosine: float | None = option(None, "minimum mean per-sample cosine (default: not checked)")
    max_accuracy_drop: float | None = option(None, "maximum accuracy drop in percentage points, needs --labels "
                                             "(default: not checked)")
    runtimes: tuple[str, ...] = RUNTIMES.field()
    providers: tuple[str, ...] = EPS.field()
    labels: Any = dataclasses.replace(LABELS, help="class labels .npy/.npz (key 'labels'): report accuracies"
                                      ).field()  # LABELS' default and parsing, verify's reason
    output: str | None = dataclasses.replace(OUTPUT, help="compare only this output (default: every output of "
                                             "both models)").field()
    calib_samples: int | None = CALIB_SAMPLES.field()
    batch_size: int = option(64, "samples per run", check=at_least(1))


@dataclasses.dataclass(frozen=True)
class BenchConfig(Concern):
    """How ``bq-onnx bench`` measures each configuration, and which configurations (runtimes x providers x
    batches)."""

    title: ClassVar[str] = "measurement"
    runtimes: tuple[str, ...] = RUNTIMES.field()
    providers: tuple[str, ...] = EPS.field()
    batches: tuple[int, ...] = option((1,), "comma-separated batch sizes", flag="--batch", metavar="BATCH",
                                      parse=parse_int_list,
                                      check=lambda v: None if v and min(v) >= 1 else "values must be >= 1")
    threads: int | None = option(None, "intra-op threads (default: the runtime's choice)", check=at_least(1))
    warmup: int = option(10, "untimed runs first", check=at_least(0))
    iterations: int = option(50, "timed runs", check=at_least(1))
    exact: bool = option(False, "exact precision settings instead of the fast defaults")


@dataclasses.dataclass(frozen=True)
class LimitsConfig(Concern):
    """Resource limits for every command (one declaration; each command's flags include it)."""

    title: ClassVar[str] = "limits"
    max_memory: int | None = option(
        None, "the most memory bq-onnx may allocate from what a model or data file declares, in bytes (suffix "
        "K/M/G/T, KiB/MiB/GiB, KB/MB/GB) or N% of the memory available; a model or data set that needs more is "
        "refused before anything is allocated (exit 3 model, 5 data)", parse=parse_memory, metavar="SIZE|N%",
        show=f"{DEFAULT_FRACTION:.0%} of the memory available")
    run_timeout: float = option(
        DEFAULT_RUN_TIMEOUT, "seconds one onnxruntime/OpenVINO session creation or run may take (posterior, tables, "
        "guard, verification, verify, bench); past it: one line, exit 10, nothing written. --max-memory also bounds "
        "each run: the address space may grow by at most that much while a session is created or runs (exit 10)",
        check=above(0), metavar="SECONDS")


# --- the composite ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimizeConfig:
    """Everything ``optimize`` is asked to do, one concern per field.

    An option several concerns hold (``seed``, ``output``, ``calib_samples``) has one value: set in any one
    concern (or by keyword), it is copied to the others; two different values are a :class:`UsageError`.
    """

    weights: WeightsConfig = dataclasses.field(default_factory=WeightsConfig)
    quantization: QuantizerConfig = dataclasses.field(default_factory=QuantizerConfig)
    storage: FormatConfig = dataclasses.field(default_factory=FormatConfig)
    allocation: AllocationConfig = dataclasses.field(default_factory=AllocationConfig)
    posterior: PosteriorConfig = dataclasses.field(default_factory=PosteriorConfig)
    distillation: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    target: TargetConfig = dataclasses.field(default_factory=TargetConfig)
    inputs: InputsConfig = dataclasses.field(default_factory=InputsConfig)
    guard: GuardConfig = dataclasses.field(default_factory=GuardConfig)

    def __post_init__(self) -> None:
        for name, holders in _shared(type(self)).items():
            values = {getattr(getattr(self, c), name) for c in holders}
            default = concern_types(type(self))[holders[0]].options()[name].default
            given = values - {default}
            if len(given) > 1:
                raise UsageError(f"option {name} has different values in {', '.join(holders)}: {sorted(given)}")
            if given:
                value = given.pop()
                for c in holders:
                    object.__setattr__(self, c, _replaced(getattr(self, c), **{name: value}))

    @classmethod
    def from_options(cls, **options: Any) -> OptimizeConfig:
        """Build from keywords named as the flags (``bits=3``, ``allocator="dp"``, ``group_size="auto"``)."""
        return cls().replace(**options)

    def replace(self, **options: Any) -> OptimizeConfig:
        """A copy with these options changed; each goes to every concern that declares it."""
        known = option_names(type(self))
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise UsageError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(known))})")
        parts = {}
        for concern in dataclasses.fields(self):
            part = getattr(self, concern.name)
            mine = {k: v for k, v in options.items() if k in part.options()}
            parts[concern.name] = _replaced(part, **mine) if mine else part
        return type(self)(**parts)

    def explicit(self) -> frozenset[str]:
        """The options whose value differs from the default."""
        return frozenset(name for concern in self.concerns() for name, opt in concern.options().items()
                         if _differs(getattr(concern, name), opt.default))

    def concerns(self) -> list[Concern]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    def to_report(self) -> dict:
        return {f.name: getattr(self, f.name).to_report() for f in dataclasses.fields(self)}


def selective_widths(default: tuple[int, ...]) -> tuple[int, ...]:
    """The widths ``--allocator selective`` uses without ``--allowed-bits``: the default and 0."""
    return tuple(sorted({0, *default}))


def _replaced(part: Concern, **changes: Any) -> Concern:
    """``dataclasses.replace`` that re-derives the widths selective implied: another allocator drops its 0."""
    if isinstance(part, AllocationConfig) and part.allocator == "selective" and "allowed_bits" not in changes \
            and changes.get("allocator", "selective") != "selective":
        default = AllocationConfig.options()["allowed_bits"].default
        if part.allowed_bits == selective_widths(default):
            changes["allowed_bits"] = default
    return dataclasses.replace(part, **changes)


def _differs(value: Any, default: Any) -> bool:
    if default is None:  # labels may be an array: compare nothing elementwise
        return value is not None
    return bool(value != default)


def concern_types(cls: type = OptimizeConfig) -> dict[str, type[Concern]]:
    """Attribute name -> concern class of a composite config, in declaration order."""
    return {f.name: f.default_factory for f in dataclasses.fields(cls)}  # type: ignore[misc]


def _shared(cls: type) -> dict[str, list[str]]:
    """Option name -> the concerns that hold it, for names held by more than one."""
    holders: dict[str, list[str]] = {}
    for concern, kind in concern_types(cls).items():
        for name in kind.options():
            holders.setdefault(name, []).append(concern)
    return {name: where for name, where in holders.items() if len(where) > 1}


def shared_options(cls: type = OptimizeConfig) -> dict[str, Option]:
    """The options more than one concern of a composite config holds (seed, output, calib_samples)."""
    every = option_names(cls)
    return {name: every[name] for name in _shared(cls)}


def option_names(cls: type = OptimizeConfig) -> dict[str, Option]:
    """Every option of a composite config, once each."""
    out: dict[str, Option] = {}
    for kind in concern_types(cls).values():
        out.update(kind.options())
    return out
