"""Look inside a model: which weights are quantized, how, and what each costs on disk."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from bq_onnx.config import WeightsConfig
from bq_onnx.context import WeightInfo
from bq_onnx.decode.rewrite import METADATA_KEY
from bq_onnx.model_io import load_model
from bq_onnx.pass_manager import run_passes
from bq_onnx.passes.prepare import UniqueInitializerNamesPass
from bq_onnx.stages.weights import survey


def _nbytes(model: ir.Model, name: str) -> int:
    for graph in model.graphs():  # a subgraph's weight is stored in that subgraph
        value = graph.initializers.get(name)
        if value is not None:
            return value.const_value.nbytes if value.const_value is not None else 0
    return 0


def candidates(model: ir.Model, min_size: int) -> tuple[list[WeightInfo], list[dict]]:
    """The weights of a float model and every float tensor considered, with what reads it and why it is kept
    in float (Constant nodes are lifted first, on this copy, as ``optimize`` does)."""
    model = run_passes(model, [LiftConstantsToInitializersPass(size_limit=min_size), UniqueInitializerNamesPass()])
    found = survey(model, WeightsConfig(min_size=min_size))
    rows = [{"name": c.name, "scope": c.scope, "shape": list(c.shape), "dtype": c.dtype, "read_by": list(c.readers),
             "weight": not c.skipped, "skipped": c.skipped} for c in found.candidates]
    return found.weights, rows


def inspect(model: str | os.PathLike, min_size: int = WeightsConfig.min_size,
            reference: str | os.PathLike | None = None) -> dict:
    """Per-layer table and totals, as a JSON-ready dict (``bq-onnx inspect --json`` prints it); ``counted`` is
    :mod:`bq_onnx.counting`'s figure against ``reference`` (for a bq-onnx output, against its own metadata)."""
    m = load_model(model)
    meta = json.loads(m.metadata_props[METADATA_KEY]) if METADATA_KEY in m.metadata_props else None
    layers = []
    considered: list[dict] = []
    if meta is not None:
        for layer in meta["layers"]:
            stored = sum(_nbytes(m, t) for t in layer["tensors"])
            layers.append(
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
                    "stored_bytes": stored,
                    "vector_dim": layer.get("vector_dim", 1),
                    "outliers": layer.get("outliers", 0),
                }
            )
    else:
        found, considered = candidates(m, min_size)
        for w in found:
            bits = w.value.dtype.itemsize * 8
            layers.append(
                {
                    "name": w.name,
                    "shape": list(w.layout.shape),
                    "bits": bits,
                    "kind": "float",
                    "method": "",
                    "block_size": 0,
                    "format": str(w.value.dtype).lower().replace("datatype.", ""),
                    "numel": w.numel,
                    "payload_bits": bits * w.numel,
                    "metadata_bits": 0,
                    "stored_bytes": _nbytes(m, w.name),
                    "vector_dim": 1,
                    "outliers": 0,
                }
            )
    numel = sum(r["numel"] for r in layers)
    stored = sum(r["stored_bytes"] for r in layers)
    all_init = sum(v.const_value.nbytes for g in m.graphs() for v in g.initializers.values()
                   if v.const_value is not None)
    ops = Counter(
        (f"{n.domain}." if n.domain not in ("", "ai.onnx") else "") + n.op_type for n in m.graph
    )
    return {
        "model": os.fspath(model),
        "file_bytes": Path(model).stat().st_size,
        "quantized_by": "bq-onnx" if meta is not None else None,
        "format": meta["format"] if meta else None,
        "opset": m.opset_imports.get("", None),
        "ir_version": m.ir_version,
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
        "counted": _counted(model, m, meta, reference, min_size),
        "ops": dict(sorted(ops.items())),
        "functions": sorted(f"{d}.{n}" for d, n, _ in m.functions),
    }


def _counted(path: str | os.PathLike, m: ir.Model, meta: dict | None, reference: str | os.PathLike | None,
             min_size: int) -> dict | None:
    """Stored bits per weight: against the float reference when given; for a bq-onnx output without one, the
    tensors its layers and shared decode constants store (``bq.`` names) over the weights it records."""
    from bq_onnx.counting import Count, count, file_bytes, ir_stored_bytes

    if reference is not None:
        return count(path, reference, min_size).to_report()
    if meta is None:
        return None
    ours = {t for layer in meta["layers"] for t in layer["tensors"]}
    original = sum(v.const_value.nbytes for v in m.graph.initializers.values()
                   if v.const_value is not None and v.name not in ours and not v.name.startswith("bq."))
    numel = sum(layer["numel"] for layer in meta["layers"])
    return Count(ir_stored_bytes(m), original, numel, file_bytes(path)).to_report()
