"""seglock.client.imaging: decoding and resizing exactly as the server does, palettes, overlays, encodings."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from seglock.app.imageio import decode_upload
from seglock.client import InvalidInput, ServerError
from seglock.client.imaging import (
    VOC_COLORMAP,
    array_to_rgb,
    decode_mask_png,
    encode_npy,
    encode_png,
    load_rgb,
    mask_image,
    overlay,
)
from tests.server_fixtures import scene as noise


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def rotated_exif_png(array: np.ndarray) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; viewers rotate 90 degrees clockwise
    return encoded(Image.fromarray(array), exif=exif)


def transparent_palette_png() -> bytes:
    image = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4)).convert("P")
    image.info["transparency"] = 3
    return encoded(image, transparency=3)


@pytest.mark.parametrize("data", [
    encoded(Image.fromarray(noise(0, 20, 30))),
    encoded(Image.fromarray(np.dstack([noise(1, 9, 7), np.arange(63, dtype=np.uint8).reshape(9, 7) * 4]))),
    encoded(Image.fromarray(np.arange(48, dtype=np.uint16).reshape(6, 8) * 1365)),
    encoded(Image.fromarray(noise(2, 16, 16)), "JPEG", quality=90),
    encoded(Image.fromarray(noise(3, 16, 16)), "WEBP", lossless=True),
    encoded(Image.fromarray(noise(4, 10, 10)[:, :, 0]).convert("LA")),
    transparent_palette_png(),
    rotated_exif_png(noise(5, 6, 10)),
], ids=["rgb", "rgba", "grey16", "jpeg", "webp", "la", "palette-transparency", "exif-rotated"])
def test_images_decode_to_exactly_the_servers_array(data):
    np.testing.assert_array_equal(load_rgb(data), decode_upload(data, max_pixels=10**6).array)


def test_exif_orientation_is_applied():
    image = noise(6, 6, 10)
    np.testing.assert_array_equal(load_rgb(rotated_exif_png(image)), np.rot90(image, k=-1))


def test_sixteen_bit_grey_is_scaled_not_clipped():
    grey = np.array([[0, 32896, 65535]], dtype=np.uint16)
    np.testing.assert_array_equal(load_rgb(encoded(Image.fromarray(grey)))[0, :, 0], [0, 128, 255])


def test_transparent_pixels_are_composited_over_white():
    rgba = np.array([[[10, 20, 30, 0], [10, 20, 30, 255]]], dtype=np.uint8)
    np.testing.assert_array_equal(load_rgb(rgba), [[[255, 255, 255], [10, 20, 30]]])


def test_arrays_of_one_or_three_channels_become_rgb_and_others_are_refused():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(array_to_rgb(grey), np.dstack([grey] * 3))
    np.testing.assert_array_equal(array_to_rgb(grey[:, :, None]), np.dstack([grey] * 3))
    for bad in (grey.astype(np.float32), np.zeros((3, 4, 2), np.uint8), np.zeros((0, 4, 3), np.uint8)):
        with pytest.raises(InvalidInput):
            array_to_rgb(bad)


def test_voc_colormap_is_the_pascal_one():
    assert VOC_COLORMAP[[0, 1, 2, 15, 255]].tolist() == [
        [0, 0, 0], [128, 0, 0], [0, 128, 0], [192, 128, 128], [224, 224, 192]]


def test_mask_image_is_a_palette_png_whose_values_are_the_class_indices():
    mask = np.array([[0, 1], [15, 255]], dtype=np.uint8)
    image = Image.open(io.BytesIO(encoded(mask_image(mask))))
    assert image.mode == "P"
    np.testing.assert_array_equal(np.asarray(image), mask)
    np.testing.assert_array_equal(decode_mask_png(encoded(mask_image(mask))), mask)


def test_overlay_blends_classes_half_way_and_keeps_the_background():
    image = np.full((1, 2, 3), 100, np.uint8)
    mask = np.array([[0, 1]], dtype=np.uint8)
    np.testing.assert_array_equal(overlay(image, mask), [[[100, 100, 100], [114, 50, 50]]])


def test_encodings_are_lossless_and_npy_needs_no_pickle():
    image = noise(8, 12, 8)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encode_png(image)))), image)
    wide = np.arange(300, dtype=np.uint16).reshape(10, 10, 3)
    loaded = np.load(io.BytesIO(encode_npy(wide)), allow_pickle=False)
    assert loaded.dtype == np.uint16
    np.testing.assert_array_equal(loaded, wide)


def test_a_mask_answer_that_is_not_a_palette_png_is_a_server_error():
    with pytest.raises(ServerError):
        decode_mask_png(encoded(Image.fromarray(noise(9, 4, 4)), "JPEG"))
    with pytest.raises(ServerError):
        decode_mask_png(b"garbage")
