"""Rounding a designed grid: nearest level (the quantizers' own codes) or error-compensating GPTQ
(:mod:`.gptq`)."""

from bq_onnx.config import ROUNDINGS
from bq_onnx.rounding.gptq import DAMPING, PRECISION_FLOOR, gptq_round, output_error

__all__ = ["DAMPING", "PRECISION_FLOOR", "ROUNDINGS", "gptq_round", "output_error"]
