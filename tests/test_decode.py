"""One decode for every PIL mode: 16-bit and float images scaled, transparency composited, the
same pixels in training, evaluation and the onnxruntime predictor (real 16-bit PNG files)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from classifier_training.data.dataset import ImageDataset
from classifier_training.data.index import Sample
from classifier_training.data.labels import labels_mapping, write_labels_mapping
from classifier_training.data.preprocess import (
    PAD_RGB,
    eval_image,
    open_image,
    open_rgb,
    to_rgb8,
)
from classifier_training.deploy.onnx_classifier import OnnxClassifier

SIZE = 16


def png16(path: Path, values: npt.NDArray[np.uint16]) -> Path:
    """Write a real 16-bit PNG (greyscale HxW, RGB HxWx3 or RGBA HxWx4) byte by byte; Pillow can
    only write the greyscale one itself."""
    h, w = values.shape[:2]
    channels = 1 if values.ndim == 2 else values.shape[2]
    colour_type = {1: 0, 3: 2, 4: 6}[channels]
    rows = values.astype(">u2").reshape(h, w * channels)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    return path


def gradient8(h: int = 20, w: int = 24, channels: int = 3, seed: int = 0) -> npt.NDArray[np.uint8]:
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels == 1 else (h, w, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def rgb_of(path: Path) -> npt.NDArray[np.uint8]:
    return np.asarray(open_rgb(path))


def test_16bit_grey_png_scales_instead_of_clipping(tmp_path: Path) -> None:
    grey8 = gradient8(channels=1)
    path = tmp_path / "grey16.png"
    Image.fromarray(grey8.astype(np.uint16) * 257).save(path)  # the exact 16-bit twin
    with Image.open(path) as im:
        assert im.mode == "I;16"
        clipped = np.asarray(im.convert("RGB"))
    assert (clipped[grey8 > 0] == 255).all()  # what a plain convert("RGB") does: white
    rgb, mode = open_image(path)
    assert mode == "I;16"
    np.testing.assert_array_equal(np.asarray(rgb), np.repeat(grey8[:, :, None], 3, axis=2))


def test_16bit_values_between_8bit_steps_use_the_high_byte(tmp_path: Path) -> None:
    values = np.array([[0, 255, 256, 511, 32768, 65279, 65280, 65535]], dtype=np.uint16)
    path = tmp_path / "steps.png"
    Image.fromarray(values).save(path)
    assert rgb_of(path)[0, :, 0].tolist() == [0, 0, 1, 1, 128, 254, 255, 255]


@pytest.mark.parametrize("channels", [3, 4])
def test_16bit_rgb_and_rgba_png_match_their_8bit_twins(tmp_path: Path, channels: int) -> None:
    u8 = gradient8(channels=channels, seed=channels)
    if channels == 4:
        u8[..., 3] = 255  # opaque: compositing then changes nothing
    path = png16(tmp_path / f"c{channels}.png", u8.astype(np.uint16) * 257)
    twin = tmp_path / f"c{channels}_8.png"
    Image.fromarray(u8).save(twin)
    with Image.open(path) as im:
        assert im.mode == ("RGB" if channels == 3 else "RGBA")
    np.testing.assert_array_equal(rgb_of(path), rgb_of(twin))
    np.testing.assert_array_equal(rgb_of(path), u8[..., :3])


def test_32bit_integer_and_float_tiffs(tmp_path: Path) -> None:
    grey8 = gradient8(channels=1, seed=3)
    Image.fromarray(grey8.astype(np.int32) * 257).save(tmp_path / "i.tif")
    Image.fromarray(grey8.astype(np.float32) / 255).save(tmp_path / "f.tif")
    expected = np.repeat(grey8[:, :, None], 3, axis=2)
    for name, mode in (("i.tif", "I"), ("f.tif", "F")):
        rgb, got_mode = open_image(tmp_path / name)
        assert got_mode == mode
        np.testing.assert_array_equal(np.asarray(rgb), expected)
    out_of_range = Image.fromarray(np.array([[-5.0, 0.5, 7.0, np.nan]], dtype=np.float32))
    assert np.asarray(to_rgb8(out_of_range))[0, :, 0].tolist() == [0, 128, 255, 0]


def test_transparency_is_composited_over_the_letterbox_colour(tmp_path: Path) -> None:
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 10, 20, 255)  # opaque
    rgba[0, 1] = (200, 10, 20, 0)  # transparent: its colour must not show
    rgba[0, 2] = (255, 255, 255, 128)  # half
    out = np.asarray(to_rgb8(Image.fromarray(rgba)))
    assert out[0, 0].tolist() == [200, 10, 20]
    assert out[0, 1].tolist() == list(PAD_RGB) and out[1, 0].tolist() == list(PAD_RGB)
    assert out[0, 2].tolist() == [round((255 * 128 + c * 127) / 255) for c in PAD_RGB]
    la = Image.fromarray(np.array([[[90, 255], [90, 0]]], dtype=np.uint8), mode="LA")
    assert np.asarray(to_rgb8(la))[0].tolist() == [[90, 90, 90], list(PAD_RGB)]
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 250, 0, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0  # palette index 0 is transparent
    palette.save(tmp_path / "p.png")
    assert rgb_of(tmp_path / "p.png")[0].tolist() == [list(PAD_RGB), [250, 0, 0]]


def test_cmyk_and_other_modes_follow_pillow(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    cmyk.save(tmp_path / "cmyk.jpg", quality=100)
    rgb, mode = open_image(tmp_path / "cmyk.jpg")
    assert mode == "CMYK" and np.abs(np.asarray(rgb)[0, 0].astype(int) - [255, 0, 0]).max() <= 2
    for mode_name in ("L", "1", "YCbCr"):
        img = Image.new(mode_name, (3, 3))
        assert to_rgb8(img).mode == "RGB"
    rgb_img = Image.new("RGB", (2, 2))
    assert to_rgb8(rgb_img) is rgb_img  # the common case costs nothing


def tiny_onnx_bundle(folder: Path, num_classes: int = 2) -> Path:
    """An ONNX classifier (global average pool + linear) and its labels mapping; no torch."""
    folder.mkdir(parents=True, exist_ok=True)
    weight = helper.make_tensor(
        "w", TensorProto.FLOAT, [3, num_classes], np.linspace(-1, 1, 3 * num_classes).tolist()
    )
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, folder / "model.onnx")
    classes = {str(i): i for i in range(num_classes)}
    write_labels_mapping(folder / "labels_mapping.json", labels_mapping(classes, SIZE))
    return folder


def test_training_evaluation_and_predictor_see_the_same_pixels(tmp_path: Path) -> None:
    """A 16-bit PNG and its 8-bit twin give identical train items, eval items and ONNX inputs."""
    u8 = gradient8(h=30, w=22, channels=1, seed=7)
    files = {"16": tmp_path / "a16.png", "8": tmp_path / "a8.png"}
    Image.fromarray(u8.astype(np.uint16) * 257).save(files["16"])
    Image.fromarray(u8).save(files["8"])
    items = {}
    for bits, path in files.items():
        sample = [Sample(path, "0", 0, str(path))]
        items[bits] = [
            ImageDataset(sample, mode, SIZE, jpeg_p=1.0 if mode == "train" else 0.0)[0]["image"]
            for mode in ("train", "eval")
        ]
    for a, b in zip(items["16"], items["8"], strict=True):
        assert a.numpy().tolist() == b.numpy().tolist()
    clf = OnnxClassifier(tiny_onnx_bundle(tmp_path / "export"))
    with Image.open(files["16"]) as im16, Image.open(files["8"]) as im8:
        x16, x8 = clf.preprocess([im16]), clf.preprocess([im8])
        np.testing.assert_array_equal(x16, x8)
        np.testing.assert_array_equal(
            np.asarray(eval_image(im16, SIZE)), items["8"][1].permute(1, 2, 0).numpy()
        )
        expected = clf.predict([im8])[0]
        assert clf.predict([im16])[0] == expected
    proc = subprocess.run(
        [sys.executable, "-m", "classifier_training.deploy.predict",
         "--model", str(tmp_path / "export"), str(files["16"]), str(files["8"])],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    results = json.loads(proc.stdout)
    assert results[0]["predictions"] == results[1]["predictions"] == expected
