"""Shared mechanics of the storage rewrites: put decode nodes in front of each weight's consumers.

A format subclass only says how one :class:`QuantizedTensor` becomes stored tensors plus a decode that yields
the ``(K, N)`` view; this base restores the tensor's own layout, keeps the original tensor name on the decoded
value (so consumers and tools see the same name), drops the float initializer and records the report row.
"""

from __future__ import annotations

import abc
import hashlib
import json

import onnx_ir as ir

from bq_onnx.context import Context, WeightInfo
from bq_onnx.decode.ops import restore_layout
from bq_onnx.emitter import GraphEmitter
from bq_onnx.onnx_proto import METADATA_KEY  # declared beside the reader that needs it without onnx-ir
from bq_onnx.qtensor import QuantizedPieces, QuantizedTensor
from bq_onnx.sizes import Storage, layer_record, storage_of

_META_KEYS = (
    "name", "bits", "kind", "method", "block_size", "shape", "view", "symmetric", "numel", "payload_bits",
    "metadata_bits", "pieces", "vector_dim", "outliers",
)


def scope_tag(scope: str) -> str:
    """A short tag of a subgraph path, for the names of the decode constants that subgraph owns."""
    return "s" + hashlib.sha1(scope.encode()).hexdigest()[:8]


def load_notes(layers: list[dict], fmt: str) -> list[str]:
    """What the native output decodes to float when a runtime loads it (vector codebooks, outliers, packed codes):
    one note each, said once for the written output (the budget search rewrites several trials)."""
    if fmt != "native":
        return []
    notes = []
    special = [r["name"] for r in layers if r["vector_dim"] > 1 or r["outliers"]]
    if special:
        notes.append(f"{len(special)} layer(s) with vector codebooks or outliers ({', '.join(special[:3])}"
                     f"{', ...' if len(special) > 3 else ''}) are decoded to float when the runtime loads the model "
                     f"(smaller file, not less RAM)")
    packed = [r["name"] for r in layers if r.get("packed_codes")]
    if packed:
        notes.append(f"{len(packed)} layer(s) at 1..3 bits, for which the target has no container of their size, "
                     f"are stored packed ({', '.join(packed[:3])}{', ...' if len(packed) > 3 else ''}) and decoded "
                     f"to float when the runtime loads the model (smaller file, not less RAM)")
    return notes


class RewritePass(ir.passes.InPlacePass, abc.ABC):
    format: str = ""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.current: WeightInfo | None = None  # the weight being emitted

    @property
    def storage(self) -> Storage:
        """What this output stores per code and scale (the target's containers in native)."""
        st = storage_of(self.ctx.config, self.ctx.derived)
        return st if st.format == self.format else Storage(self.format)

    def requires(self, model: ir.Model) -> None:
        assert model.opset_imports.get("", 0) >= 21, "run UpgradeOpsetPass first"
        assert self.ctx.quantized, "the weights must be quantized first (bq_onnx.stages.quantize)"

    @abc.abstractmethod
    def emit(self, em: GraphEmitter, qt: QuantizedTensor, name: str, model: ir.Model) -> ir.Value:
        """Store ``qt``'s dense part (via ``em.tensor``) and return the decoded ``(K, N)`` float value."""

    @abc.abstractmethod
    def emit_outliers(self, em: GraphEmitter, x: ir.Value, qt: QuantizedTensor, name: str, model: ir.Model) -> ir.Value:
        """Store ``qt``'s sparse outliers and return ``x`` with them added back."""

    def _emit_one(self, em: GraphEmitter, qt: QuantizedTensor, name: str, model: ir.Model) -> ir.Value:
        x = self.emit(em, qt, name, model)
        return x if qt.outlier_index is None else self.emit_outliers(em, x, qt, name, model)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        main = model.graph
        shared: dict = {}  # the main graph's constants; each subgraph that owns a weight gets its own
        sub_shared: dict[int, dict] = {}
        derived: dict[int, dict] = {}  # values computed once per graph (lookup tables), reused by later weights
        scopes: dict[int, str] = {}
        new_nodes: dict[int, tuple[ir.Graph, list[ir.Node]]] = {id(main): (main, [])}
        self.ctx.layers = []
        for info in self.ctx.weights:
            qt = self.ctx.quantized[info.name]
            self.current = info
            graph = info.value.graph or main  # the decode goes where the initializer lives
            scopes[id(graph)] = info.scope
            em = GraphEmitter(f"{info.name}.bq/", shared if graph is main else sub_shared.setdefault(id(graph), {}),
                              derived.setdefault(id(graph), {}))
            view = self._emit_any(em, qt, info.name, model)
            decoded = restore_layout(em, view, info.layout)
            if info.value.dtype != ir.DataType.FLOAT:
                decoded = em.op("Cast", [decoded], to=info.value.dtype)
            self._replace(graph, info, decoded)
            for value in em.tape.initializers:
                graph.register_initializer(value)
            new_nodes.setdefault(id(graph), (graph, []))[1].extend(em.tape.nodes)
            stored = {v.name: v.const_value.nbytes for v in em.tape.initializers}
            original = info.value.const_value.nbytes if info.value.const_value is not None else 0
            self.ctx.layers.append(
                layer_record(info.name, qt, self.storage, stored, info.layout.shape, original)
            )
        for value in sorted(shared.values(), key=lambda v: v.name):
            main.register_initializer(value)
        for graph, _ in new_nodes.values():
            if graph is main:
                continue
            suffix = f".{scope_tag(scopes[id(graph)])}"
            for value in sorted(sub_shared.get(id(graph), {}).values(), key=lambda v: v.name):
                value.name += suffix  # a subgraph's constants never take an outer graph's names
                graph.register_initializer(value)
        for graph, nodes in new_nodes.values():
            if len(graph):
                graph.insert_before(graph[0], nodes)
            else:
                graph.extend(nodes)
        self._record_metadata(model)
        return ir.passes.PassResult(model, modified=True)

    def groups(self, pieces: QuantizedPieces) -> list[QuantizedTensor]:
        """The stored tensors of a weight's pieces, covering its columns in order: one per piece here; a format
        may join pieces it stores together at no extra cost (native overrides)."""
        return [qt for _, _, qt in pieces.pieces]

    def chunks(self, qt: QuantizedTensor) -> list[QuantizedTensor]:
        """One stored tensor as the slices of columns the format writes it in: itself here; native cuts a weight
        too large for one runtime op (:meth:`bq_onnx.passes.rewrite_native.RewriteNativePass.chunks`)."""
        return [qt]

    def _emit_any(self, em: GraphEmitter, q: QuantizedTensor | QuantizedPieces, name: str, model: ir.Model) -> ir.Value:
        groups = [q] if isinstance(q, QuantizedTensor) else self.groups(q)
        groups = [part for qt in groups for part in self.chunks(qt)]
        if len(groups) == 1:
            return self._emit_one(em, groups[0], name, model)
        views = [self._emit_one(em, qt, f"{name}.p{i}", model) for i, qt in enumerate(groups)]
        return em.op("Concat", views, "columns", axis=1)

    @staticmethod
    def _replace(graph: ir.Graph, info: WeightInfo, decoded: ir.Value) -> None:
        old = info.value
        dtype = old.dtype
        ir.convenience.replace_all_uses_with(old, decoded)
        graph.initializers.pop(old.name)
        old_name = old.name
        old.name = f"{old_name}.bq_float"  # detached; frees the name for the decoded value
        decoded.name = old_name
        decoded.dtype = dtype
        decoded.shape = ir.Shape(list(info.layout.shape))

    def _record_metadata(self, model: ir.Model) -> None:
        q, d = self.ctx.config.quantization, self.ctx.derived
        meta = {
            "format": self.format,
            "quantizer": q.quantizer,
            "outliers": d.outliers,
            "group_size": d.group_size,
            "layers": [
                {k: r[k] for k in _META_KEYS}
                | {"tensors": sorted(r["tensors"])}
                for r in self.ctx.layers
            ],
        }
        model.metadata_props[METADATA_KEY] = json.dumps(meta, sort_keys=True, separators=(",", ":"))

    def ensures(self, model: ir.Model) -> None:
        stored = {name for graph in model.graphs() for name in graph.initializers}  # one walk, not one per weight
        for info in self.ctx.weights:
            assert info.name not in stored, f"float weight '{info.name}' is still stored"
