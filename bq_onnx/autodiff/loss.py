"""The scalar loss appended to a model so the autodiff can differentiate it.

One graph serves every classification use: ``loss = -sum(target * LogSoftmax(logits))`` with the target fed
at run time. Feeding the FP32 model's own probabilities gives the label-free KL (up to the constant entropy,
which has no gradient); one-hot labels give cross-entropy; one-hot pseudo-labels or labels sampled from the
predictive distribution give the empirical and the Monte-Carlo Fisher. ``mse`` (``0.5 * sum((y - target)^2)``)
serves regression and embedding outputs.
"""

from __future__ import annotations

import onnx_ir as ir

from bq_onnx.errors import UsageError

LOSS = "bq_loss"
TARGET = "bq_target"
LOSS_KINDS = ("kl", "ce", "mse")


def output_value(model: ir.Model, output: str | None) -> ir.Value:
    outputs = {v.name: v for v in model.graph.outputs}
    if output is None:
        return model.graph.outputs[0]
    if output not in outputs:
        raise UsageError(f"output '{output}' is not a graph output (outputs: {', '.join(outputs)})")
    return outputs[output]


def append_loss(model: ir.Model, kind: str, output: str | None = None, axis: int = -1) -> None:
    """Replace the graph outputs by ``bq_loss`` (``kind`` from :data:`LOSS_KINDS`); add the input ``bq_target``
    shaped like the chosen output. In place."""
    graph = model.graph
    y = output_value(model, output)
    target = ir.Value(name=TARGET, type=ir.TensorType(ir.DataType.FLOAT), shape=y.shape)
    tape = ir.tape.Tape()
    if kind == "mse":
        diff = tape.op("Sub", [y, target])
        total = tape.op("ReduceSum", [tape.op("Mul", [diff, diff])], attributes={"keepdims": 0})
        half = tape.initializer(ir.tensor(0.5, dtype=ir.DataType.FLOAT, name="bq_half"))
        loss = tape.op("Mul", [total, half])
    else:
        log_q = tape.op("LogSoftmax", [y], attributes={"axis": axis})
        loss = tape.op(
            "Neg", [tape.op("ReduceSum", [tape.op("Mul", [target, log_q])], attributes={"keepdims": 0})]
        )
    loss.name = LOSS
    loss.type = ir.TensorType(ir.DataType.FLOAT)
    loss.shape = ir.Shape([])
    graph.inputs.append(target)
    for value in tape.initializers:
        graph.register_initializer(value)
    graph.extend(tape.nodes)
    graph.outputs.clear()
    graph.outputs.append(loss)
