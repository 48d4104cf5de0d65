"""bq-onnx against the quantizers users would pick instead, on real pretrained models, at matched stored size.

Usage:  python benchmarks/peers.py [--models lenet,digits_mlp,minilm-l3,minilm-l6,efficientnet-lite0] [--quick]
        [--out benchmarks/RESULTS.md]

Writes ``benchmarks/RESULTS.md`` (tables, machine, versions) and ``benchmarks/peers_<model>.png`` (metric
against stored bits per weight, a line per tool). Large models and every quantized output go to
``benchmarks/.cache/`` (git-ignored); missing models are built on first use by ``models/build_*.py`` with this
interpreter (needs torch==2.13.0 CPU + transformers; see models/README.md).

Every quantization runs in its own subprocess (``--worker``), so its wall time (load + quantize + save) and its
peak memory (``VmHWM`` of the fresh process) are its own. Every output is evaluated in onnxruntime CPU with exact
settings: ``session.qdq_matmulnbits_accuracy_level=0`` and every ``MatMulNBits`` node's ``accuracy_level`` set
to 0 in the copy that is evaluated.

Size rule, the same for every tool: the *quantized set* is the FP32 model's float initializers (2-D or more) that
are gone from the output; the *stored bits* are the bits of every initializer the output feeds into a decoder
(``DequantizeLinear``, ``MatMulNBits`` inputs 1-4, ``GatherBlockQuantized``, or a node of the ``bq`` domain)
and that is not an unchanged FP32 initializer, counted as stored (int4/uint4 at 4 bits, int2/uint2 at 2, fp16 at
16, whole bytes rounded up per tensor). bits per weight = stored bits / elements of the quantized set.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache"
MODEL_CACHE = CACHE / "models"
OUT_CACHE = CACHE / "peers"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One benchmark model: where it is, how to build it, its data and how to score it."""

    name: str
    path: Path
    calib: Path  # {input name: array} for --calib and the peers' calibration
    data: Path  # evaluation inputs (and labels)
    kind: str  # "labels" (classifier with test labels), "imagenet" (agreement with FP32), "embedding"
    build: tuple[str, ...] = ()
    loss: str = "kl"
    scope_ops: tuple[str, ...] = ("MatMul", "Gemm", "Conv")  # weights of these ops are in scope for every tool


MODELS: dict[str, ModelSpec] = {
    "lenet": ModelSpec("lenet", ROOT / "models/lenet.onnx", ROOT / "models/lenet_calib.npz",
                       ROOT / "models/lenet_data.npz", "labels"),
    "digits_mlp": ModelSpec("digits_mlp", ROOT / "models/digits_mlp.onnx", ROOT / "models/digits_mlp_calib.npz",
                            ROOT / "models/digits_mlp_data.npz", "labels"),
    "minilm-l3": ModelSpec("minilm-l3", MODEL_CACHE / "minilm_l3.onnx", MODEL_CACHE / "minilm_calib.npz",
                           MODEL_CACHE / "sentences.npz", "embedding", ("models/build_minilm.py", "--only", "l3"),
                           loss="mse", scope_ops=("MatMul", "Gemm")),
    "minilm-l6": ModelSpec("minilm-l6", MODEL_CACHE / "minilm_l6.onnx", MODEL_CACHE / "minilm_calib.npz",
                           MODEL_CACHE / "sentences.npz", "embedding", ("models/build_minilm.py", "--only", "l6"),
                           loss="mse", scope_ops=("MatMul", "Gemm")),
    "efficientnet-lite0": ModelSpec("efficientnet-lite0", MODEL_CACHE / "efficientnet_lite0.onnx",
                                    MODEL_CACHE / "efficientnet_calib.npz", MODEL_CACHE / "photos.npz", "imagenet",
                                    ("models/build_efficientnet.py",)),
}  # fmt: skip

#: Peer configurations: (name, tool, options). bq-onnx's own points are added per model from the peers' sizes.
PEERS: list[tuple[str, str, dict[str, Any]]] = [
    ("ort-rtn4-b32", "ort", {"algo": "rtn", "bits": 4, "block": 32}),
    ("ort-rtn4-b128", "ort", {"algo": "rtn", "bits": 4, "block": 128}),
    ("ort-rtn8-b128", "ort", {"algo": "rtn", "bits": 8, "block": 128}),
    ("ort-hqq2-b64", "ort", {"algo": "hqq", "bits": 2, "block": 64}),
    ("ort-hqq4-b128", "ort", {"algo": "hqq", "bits": 4, "block": 128}),
    ("ort-gptq4-b128", "ort", {"algo": "gptq", "bits": 4, "block": 128}),
    ("nncf-int4-r0.6", "nncf", {"mode": "int4", "ratio": 0.6}),
    ("nncf-int4-r0.8", "nncf", {"mode": "int4", "ratio": 0.8}),
    ("nncf-int4-r1.0", "nncf", {"mode": "int4", "ratio": 1.0}),
    ("nncf-int8", "nncf", {"mode": "int8"}),
    ("bq-uniform4-g128", "bq", {"allocator": "uniform", "bits": 4, "group_size": 128, "format": "native"}),
    ("bq-uniform8-g128", "bq", {"allocator": "uniform", "bits": 8, "group_size": 128, "format": "native"}),
]
#: bq-onnx greedy budgets (stored bits per weight incl. metadata) swept on every model besides the peers' sizes.
SWEEP = (2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0)
BQ_GREEDY = {"allocator": "greedy", "group_size": "auto", "format": "compact"}
TIMING_CALIB = 128  # calibration samples for the optimize-time comparison (all-MiniLM-L6-v2: 128 sentences)


# ----------------------------------------------------------------------------------------------- data


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def calib_feeds(spec: ModelSpec, n: int | None = None) -> dict[str, np.ndarray]:
    feeds = load_npz(spec.calib)
    return {k: v[:n] for k, v in feeds.items()} if n else feeds


def eval_feeds(spec: ModelSpec) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    data = load_npz(spec.data)
    if spec.kind == "labels":
        return {"input": data["test_input"]}, data["test_labels"]
    if spec.kind == "imagenet":
        return {"input": data["eval_input"]}, None
    return {"input_ids": data["eval_input_ids"], "attention_mask": data["eval_attention_mask"]}, None


# ------------------------------------------------------------------------------------------- workers


def _vm_hwm_mb() -> float:
    """Peak resident memory of this process (VmHWM belongs to the exec'd address space, unlike ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class _Reader:
    """onnxruntime CalibrationDataReader over an npz of {input: (N, ...)} arrays, one sample per call."""

    def __init__(self, feeds: dict[str, np.ndarray]) -> None:
        self.feeds = feeds
        self.n = len(next(iter(feeds.values())))
        self.i = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= self.n:
            return None
        self.i += 1
        return {k: v[self.i - 1 : self.i] for k, v in self.feeds.items()}

    def rewind(self) -> None:
        self.i = 0

    def __iter__(self):
        self.rewind()
        while (item := self.get_next()) is not None:
            yield item

    def __deepcopy__(self, memo):  # GPTQ deep-copies the reader: share the arrays
        return _Reader(self.feeds)


def run_ort(spec: ModelSpec, opts: dict[str, Any], out: Path, n_calib: int | None) -> None:
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    model = onnx.load(str(spec.path))
    algo, bits, block = opts["algo"], opts["bits"], opts["block"]
    if algo == "rtn":
        cfg = mnq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=False, bits=bits, accuracy_level=0)
    elif algo == "hqq":
        cfg = mnq.HQQWeightOnlyQuantConfig(block_size=block, bits=bits)
    else:
        cfg = mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=_Reader(calib_feeds(spec, n_calib)),
                                            block_size=block)
    q = mnq.MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=False, accuracy_level=0,
                                 algo_config=cfg)
    q.process()
    q.model.save_model_to_file(str(out), use_external_data_format=False)


def run_nncf(spec: ModelSpec, opts: dict[str, Any], out: Path, n_calib: int | None) -> None:
    import nncf
    import onnx

    model = onnx.load(str(spec.path))
    if opts["mode"] == "int8":
        result = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    else:
        feeds = calib_feeds(spec, n_calib)
        n = len(next(iter(feeds.values())))
        dataset = nncf.Dataset([{k: v[i : i + 1] for k, v in feeds.items()} for i in range(n)])
        result = nncf.compress_weights(
            model, mode=nncf.CompressWeightsMode.INT4_ASYM, ratio=opts["ratio"], group_size=128, dataset=dataset,
            sensitivity_metric=nncf.SensitivityMetric.HESSIAN_INPUT_ACTIVATION, subset_size=n,
        )
    repairs = repair_for_onnxruntime(result)
    onnx.save(result, str(out))
    if repairs:
        print("@@REPAIRS " + json.dumps(repairs))


def repair_for_onnxruntime(model) -> list[str]:
    """Mend three defects of NNCF 3.4's ONNX output so onnxruntime computes what NNCF meant; returns what was
    repaired. None changes a dequantized weight (checked against a numpy dequantization of NNCF's own tensors).

    * ``DequantizeLinear`` per-axis scales (and zero points) shaped ``[C, 1, 1]`` instead of 1-D ``[C]`` (the
      operator spec's per-axis form; onnxruntime rejects the model): reshaped.
    * ``MatMulNBits`` 4-bit zero points stored one per byte ``[N, n_blocks]`` instead of two per byte
      ``[N, ceil(n_blocks / 2)]``, low nibble first (onnxruntime rejects the model): packed.
    * ``MatMulNBits`` given the layer's bias as input 5 while the original ``Add`` of that same bias is kept
      (the bias would be added twice): the bias input is dropped, the ``Add`` stays.
    """
    import onnx
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    done: dict[str, int] = {}

    def replace(name: str, array: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(array, name))

    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx"):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("block_size", 0) or len(node.input) < 2 or node.input[1] not in inits:
                continue
            scale = numpy_helper.to_array(inits[node.input[1]])
            if scale.ndim <= 1 or sum(d != 1 for d in scale.shape) > 1:
                continue
            for name in node.input[1:3]:
                if name in inits:
                    replace(name, numpy_helper.to_array(inits[name]).reshape(-1))
            done["per-axis DequantizeLinear scales reshaped to 1-D"] = done.get(
                "per-axis DequantizeLinear scales reshaped to 1-D", 0) + 1
        if node.op_type == "MatMulNBits" and len(node.input) > 5 and node.input[5]:
            bias = node.input[5]
            users = [u for u in model.graph.node if node.output[0] in u.input]
            if users and all(u.op_type == "Add" and bias in u.input for u in users):
                del node.input[5:]
                while node.input and not node.input[-1]:
                    del node.input[-1]
                what = "MatMulNBits bias inputs dropped (the kept Add adds the same bias)"
                done[what] = done.get(what, 0) + 1
        if node.op_type == "MatMulNBits" and len(node.input) > 3 and node.input[3] in inits:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            zp = numpy_helper.to_array(inits[node.input[3]])
            n, k, block = attrs["N"], attrs["K"], attrs["block_size"]
            n_blocks = -(-k // block)
            if attrs.get("bits", 4) != 4 or zp.dtype != np.uint8 or zp.shape != (n, n_blocks) or n_blocks == 1:
                continue
            if zp.max(initial=0) > 15:
                continue
            padded = np.zeros((n, 2 * (-(-n_blocks // 2))), dtype=np.uint8)
            padded[:, :n_blocks] = zp
            replace(node.input[3], (padded[:, 0::2] | (padded[:, 1::2] << 4)).astype(np.uint8))
            done["MatMulNBits 4-bit zero points packed two per byte"] = done.get(
                "MatMulNBits 4-bit zero points packed two per byte", 0) + 1
    return [f"{what} ({count} nodes)" for what, count in done.items()]


def run_bq(spec: ModelSpec, opts: dict[str, Any], out: Path, n_calib: int | None) -> None:
    import bq_onnx

    kwargs: dict[str, Any] = {
        "bits": opts["bits"], "allocator": opts["allocator"], "group_size": opts["group_size"],
        "format": opts["format"], "keep_fp": tuple(opts.get("keep_fp", ())),
        # greedy budgets are stored bits (codes + metadata); bq-uniform<b> is b-bit codes, like the peers' configs
        "bits_include_metadata": opts["allocator"] != "uniform",
    }  # fmt: skip
    if opts.get("posterior"):
        kwargs["posterior"] = opts["posterior"]
    elif opts["allocator"] != "uniform":
        kwargs["calib"] = calib_feeds(spec, n_calib)
        kwargs["posterior_options"] = {"loss": spec.loss}
    result = bq_onnx.optimize(str(spec.path), **kwargs)
    result.save(str(out), force=True, verify=False)


def run_posterior(spec: ModelSpec, opts: dict[str, Any], out: Path, n_calib: int | None) -> None:
    """The posterior once per model; bq-onnx's sweep reuses it (``--posterior``) instead of re-estimating."""
    import bq_onnx

    posterior = bq_onnx.estimate_posterior(str(spec.path), calib_feeds(spec, n_calib), "laplace", loss=spec.loss)
    posterior.save(str(out))


RUNNERS = {"ort": run_ort, "nncf": run_nncf, "bq": run_bq, "posterior": run_posterior}


def worker(spec_json: str) -> None:
    job = json.loads(spec_json)
    spec = MODELS[job["model"]]
    t0 = time.perf_counter()
    RUNNERS[job["tool"]](spec, job["opts"], Path(job["out"]), job.get("n_calib"))
    print("@@RESULT " + json.dumps({"wall_s": time.perf_counter() - t0, "peak_mb": _vm_hwm_mb()}))


def launch(model: str, tool: str, opts: dict[str, Any], out: Path, n_calib: int | None = None,
           timeout: float = 1800) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter; its wall time and peak memory, or its error."""
    job = json.dumps({"model": model, "tool": tool, "opts": opts, "out": str(out), "n_calib": n_calib})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", job], capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    repairs: list[str] = []
    for line in proc.stdout.splitlines():
        if line.startswith("@@REPAIRS "):
            repairs = json.loads(line[len("@@REPAIRS ") :])
        if line.startswith("@@RESULT "):
            return {**json.loads(line[len("@@RESULT ") :]), **({"repairs": repairs} if repairs else {})}
    lines = [ln.strip() for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
    heads = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b", ln)]
    return {"error": (heads[-1] if heads else lines[-1] if lines else f"exit {proc.returncode}")[:300]}


# -------------------------------------------------------------------------------------- size and eval


def _bits_of(dtype: int) -> int:
    import onnx

    special = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}
    for name in ("INT2", "UINT2"):
        if hasattr(onnx.TensorProto, name):
            special[getattr(onnx.TensorProto, name)] = 2
    if dtype in special:
        return special[dtype]
    return onnx.helper.tensor_dtype_to_np_dtype(dtype).itemsize * 8


def _initializers(model) -> dict[str, Any]:
    out = {t.name: t for t in model.graph.initializer}
    for f in model.functions:  # decoders may live in functions, their inputs stay graph initializers
        del f
    return out


def stored_size(fp32_path: Path, out_path: Path) -> dict[str, Any]:
    """The size rule of the module docstring: quantized set, stored bits, bits per weight."""
    import onnx

    ref = onnx.load(str(fp32_path))
    out = onnx.load(str(out_path))
    ref_inits = {t.name: (tuple(t.dims), t.data_type) for t in ref.graph.initializer
                 if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and len(t.dims) >= 2}
    out_inits = _initializers(out)
    kept = {n for n, (dims, dt) in ref_inits.items()
            if n in out_inits and tuple(out_inits[n].dims) == dims and out_inits[n].data_type == dt}
    quantized = sorted(set(ref_inits) - kept)
    numel = sum(int(np.prod(ref_inits[n][0])) for n in quantized)
    stored: set[str] = set()
    for node in out.graph.node:
        if node.op_type == "DequantizeLinear" or node.domain == "bq":
            names = list(node.input)
        elif node.op_type in ("MatMulNBits", "GatherBlockQuantized") and node.domain == "com.microsoft":
            names = list(node.input[1:5]) if node.op_type == "MatMulNBits" else list(node.input)
        else:
            continue
        stored.update(n for n in names if n and n in out_inits and n not in kept and n not in ref_inits)
    bits = 0
    for n in stored:
        t = out_inits[n]
        bits += -(-int(np.prod(t.dims, dtype=np.int64)) * _bits_of(t.data_type) // 8) * 8
    return {"quantized": quantized, "numel": numel, "stored_bits": bits, "bpw": bits / numel if numel else float("nan"),
            "file_mb": out_path.stat().st_size / 1e6}


def scope(spec: ModelSpec) -> list[str]:
    """FP32 weights (2-D or more float initializers) read by the scope ops: the tensors every tool may quantize."""
    import onnx

    model = onnx.load(str(spec.path))
    inits = {t.name for t in model.graph.initializer if len(t.dims) >= 2}
    return sorted({i for n in model.graph.node if n.op_type in spec.scope_ops for i in n.input if i in inits})


def exact_session(path: Path):
    """onnxruntime CPU with exact int4 MatMul (accuracy level 0, also on MatMulNBits nodes a peer wrote); a refused
    model is reported as one line, not onnxruntime's log. The zoo scores with it too."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name == "accuracy_level":
                    a.i = 0
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    opts.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def predict(path: Path, feeds: dict[str, np.ndarray], batch: int = 64) -> np.ndarray:
    sess = exact_session(path)
    name = sess.get_outputs()[0].name
    n = len(next(iter(feeds.values())))
    return np.concatenate([sess.run([name], {k: v[i : i + batch] for k, v in feeds.items()})[0]
                           for i in range(0, n, batch)])


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def metrics(kind: str, ref: np.ndarray, got: np.ndarray, labels: np.ndarray | None) -> dict[str, float]:
    """Quality of ``got`` against the FP32 outputs ``ref`` (and labels)."""
    if kind == "embedding":
        def unit(x: np.ndarray) -> np.ndarray:
            return x / np.linalg.norm(x, axis=1, keepdims=True)

        r, g = unit(ref.astype(np.float64)), unit(got.astype(np.float64))
        sim_r, sim_g = r @ r.T, g @ g.T
        np.fill_diagonal(sim_r, -np.inf)
        np.fill_diagonal(sim_g, -np.inf)
        top_r, top_g = np.argsort(-sim_r, axis=1)[:, :10], np.argsort(-sim_g, axis=1)[:, :10]
        overlap10 = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top_r, top_g)])
        return {"cosine": float((r * g).sum(1).mean()), "min_cosine": float((r * g).sum(1).min()),
                "nn1_agreement": float((top_r[:, 0] == top_g[:, 0]).mean()), "nn10_overlap": float(overlap10)}
    lp, lq = _log_softmax(ref), _log_softmax(got)
    out = {"agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
           "kl": float((np.exp(lp) * (lp - lq)).sum(1).mean())}
    if kind == "imagenet":
        t5r, t5g = np.argsort(-ref, 1)[:, :5], np.argsort(-got, 1)[:, :5]
        out["top5_overlap"] = float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(t5r, t5g)]))
    if labels is not None:
        out["accuracy"] = float((got.argmax(1) == labels).mean())
    return out


PRIMARY = {"labels": "accuracy", "imagenet": "agreement", "embedding": "cosine"}


# ------------------------------------------------------------------------------------------ the run


def ensure_model(spec: ModelSpec) -> None:
    if spec.path.exists() and spec.calib.exists() and spec.data.exists():
        return
    print(f"[{spec.name}] building with {' '.join(spec.build)}", flush=True)
    subprocess.run([sys.executable, *spec.build], cwd=ROOT, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def bench_model(spec: ModelSpec, quick: bool) -> dict[str, Any]:
    started = time.time()
    ensure_model(spec)
    out_dir = OUT_CACHE / spec.name
    out_dir.mkdir(parents=True, exist_ok=True)
    feeds, labels = eval_feeds(spec)
    ref = predict(spec.path, feeds)
    in_scope = scope(spec)
    rows: list[dict[str, Any]] = []
    fp32 = {"config": "fp32", "tool": "fp32", "bpw": 32.0, **metrics(spec.kind, ref, ref, labels)}
    rows.append(fp32)

    def record(config: str, tool: str, opts: dict[str, Any], n_calib: int | None = None, **extra: Any) -> dict:
        out = out_dir / f"{config}.onnx"
        print(f"[{spec.name}] {config} ...", end=" ", flush=True)
        res = launch(spec.name, tool, opts, out, n_calib)
        row: dict[str, Any] = {"config": config, "tool": tool, **extra, **res}
        if "error" not in res:
            size = stored_size(spec.path, out)
            if not size["numel"]:
                row["error"] = "quantized nothing (no weight of a supported op type)"
            else:
                row.update({k: size[k] for k in ("bpw", "numel", "file_mb")})
                row["quantized"] = size["quantized"]
                row["out_of_scope"] = sorted(set(size["quantized"]) - set(in_scope))
                try:
                    row.update(metrics(spec.kind, ref, predict(out, feeds), labels))
                except Exception as exc:  # a peer output that onnxruntime refuses is a result, not a crash
                    first = str(exc).strip().splitlines()[0]
                    row = {k: v for k, v in row.items() if k not in ("bpw", "numel", "file_mb")}
                    first = first if len(first) < 300 else f"{first[:150]} ... {first[-130:]}"
                    row["error"] = f"onnxruntime rejects the output: {first}"
        print(row.get("error") or f"{row['bpw']:.3f} bpw {PRIMARY[spec.kind]}={row[PRIMARY[spec.kind]]:.4f} "
              f"{row['wall_s']:.1f}s {row['peak_mb']:.0f}MB", flush=True)
        rows.append(row)
        return row

    peers = [p for p in PEERS if not quick or p[0] in ("ort-rtn4-b128", "nncf-int4-r0.8", "bq-uniform4-g128")]
    for config, tool, opts in peers:
        if tool == "bq":
            opts = {**opts, "keep_fp": sorted(set(_bq_candidates(spec)) - set(in_scope))}
        record(config, tool, opts, n_calib=TIMING_CALIB)

    # the posterior once, then bq-onnx greedy at each peer's size (same tensors) and a fixed sweep
    post = out_dir / "posterior.npz"
    prow = launch(spec.name, "posterior", {}, post, TIMING_CALIB)
    rows.append({"config": "bq-posterior", "tool": "bq-posterior", **prow})
    budgets: dict[tuple[float, tuple[str, ...]], str] = {}
    candidates = _bq_candidates(spec)
    for r in rows:
        if "bpw" in r and (r["tool"] in ("ort", "nncf") or r["config"].startswith("bq-uniform")):
            # exactly the peer's tensors (out-of-scope ones too, e.g. NNCF's int8 embeddings): same set, same bpw
            tensors = tuple(sorted(set(r["quantized"]) & set(candidates)))
            # the budget rounds down, so a point that meets its budget is never larger than the peer's
            budgets.setdefault((math.floor(r["bpw"] * 1000) / 1000, tensors), r["config"])
    for b in SWEEP if not quick else ():  # budgets above 8 are capped: bq-onnx's --bits is at most 8
        budgets.setdefault((b, tuple(in_scope)), "sweep")
    for (bits, tensors), matched in sorted(budgets.items()):
        # a little under the budget first: stored bytes it does not see (int64 layout constants) rarely push it over
        opts = {**BQ_GREEDY, "bits": min(bits, 8.0) - 0.002, "keep_fp": sorted(set(candidates) - set(tensors))}
        if "error" not in prow:
            opts["posterior"] = str(post)
        tag = f"bq-greedy-{bits:.3f}" + ("" if set(tensors) == set(in_scope) else f"-as-{matched}")
        row = record(tag, "bq", opts, n_calib=TIMING_CALIB, matched=matched, target_bpw=bits)
        for _ in range(3):  # still over (fewer pieces share layouts at a lower budget): take the excess off
            over = row.get("bpw", 0.0) - min(bits, 8.0)
            if over <= 0:
                break
            rows.remove(row)
            opts = {**opts, "bits": opts["bits"] - over - 0.0005}
            row = record(tag, "bq", opts, n_calib=TIMING_CALIB, matched=matched, target_bpw=bits)

    # optimize wall time with calibration included, against NNCF with the Hessian metric on the same samples
    timing = []
    if spec.name == "minilm-l6" or not quick:
        keep = sorted(set(candidates) - set(in_scope))
        timing.append(record("time-bq-greedy-calib", "bq", {**BQ_GREEDY, "bits": 4.0, "keep_fp": keep},
                             n_calib=TIMING_CALIB, timing=True))
        # the same with one group size: --group-size auto scores three block sizes in the tables
        timing.append(record("time-bq-greedy-calib-g64", "bq", {**BQ_GREEDY, "group_size": 64, "bits": 4.0,
                                                               "keep_fp": keep}, n_calib=TIMING_CALIB, timing=True))
    return {"spec": spec, "rows": rows, "scope": in_scope, "timing": timing, "elapsed_s": time.time() - started}


def _bq_candidates(spec: ModelSpec) -> list[str]:
    """Weights bq-onnx would quantize (its own finder), so ``keep_fp`` can pin everything outside the scope."""
    from bq_onnx.estimators import prepare

    return [w.name for w in prepare(str(spec.path)).weights]


# ------------------------------------------------------------------------------------------- report


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    if os.environ.get("BQ_ONNX_COMMIT"):  # the benchmark ran an installed snapshot of this commit
        out["bq-onnx commit"] = os.environ["BQ_ONNX_COMMIT"][:12]
    for pkg in ("bq-onnx", "onnx", "onnxruntime", "onnx-ir", "nncf", "openvino", "numpy", "torch", "transformers"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        kb = int(next(ln for ln in meminfo if ln.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} CPUs{mem}"


def frontier_notes(result: dict[str, Any]) -> list[str]:
    """For every peer point: the best bq-onnx greedy point of equal or smaller size over the same tensors, and
    whether it is at/above.

    A bq-onnx point at most 0.01 bpw larger is shown too (budgets are met to a few thousandths), marked as such.
    """
    spec = result["spec"]
    key = PRIMARY[spec.kind]
    rows = [r for r in result["rows"] if "bpw" in r and r["tool"] != "fp32" and not r.get("timing")]
    bq = [r for r in rows if r["config"].startswith("bq-greedy")]
    notes = []
    for p in rows:
        if p["tool"] not in ("ort", "nncf") and not p["config"].startswith("bq-uniform"):
            continue
        # only bq-onnx points that quantized the same tensors: bits per weight of different sets do not compare
        peer_set = set(p.get("quantized", ()))
        mine = [r for r in bq if set(r.get("quantized", ())) == peer_set]
        same = [r for r in mine if r["bpw"] <= p["bpw"] + 1e-6]
        near = [r for r in mine if p["bpw"] < r["bpw"] <= p["bpw"] + 0.01]
        cells = []
        for group, tag in ((same, ""), (near, " (larger by {d:.3f} bpw)")):
            if group:
                best = max(group, key=lambda r: r[key])
                verdict = "at/above" if best[key] >= p[key] else "**below**"
                cells.append(f"{best['config']} ({best['bpw']:.3f} bpw): {best[key]:.4f} {verdict}"
                             + tag.format(d=best["bpw"] - p["bpw"]))
        text = "; ".join(cells) if cells else "no bq-onnx point at this size"
        notes.append(f"| {p['config']} | {p['bpw']:.3f} | {p[key]:.4f} | {text} |")
    return notes


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = result["spec"]
    key = PRIMARY[spec.kind]
    rows = [r for r in result["rows"] if "bpw" in r and r["tool"] != "fp32" and not r.get("timing")]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        label = {"ort": "onnxruntime MatMulNBits", "nncf": "NNCF compress_weights"}.get(r["tool"], "")
        if r["tool"] == "bq":
            label = "bq-onnx greedy (compact)" if r["config"].startswith("bq-greedy") else "bq-onnx uniform (native)"
        groups.setdefault(label, []).append(r)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"onnxruntime MatMulNBits": "s", "NNCF compress_weights": "^", "bq-onnx greedy (compact)": "o",
               "bq-onnx uniform (native)": "D"}
    for label, pts in groups.items():
        pts = sorted(pts, key=lambda r: r["bpw"])
        style = "-" if label.startswith("bq-onnx greedy") else ":"
        ax.plot([r["bpw"] for r in pts], [r[key] for r in pts], style, marker=markers.get(label, "o"), label=label)
        if not label.startswith("bq-onnx greedy"):
            for r in pts:
                ax.annotate(r["config"].split("-", 1)[1], (r["bpw"], r[key]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
    fp = next(r for r in result["rows"] if r["tool"] == "fp32")
    ax.axhline(fp[key], color="grey", lw=0.8, ls="--", label=f"FP32 ({fp[key]:.4f})")
    ax.set_xlabel("stored bits per weight (codes + scales + zero points) over the quantized tensors")
    ax.set_ylabel({"accuracy": "test accuracy", "agreement": "top-1 agreement with FP32",
                   "cosine": "mean cosine similarity to FP32 embedding"}[key])
    ax.set_title(f"{spec.name}: quality at matched size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v: Any, nd: int = 4) -> str:
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return "" if v is None else str(v)


def report(results: list[dict[str, Any]], out: Path) -> None:
    minutes = sum(r.get("elapsed_s", 0.0) for r in results) / 60
    lines = ["# bq-onnx against its peers on real pretrained models", "",
             f"Produced by `python benchmarks/peers.py --models {','.join(r['spec'].name for r in results)}` "
             f"({minutes:.0f} min in all).", "", f"Machine: {machine()}.", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()) + ".", "",
             (__doc__ or "").split("\n\n", 3)[3].strip(), "",
             "bq-onnx greedy points: compact format, `--group-size auto` (32, 64 or 128 rows per block, chosen per "
             "tensor and width by the tables), `bits_include_metadata`, budget = the stored "
             "bits per weight to hit, posterior from 128 calibration samples estimated once per model "
             "(`bq-posterior` row) and passed as `posterior=`; `-as-<peer>` points quantize exactly that peer's "
             "tensors. Evaluation data never overlap calibration data.", ""]
    for res in results:
        spec = res["spec"]
        key = PRIMARY[spec.kind]
        cols = {"labels": ["accuracy", "agreement", "kl"], "imagenet": ["agreement", "top5_overlap", "kl"],
                "embedding": ["cosine", "min_cosine", "nn1_agreement", "nn10_overlap"]}[spec.kind]
        lines += [f"## {spec.name}", "", f"![{spec.name}](peers_{spec.name}.png)", "",
                  f"Scope: {len(res['scope'])} weight tensors read by {'/'.join(spec.scope_ops)}; primary metric "
                  f"`{key}`.", "",
                  "| config | bpw | " + " | ".join(cols) + " | optimize s | peak MB | note |",
                  "|---|---:|" + "---:|" * len(cols) + "---:|---:|---|"]
        for r in res["rows"]:
            note = r.get("error", "")
            if r.get("repairs"):
                note += " NNCF output repaired (``repair_for_onnxruntime``): " + "; ".join(r["repairs"])
            if r.get("out_of_scope"):
                note += f" also quantized {len(r['out_of_scope'])} tensors outside the scope"
            if "bpw" in r and "quantized" in r and set(r["quantized"]) != set(res["scope"]) and not r.get(
                    "out_of_scope"):
                note += f" {len(r['quantized'])}/{len(res['scope'])} scope tensors quantized"
            lines.append(f"| {r['config']} | {_fmt(r.get('bpw'), 3)} | " + " | ".join(_fmt(r.get(c)) for c in cols)
                         + f" | {_fmt(r.get('wall_s'), 1)} | {_fmt(r.get('peak_mb'), 0)} | {note.strip()} |")
        lines += ["", "Frontier check (best bq-onnx greedy point of equal or smaller size against each peer point):",
                  "", f"| peer point | bpw | {key} | best bq-onnx greedy point at <= bpw (and within +0.01 bpw) |",
                  "|---|---:|---:|---|",
                  *frontier_notes(res), ""]
    out.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    ap.add_argument("--quick", action="store_true", help="one point per tool (smoke test)")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite RESULTS.md and the PNGs from the last run's per-model results in benchmarks/.cache "
                         "(a normal run also reports every model with cached results, not only --models)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s): {', '.join(unknown)}")
    fresh: dict[str, dict] = {}
    for name in names:
        if not args.report_only:
            res = bench_model(MODELS[name], args.quick)
            (OUT_CACHE / f"{name}.json").write_text(json.dumps({**res, "spec": name}, indent=1, default=str))
            fresh[name] = res
            plot(res, args.out.parent / f"peers_{name}.png")
        report(_all_results(fresh), args.out)  # every model with results so far, not only this run's
    if args.report_only:
        for res in _all_results(fresh):
            plot(res, args.out.parent / f"peers_{res['spec'].name}.png")
    print(f"wrote {args.out}")


def _all_results(fresh: dict[str, dict]) -> list[dict]:
    """This run's results plus the cached ones of every other model, in MODELS order."""
    results = []
    for name, spec in MODELS.items():
        if name in fresh:
            results.append(fresh[name])
            continue
        cached = OUT_CACHE / f"{name}.json"
        if cached.exists():
            res = json.loads(cached.read_text())
            res["spec"] = spec
            results.append(res)
    return results


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        main()
