"""Calibration data sources: every source kind, re-batching, image preprocessing, errors."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from trtq.calib import BatchSource, ImagePreprocess, check_batch, open_batches
from trtq.errors import DataError
from trtq.graph.load import TensorSpec, load_model, model_inputs


def spec(name: str, *shape: int | str, dtype: str = "float32") -> TensorSpec:
    return TensorSpec(name, np.dtype(dtype), tuple(shape))


@contextlib.contextmanager
def data_error(match: str):
    """Expect a DataError whose message matches and fits on one line."""
    with pytest.raises(DataError, match=match) as info:
        yield
    assert "\n" not in str(info.value)


def samples(count: int, *shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, *shape)).astype(np.float32)


def save_image(folder: Path, name: str, pixels: np.ndarray) -> Path:
    path = folder / name
    Image.fromarray(pixels).save(path)
    return path


# --------------------------------------------------------------------------- source kinds


def test_real_mnist_calibration_set(mnist_model):
    inputs = model_inputs(load_model(mnist_model))
    source = open_batches(mnist_model.with_name("mnist_calib.npz"), inputs, batch_size=100)
    batches = list(source)
    assert source.num_samples == sum(len(b["input"]) for b in batches) > 0
    assert len(source) == len(batches)
    assert all(set(b) == {"input"} for b in batches)  # 'labels' ignored
    assert batches[0]["input"].dtype == np.float32  # uint8 pixels cast losslessly
    assert source.description.startswith(f"{source.num_samples} samples in ")


def test_npz_with_fixed_batch_dim_drops_the_partial_batch(tmp_path, caplog):
    x = samples(10, 1, 8, 8)
    np.savez(tmp_path / "calib.npz", x=x, labels=np.arange(10))
    with caplog.at_level(logging.WARNING):
        source = open_batches(tmp_path / "calib.npz", [spec("x", 4, 1, 8, 8)])
    assert (len(source), source.num_samples) == (2, 8)
    assert "dropping 2 samples" in caplog.text
    batches = list(source)
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), x[:8])


def test_npz_with_dynamic_batch_dim_keeps_the_partial_batch(tmp_path):
    x = samples(10, 3)
    np.savez(tmp_path / "calib.npz", x=x)
    source = open_batches(tmp_path / "calib.npz", [spec("x", "N", 3)], batch_size=4)
    assert [len(b["x"]) for b in source] == [4, 4, 2]
    assert source.description == f"10 samples in 3 batches from {tmp_path / 'calib.npz'}"


def test_single_input_npz_uses_the_one_array_of_fitting_rank(tmp_path):
    x = samples(3, 5)
    np.savez(tmp_path / "calib.npz", images=x, labels=np.arange(3))
    (batch,) = open_batches(tmp_path / "calib.npz", [spec("input", "N", 5)])
    np.testing.assert_array_equal(batch["input"], x)


def test_npy_file_with_default_batch_size(tmp_path):
    np.save(tmp_path / "calib.npy", samples(20, 2))
    source = open_batches(tmp_path / "calib.npy", [spec("x", "N", 2)])
    assert [len(b["x"]) for b in source] == [8, 8, 4]


def test_folder_of_one_and_many_sample_files_for_two_inputs(tmp_path):
    a, b = samples(5, 4), samples(5, 2, seed=1)
    np.savez(tmp_path / "0.npz", a=a[0], b=b[0])  # one sample, no batch dim
    np.savez(tmp_path / "1.npz", a=a[1:], b=b[1:])  # four samples
    (tmp_path / "README.txt").write_text("not data")
    source = open_batches(tmp_path, [spec("a", "N", 4), spec("b", "N", 2)], batch_size=3)
    batches = list(source)
    assert (source.num_batches, source.num_samples) == (2, 5)
    np.testing.assert_array_equal(np.concatenate([x["a"] for x in batches]), a)
    np.testing.assert_array_equal(np.concatenate([x["b"] for x in batches]), b)


def test_folder_of_npy_files_is_read_in_name_order(tmp_path):
    x = samples(3, 2)
    for i, name in enumerate(["a.npy", "b.npy", "c.npy"]):
        np.save(tmp_path / name, x[i])
    (batch,) = open_batches(tmp_path, [spec("x", "N", 2)])
    np.testing.assert_array_equal(batch["x"], x)


def test_batch_is_cut_where_the_dynamic_width_changes(tmp_path):
    for i, width in enumerate([100, 100, 120]):
        np.save(tmp_path / f"line{i}.npy", samples(1, 3, 32, width, seed=i)[0])
    source = open_batches(tmp_path, [spec("x", "N", 3, 32, "W")])
    assert [b["x"].shape for b in source] == [(2, 3, 32, 100), (1, 3, 32, 120)]
    assert source.num_batches == 2


def test_iterating_twice_gives_the_same_batches(tmp_path):
    for i in range(3):
        np.save(tmp_path / f"{i}.npy", samples(3, 2, seed=i))
    source = open_batches(tmp_path, [spec("x", "N", 2)], batch_size=2)
    first, second = list(source), list(source)
    assert len(first) == len(second) == 5
    for one, two in zip(first, second, strict=True):
        np.testing.assert_array_equal(one["x"], two["x"])


def test_limit_caps_samples_and_never_opens_later_files(tmp_path):
    np.save(tmp_path / "a.npy", samples(4, 2))
    np.save(tmp_path / "b.npy", samples(4, 2))
    (tmp_path / "c.npy").write_bytes(b"corrupt")
    source = open_batches(tmp_path, [spec("x", "N", 2)], batch_size=4, limit=6)
    assert [len(b["x"]) for b in source] == [4, 2]
    assert source.num_samples == 6


def test_loader_script(tmp_path):
    script = tmp_path / "loader.py"
    script.write_text(
        "import numpy as np\n"
        "def load_data():\n"
        "    for n in (2, 3, 4):\n"
        "        yield {'x': np.full((n, 2), n, dtype=np.float64), 'label': n}\n"
    )
    source = open_batches(script, [spec("x", "N", 2)], limit=7)
    assert source.num_batches is None and source.num_samples is None
    with pytest.raises(TypeError, match="not known"):
        len(source)
    batches = list(source)
    assert [b["x"].shape for b in batches] == [(2, 2), (3, 2), (2, 2)]  # last cut to the limit
    assert all(set(b) == {"x"} and b["x"].dtype == np.float32 for b in batches)
    assert len(list(source)) == 3


def test_loader_script_errors_are_the_scripts_fault(tmp_path):
    script = tmp_path / "loader.py"
    script.write_text("def load_data():\n    raise RuntimeError('the user bug')\n    yield\n")
    with pytest.raises(
        DataError, match="load_data\\(\\) raised RuntimeError: the user bug"
    ) as info:
        list(open_batches(script, [spec("x", "N", 2)]))
    assert isinstance(info.value.__cause__, RuntimeError)  # the traceback --debug shows


# --------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    save_image(folder, "a_astronaut.png", skdata.astronaut())
    save_image(folder, "b_chelsea.jpg", skdata.chelsea())
    save_image(folder, "c_coffee.png", skdata.coffee())
    return folder


def by_hand(path: Path, size: tuple[int, int], mean, std, bgr: bool = False) -> np.ndarray:
    """HWC float32 input computed step by step from one image file."""
    height, width = size
    image = Image.open(path).convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32)
    if bgr:
        pixels = pixels[..., ::-1]
    return (pixels * np.float32(1 / 255) - np.float32(mean)) / np.float32(std)


def test_images_resized_to_the_model_and_normalised(photos):
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    preprocess = ImagePreprocess(mean=mean, std=std)
    source = open_batches(photos, [spec("x", "N", 3, 224, 224)], preprocess=preprocess)
    (batch,) = source
    assert batch["x"].shape == (3, 3, 224, 224)
    assert source.description.startswith("3 images in 1 batch")
    expected = by_hand(photos / "b_chelsea.jpg", (224, 224), mean, std).transpose(2, 0, 1)
    np.testing.assert_allclose(batch["x"][1], expected, rtol=1e-6, atol=1e-6)


def test_bgr_order_and_nhwc_layout(photos):
    mean = (0.1, 0.2, 0.3)
    nchw = ImagePreprocess(resize=(64, 96), mean=mean, color="BGR")
    (bgr,) = open_batches(photos, [spec("x", "N", 3, "H", "W")], preprocess=nchw, limit=1)
    expected = by_hand(photos / "a_astronaut.png", (64, 96), mean, 1.0, bgr=True)
    np.testing.assert_allclose(bgr["x"][0], expected.transpose(2, 0, 1), rtol=1e-6, atol=1e-6)

    nhwc = ImagePreprocess(mean=mean[::-1], color="RGB")
    (rgb,) = open_batches(photos, [spec("x", "N", 64, 96, 3)], preprocess=nhwc, limit=1)
    np.testing.assert_allclose(rgb["x"][0], expected[..., ::-1], rtol=1e-6, atol=1e-6)


def test_grayscale_model_and_images_of_different_sizes(tmp_path):
    camera = skdata.camera()
    save_image(tmp_path, "a.png", camera)
    save_image(tmp_path, "b.png", camera[:100, :150])
    save_image(tmp_path, "c.png", camera[:100, :150])
    source = open_batches(tmp_path, [spec("x", "N", 1, "H", "W")], preprocess=None)
    batches = list(source)
    assert [b["x"].shape for b in batches] == [(1, 1, 512, 512), (2, 1, 100, 150)]
    np.testing.assert_allclose(batches[1]["x"][0, 0], camera[:100, :150] / np.float32(255))


def test_fixed_height_keeps_the_aspect_ratio(tmp_path):
    save_image(tmp_path, "line.png", skdata.coffee()[:64, :96])
    (batch,) = open_batches(tmp_path, [spec("x", "N", 3, 32, "W")])
    assert batch["x"].shape == (1, 3, 32, 48)


def test_parse_command_line_text():
    parsed = ImagePreprocess.parse(
        resize="32x100", mean="0.485, 0.456,0.406", std="0.5", scale="1/255", layout="nhwc"
    )
    assert parsed == ImagePreprocess(
        resize=(32, 100), mean=(0.485, 0.456, 0.406), std=(0.5,), layout="NHWC"
    )
    assert ImagePreprocess.parse() is None


# --------------------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    with data_error(r"data not found: .*nowhere\.npz\. pass a \.npz file"):
        open_batches(tmp_path / "nowhere.npz", [spec("x", "N", 2)])


def test_empty_folder(tmp_path):
    with data_error(r"data folder .* holds no files\. put the data directly in it"):
        open_batches(tmp_path, [spec("x", "N", 2)])


def test_folder_without_usable_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with data_error(r"has no usable files \(e\.g\. notes\.txt\)"):
        open_batches(tmp_path, [spec("x", "N", 2)])


def test_unsupported_file_type(tmp_path):
    (tmp_path / "data.csv").write_text("1,2\n")
    with data_error(r"unsupported data file: .*data\.csv\. pass .*load_data\(\)"):
        open_batches(tmp_path / "data.csv", [spec("x", "N", 2)])


def test_missing_input_name(tmp_path):
    np.savez(tmp_path / "calib.npz", a=samples(2, 4), labels=np.arange(2))
    with data_error(r"no array for input 'b' \(arrays found: a 2x4, labels 2\)"):
        open_batches(tmp_path / "calib.npz", [spec("a", "N", 4), spec("b", "N", 2)])


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        (
            {"left": (2, 4), "right": (2, 4)},
            r"and several arrays of rank 2 .*left 2x4, right 2x4\)",
        ),
        ({"cube": (2, 4, 4)}, r"and no array of rank 2 or 1 .*\(arrays found: cube 2x4x4\)"),
    ],
)
def test_no_single_array_fits_a_single_input(tmp_path, arrays, match):
    np.savez(tmp_path / "calib.npz", **{key: np.zeros(shape) for key, shape in arrays.items()})
    with data_error(rf"has no array named 'x' {match}\. save the data under the key 'x'"):
        open_batches(tmp_path / "calib.npz", [spec("x", "N", 4)])


def test_npy_in_a_folder_for_a_two_input_model(tmp_path):
    np.save(tmp_path / "a.npy", samples(2, 4))
    with data_error(r"a\.npy is a \.npy file, .* 2 inputs \('a', 'b'\)\. save \.npz files"):
        open_batches(tmp_path, [spec("a", "N", 4), spec("b", "N", 4)])


def test_wrong_rank(tmp_path):
    np.save(tmp_path / "calib.npy", samples(2, 28))
    with data_error(
        r"expected shape Nx1x28x28 \(N dynamic\) \(or 1x28x28 for one sample\), got 2x28"
    ):
        open_batches(tmp_path / "calib.npy", [spec("x", "N", 1, 28, 28)])


def test_wrong_fixed_dim(tmp_path):
    np.savez(tmp_path / "a.npz", x=samples(1, 3, 200, 224))
    with data_error(r"input 'x': expected shape Nx3x224x224 \(N dynamic\), got 1x3x200x224 in "):
        open_batches(tmp_path, [spec("x", "N", 3, 224, 224)])


@pytest.mark.parametrize(
    ("stored", "expected"), [("float32", "int64"), ("int64", "int8"), ("float64", "float16")]
)
def test_dtype_that_would_lose_information(tmp_path, stored, expected):
    np.save(tmp_path / "calib.npy", np.ones((2, 3), dtype=stored))
    with data_error(f"input 'x': expected dtype {expected}, got {stored} in .*calib.npy"):
        open_batches(tmp_path / "calib.npy", [spec("x", "N", 3, dtype=expected)])


@pytest.mark.parametrize(("bad", "word"), [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_non_finite_values(tmp_path, bad, word):
    x = samples(6, 3)
    x[4, 1] = bad
    np.save(tmp_path / "calib.npy", x)
    source = open_batches(tmp_path / "calib.npy", [spec("x", "N", 3)], batch_size=4)
    with data_error(rf"input 'x' has 1 {word} values in .*calib\.npy \[samples 4:6\]\. clean"):
        list(source)
    assert len(list(open_batches(tmp_path / "calib.npy", [spec("x", "N", 3)], check_finite=False)))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"resize": "224"}, r"--resize '224' is not HEIGHTxWIDTH"),
        ({"resize": "0x224"}, r"not a \(height, width\) pair of positive sizes"),
        ({"mean": "0.5,,0.4"}, r"--mean '0\.5,,0\.4' is not a comma-separated list"),
        ({"std": "1,0,1"}, r"std \(1\.0, 0\.0, 1\.0\) has a zero"),
        ({"scale": "1/0"}, r"--scale '1/0' is not a number or fraction"),
        ({"color": "rgba"}, r"color 'RGBA' is unknown"),
    ],
)
def test_malformed_command_line_text(options, match):
    with data_error(match):
        ImagePreprocess.parse(**options)


def test_loader_script_without_load_data(tmp_path):
    (tmp_path / "loader.py").write_text("def make_data():\n    return []\n")
    with data_error(r"loader script .*loader\.py defines no load_data\(\) function"):
        open_batches(tmp_path / "loader.py", [spec("x", "N", 2)])


def test_loader_script_that_cannot_import(tmp_path):
    (tmp_path / "loader.py").write_text("import no_such_module_here\n")
    with data_error(r"cannot import loader script .*No module named 'no_such_module_here'"):
        open_batches(tmp_path / "loader.py", [spec("x", "N", 2)])


def test_loader_batch_missing_an_input(tmp_path):
    (tmp_path / "loader.py").write_text(
        "import numpy as np\ndef load_data():\n    yield {'image': np.zeros((1, 2), np.float32)}\n"
    )
    source = open_batches(tmp_path / "loader.py", [spec("x", "N", 2)])
    with data_error(r"batch 0 of .*loader\.py has no array for input 'x' \(keys given: 'image'\)"):
        list(source)


def test_batch_size_against_a_fixed_batch_dim(tmp_path):
    np.save(tmp_path / "calib.npy", samples(8, 2))
    with data_error(r"batch size 8 does not fit input 'x' of shape 1x2, .*pass batch size 1"):
        open_batches(tmp_path / "calib.npy", [spec("x", 1, 2)], batch_size=8)


def test_too_few_samples_for_the_fixed_batch_dim(tmp_path):
    np.save(tmp_path / "calib.npy", samples(3, 2))
    with data_error(r"no complete batch: 3 samples, but the model's batch dim is fixed at 4"):
        open_batches(tmp_path / "calib.npy", [spec("x", 4, 2)])


def test_image_options_for_array_data(tmp_path):
    np.save(tmp_path / "calib.npy", samples(3, 2))
    preprocess = ImagePreprocess(resize=(4, 4))
    with data_error(r"image preprocessing options were given, but .*calib\.npy holds no images"):
        open_batches(tmp_path / "calib.npy", [spec("x", "N", 2)], preprocess=preprocess)


def test_images_for_a_model_that_is_not_an_image_model(photos):
    with data_error(r"a folder of images feeds one 4-D numeric input, .* x float32 Nx10"):
        open_batches(photos, [spec("x", "N", 10)])


def test_resize_that_contradicts_the_model(photos):
    with data_error(r"--resize 100x100 does not fit input 'x' of shape Nx3x224x224"):
        open_batches(photos, [spec("x", "N", 3, 224, 224)], preprocess=ImagePreprocess((100, 100)))


def test_mean_with_the_wrong_number_of_channels(tmp_path):
    save_image(tmp_path, "camera.png", skdata.camera())
    preprocess = ImagePreprocess(mean=(0.1, 0.2, 0.3))
    with data_error(r"mean \(0\.1, 0\.2, 0\.3\) has 3 values, but GRAY images have 1 channel"):
        open_batches(tmp_path, [spec("x", "N", 1, 64, 64)], preprocess=preprocess)


def test_check_batch_names_disagreeing_dynamic_dims():
    batch = {"a": np.zeros((2, 3), np.float32), "b": np.zeros((3, 3), np.float32)}
    with data_error(r"dynamic dim 'N' is 2 in input 'a' but 3 in input 'b' in batch 7"):
        check_batch(batch, [spec("a", "N", 3), spec("b", "N", 3)], "batch 7")


def test_batch_source_is_the_public_type(tmp_path):
    np.save(tmp_path / "calib.npy", samples(2, 2))
    assert isinstance(open_batches(tmp_path / "calib.npy", [spec("x", "N", 2)]), BatchSource)
