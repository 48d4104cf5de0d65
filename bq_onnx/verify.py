"""Built-in verification: the written model must compute what the numpy-dequantized reference computes.

The reference is the input model with every quantized weight replaced by ``QuantizedTensor.dequantize()``
(numpy, mapped back to the weight's own layout). Both run in onnxruntime with exact precision settings.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass, TopologicalSortPass

from bq_onnx.context import Context
from bq_onnx.errors import DataError, InputsError, ModelError, UnsupportedError, VerificationError
from bq_onnx.idle import drop_pages
from bq_onnx.model_io import copy_model, load_model
from bq_onnx.pass_manager import run_passes
from bq_onnx.passes.prepare import prepare_passes
from bq_onnx.progress import memtrace, release_freed_memory
from bq_onnx.qtensor import row_bands

#: Outputs may differ by summation order (fused MatMulNBits vs MatMul), nothing more: relative to the output's
#: magnitude, 1e-4 for float32 and a few units in the last place for float16, or, for long reductions,
#: K * eps / :data:`REDUCTION_SHARE` with K the longest reduction of a quantized weight: a float32 sum of K terms
#: carries up to K * eps of rounding (same-signed partial sums round the same way), and two kernels sum in
#: different orders (a [2^22, 1] weight: 5e-3 relative measured between MatMulNBits and MatMul, allowed 1.6e-2).
RTOL = 1e-4
REDUCTION_SHARE = 16
#: The written model must stay this close to the ORIGINAL float model on the same inputs (cosine similarity of
#: each float output, flattened; shapes and dtypes equal for every output): a rewrite that changed what the
#: graph computes (a quantized shape or scale, a flipped sign) fails. Quantization damage the user asked for is
#: not this check's business (LeNet at 1 bit with 0-bit blocks measures 0.37 on random inputs): the guard and
#: --min-cosine/--min-agreement (exit 9) judge that on real data.
FLOAT_COSINE_FLOOR = 0.0
#: Reference tensors up to this size stay inside the reference model file; bigger ones go to its data file.
INLINE_BYTES = 1 << 20
#: Full-precision reference weights per verification session: bigger models are verified segment by segment.
SEGMENT_BYTES = 512 << 20


@dataclasses.dataclass
class OutputCheck:
    name: str
    max_abs_error: float
    max_abs_reference: float
    ok: bool
    float_cosine: float | None = None  # against the original float model (None: not a float output)


def reference_model(source, ctx: Context) -> ir.Model:
    """The input model, prepared like the pipeline does, with dequantized weights in place of the floats."""
    model = run_passes(load_model(source), prepare_passes(ctx.config.weights))
    owned = {name: v for g in model.graphs() for name, v in g.initializers.items()}  # subgraphs' weights too
    for name, qt in ctx.quantized.items():
        value = owned[name]
        info = ctx.weight(name)
        restored = info.layout.from_view(qt.dequantize())
        dtype = value.dtype
        np_dtype = dtype.numpy() if dtype is not None else np.float32
        value.const_value = ir.tensor(restored.astype(np_dtype), name=name)
    return model


def write_reference(model: ir.Model, ctx: Context, folder: str | os.PathLike, name: str = "reference",
                    dequantized: bool = True) -> Path:
    """Write ``model`` (prepared like the pipeline does) as the reference, one weight at a time: each dequantized
    weight (and each external tensor of the input) goes straight to the data file and is dropped, so the
    reference never exists in memory as a whole (:func:`reference_model` builds it in memory, for tests).
    ``dequantized=False``: the float weights stay (the original model, prepared the same way)."""
    quantized = ctx.quantized if dequantized else {}
    folder = Path(folder)
    data_name = f"{name}.onnx.data"
    with open(folder / data_name, "wb") as data:
        for graph in model.graphs():
            for key, value in graph.initializers.items():
                tensor = value.const_value
                if tensor is None:
                    continue
                if key in quantized:  # names are unique across graphs (UniqueInitializerNamesPass)
                    layout = ctx.weight(key).layout
                    np_dtype = value.dtype.numpy() if value.dtype is not None else np.float32
                    bands = None if layout.needs_transpose or tensor.nbytes <= INLINE_BYTES else \
                        row_bands(quantized[key], tensor.nbytes)
                    if bands is not None:  # written band by band of rows: its layout is its view's
                        data.write(b"\0" * (-data.tell() % 4096))
                        offset = data.tell()
                        _write_bands(data, bands, np_dtype)
                        value.const_value = ir.ExternalTensor(data_name, offset, data.tell() - offset, tensor.dtype,
                                                              shape=ir.Shape(tensor.shape), name=key,
                                                              base_dir=folder)
                        continue
                    restored = layout.from_view(quantized[key].dequantize())
                    drop_pages()  # the codes read, where they wait on disk (bq_onnx.idle)
                    payload = np.ascontiguousarray(restored.astype(np_dtype, copy=False))
                    del restored
                elif isinstance(tensor, ir.ExternalTensor):  # its folder is not ours: copy the bytes
                    if tensor.nbytes <= INLINE_BYTES:  # shape tensors must be inline for shape inference
                        value.const_value = ir.tensor(tensor.numpy(), dtype=tensor.dtype, name=key)
                        continue
                    data.write(b"\0" * (-data.tell() % 4096))
                    offset = data.tell()
                    tensor.tofile(data)  # by chunks: a big weight is never read whole here
                    value.const_value = ir.ExternalTensor(data_name, offset, tensor.nbytes, tensor.dtype,
                                                          shape=ir.Shape(tensor.shape), name=key, base_dir=folder)
                    continue
                else:
                    continue
                if payload.nbytes <= INLINE_BYTES:
                    value.const_value = ir.tensor(payload, name=key)
                    continue
                data.write(b"\0" * (-data.tell() % 4096))
                offset = data.tell()
                payload.tofile(data)
                value.const_value = ir.ExternalTensor(data_name, offset, payload.nbytes, tensor.dtype,
                                                      shape=ir.Shape(tensor.shape), name=key, base_dir=folder)
                del payload
    path = folder / f"{name}.onnx"
    ir.save(model, path)
    memtrace(f"verify: {name} written")
    return path


def _write_bands(data, bands: Iterator[tuple[int, np.ndarray]], dtype: np.dtype) -> None:
    """A weight's decode (as ``dtype``) written to ``data`` band by band of rows (:func:`bq_onnx.qtensor.row_bands`),
    the codes each band read dropped again: the same bytes, without the decoded weight in memory whole (issue 21;
    at 1 GiB of one weight it held the reference's writing at 1.66x the weight)."""
    for _, band in bands:
        np.ascontiguousarray(band.astype(dtype, copy=False)).tofile(data)
        del band
        drop_pages()  # the codes read, where they wait on disk (bq_onnx.idle)


def segments(model: ir.Model, segment_bytes: int) -> list[list[ir.Node]]:
    """The main graph's nodes (topologically sorted) cut into runs that read at most ``segment_bytes`` of
    initializers each (a single larger one gets a run of its own); one run when the graph has subgraphs, whose
    reads of outer values a cut could not see."""
    nodes = list(model.graph)
    if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for n in nodes for a in n.attributes.values()):
        return [nodes]
    runs: list[list[ir.Node]] = [[]]
    size, seen = 0, set()
    for node in nodes:
        weights = [v for v in node.inputs if v is not None and v.const_value is not None and v.name not in seen]
        nbytes = sum(v.const_value.nbytes for v in weights)
        if runs[-1] and size + nbytes > segment_bytes:
            runs.append([])
            size = 0
        runs[-1].append(node)
        size += nbytes
        seen.update(v.name for v in weights)
    return runs


def reference_outputs(source, ctx: Context, feeds: Mapping[str, np.ndarray], rt, folder: str | os.PathLike,
                      segment_bytes: int | None = None) -> list[np.ndarray]:
    """The reference's outputs on ``feeds``, computed by consecutive segments of the graph, each in its own
    session that is dropped before the next is built: peak memory holds ``segment_bytes`` of full-precision
    weights (default :data:`SEGMENT_BYTES`), not the whole model; intermediate activations pass between them."""
    return reference_runs(source, ctx, [feeds], rt, folder, segment_bytes)[0]


@dataclasses.dataclass(frozen=True)
class PreparedReference:
    """A source already loaded and prepared as the pipeline prepares it (:func:`prepared_reference`): passed to
    :func:`reference_runs` as its ``source``, read and prepared once for both references (loading and preparing
    took about 0.5 s of each on MiniLM-L3)."""

    model: ir.Model


def prepared_reference(source, ctx: Context) -> PreparedReference:
    """``source`` loaded and prepared as the pipeline prepares it: what :func:`reference_runs` writes out."""
    return PreparedReference(run_passes(load_model(source), [*prepare_passes(ctx.config.weights),
                                                              TopologicalSortPass()]))


def reference_runs(source, ctx: Context, runs: Sequence[Mapping[str, np.ndarray]], rt, folder: str | os.PathLike,
                   segment_bytes: int | None = None, dequantized: bool = True) -> list[list[np.ndarray]]:
    """:func:`reference_outputs` of each of ``runs`` (feeds of the same shapes: runs of a fixed batch), every
    session built once; ``dequantized=False``: of the float model itself. A :class:`PreparedReference` source is
    used as it is, and its weights are as they were when this returns."""
    prepared = source if isinstance(source, PreparedReference) else prepared_reference(source, ctx)
    model = prepared.model
    kept = [(value, value.const_value) for graph in model.graphs() for value in graph.initializers.values()]
    try:
        return _reference_runs(model, ctx, runs, rt, folder, segment_bytes, dequantized)
    finally:
        for value, tensor in kept:  # write_reference swapped them for the dequantized or copied ones
            value.const_value = tensor


def _reference_runs(model: ir.Model, ctx: Context, runs: Sequence[Mapping[str, np.ndarray]], rt,
                    folder: str | os.PathLike, segment_bytes: int | None, dequantized: bool) -> list[list[np.ndarray]]:
    pieces = segments(model, SEGMENT_BYTES if segment_bytes is None else segment_bytes)
    outputs = [v.name for v in model.graph.outputs]
    if len(pieces) > 1:
        for value in model.graph.inputs:
            if value.name in runs[0]:
                value.shape = ir.Shape(list(np.shape(runs[0][value.name])))
        ShapeInferencePass(check_type=False, strict_mode=False)(model)
    if len(pieces) == 1 or not _typed_boundaries(model, pieces):
        session = rt.session(write_reference(model, ctx, folder, dequantized=dequantized), exact=True,
                             lean=True, spin=False)
        memtrace("verify: reference session")
        return [session.run(feeds) for feeds in runs]
    values: list[dict[str, np.ndarray]] = [dict(feeds) for feeds in runs]
    for i in range(len(pieces)):
        part = _segment_model(model, pieces, i)
        session = rt.session(write_reference(part, ctx, folder, f"reference{i}", dequantized), exact=True,
                             lean=True, spin=False)
        for known in values:
            wanted = {k: known[k] for k in session.input_names}
            known.update(zip(session.output_names, session.run(wanted)))
        del session, part
        release_freed_memory()
        for f in Path(folder).glob(f"reference{i}.onnx*"):
            f.unlink()
        memtrace(f"verify: reference segment {i + 1}/{len(pieces)}")
    return [[known[name] for name in outputs] for known in values]


def _boundaries(model: ir.Model, runs: list[list[ir.Node]], i: int) -> tuple[list[ir.Value], list[ir.Value]]:
    """Values segment ``i`` reads from outside (graph inputs, earlier segments) and must hand on."""
    inside = {id(n) for n in runs[i]}
    later = {id(n) for run in runs[i + 1:] for n in run}
    graph_outputs = {id(v) for v in model.graph.outputs}
    ins: dict[int, ir.Value] = {}
    outs: dict[int, ir.Value] = {}
    for node in runs[i]:
        for v in node.inputs:
            if v is not None and v.const_value is None and (v.producer() is None or id(v.producer()) not in inside):
                ins.setdefault(id(v), v)
        for v in node.outputs:
            if id(v) in graph_outputs or any(id(u.node) in later for u in v.uses()):
                outs.setdefault(id(v), v)
    return list(ins.values()), list(outs.values())


def _typed_boundaries(model: ir.Model, runs: list[list[ir.Node]]) -> bool:
    for i in range(len(runs)):
        ins, outs = _boundaries(model, runs, i)
        if any(v.dtype is None for v in ins + outs):
            return False
    return True


def _segment_model(model: ir.Model, runs: list[list[ir.Node]], i: int) -> ir.Model:
    """A model of segment ``i`` alone: a copy whose inputs and outputs are the segment's boundary values."""
    ins, outs = _boundaries(model, runs, i)
    in_names, out_names = {v.name for v in ins}, {v.name for v in outs}
    start = sum(len(run) for run in runs[:i])  # runs are consecutive slices of the sorted nodes; a copy keeps order
    part = copy_model(model)
    graph = part.graph
    values = {v.name: v for n in graph for v in n.outputs} | {v.name: v for v in graph.inputs}
    drop = [n for j, n in enumerate(graph) if not start <= j < start + len(runs[i])]
    graph.outputs.clear()
    graph.outputs.extend(values[name] for name in sorted(out_names))
    graph.inputs.clear()
    for name in sorted(in_names):  # an earlier segment's value becomes a fresh graph input of this one
        old = values[name]
        new = old if old.producer() is None else ir.Value(name=name, type=old.type, shape=old.shape)
        if new is not old:
            ir.convenience.replace_all_uses_with(old, new)
        graph.inputs.append(new)
    graph.remove(drop, safe=False)
    for name in [n for n, v in graph.initializers.items() if not v.uses()]:
        graph.initializers.pop(name)
    return part


def reduction_length(ctx: Context) -> int:
    """The longest reduction (K of the (K, N) view) of a quantized weight."""
    return max((ctx.weight(name).layout.view_shape[0] for name in ctx.quantized), default=1)


def compare(reference: list[np.ndarray], candidate: list[np.ndarray], names: list[str],
            reduction: int = 1) -> list[OutputCheck]:
    """Per output: equal shapes, the same non-finite pattern, and a max abs error within the tolerance (see
    :data:`RTOL`; ``reduction``: :func:`reduction_length`) of the reference's magnitude."""
    checks = []
    for name, ref, out in zip(names, reference, candidate):
        if any(np.asarray(a).dtype.kind in "OSUV" for a in (ref, out)):  # strings: equal or not (issue 21)
            same = np.asarray(ref).shape == np.asarray(out).shape and bool(np.all(np.asarray(ref) == np.asarray(out)))
            checks.append(OutputCheck(name, 0.0 if same else float("inf"), 0.0, same))
            continue
        ref64, out64 = np.asarray(ref, dtype=np.float64), np.asarray(out, dtype=np.float64)
        if ref64.shape != out64.shape:
            checks.append(OutputCheck(name, float("inf"), 0.0, False))
            continue
        scale = float(np.max(np.abs(ref64))) if ref64.size else 0.0
        err = float(np.max(np.abs(ref64 - out64))) if ref64.size else 0.0
        finite = bool(np.isfinite(out64).all() == np.isfinite(ref64).all())
        dtype = np.asarray(ref).dtype
        if np.issubdtype(dtype, np.floating):
            eps = float(np.finfo(dtype).eps)
            rtol = max(RTOL, 8 * eps, reduction * eps / REDUCTION_SHARE)
        else:
            rtol = 0.0
        checks.append(OutputCheck(name, err, scale, finite and err <= rtol * max(scale, 1e-3)))
    return checks


def combine(per_run: list[list[OutputCheck]]) -> list[OutputCheck]:
    """Per output, the worst of its checks over several runs."""
    out = []
    for checks in zip(*per_run):
        cosines = [c.float_cosine for c in checks if c.float_cosine is not None]
        out.append(OutputCheck(checks[0].name, max(c.max_abs_error for c in checks),
                               max(c.max_abs_reference for c in checks), all(c.ok for c in checks),
                               min(cosines) if cosines else None))
    return out


def float_fidelity(original: list[np.ndarray], candidate: list[np.ndarray], names: list[str]) -> list[str]:
    """What is wrong with ``candidate`` against the original float model's outputs (empty: nothing): a shape or
    dtype that differs, non-finite values where the original has none, a float output whose cosine similarity
    is under :data:`FLOAT_COSINE_FLOOR`."""
    problems = []
    for name, ref, out in zip(names, original, candidate):
        ref, out = np.asarray(ref), np.asarray(out)
        if ref.shape != out.shape or ref.dtype != out.dtype:
            problems.append(f"output '{name}' is {out.dtype}{list(out.shape)} where the float model gives "
                            f"{ref.dtype}{list(ref.shape)}")
            continue
        if not np.issubdtype(ref.dtype, np.floating):
            continue
        if not np.isfinite(out[np.isfinite(ref)]).all():
            problems.append(f"output '{name}' has non-finite values where the float model has none")
            continue
        cosine = cosine_similarity(ref, out)
        if cosine is not None and cosine <= FLOAT_COSINE_FLOOR:
            problems.append(f"output '{name}' is far from the float model's (cosine {cosine:.3f}, must be above "
                            f"{FLOAT_COSINE_FLOOR:g})")
    return problems


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float | None:
    """Of the flattened finite entries, in float64; None when the original is all zero (no direction)."""
    a64, b64 = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    keep = np.isfinite(a64) & np.isfinite(b64)
    a64, b64 = a64[keep], b64[keep]
    na, nb = float(np.linalg.norm(a64)), float(np.linalg.norm(b64))
    if na == 0.0:
        return None if nb == 0.0 else 0.0
    return float(a64 @ b64) / (na * nb) if nb > 0 else 0.0


def verify_written(
    path: str | os.PathLike, source, ctx: Context, feeds: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]],
    runtime: str = "onnxruntime", random_inputs: bool = False, shown: str | os.PathLike | None = None,
) -> list[OutputCheck]:
    """Reload ``path``, check it by path, run it and the reference on ``feeds`` (one run's feeds, or a list of
    runs: a fixed-batch model's samples); raise on a mismatch. ``random_inputs``: the feeds are made up, and a
    model that cannot run on them is checked in FP32 first, so that invalid inputs are not reported as a bad
    model (:class:`~bq_onnx.errors.InputsError`). ``shown``: the name messages give the file (the destination of
    a staged output)."""
    from bq_onnx.runtimes import get_runtime

    runs = [feeds] if isinstance(feeds, Mapping) else list(feeds)
    path = Path(path)
    where = Path(shown) if shown is not None else path
    try:
        onnx.checker.check_model(os.fspath(path))
    except onnx.checker.ValidationError as exc:
        raise VerificationError(f"{where}: written model fails the onnx checker: {str(exc).splitlines()[0]}") from None
    memtrace("verify: checker")
    rt = get_runtime(runtime)
    out, names = _candidate_runs(path, where, source, ctx, runs, rt, random_inputs)
    with tempfile.TemporaryDirectory(prefix="bq-ref-") as tmp:
        prepared = prepared_reference(source, ctx)
        ref_out = reference_runs(prepared, ctx, runs, rt, tmp)
        memtrace("verify: reference run")
        float_out = reference_runs(prepared, ctx, runs, rt, tmp, dequantized=False)
        del prepared
        memtrace("verify: float model run")
    reduction = reduction_length(ctx)
    per_run = [compare(r, o, names, reduction) for r, o in zip(ref_out, out)]
    for checks, original, o in zip(per_run, float_out, out):
        for check, f, c in zip(checks, original, o):
            if np.issubdtype(np.asarray(f).dtype, np.floating) and np.shape(f) == np.shape(c):
                check.float_cosine = cosine_similarity(f, c)
    checks = combine(per_run)
    bad = [c for c in checks if not c.ok]
    if bad:
        c = bad[0]
        raise VerificationError(
            f"{where}: output '{c.name}' differs from the numpy-dequantized reference "
            f"(max abs error {c.max_abs_error:.3g}, reference magnitude {c.max_abs_reference:.3g})"
        )
    for original, o in zip(float_out, out):
        problems = float_fidelity(original, o, names)
        if problems:
            raise VerificationError(f"{where}: the written model does not compute what the float model does: "
                                    f"{problems[0]}")
    return checks


def _candidate_runs(path: Path, where: Path, source, ctx: Context, runs: Sequence[Mapping[str, np.ndarray]], rt,
                    random_inputs: bool) -> tuple[list[list[np.ndarray]], list[str]]:
    """The written model's outputs on ``runs`` (and their names) in its own session, dropped before the
    full-precision reference is built (one session at a time); big codebook decodes are computed by numpy from
    the written tensors, the rest of the file in the runtime (:mod:`bq_onnx.verify_decoded`)."""
    from bq_onnx.verify_decoded import decoded_candidate

    with tempfile.TemporaryDirectory(prefix="bq-cand-") as tmp:
        candidate = decoded_candidate(path, tmp) if ctx.quantized else None
        if candidate is not None:
            memtrace("verify: candidate decoded")
        try:
            session = rt.session(candidate or path, exact=True, lean=True, spin=False)
        except (UnsupportedError, ModelError) as exc:  # named by the output; an unknown op: not supported (exit 4)
            text = str(exc).replace(os.fspath(candidate or path), os.fspath(where))
            raise (UnsupportedError(text) if isinstance(exc, UnsupportedError) else VerificationError(text)) from None
        try:
            out = [session.run(run) for run in runs]
        except DataError:
            if random_inputs:
                del session
                fp32_runs(source, runs, rt)  # raises InputsError when the FP32 model fails on them too
            raise
        names = session.output_names
        del session
    release_freed_memory()
    memtrace("verify: candidate run")
    return out, names


def fp32_runs(source, runs: Sequence[Mapping[str, np.ndarray]], rt) -> None:
    """Run the input model itself on ``runs``; a failure there means the inputs, not the quantized model, are
    wrong: an :class:`~bq_onnx.errors.InputsError` that asks for real inputs."""
    with tempfile.TemporaryDirectory(prefix="bq-fp32-") as tmp:
        if isinstance(source, (str, os.PathLike)):
            where, path = os.fspath(source), source
        else:
            where, path = "<in-memory model>", Path(tmp) / "fp32.onnx"
            ir.save(load_model(source), path)
        session = rt.session(path, exact=True, lean=True, spin=False)
        try:
            for run in runs:
                session.run(run)
        except DataError as exc:
            reason = str(exc).removeprefix("onnxruntime could not run the model on these inputs: ")
            shapes = ", ".join(f"{k} {list(np.shape(v))}" for k, v in runs[0].items())
            raise InputsError(
                f"{where}: the FP32 model itself fails on random verification inputs ({shapes}): {reason}; give "
                f"real inputs with --calib DATA or --verify-inputs FILE, or their shapes with --input-shape "
                f"NAME=D,D,... (nothing was written)"
            ) from None
