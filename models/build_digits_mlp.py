"""Build the digits-MLP reference model on scikit-learn's ``load_digits`` (1797 real 8x8 digits).

Why: bq-onnx needs a tiny, real, fully-connected model with real calibration data that ships inside a
PyPI wheel (no download at run time), for fast tests. Its layers are exported as ``MatMul`` + ``Add`` with
weights stored [in, out] (not ``Gemm``), because that is the layout that onnxruntime fuses with a blocked
int4 ``DequantizeLinear`` into ``MatMulNBits`` and the only one peer tools such as onnxruntime's
``MatMulNBitsQuantizer`` quantize (they skip ``Gemm``); the LeNet model covers ``Gemm`` and ``Conv``.

Outputs (next to this file): ``digits_mlp.onnx``, ``digits_mlp_data.npz`` (calib/test inputs and labels),
``digits_mlp_calib.npz`` (``{"input": calib_input}``, what a user passes as ``--calib``) and the
``digits_mlp`` entry of ``accuracy.json``. Training is deterministic (fixed seeds, one CPU thread,
deterministic algorithms), so rebuilding on the same machine and versions gives the same bytes.

Rebuild: ``pip install torch==2.13.0 scikit-learn``, then ``python models/build_digits_mlp.py`` from the
repository root. torch is a build-time tool only.
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
    permutation_split,
    save_data,
)

SEED = 0
SPLIT = (1097, 200, 500)  # train / calibration / test, one seeded permutation of the 1797 digits
HIDDEN = (256, 128)
EPOCHS = 60
BATCH_SIZE = 32
LR = 1e-3  # Adam, constant learning rate
OPSET = 18
PIXEL_SCALE = 16.0  # input = load_digits pixel (0..16) / 16, in [0, 1]; no mean/std normalization


class MatMulLinear(nn.Module):
    """Fully-connected ``x @ weight + bias``, ``weight`` stored [in, out]: exports as MatMul + Add."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        ref = nn.Linear(n_in, n_out)  # same initialization as nn.Linear
        self.weight = nn.Parameter(ref.weight.detach().t().contiguous())
        self.bias = nn.Parameter(ref.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight) + self.bias


class DigitsMLP(nn.Module):
    """MLP 64 -> 256 -> 128 -> 10 with ReLU."""

    def __init__(self, hidden: tuple[int, ...] = HIDDEN) -> None:
        super().__init__()
        self.fc1 = MatMulLinear(64, hidden[0])
        self.fc2 = MatMulLinear(hidden[0], hidden[1])
        self.fc3 = MatMulLinear(hidden[1], 10)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.fc3(x)


def load_data() -> dict[str, np.ndarray]:
    """Load ``load_digits``, scale to [0, 1] and split 1097/200/500 (seeded permutation, seed 0)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = np.asarray(x, dtype=np.float32) / np.float32(PIXEL_SCALE)
    y = np.asarray(y, dtype=np.int64)
    train, calib, test = permutation_split(len(y), SPLIT, SEED)
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


def train(model: nn.Module, x: np.ndarray, y: np.ndarray) -> None:
    """Adam, cross-entropy, shuffled mini-batches drawn from a seeded torch generator."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for epoch in range(EPOCHS):
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for start in range(0, len(xt), BATCH_SIZE):
            idx = perm[start : start + BATCH_SIZE]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1:3d}  train loss {total / len(xt):.4f}")
    model.eval()


@torch.no_grad()
def torch_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Logits of the trained model in eval mode."""
    return model(torch.from_numpy(x)).numpy()


def export(model: nn.Module, path: Path) -> None:
    """TorchScript export (opset 18): MatMul/Add/Relu only, weights as initializers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter warns that it is deprecated
        torch.onnx.export(
            model,
            (torch.zeros(1, 64),),
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
    model = DigitsMLP()
    train(model, data["train_input"], data["train_labels"])

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "digits_mlp.onnx"
    export(model, onnx_path)
    data_path, _ = save_data(out, "digits_mlp", data)
    info = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "opset": OPSET,
        "input": "input [batch,64] float32, pixel/16 in [0,1]",
        "data_source": "sklearn.datasets.load_digits() (1797 8x8 digits)",
    }
    check_and_record(
        "digits_mlp",
        onnx_path,
        data_path,
        data,
        torch_logits(model, data["test_input"]),
        info,
        args.ort_python,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
