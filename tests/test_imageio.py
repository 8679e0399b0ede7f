"""Upload decoding and mask encoding: every accepted mode, and a 4xx for everything else."""

import io

import numpy as np
import pytest
from PIL import Image

from seglock.app.errors import APIError
from seglock.app.imageio import decode_upload, encode_mask_png, mask_image, resize_mask

LIMIT = 10_000_000


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def rgb(height=12, width=20) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


def status_of(data: bytes, max_pixels=LIMIT) -> int:
    with pytest.raises(APIError) as info:
        decode_upload(data, max_pixels=max_pixels)
    return info.value.status


def test_png_rgb_decodes_exactly():
    array = rgb()
    upload = decode_upload(encode(Image.fromarray(array), "PNG"), max_pixels=LIMIT)
    assert upload.kind == "png" and upload.lossless
    np.testing.assert_array_equal(upload.array, array)


def test_webp_lossless_decodes_exactly():
    array = rgb()
    upload = decode_upload(encode(Image.fromarray(array), "WEBP", lossless=True), max_pixels=LIMIT)
    assert upload.kind == "webp"
    np.testing.assert_array_equal(upload.array, array)


def test_jpeg_decodes_to_rgb_of_same_size():
    upload = decode_upload(encode(Image.fromarray(rgb(16, 24)), "JPEG"), max_pixels=LIMIT)
    assert upload.kind == "jpeg" and not upload.lossless
    assert upload.array.shape == (16, 24, 3) and upload.array.dtype == np.uint8


def test_greyscale_becomes_three_equal_channels():
    grey = rgb()[:, :, 0]
    array = decode_upload(encode(Image.fromarray(grey), "PNG"), max_pixels=LIMIT).array
    for channel in range(3):
        np.testing.assert_array_equal(array[:, :, channel], grey)


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    wide = np.array([[0, 257, 65535]], dtype=np.uint16)
    array = decode_upload(encode(Image.fromarray(wide), "PNG"), max_pixels=LIMIT).array
    assert array[0, :, 0].tolist() == [0, 1, 255]


def test_rgba_is_composited_over_white():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque stays
    rgba[1, 1] = (10, 20, 30, 0)    # transparent becomes white
    array = decode_upload(encode(Image.fromarray(rgba), "PNG"), max_pixels=LIMIT).array
    assert array[0, 0].tolist() == [10, 20, 30]
    assert array[1, 1].tolist() == [255, 255, 255]


def test_palette_and_cmyk_convert_to_rgb():
    palette = Image.fromarray(rgb()).convert("P")
    assert decode_upload(encode(palette, "PNG"), max_pixels=LIMIT).array.shape == (12, 20, 3)
    cmyk = Image.fromarray(rgb()).convert("CMYK")
    assert decode_upload(encode(cmyk, "JPEG"), max_pixels=LIMIT).array.shape == (12, 20, 3)


def test_exif_orientation_is_applied():
    image = Image.fromarray(rgb(10, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    upload = decode_upload(encode(image, "JPEG", exif=exif.tobytes()), max_pixels=LIMIT)
    assert upload.array.shape[:2] == (30, 10)


def test_npy_uint16_tensor_is_accepted():
    tensor = np.arange(4 * 4 * 3, dtype=np.uint16).reshape(4, 4, 3) * 20
    buffer = io.BytesIO()
    np.save(buffer, tensor)
    upload = decode_upload(buffer.getvalue(), max_pixels=LIMIT)
    assert upload.kind == "npy" and upload.array.dtype == np.uint16
    np.testing.assert_array_equal(upload.array, tensor)


def test_npy_with_pickled_objects_is_refused_with_400():
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert status_of(buffer.getvalue()) == 400


def test_npy_of_wrong_dtype_or_shape_is_422():
    for array in (np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.uint8)):
        buffer = io.BytesIO()
        np.save(buffer, array)
        assert status_of(buffer.getvalue()) == 422


def test_garbage_is_415_and_empty_is_400():
    assert status_of(b"this is not an image at all") == 415
    assert status_of(b"") == 400


def test_other_formats_are_415():
    assert status_of(encode(Image.fromarray(rgb()), "BMP")) == 415
    assert status_of(encode(Image.fromarray(rgb()), "GIF")) == 415


def test_truncated_png_is_400():
    data = encode(Image.fromarray(rgb(64, 64)), "PNG")
    assert status_of(data[: len(data) // 2]) == 400


def test_too_many_pixels_is_413_before_decoding():
    data = encode(Image.fromarray(rgb(100, 100)), "PNG")
    assert status_of(data, max_pixels=9_999) == 413


def test_mask_png_keeps_class_indices_and_uses_voc_colours():
    mask = np.random.default_rng(1).integers(0, 21, (17, 23), dtype=np.uint8)
    image = Image.open(io.BytesIO(encode_mask_png(mask)))
    assert image.mode == "P"
    np.testing.assert_array_equal(np.asarray(image), mask)
    assert image.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]


@pytest.mark.parametrize("shape", [(1, 1), (7, 300), (256, 256), (600, 401)])
def test_mask_png_is_the_image_mask_image_makes_with_valid_chunks(shape):
    mask = np.random.default_rng(shape[1]).integers(0, 256, shape, dtype=np.uint8)
    data = encode_mask_png(mask)
    Image.open(io.BytesIO(data)).verify()  # signature, chunk order and every chunk's CRC
    written, reference = Image.open(io.BytesIO(data)), mask_image(mask)
    assert (written.format, written.mode, written.size) == ("PNG", "P", shape[::-1])
    assert written.getpalette() == reference.getpalette()
    np.testing.assert_array_equal(np.asarray(written), mask)
    np.testing.assert_array_equal(np.asarray(written.convert("RGB")), np.asarray(reference.convert("RGB")))


def test_mask_resize_is_nearest():
    mask = np.array([[0, 1], [2, 3]], dtype=np.uint8)
    np.testing.assert_array_equal(resize_mask(mask, (4, 4)), np.kron(mask, np.ones((2, 2), np.uint8)))
