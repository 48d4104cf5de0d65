"""Capability profiles of deployment targets, for legalization (``optimize(target=...)``) and the validator.

These describe what each runtime *executes* from a native-format model, from the runtimes' documentation and
source (see DESIGN.md "Target constraints"): only onnxruntime and OpenVINO are measured here (CPU, no GPU).
``native_bits`` are the widths a target executes without widening (``--strict-size`` keeps only those).
``containers`` with int2/uint2 make the native format store 1..2-bit grids in them (opset 25): onnxruntime 1.32
runs them, OpenVINO 2026.4 does not read INT2 ("Unsupported data type INT2", ``tests/test_containers.py``), so only
``--target onnxruntime`` writes them; the default target, which must run in both, stores them in int4.
``packed_codes``: where no allocation in containers meets the budget, 1..3-bit grids, which have no container of
their size there, are stored packed at their width and decoded by standard ops (exact in onnxruntime and OpenVINO,
like the compact format's decode; folded at load), so ``--bits 4`` and below fit where int4 plus scales costs over
4 bits: the default target (no profile, always allowed) and OpenVINO. onnxruntime packs too, where the budget is
below every block at 3 bits or more in containers (int4): int2 meets such a budget, but without a 3-bit grid it
buys 2 or 4 bits per weight (the PP-OCR recognizer at ``--bits 4``: CER 0.483 with int2 and int4 alone, 0.062 with
packed 3-bit grids at the same size, ``benchmarks/zoo_native_ort_s14.md``); 1..2-bit grids stay int2, and the
layers stored packed are decoded to float at load (no MatMulNBits kernel for them).
onnxruntime keeps int2 and int4 containers (run compressed, MatMulNBits); TensorRT and ROCm are not measured.
``fp16_scales``: measured exact in onnxruntime and OpenVINO; TensorRT and ROCm are not measured here, so fp32.
"""

from __future__ import annotations

from bq_onnx.errors import UsageError
from bq_onnx.runtimes.base import Capabilities

_STANDARD = frozenset({"", "ai.onnx"})

PROFILES: dict[str, Capabilities] = {
    "onnxruntime": Capabilities(
        name="onnxruntime",
        containers=frozenset({"int4", "uint4", "int8", "uint8", "int2", "uint2"}),
        compressed_bits=frozenset({2, 4, 8}),
        symmetric_only=False,
        block_sizes=None,
        block_axes=frozenset({0, 1}),
        divisible_blocks=False,
        local_functions=True,
        opsets=(7, 25),
        native_bits=frozenset(range(9)),
        domains=_STANDARD | {"com.microsoft"},
        fp16_scales=True,
        packed_codes=True,
        description="onnxruntime CPU: any container and width (int2 at opset 25), asymmetric, codebooks and "
                    "local functions",
    ),
    "tensorrt": Capabilities(
        name="tensorrt",
        containers=frozenset({"int4", "int8"}),
        compressed_bits=frozenset({4, 8}),
        symmetric_only=True,
        block_sizes=frozenset({64, 128}),
        block_axes=frozenset({0, 1}),
        divisible_blocks=False,
        local_functions=True,
        opsets=(9, 22),
        native_bits=frozenset({4, 8}),
        int4_ops=frozenset({"MatMul", "Gemm"}),
        int4_blocked_only=True,
        int8_per_channel=True,
        even_last_dim=True,
        codebooks=False,
        description="TensorRT 10: symmetric int4 blocked (64/128) into MatMul/Gemm, int8 per channel elsewhere",
    ),
    "rocm": Capabilities(
        name="rocm",
        containers=frozenset({"int4", "uint4", "int8", "uint8"}),
        compressed_bits=frozenset({4}),
        symmetric_only=False,
        block_sizes=None,
        block_axes=frozenset({0, 1}),
        divisible_blocks=False,
        local_functions=False,
        opsets=(7, 23),
        native_bits=frozenset({4, 8}),
        description="ROCm / MIGraphX EP: int8 QDQ, MatMulNBits 4-bit only, no local functions, no int2",
    ),
    "openvino": Capabilities(
        name="openvino",
        containers=frozenset({"int4", "uint4", "int8", "uint8"}),
        compressed_bits=frozenset({2, 4, 8}),
        symmetric_only=False,
        block_sizes=None,
        block_axes=frozenset({0}),
        divisible_blocks=True,
        local_functions=False,
        opsets=(7, 23),
        native_bits=frozenset({4, 8}),
        fp16_scales=True,
        packed_codes=True,
        description="OpenVINO: int4/int8 DQ blocked on axis 0 dividing the dimension, local functions inlined "
                    "first, no int2",
    ),
}
ALIASES = {"ort": "onnxruntime", "trt": "tensorrt", "migraphx": "rocm", "ov": "openvino"}


def profile_names() -> list[str]:
    return list(PROFILES)


def get_profile(name: str | Capabilities) -> Capabilities:
    """The profile of a target name (or alias: ort, trt, migraphx, ov); a Capabilities is returned as is."""
    if isinstance(name, Capabilities):
        return name
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in PROFILES:
        raise UsageError(f"unknown target '{name}' (known: {', '.join(PROFILES)}; aliases: "
                         f"{', '.join(f'{a}={t}' for a, t in ALIASES.items())})")
    return PROFILES[key]
