"""Graph passes over one onnx-ir model; each does one thing and states what it requires and ensures."""
