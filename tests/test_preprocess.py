"""Frame -> input tensor, checked against references computed by hand.

The frames are patches of real photos, enlarged by whole pixel blocks so that
every resize the preprocessor does is an exact 2:1 (or 1:1) reduction whose
result is known without OpenCV; the reference tensors are then built with
plain numpy.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from testassets.mobilenet import imagenet_preprocess

from edge_agent.bundles.manifest import Preprocessing, TensorSpec
from edge_agent.pipeline.preprocess import Preprocessor, Transform

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat


def make(
    size: tuple[int, int],
    *,
    dtype: str = "float32",
    rank: int = 4,
    **opts,
) -> Preprocessor:
    spec = Preprocessing(size=size, **opts)
    w, h = size
    c = 1 if spec.color == "gray" else 3
    shape = [1, c, h, w] if spec.layout == "nchw" else [1, h, w, c]
    return Preprocessor(spec, TensorSpec(name="input", shape=shape[4 - rank :], dtype=dtype))


def blocks(img: np.ndarray, k: int = 2) -> np.ndarray:
    """Every pixel becomes a k x k block: a k:1 area reduction gives img back exactly."""
    return np.ascontiguousarray(np.repeat(np.repeat(img, k, axis=0), k, axis=1))


def normalise(bgr: np.ndarray, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), color: str = "rgb") -> np.ndarray:
    """The manifest's arithmetic by hand: channel order, /255, -mean, /std, HWC float64."""
    img = bgr[..., ::-1] if color == "rgb" else bgr
    return (img.astype(np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)


def nchw(hwc: np.ndarray) -> np.ndarray:
    return hwc.transpose(2, 0, 1)[None]


@pytest.fixture(scope="module")
def chelsea(assets: dict[str, Path]) -> np.ndarray:
    img = cv2.imread(str(assets["photos"] / "chelsea.jpg"))
    assert img is not None
    return img


@pytest.fixture(scope="module")
def patch(chelsea: np.ndarray):
    """A small patch of real pixels of a given (h, w), from the cat's face."""

    def cut(h: int, w: int) -> np.ndarray:
        return np.ascontiguousarray(chelsea[100 : 100 + h, 180 : 180 + w])

    return cut


# ------------------------------------------------------------------- resizing


def test_stretch_frame_already_at_model_size(patch) -> None:
    """With no resize to do, the tensor must be exactly (pixel/255 - mean)/std in RGB order, NCHW."""
    frame = patch(4, 6)
    pre = make((6, 4), resize="stretch", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    tensor, transform = pre(frame)
    assert tensor.shape == (1, 3, 4, 6) and tensor.dtype == np.float32
    np.testing.assert_allclose(tensor, nchw(normalise(frame, IMAGENET_MEAN, IMAGENET_STD)), atol=1e-5)
    assert transform == Transform(1.0, 1.0, 0.0, 0.0)


def test_stretch_with_different_x_and_y_factors(patch) -> None:
    """Stretch ignores aspect ratio: a 16x8 frame into 4x4 is a 4:1 and a 2:1 reduction."""
    small = patch(4, 4)
    frame = np.ascontiguousarray(np.repeat(np.repeat(small, 2, axis=0), 4, axis=1))  # 8 x 16
    tensor, transform = make((4, 4), resize="stretch")(frame)
    np.testing.assert_allclose(tensor, nchw(normalise(small)), atol=1e-5)
    assert transform == Transform(4.0, 2.0, 0.0, 0.0)


def test_crop_scales_short_side_then_centre_crops(patch) -> None:
    """crop: a 16x8 frame into 4x4 is halved to 8x4, then columns 2..5 are kept (the centre)."""
    small = patch(4, 8)
    frame = blocks(small)  # 8 x 16
    pre = make((4, 4), resize="crop")
    assert pre.geometry(16, 8) == ((8, 4), (2, 0, 0, 0), Transform(2.0, 2.0, 4.0, 0.0))
    tensor, transform = pre(frame)
    np.testing.assert_allclose(tensor, nchw(normalise(small[:, 2:6])), atol=1e-5)
    assert transform == Transform(2.0, 2.0, 4.0, 0.0)


def test_crop_portrait_frame_crops_rows(patch) -> None:
    """A portrait frame is cropped top and bottom rather than left and right."""
    small = patch(8, 4)
    frame = blocks(small)  # 16 x 8
    tensor, transform = make((4, 4), resize="crop")(frame)
    np.testing.assert_allclose(tensor, nchw(normalise(small[2:6, :])), atol=1e-5)
    assert transform == Transform(2.0, 2.0, 0.0, 4.0)


def test_crop_fraction_enlarges_before_cropping(patch) -> None:
    """crop_fraction 0.5 scales the short side to size/0.5, then keeps the central half (ImageNet's 256->224 idea)."""
    small = patch(8, 8)
    frame = blocks(small)  # 16 x 16
    pre = make((4, 4), resize="crop", crop_fraction=0.5)
    tensor, transform = pre(frame)
    np.testing.assert_allclose(tensor, nchw(normalise(small[2:6, 2:6])), atol=1e-5)
    assert transform == Transform(2.0, 2.0, 4.0, 4.0)


def test_letterbox_pads_with_pad_value(patch) -> None:
    """letterbox keeps the aspect ratio: a 16x10 frame becomes 8x5, centred with 1 row of padding on top and 2 below."""
    small = patch(5, 8)
    frame = blocks(small)  # 10 x 16
    pre = make((8, 8), resize="letterbox", pad_value=114)
    assert pre.geometry(16, 10) == ((8, 5), (0, 0, 0, 1), Transform(2.0, 2.0, 0.0, -2.0))
    expected = np.full((8, 8, 3), 114, np.uint8)
    expected[1:6] = small
    tensor, transform = pre(frame)
    np.testing.assert_allclose(tensor, nchw(normalise(expected)), atol=1e-5)
    assert np.allclose(tensor[0, :, 0, :], 114 / 255) and np.allclose(tensor[0, :, 6:, :], 114 / 255)
    assert transform == Transform(2.0, 2.0, 0.0, -2.0)


def test_letterbox_pads_columns_for_portrait_frames(patch) -> None:
    """A portrait frame is padded left and right instead."""
    small = patch(8, 4)
    frame = blocks(small)  # 16 x 8
    expected = np.zeros((8, 8, 3), np.uint8)
    expected[:, 2:6] = small
    tensor, transform = make((8, 8), resize="letterbox")(frame)
    np.testing.assert_allclose(tensor, nchw(normalise(expected)), atol=1e-5)
    assert transform == Transform(2.0, 2.0, -4.0, 0.0)


# ------------------------------------------------------------------ transform


@pytest.mark.parametrize(
    ("resize", "size", "frame_wh", "model_box", "frame_box"),
    [
        ("stretch", (4, 4), (16, 8), [1, 1, 3, 3], [4, 2, 12, 6]),
        ("crop", (4, 4), (16, 8), [0, 0, 4, 4], [4, 0, 12, 8]),
        ("crop", (4, 4), (8, 16), [1, 0, 3, 2], [2, 4, 6, 8]),
        ("letterbox", (8, 8), (16, 10), [0, 1, 8, 6], [0, 0, 16, 10]),
        ("letterbox", (8, 8), (8, 16), [2, 0, 6, 8], [0, 0, 8, 16]),
    ],
)
def test_transform_maps_model_boxes_to_frame_pixels(resize, size, frame_wh, model_box, frame_box) -> None:
    """Detections are reported in the camera frame's pixels (CONTRACT §3), whatever resize the model needed."""
    pre = make(size, resize=resize)
    _, _, transform = pre.geometry(*frame_wh)
    np.testing.assert_allclose(transform.box_to_frame(np.array([model_box], np.float32)), [frame_box], atol=1e-6)


@pytest.mark.parametrize(
    ("resize", "size", "frame_hw"),
    [("stretch", (8, 5), (10, 16)), ("crop", (4, 4), (8, 16)), ("letterbox", (8, 8), (10, 16))],
)
def test_transform_agrees_with_the_tensor(patch, resize, size, frame_hw) -> None:
    """A bright square placed in the frame, found in the tensor and mapped back, must land where it was placed."""
    h, w = frame_hw
    frame = blocks(patch(h // 2, w // 2) // 2)  # real texture, at most 127
    x0, y0, x1, y1 = 6, 2, 10, 6  # even coordinates: whole model pixels after the 2:1 reduction
    frame[y0:y1, x0:x1] = 255
    pre = make(size, resize=resize, color="bgr")
    tensor, transform = pre(frame)
    ys, xs = np.nonzero(tensor[0].min(axis=0) > 0.99)
    found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
    np.testing.assert_allclose(transform.box_to_frame(found), [x0, y0, x1, y1], atol=1e-5)


def test_box_to_frame_does_not_modify_its_input() -> None:
    """Postprocessing may reuse the model-space boxes; mapping must return a new array."""
    boxes = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
    out = Transform(2.0, 3.0, 10.0, -5.0).box_to_frame(boxes)
    np.testing.assert_allclose(out, [[12.0, 1.0, 16.0, 7.0]])
    np.testing.assert_allclose(boxes, [[1.0, 2.0, 3.0, 4.0]])


# ------------------------------------------------------ normalisation, layout


def test_mean_and_std_apply_per_channel_in_color_order(patch) -> None:
    """mean/std are per channel of the model's colour order: swapping them onto the wrong channel would shift every input."""
    frame = patch(4, 4)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    tensor, _ = make((4, 4), mean=mean, std=std)(frame)
    r, g, b = (frame[..., i].astype(np.float64) / 255 for i in (2, 1, 0))
    np.testing.assert_allclose(tensor[0, 0], (r - 0.1) / 0.5, atol=1e-5)
    np.testing.assert_allclose(tensor[0, 1], (g - 0.2) / 0.25, atol=1e-5)
    np.testing.assert_allclose(tensor[0, 2], (b - 0.3) / 0.125, atol=1e-5)


def test_nhwc_is_the_transpose_of_nchw(patch) -> None:
    """TFLite models want NHWC, ONNX ones usually NCHW: same numbers, different axis order."""
    frame = patch(4, 6)
    a, _ = make((6, 4), layout="nchw", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(frame)
    b, _ = make((6, 4), layout="nhwc", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(frame)
    assert a.shape == (1, 3, 4, 6) and b.shape == (1, 4, 6, 3)
    np.testing.assert_array_equal(b, a.transpose(0, 2, 3, 1))
    assert b.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(b[0], normalise(frame, (0.5,) * 3, (0.5,) * 3), atol=1e-5)


def test_bgr_keeps_opencv_channel_order(patch) -> None:
    """A model trained on BGR (Caffe-style) must get the frame's channels unswapped."""
    frame = patch(4, 4)
    rgb, _ = make((4, 4), color="rgb")(frame)
    bgr, _ = make((4, 4), color="bgr")(frame)
    np.testing.assert_allclose(bgr, nchw(normalise(frame, color="bgr")), atol=1e-5)
    np.testing.assert_array_equal(bgr[0, ::-1], rgb[0])


def test_gray_single_channel(patch) -> None:
    """Gray models get one luma channel (ITU-R 601 weights) with the first mean/std entry."""
    frame = patch(4, 4)
    tensor, _ = make((4, 4), color="gray", mean=(0.5, 9.0, 9.0), std=(0.25, 9.0, 9.0))(frame)
    assert tensor.shape == (1, 1, 4, 4)
    b, g, r = (frame[..., i].astype(np.float64) for i in range(3))
    luma = np.round(0.299 * r + 0.587 * g + 0.114 * b)
    np.testing.assert_allclose(tensor[0, 0], (luma / 255 - 0.5) / 0.25, atol=1.01 / 255 / 0.25)
    nhwc, _ = make((4, 4), color="gray", layout="nhwc", mean=(0.5, 9.0, 9.0), std=(0.25, 9.0, 9.0))(frame)
    assert nhwc.shape == (1, 4, 4, 1)
    np.testing.assert_array_equal(nhwc[0, :, :, 0], tensor[0, 0])


def test_gray_frame_is_accepted(patch) -> None:
    """Some cameras deliver single-channel frames; they must preprocess like the same picture in colour."""
    gray = cv2.cvtColor(patch(4, 4), cv2.COLOR_BGR2GRAY)
    tensor, _ = make((4, 4))(gray)
    expected = nchw(normalise(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)))
    np.testing.assert_allclose(tensor, expected, atol=1e-5)


def test_uint8_input_without_quantization_gets_raw_pixels(patch) -> None:
    """Models that take uint8 pixels (and normalise inside) must get the pixels untouched, not floats."""
    frame = patch(4, 4)
    tensor, _ = make((4, 4), dtype="uint8", layout="nhwc", mean=IMAGENET_MEAN, std=IMAGENET_STD)(frame)
    assert tensor.dtype == np.uint8
    np.testing.assert_array_equal(tensor[0], frame[..., ::-1])


def test_input_without_batch_dimension(patch) -> None:
    """A rank-3 model input gets a rank-3 tensor (no batch axis added)."""
    tensor, _ = make((4, 4), rank=3)(patch(4, 4))
    assert tensor.shape == (3, 4, 4)


# -------------------------------------------------------- real photo, ImageNet


def _ort_session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_crop_equals_imagenet_reference_when_geometry_is_exact(assets: dict[str, Path]) -> None:
    """For a square photo both resize to 256 then crop 224: the tensors must be the same to float precision."""
    img = cv2.imread(str(assets["photos"] / "astronaut.jpg"))
    pre = make((224, 224), resize="crop", crop_fraction=0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    ours, _ = pre(img)
    ref = imagenet_preprocess(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
    assert ours.shape == ref.shape == (1, 3, 224, 224)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_crop_matches_imagenet_reference_on_chelsea_and_classifies_a_cat(assets: dict[str, Path]) -> None:
    """The agent's crop path must give the model what it was trained on: close to torchvision's tensor, and a cat for chelsea."""
    img = cv2.imread(str(assets["photos"] / "chelsea.jpg"))  # 451 x 300
    pre = make((224, 224), resize="crop", crop_fraction=0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    ours, _ = pre(img)
    ref = imagenet_preprocess(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
    # Resized long side: 385 here (rounded), 384 in torchvision (truncated); the 1-pixel
    # difference in scale shows up as interpolation noise, not as a shift or colour error.
    diff = np.abs(ours - ref)
    assert diff.mean() < 0.1, diff.mean()
    assert np.abs(ours.mean(axis=(2, 3)) - ref.mean(axis=(2, 3))).max() < 0.01
    session = _ort_session(assets["mobilenet_v2"])
    name = session.get_inputs()[0].name
    ours_logits = session.run(None, {name: ours})[0][0]
    ref_logits = session.run(None, {name: ref})[0][0]
    assert int(np.argmax(ours_logits)) in CAT_CLASSES
    assert int(np.argmax(ours_logits)) == int(np.argmax(ref_logits))


# ------------------------------------------- one pass: quantization folded in


@pytest.mark.parametrize("dtype,scale,zp", [("int8", 0.0187, -14), ("uint8", 1 / 255, 0), ("int8", 0.5, 3)])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_quantized_input_is_the_float_tensor_quantized_in_the_same_pass(patch, dtype, scale, zp, layout) -> None:
    """The folded (p * a' + b') equals quantize(p * a + b) as the runtime did it,
    but for a value sitting on a rounding boundary (at most 1 step, rarely)."""
    from edge_agent.bundles.manifest import Quantization
    from edge_agent.runtimes.base import quantize

    img = patch(24, 32)
    opts = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, layout=layout)
    float_x, _ = make((32, 24), **opts)(img)
    q = Quantization(scale=scale, zero_point=zp)
    spec = Preprocessing(size=(32, 24), **opts)
    shape = [1, 3, 24, 32] if layout == "nchw" else [1, 24, 32, 3]
    pre = Preprocessor(spec, TensorSpec(name="input", shape=shape, dtype=dtype, quantization=q))
    x, _ = pre(img)
    want = quantize(float_x, q, np.dtype(dtype))
    assert x.dtype == np.dtype(dtype) and x.shape == want.shape
    diff = np.abs(x.astype(np.int32) - want.astype(np.int32))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_int8_input_without_scale_is_centred_pixels(patch) -> None:
    img = patch(24, 32)
    x, _ = make((32, 24), dtype="int8", color="bgr")(img)
    assert x.dtype == np.int8
    assert np.array_equal(x, nchw(img.astype(np.int16) - 128).astype(np.int8))


def test_geometry_is_computed_once_per_frame_size(patch) -> None:
    pre = make((16, 16), resize="crop")
    assert pre.geometry(64, 48) is pre.geometry(64, 48)
    assert pre.geometry(64, 48) != pre.geometry(48, 64)


def test_prepared_carries_the_key_of_its_preprocessing(patch) -> None:
    img = patch(32, 32)
    a, b = make((16, 16)), make((16, 16))
    c = make((16, 16), color="bgr")
    prepared = a.prepare(img)
    assert prepared.key == b.key and prepared.key != c.key
    assert np.array_equal(prepared.tensor, a(img)[0])
