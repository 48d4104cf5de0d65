"""The analyses of the pipeline: each takes typed inputs and returns a typed value (the weights found, a posterior,
the expected-loss tables, an allocation, the quantized forms, the distilled forms); none changes the model. What
changes the model is an onnx-ir pass in :mod:`bq_onnx.passes`."""
