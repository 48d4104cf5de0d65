"""Look inside a model: which weights are quantized, how, and what each costs on disk.

``bq-onnx inspect`` reads the file with onnx's protobuf classes alone (:mod:`bq_onnx.onnx_proto`) and checks
it with the validation loading runs (:mod:`bq_onnx.model_checks`: tensor sizes and budgets, external data,
onnx's C++ checker; same lines, same exit codes), so it starts without numpy, the onnx package or onnx-ir (about
a second less). A bq-onnx output carries its per-layer record in its metadata and is counted by
:mod:`bq_onnx.counting`; a float model's weights are surveyed on the protobuf (:mod:`bq_onnx.proto_graph`) with
the rules ``optimize`` applies on the IR. The IR path (:func:`inspect_ir`, :func:`bq_onnx.model_io.load_model`
and :mod:`bq_onnx.stages.weights`) stays as the reference: ``tests/test_fast_start.py`` checks both give the
same report.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bq_onnx import provenance
from bq_onnx.config import WeightsConfig
from bq_onnx.errors import ModelError
from bq_onnx.model_checks import check_model, check_structure
from bq_onnx.onnx_proto import METADATA_KEY, data_type_bits, iter_graphs, pb, read_with_bytes, tensor_bytes

if TYPE_CHECKING:
    import onnx_ir as ir

    from bq_onnx.context import WeightInfo
    from bq_onnx.weight_rules import Candidate


def _nbytes(model: ir.Model, name: str) -> int:
    for graph in model.graphs():  # a subgraph's weight is stored in that subgraph
        value = graph.initializers.get(name)
        if value is not None:
            return value.const_value.nbytes if value.const_value is not None else 0
    return 0


def candidates(model: ir.Model, min_size: int) -> tuple[list[WeightInfo], list[dict]]:
    """The weights of a float model and every float tensor considered, with what reads it and why it is kept
    in float (Constant nodes are lifted first, on this copy, as ``optimize`` does)."""
    from onnx_ir.passes.common import LiftConstantsToInitializersPass

    from bq_onnx.pass_manager import run_passes
    from bq_onnx.passes.prepare import UniqueInitializerNamesPass
    from bq_onnx.stages.weights import survey

    model = run_passes(model, [LiftConstantsToInitializersPass(size_limit=min_size), UniqueInitializerNamesPass()])
    found = survey(model, WeightsConfig(min_size=min_size))
    return found.weights, [_candidate_row(c) for c in found.candidates]


def _candidate_row(c: Candidate) -> dict:
    return {"name": c.name, "scope": c.scope, "shape": list(c.shape), "dtype": c.dtype, "read_by": list(c.readers),
            "weight": not c.skipped, "skipped": c.skipped}


#: Bits per element of the float types a weight may have.
_FLOAT_BITS = {"float": 32, "float16": 16, "bfloat16": 16, "double": 64}


def _float_layer(name: str, shape: list[int], dtype: str, numel: int, stored: int) -> dict:
    """A float model's weight as a report row (stored in ``dtype``, nothing quantized)."""
    bits = _FLOAT_BITS[dtype]
    return {"name": name, "shape": shape, "bits": bits, "kind": "float", "method": "", "block_size": 0,
            "format": dtype, "numel": numel, "payload_bits": bits * numel, "metadata_bits": 0,
            "stored_bytes": stored, "vector_dim": 1, "outliers": 0}


def inspect(model: str | os.PathLike, min_size: int = WeightsConfig.min_size,
            reference: str | os.PathLike | None = None) -> dict:
    """Per-layer table and totals, as a JSON-ready dict (``bq-onnx inspect --json`` prints it); ``counted`` is
    :mod:`bq_onnx.counting`'s figure against ``reference`` (for a bq-onnx output, against its own metadata)."""
    with _collector_paused():
        proto, invalid = _read_for_counting(model)
        meta = _metadata(proto.metadata_props)
        if meta is None:
            report = _inspect_float_proto(model, proto, min_size, reference)
        elif invalid is not None:
            raise ModelError(invalid)  # bq-onnx's own outputs import every domain they use
        else:
            report = _inspect_proto(model, proto, meta, min_size, reference)
        extra = {"invalid": invalid} if invalid else {}
        return report | {"provenance": provenance.read(proto.metadata_props)} | extra


def _read_for_counting(path: str | os.PathLike) -> tuple[Any, str | None]:
    """The file's ``ModelProto`` after the checks every input passes (:mod:`bq_onnx.model_checks`), and a warning
    or None. One defect is let through with a warning, as it does not touch what is stored: an op domain used
    without its opset import (NNCF 3.4 writes ``MatMulNBits`` without importing ``com.microsoft``), so its
    output is counted on the same terms as bq-onnx's and onnxruntime's; anything else is refused as before."""
    proto, data = read_with_bytes(path)
    where = str(Path(path))
    check_model(proto, where, Path(path).resolve().parent, check_graph=False)
    try:
        check_structure(proto, where, data)
        return proto, None
    except ModelError as exc:
        first = last = exc
    amended, missing = pb().ModelProto(), []
    amended.CopyFrom(proto)
    while len(missing) < 4:  # one domain per checker message
        match = re.search(r"No opset import for domain '([^']+)'", str(last))
        if match is None or match.group(1) in missing:
            raise first
        missing.append(match.group(1))
        amended.opset_import.add(domain=missing[-1], version=1)
        try:
            check_structure(amended, where)
        except ModelError as exc:
            last = exc
            continue
        return proto, (f"{where} uses op domain(s) {', '.join(missing)} without importing them (invalid ONNX; "
                       f"onnxruntime refuses it until an opset_import is added)")
    raise first


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic collector off while the report is made (as it was after).

    Everything inspect builds (the protobuf's wrappers, the survey's view: several objects per node) stays alive
    until the report is made, so a collection finds nothing to free; but once a graph is large enough for a full
    collection (about 1e6 nodes), each one re-scans every object: the part of inspect's CPU time that grew faster
    than the nodes (``benchmarks/graph_scale.py``). The view's cycles left behind are freed by the next
    collection after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _inspect_float_proto(model: str | os.PathLike, proto: Any, min_size: int,
                         reference: str | os.PathLike | None) -> dict:
    """The report of a float model from its protobuf: the weight survey of :mod:`bq_onnx.proto_graph`."""
    from bq_onnx.proto_graph import survey

    found = survey(proto, min_size)
    layers = [_float_layer(c.name, list(c.shape), c.dtype, math.prod(c.shape), found.initializer_bytes[c.name])
              for c in found.weights]
    from bq_onnx.counting import count, count_alone

    # without the reference, the codes its quantized ops read and the float weights left (any tool's output)
    alone = reference is None
    counted = (count_alone(model, min_size, proto, found) if alone else count(model, reference, min_size)).to_report()
    counted["against"] = "quantized ops" if alone else "reference"
    functions = dict.fromkeys((f.domain, f.name, f.overload) for f in proto.functions)
    return _report(model, None, layers, [_candidate_row(c) for c in found.candidates], found.all_initializer_bytes,
                   counted, opset={o.domain: o.version for o in proto.opset_import}.get(""),
                   ir_version=proto.ir_version, nodes=found.nodes, functions=functions)


def _metadata(props: Iterable[Any]) -> dict | None:
    """bq-onnx's per-layer record from ``metadata_props`` (proto entries or the IR's mapping), or None."""
    values = dict(props.items()) if hasattr(props, "items") else {p.key: p.value for p in props}
    return json.loads(values[METADATA_KEY]) if METADATA_KEY in values else None


def _inspect_proto(model: str | os.PathLike, proto: Any, meta: dict, min_size: int,
                   reference: str | os.PathLike | None) -> dict:
    """The report of a bq-onnx output from its protobuf: sizes from the declared types and shapes."""
    from bq_onnx.counting import Count, count, file_bytes, stored_bytes

    bits = data_type_bits()
    sizes: dict[str, int] = {}
    all_init = 0
    for graph in iter_graphs(proto.graph):  # a subgraph's weight is stored in that subgraph; the first one counts
        for t in graph.initializer:
            nbytes = tensor_bytes(t, bits)
            sizes.setdefault(t.name, nbytes)
            all_init += nbytes
    layers = _quantized_layers(meta, lambda name: sizes.get(name, 0))
    if reference is not None:
        counted = count(model, reference, min_size).to_report()
    else:
        ours = {t for layer in meta["layers"] for t in layer["tensors"]}
        original = sum(tensor_bytes(t, bits) for t in proto.graph.initializer
                       if t.name not in ours and not t.name.startswith("bq."))
        numel = sum(layer["numel"] for layer in meta["layers"])
        counted = Count(stored_bytes(proto), original, numel, file_bytes(model, proto)).to_report()
    functions = dict.fromkeys((f.domain, f.name, f.overload) for f in proto.functions)
    return _report(model, meta, layers, [], all_init, counted,
                   opset={o.domain: o.version for o in proto.opset_import}.get(""),
                   ir_version=proto.ir_version, nodes=((n.domain, n.op_type) for n in proto.graph.node),
                   functions=functions)


def _quantized_layers(meta: dict, stored: Callable[[str], int]) -> list[dict]:
    """The layers of bq-onnx's record, each with the bytes its tensors store (``stored``: one tensor's)."""
    return [
        {
            "name": layer["name"],
            "shape": layer["shape"],
            "bits": layer["bits"],
            "kind": layer["kind"],
            "method": layer["method"],
            "block_size": layer["block_size"],
            "format": meta["format"],
            "numel": layer["numel"],
            "payload_bits": layer["payload_bits"],
            "metadata_bits": layer["metadata_bits"],
            "stored_bytes": sum(stored(t) for t in layer["tensors"]),
            "vector_dim": layer.get("vector_dim", 1),
            "outliers": layer.get("outliers", 0),
        }
        for layer in meta["layers"]
    ]


def inspect_ir(model: str | os.PathLike, min_size: int = WeightsConfig.min_size,
               reference: str | os.PathLike | None = None) -> dict:
    """:func:`inspect` on the IR (any model): the weight survey for float models, the checks of ``load_model``."""
    from bq_onnx.model_io import load_model

    m = load_model(model)
    meta = _metadata(m.metadata_props)
    considered: list[dict] = []
    if meta is not None:
        layers = _quantized_layers(meta, lambda name: _nbytes(m, name))
    else:
        layers = []
        found, considered = candidates(m, min_size)
        for w in found:
            dtype = str(w.value.dtype).lower().replace("datatype.", "")
            layers.append(_float_layer(w.name, list(w.layout.shape), dtype, w.numel, _nbytes(m, w.name)))
    all_init = sum(v.const_value.nbytes for g in m.graphs() for v in g.initializers.values()
                   if v.const_value is not None)
    report = _report(model, meta, layers, considered, all_init, _counted(model, m, meta, reference, min_size),
                     opset=m.opset_imports.get("", None), ir_version=m.ir_version,
                     nodes=((n.domain, n.op_type) for n in m.graph), functions=m.functions)
    return report | {"provenance": provenance.read(m.metadata_props)}


def _report(model: str | os.PathLike, meta: dict | None, layers: list[dict], considered: list[dict],
            all_init: int, counted: dict | None, *, opset: int | None, ir_version: int,
            nodes: Iterable[tuple[str, str]], functions: Iterable[tuple[str, str, str]]) -> dict:
    """The JSON-ready report from what either path read (one place for its keys and totals)."""
    numel = sum(r["numel"] for r in layers)
    stored = sum(r["stored_bytes"] for r in layers)
    ops = Counter((f"{domain}." if domain not in ("", "ai.onnx") else "") + op_type for domain, op_type in nodes)
    return {
        "model": os.fspath(model),
        "file_bytes": Path(model).stat().st_size,
        "quantized_by": "bq-onnx" if meta is not None else None,
        "format": meta["format"] if meta else None,
        "opset": opset,
        "ir_version": ir_version,
        "layers": layers,
        "totals": {
            "layers": len(layers),
            "numel": numel,
            "payload_bits": sum(r["payload_bits"] for r in layers),
            "metadata_bits": sum(r["metadata_bits"] for r in layers),
            "stored_bytes": stored,
            "bits_per_weight": sum(r["payload_bits"] for r in layers) / max(numel, 1),
            "bits_per_weight_with_metadata": sum(r["payload_bits"] + r["metadata_bits"] for r in layers)
            / max(numel, 1),
            "stored_bits_per_weight": 8 * stored / max(numel, 1),
            "other_initializer_bytes": all_init - stored,
        },
        "candidates": considered,
        "counted": counted,
        "ops": dict(sorted(ops.items())),
        "functions": sorted(f"{d}.{n}" for d, n, _ in functions),
    }


def _counted(path: str | os.PathLike, m: ir.Model, meta: dict | None, reference: str | os.PathLike | None,
             min_size: int) -> dict | None:
    """Stored bits per weight: against the float reference when given; for a bq-onnx output without one, the
    tensors its layers and shared decode constants store (``bq.`` names) over the weights it records."""
    from bq_onnx.counting import Count, count, count_alone, file_bytes, ir_stored_bytes

    if meta is None:  # a float model or another tool's output: as the protobuf path counts it
        alone = reference is None
        counted = (count_alone(path, min_size) if alone else count(path, reference, min_size)).to_report()
        return counted | {"against": "quantized ops" if alone else "reference"}
    if reference is not None:
        return count(path, reference, min_size).to_report()
    ours = {t for layer in meta["layers"] for t in layer["tensors"]}
    original = sum(v.const_value.nbytes for v in m.graph.initializers.values()
                   if v.const_value is not None and v.name not in ours and not v.name.startswith("bq."))
    numel = sum(layer["numel"] for layer in meta["layers"])
    return Count(ir_stored_bytes(m), original, numel, file_bytes(path)).to_report()
