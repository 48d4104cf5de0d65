"""Shared helpers for the reference-model build scripts (numpy, onnx and onnxruntime only; no torch).

The build scripts train with torch, but the numbers recorded in ``accuracy.json`` must be what onnxruntime
measures on the exported file, because that file is what bq-onnx quantizes. onnxruntime may live in a
different environment from torch, so this module doubles as a tiny CLI that the build scripts can run under
another interpreter (``python models/_common.py logits MODEL.onnx DATA.npz KEY OUT.npy``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

MODELS_DIR = Path(__file__).resolve().parent
ACCURACY_JSON = MODELS_DIR / "accuracy.json"
IR_VERSION = 10  # onnx 1.23 writes newer IR versions than onnxruntime 1.31 accepts (<= 13); pin one it loads.


def stratified_split(labels: np.ndarray, sizes_per_class: tuple[int, ...], seed: int) -> list[np.ndarray]:
    """Split indices into disjoint parts with exactly ``sizes_per_class[k]`` samples of every class in part k.

    Uses ``np.random.default_rng(seed)`` (PCG64, stable across numpy versions); each part is sorted so the
    order does not depend on the shuffle.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in sizes_per_class]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        if idx.size < sum(sizes_per_class):
            raise ValueError(f"class {cls} has {idx.size} samples, need {sum(sizes_per_class)}")
        start = 0
        for k, n in enumerate(sizes_per_class):
            parts[k].append(idx[start : start + n])
            start += n
    return [np.sort(np.concatenate(p)) for p in parts]


def permutation_split(n_samples: int, sizes: tuple[int, ...], seed: int) -> list[np.ndarray]:
    """Split ``range(n_samples)`` into disjoint parts of the given sizes by one seeded permutation."""
    if sum(sizes) > n_samples:
        raise ValueError(f"sizes {sizes} exceed {n_samples} samples")
    perm = np.random.default_rng(seed).permutation(n_samples)
    out, start = [], 0
    for n in sizes:
        out.append(np.sort(perm[start : start + n]))
        start += n
    return out


def finalize_onnx(path: Path) -> None:
    """Pin the IR version, drop exporter doc strings, check the model and save it again in place."""
    import onnx

    model = onnx.load(str(path))
    model.ir_version = IR_VERSION
    model.doc_string = ""
    model.graph.doc_string = ""
    for node in model.graph.node:
        node.doc_string = ""
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file (used to check that rebuilding gives the same bytes)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _ort_logits_inprocess(onnx_path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in sess.get_inputs()]
    return sess.run(None, {name: x})[0]


def _default_ort_python() -> str | None:
    env = os.environ.get("BQ_ORT_PYTHON")
    if env:
        return env
    venv = MODELS_DIR.parent / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else None


def ort_logits(onnx_path: Path, data_npz: Path, key: str, ort_python: str | None = None) -> np.ndarray:
    """Run ``data_npz[key]`` through ``onnx_path`` with onnxruntime (CPU EP) and return the logits.

    Runs in this process when onnxruntime is importable, else under ``ort_python`` (default: the
    ``BQ_ORT_PYTHON`` environment variable, then the repository's ``.venv``).
    """
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        ort_python = ort_python or _default_ort_python()
        if ort_python is None:
            raise RuntimeError("onnxruntime is not importable here; pass --ort-python or set BQ_ORT_PYTHON") from None
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "logits.npy"
            cmd = [
                ort_python,
                str(Path(__file__).resolve()),
                "logits",
                str(onnx_path),
                str(data_npz),
                key,
                str(out),
            ]
            subprocess.run(cmd, check=True)
            return np.load(out)
    with np.load(data_npz) as data:
        x = data[key]
    return _ort_logits_inprocess(onnx_path, x)


def update_accuracy(key: str, entry: dict, path: Path = ACCURACY_JSON) -> None:
    """Set ``accuracy.json[key] = entry``, keeping the other models' entries (sorted keys, stable output)."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = entry
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_data(out_dir: Path, name: str, data: dict[str, np.ndarray]) -> tuple[Path, Path]:
    """Write ``{name}_data.npz`` (calib/test inputs and labels) and ``{name}_calib.npz`` (``{"input": ...}``).

    The calibration file is keyed by the graph input name, which is what the tool's ``--calib`` expects.
    """
    data_path, calib_path = out_dir / f"{name}_data.npz", out_dir / f"{name}_calib.npz"
    keep = ("calib_input", "calib_labels", "test_input", "test_labels")
    np.savez_compressed(data_path, **{k: data[k] for k in keep})
    np.savez_compressed(calib_path, input=data["calib_input"])
    return data_path, calib_path


def check_and_record(
    key: str,
    onnx_path: Path,
    data_path: Path,
    data: dict[str, np.ndarray],
    torch_test_logits: np.ndarray,
    info: dict,
    ort_python: str | None = None,
) -> dict:
    """Measure accuracy with onnxruntime, require it to equal torch's, and write the ``accuracy.json`` entry.

    The entry goes to ``accuracy.json`` next to ``onnx_path``; ``info`` adds model-specific fields.
    """
    o_test = ort_logits(onnx_path, data_path, "test_input", ort_python)
    o_calib = ort_logits(onnx_path, data_path, "calib_input", ort_python)
    torch_acc = float((torch_test_logits.argmax(1) == data["test_labels"]).mean())
    ort_acc = float((o_test.argmax(1) == data["test_labels"]).mean())
    calib_acc = float((o_calib.argmax(1) == data["calib_labels"]).mean())
    max_diff = float(np.abs(torch_test_logits - o_test).max())
    print(f"test accuracy: torch {torch_acc:.4f}  onnxruntime {ort_acc:.4f}  max |logit diff| {max_diff:.2e}")
    if ort_acc != torch_acc:
        raise SystemExit("onnxruntime and torch accuracies differ")
    entry = {
        "fp32_test_accuracy": ort_acc,
        "test_samples": len(data["test_labels"]),
        "fp32_calib_accuracy": calib_acc,
        "calib_samples": len(data["calib_labels"]),
        "train_samples": len(data["train_labels"]),
        "torch_test_accuracy": torch_acc,
        "max_abs_logit_diff_torch_vs_ort": max_diff,
        "ir_version": IR_VERSION,
        "onnx_sha256": sha256(onnx_path),
        **info,
    }
    update_accuracy(key, entry, Path(onnx_path).parent / "accuracy.json")
    print(f"wrote {onnx_path} ({Path(onnx_path).stat().st_size} bytes, sha256 {entry['onnx_sha256'][:16]})")
    return entry


def _main(argv: list[str]) -> int:
    if len(argv) == 5 and argv[0] == "logits":
        onnx_path, data_npz, key, out = argv[1:]
        with np.load(data_npz) as data:
            x = data[key]
        np.save(out, _ort_logits_inprocess(Path(onnx_path), x))
        return 0
    print("usage: _common.py logits MODEL.onnx DATA.npz KEY OUT.npy", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
