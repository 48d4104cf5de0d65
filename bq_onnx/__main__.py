from bq_onnx.cli import entry

entry()
