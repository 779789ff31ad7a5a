"""The data path's contract (``faar_serve/codec``), checked against references written here.

* Decoding: the header alone gives the size (after EXIF orientation) and the reduced size;
  limits apply before any pixel is decoded; all eight orientations are applied.
* Resizing: label maps identical to nearest-neighbour resampling with half-pixel centres;
  every other map within one step of its encoding of a float64 bilinear reference
  (``support.reference_resize``), on several sizes and all eight orientations.
* Encodings: every PNG read back bit-exact by Pillow; NPZ dtypes and float16 rounding.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image
from support import encode, image, nearest_index, reference_resize

from faar_serve import codec
from faar_serve.codec import png, resize
from faar_serve.manifest import TaskInfo

PALETTE = tuple((i * 40 % 256, i * 90 % 256, i * 150 % 256) for i in range(7))
TASKS = {
    "semseg": TaskInfo("semseg", "labels", "semseg", "classes", tuple(f"c{i}" for i in range(7)), PALETTE),
    "saliency": TaskInfo("saliency", "probability", "saliency", "salient object"),
    "depth": TaskInfo("depth", "depth", "depth", "depth in m", units="m"),
    "normals": TaskInfo("normals", "normals", "normals", "x right, y up, z to the camera"),
}
# (model output h, w) -> (upload h, w): growing, shrinking, mixed, odd and prime sizes, one pixel.
SIZES = [((16, 16), (37, 53)), ((16, 24), (11, 97)), ((13, 7), (13, 7)), ((16, 16), (1, 1)),
         ((9, 31), (128, 17)), ((32, 32), (64, 64)), ((32, 32), (48, 80))]


def model_outputs(seed: int, h: int, w: int) -> dict[str, np.ndarray]:
    """Maps like a model's: smooth with sharp regions, values spanning each encoding's range."""
    rng = np.random.default_rng(seed)
    field = cv2.resize(rng.normal(size=(4, 4, 8)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    field = field.reshape(h, w, 8) + rng.normal(scale=0.3, size=(h, w, 8)).astype(np.float32)
    normals = field[..., 4:7].transpose(2, 0, 1) + np.array([0, 0, 1.5], np.float32)[:, None, None]
    return {"semseg": field[..., :7].argmax(-1).astype(np.uint8),
            "saliency": (1 / (1 + np.exp(-3 * field[..., 7]))).astype(np.float32),
            "depth": (3 + 3 * field[..., 0] + rng.uniform(0, 1e-3, (h, w))).astype(np.float32),  # some < 0
            "normals": (normals / np.linalg.norm(normals, axis=0)).astype(np.float32)}


def read_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def check_maps(outputs: dict[str, np.ndarray], height: int, width: int) -> None:
    """The contract, map by map, on the PNGs and the float32 arrays ``render`` produces."""
    tasks = list(TASKS.values())
    pngs = codec.render(tasks, outputs, height, width, "png").maps
    arrays = codec.render(tasks, outputs, height, width, "npz", "float32").maps
    for name, task in TASKS.items():
        want = reference_resize(task.kind, outputs[name], height, width)
        got = read_png(pngs[name][0])
        assert got.shape[:2] == (height, width), name
        if task.kind == "labels":
            np.testing.assert_array_equal(got, want, err_msg=name)
            np.testing.assert_array_equal(arrays[name], want, err_msg=name)
            continue
        value = {"probability": lambda p: p / 255, "depth": lambda p: p * codec.DEPTH_SCALE,
                 "normals": lambda p: p.transpose(2, 0, 1) / 127.5 - 1}[task.kind](got.astype(np.float64))
        step = {"probability": 1 / 255, "depth": codec.DEPTH_SCALE, "normals": 2 / 255}[task.kind]
        encodable = {"probability": (0, 1), "depth": (0, 65535 * codec.DEPTH_SCALE), "normals": (-1, 1)}[task.kind]
        error = np.abs(value - np.clip(want, *encodable))
        assert error.max() <= step, name  # the promise: one step of the encoding
        assert error.max() <= step / 2 + 1e-5, name  # what rounding once from float32 gives
        np.testing.assert_allclose(arrays[name], want, atol=1e-5, rtol=1e-6, err_msg=name)


@pytest.mark.parametrize(("model_hw", "out_hw"), SIZES)
def test_maps_follow_the_contract(model_hw: tuple[int, int], out_hw: tuple[int, int]) -> None:
    check_maps(model_outputs(sum(model_hw + out_hw), *model_hw), *out_hw)


def test_the_libraries_nearest_resamplers_miss_the_promised_convention() -> None:
    # Why two numpy gathers: OpenCV's INTER_NEAREST is half a pixel off; its INTER_NEAREST_EXACT
    # and Pillow's NEAREST compute the same rule inexactly (ties, and drift at large enlargements).
    ramp = np.arange(128, dtype=np.uint8)[None].repeat(2, 0)
    want = ramp[:, nearest_index(128, 1080)]
    assert not np.array_equal(cv2.resize(ramp, (1080, 2), interpolation=cv2.INTER_NEAREST), want)
    assert not np.array_equal(np.asarray(Image.fromarray(ramp).resize((1080, 2), Image.Resampling.NEAREST)), want)
    two = np.array([[0, 1]], np.uint8)
    assert not np.array_equal(cv2.resize(two, (1080, 1), interpolation=cv2.INTER_NEAREST_EXACT),
                              two[:, nearest_index(2, 1080)])
    np.testing.assert_array_equal(resize.labels(ramp, 2, 1080), want)


def test_label_resampling_is_exact_for_many_sizes() -> None:
    arr = np.random.default_rng(0).integers(0, 21, (24, 40), dtype=np.uint8)
    for height in (1, 2, 7, 23, 24, 25, 47, 48, 100, 333, 1080):
        for width in (1, 3, 39, 40, 41, 81, 640, 1921):
            np.testing.assert_array_equal(resize.labels(arr, height, width),
                                          reference_resize("labels", arr, height, width), err_msg=f"{height}x{width}")


def test_classes_present_are_those_of_the_resized_map() -> None:
    arr = np.zeros((16, 16), np.uint8)
    arr[7, 7] = 3  # one pixel: kept when growing, lost when shrinking to 2x2
    for height, width in ((37, 41), (2, 2), (16, 3)):
        resized = resize.labels(arr, height, width)
        _, fields = codec.png_map(TASKS["semseg"], arr, resized)
        assert fields["classes_present"] == [f"c{i}" for i in np.unique(resized)], (height, width)


# --- decoding ---------------------------------------------------------------------------------------
def oriented_file(rgb: np.ndarray, orientation: int, fmt: str) -> bytes:
    """A file whose viewer, applying EXIF ``orientation``, displays ``rgb``."""
    inverse = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
               5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_270}
    stored = Image.fromarray(rgb)
    exif = Image.Exif()
    if orientation != 1:
        stored = stored.transpose(inverse[orientation])
        exif[0x0112] = orientation
    params = {"quality": 95} if fmt == "JPEG" else {}
    return encode(stored, fmt, exif=exif, **params)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_size_and_reduced_decoding(orientation: int) -> None:
    rgb = image(orientation, height=150, width=270)
    png_probe = codec.probe(oriented_file(rgb, orientation, "PNG"), 10**6)
    assert png_probe.size == (150, 270) and png_probe.orientation == orientation
    np.testing.assert_array_equal(png_probe.decode(32, 32), rgb)  # PNG: no reduced decoding, exact

    jpeg = codec.probe(oriented_file(rgb, orientation, "JPEG"), 10**6)
    assert jpeg.size == (150, 270), "the answer's size is the original, oriented one"
    for want in ((0, 0), (32, 32), (40, 60), (60, 40), (75, 135), (150, 270)):
        expected = jpeg.decoded_size(*want)
        assert expected[0] >= want[0] and expected[1] >= want[1]
        decoded = codec.probe(oriented_file(rgb, orientation, "JPEG"), 10**6).decode(*want)
        assert decoded.shape == (*expected, 3)
        shown = np.asarray(Image.fromarray(rgb).resize(expected[::-1], Image.Resampling.BOX), np.int16)
        assert np.abs(decoded - shown).mean() < 6, (want, expected)  # the displayed image, not a turned one
    assert jpeg.decoded_size(32, 32) == (38, 68)  # 1/4 scale: both sides still at least 32
    check_maps(model_outputs(orientation, 16, 24), *codec.output_size("original", jpeg.size, (16, 24)))


def test_reduced_decoding_gives_the_model_almost_the_same_input() -> None:
    rgb = image(5, height=1512, width=2016)
    data = encode(rgb, "JPEG", quality=90)
    full = codec.model_input(codec.probe(data, 10**7).decode(), 128, 128)
    probe = codec.probe(data, 10**7)
    reduced = codec.model_input(probe.decode(128, 128), 128, 128)
    assert probe.size == (1512, 2016) and probe.decoded_size(128, 128) == (189, 252)  # 1/8 scale, also after
    assert reduced.shape == (128, 128, 3)
    small = codec.probe(encode(image(6, height=300, width=400), "JPEG"), 10**6)
    assert small.decode(16, 16).shape == (38, 50, 3) and small.decoded_size(16, 16) == (38, 50)
    assert small.size == (300, 400)  # the header's size, not the reduced image's
    assert np.abs(full.astype(np.int16) - reduced).mean() < 1.5


def test_limits_apply_before_any_pixel_is_decoded() -> None:
    big = encode(image(6, height=600, width=800), "JPEG")
    truncated = big[: len(big) // 3]
    p = codec.probe(truncated, 10**6)  # the header is intact: size known, nothing decoded yet
    assert p.size == (600, 800) and p.decoded_size(100, 100) == (150, 200)
    with pytest.raises(codec.ImageError) as refused:
        codec.probe(truncated, 400 * 600)
    assert (refused.value.status, refused.value.code) == (413, "too_many_pixels")
    with pytest.raises(codec.ImageError) as corrupt:
        p.decode(100, 100)
    assert (corrupt.value.status, corrupt.value.code) == (422, "corrupt_image")


# --- size -------------------------------------------------------------------------------------------
def test_size_parameter() -> None:
    assert [codec.parse_size(v) for v in (None, "original", "model", "640", 17)] == ["original", "original",
                                                                                      "model", 640, 17]
    for bad in ("0", "-3", "1.5", "big", "", 0, True):
        with pytest.raises(ValueError, match="size must be"):
            codec.parse_size(bad)
    image_hw, model_hw = (3024, 4032), (128, 128)
    assert codec.output_size("original", image_hw, model_hw) == (3024, 4032)
    assert codec.output_size("model", image_hw, model_hw) == (128, 128)
    assert codec.output_size(1024, image_hw, model_hw) == (768, 1024)
    assert codec.output_size(1024, (4032, 3024), model_hw) == (1024, 768)
    assert codec.output_size(5000, image_hw, model_hw) == image_hw  # never larger than the upload
    assert codec.output_size(1, (10, 3000), model_hw) == (1, 1)


# --- encodings --------------------------------------------------------------------------------------
def test_png_writer_is_read_back_bit_exact() -> None:
    rng = np.random.default_rng(1)
    for height, width in ((1, 1), (5, 3), (31, 77), (64, 64)):
        grey = rng.integers(0, 256, (height, width), dtype=np.uint8)
        deep = rng.integers(0, 65536, (height, width), dtype=np.uint16)
        rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        for filter_kind in (png.FILTER_SUB, png.FILTER_UP):
            np.testing.assert_array_equal(read_png(png.png(grey, filter_kind=filter_kind)), grey)
            np.testing.assert_array_equal(read_png(png.png(deep, filter_kind=filter_kind)), deep)
        np.testing.assert_array_equal(read_png(png.png(rgb)), rgb)
        labels = Image.open(io.BytesIO(png.png(grey % 7, PALETTE, png.FILTER_UP)))
        assert labels.mode == "P" and labels.getpalette()[:21] == [v for c in PALETTE for v in c]
        np.testing.assert_array_equal(np.asarray(labels), grey % 7)
    with pytest.raises(ValueError):
        png.png(np.zeros((4, 4), np.float32))


def test_npz_dtypes_and_precision() -> None:
    outputs = model_outputs(3, 16, 16)
    for precision, float_type in (("float16", np.float16), ("float32", np.float32)):
        arrays = codec.render(list(TASKS.values()), outputs, 30, 40, "npz", precision).maps
        assert arrays["semseg"].dtype == np.uint8 and arrays["normals"].shape == (3, 30, 40)
        for name in ("saliency", "depth", "normals"):
            assert arrays[name].dtype == float_type, (name, precision)
            want = reference_resize(TASKS[name].kind, outputs[name], 30, 40)
            # float16: 11 significant bits, so within 2^-11 of the value's magnitude (plus float32 round-off)
            tolerance = np.abs(want) * 2.0**-11 + 1e-5 if precision == "float16" else 1e-5
            assert (np.abs(arrays[name].astype(np.float64) - want) <= tolerance).all(), (name, precision)
    npz = np.load(io.BytesIO(codec.npz_bytes({"a": np.zeros((2, 2), np.float16)})))
    assert npz["a"].dtype == np.float16
