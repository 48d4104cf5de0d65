"""Reverse-mode autodiff in standard ONNX ops: the gradient model (:mod:`.gradient`), the vector-Jacobian
rules (:mod:`.vjp_rules` and the ``vjp_*`` families), and the scalar loss they differentiate (:mod:`.loss`)."""
