"""Gradient graphs kept on disk (``--cache DIR``), so the same model, loss and weights are differentiated once.

The key is a sha256 of what the graph is built from: the bq-onnx version, the loss value, the weights and whether
they become inputs, and the model itself (every node with its attributes, the graph's inputs and outputs and
opsets, every initializer's name, type, shape and bytes). A cached file holds the gradient model without the
initializers it shares with the model it was built from (they are taken from the model given, so the file stays
small); its metadata repeats the key, the loss and gradient names. An entry that cannot be read, whose key or
names do not match, or that is not a model of the expected outputs is ignored and rebuilt: the cache is never
trusted blindly. Files are written to a temporary name and renamed into place, so a reader never sees half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

GradientGraph = Any
"""A :class:`bq_onnx.autodiff.gradient.GradientGraph` (not imported here: that module imports this one)."""

KEY = "bq_onnx.gradient_cache"
"""Metadata entry of a cached gradient model: its key, loss, gradients, unsupported weights, borrowed tensors."""
BORROWED = "bq-onnx-borrowed-initializer"
"""External-data location a cached file gives the initializers it shares with the model it was built from."""


def model_key(model: ir.Model, loss: str, wrt: Sequence[str], weights_as_inputs: bool) -> str:
    """sha256 of everything a gradient graph is built from (see the module docstring)."""
    from bq_onnx import __version__

    h = hashlib.sha256()
    h.update(json.dumps({"version": __version__, "loss": loss, "wrt": list(wrt), "as_inputs": weights_as_inputs,
                         "opsets": sorted(model.opset_imports.items()), "ir": model.ir_version}).encode())
    graph = model.graph
    for value in [*graph.inputs, *graph.outputs]:
        h.update(f"io|{value.name}|{value.type}|{value.shape}\n".encode())
    for node in ir.traversal.RecursiveGraphIterator(graph):
        h.update(ir.serde.serialize_node(node).SerializeToString(deterministic=True))
    for graph_ in model.graphs():
        for name, value in graph_.initializers.items():
            tensor = value.const_value
            h.update(f"init|{name}|{value.dtype}|{value.shape}|".encode())
            if tensor is not None:
                h.update(memoryview(np.ascontiguousarray(tensor.numpy())).cast("B"))
    for f in model.functions.values():
        h.update(ir.serde.serialize_function(f).SerializeToString(deterministic=True))
    return h.hexdigest()


def cached_gradient_model(
    folder: str | os.PathLike,
    model: ir.Model,
    loss: str,
    wrt: Sequence[str],
    weights_as_inputs: bool,
    build: Callable[[], GradientGraph],
    make: Callable[..., GradientGraph],
) -> GradientGraph:
    """The gradient graph of ``model`` from ``folder`` when a valid entry is there, else ``build()``, stored;
    ``make(model, loss, gradients, unsupported)`` makes one from an entry read back."""
    key = model_key(model, loss, wrt, weights_as_inputs)
    path = Path(folder) / f"gradient-{key}.onnx"
    found = _load(path, key, model, make) if path.is_file() else None
    if found is not None:
        return found
    graph = build()
    with contextlib.suppress(OSError):  # a cache that cannot be written only costs the next run the build
        _store(path, key, graph, model)
    return graph


def _shared(graph: GradientGraph, source: ir.Model) -> list[str]:
    """Initializers of the gradient model that are the source model's (the same tensor object)."""
    own = graph.model.graph.initializers
    theirs = source.graph.initializers
    return sorted(name for name, value in own.items()
                  if name in theirs and value.const_value is not None
                  and value.const_value is theirs[name].const_value)


def _store(path: Path, key: str, graph: GradientGraph, source: ir.Model) -> None:
    """Write the entry atomically; shared initializers are written as references, not bytes."""
    borrowed = _shared(graph, source)
    inits = graph.model.graph.initializers
    kept = {name: inits[name].const_value for name in borrowed}
    meta = {"key": key, "loss": graph.loss, "gradients": list(graph.gradients.items()),  # in output order
            "unsupported": graph.unsupported,
            "borrowed": borrowed}
    try:
        for name in borrowed:
            t = kept[name]
            inits[name].const_value = ir.ExternalTensor(BORROWED, 0, t.nbytes, t.dtype, shape=t.shape, name=name)
        graph.model.metadata_props[KEY] = json.dumps(meta, sort_keys=True)
        proto = ir.to_proto(graph.model)
    finally:
        for name, t in kept.items():
            inits[name].const_value = t
        graph.model.metadata_props.pop(KEY, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(proto.SerializeToString())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path, key: str, source: ir.Model, make: Callable[..., GradientGraph]) -> GradientGraph | None:
    """The entry at ``path`` with the source's shared initializers put back; None if anything does not match."""
    try:
        proto = onnx.ModelProto.FromString(path.read_bytes())
        meta = json.loads({p.key: p.value for p in proto.metadata_props}[KEY])
        if meta["key"] != key:
            return None
        model = ir.serde.deserialize_model(proto)
        model.metadata_props.pop(KEY, None)
        theirs = source.graph.initializers
        for name in meta["borrowed"]:
            value, tensor = model.graph.initializers[name], theirs[name].const_value
            if not isinstance(value.const_value, ir.ExternalTensor) or value.const_value.location != BORROWED \
                    or value.dtype != tensor.dtype or tuple(value.shape) != tuple(tensor.shape):
                return None
            value.const_value = tensor
        for value in model.graph.initializers.values():  # no other reference outside the file
            if isinstance(value.const_value, ir.ExternalTensor):
                return None
        outputs = [v.name for v in model.graph.outputs]
        gradients = {str(k): str(v) for k, v in meta["gradients"]}
        if outputs != [meta["loss"], *gradients.values()]:
            return None
        unsupported = {str(k): [str(x) for x in v] for k, v in meta["unsupported"].items()}
        return make(model, str(meta["loss"]), gradients, unsupported)
    except Exception:  # noqa: BLE001 - a damaged or foreign entry is rebuilt, never trusted
        return None
