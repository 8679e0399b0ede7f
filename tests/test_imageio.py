"""Upload decoding and mask encoding: every accepted mode, and a 4xx for everything else."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from seglock.app import imageio
from seglock.app.errors import APIError
from seglock.app.imageio import (
    _decode_plain_png,
    decode_upload,
    encode_mask_png,
    mask_image,
    plain_png_shape,
    resize_mask,
)

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


# -- plain RGB PNGs decoded by libspng (imagecodecs) -------------------------------------------------

def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_of(rows: bytes, height: int, width: int, *extra: bytes, color: int = 2, depth: int = 8,
           interlace: int = 0, idat: bytes | None = None) -> bytes:
    """A PNG written by hand: IHDR, `extra` chunks, one IDAT (the rows, filter byte first), IEND."""
    header = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, interlace)
    return (PNG_MAGIC + chunk(b"IHDR", header) + b"".join(extra)
            + chunk(b"IDAT", zlib.compress(rows) if idat is None else idat) + chunk(b"IEND", b""))


def plain_rows(array: np.ndarray) -> bytes:
    return b"".join(b"\x00" + row.tobytes() for row in array)


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def scene(height: int, width: int) -> np.ndarray:
    """Smooth gradients with noise: every PNG filter is chosen somewhere when Pillow writes it."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 3 + y, y * 2, (x * y) // 7], axis=-1)
    return ((base + np.random.default_rng(height * width).integers(0, 12, base.shape)) % 256).astype(np.uint8)


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (7, 3), (97, 131), (256, 256)])
@pytest.mark.parametrize("options", [{}, {"compress_level": 0}, {"compress_level": 1}, {"optimize": True},
                                     {"dpi": (72, 72), "gamma": 0.45455}])
def test_a_plain_rgb_png_is_decoded_by_libspng_to_exactly_pillows_pixels(shape, options):
    pytest.importorskip("imagecodecs")
    data = encode(Image.fromarray(scene(*shape)), "PNG", **options)
    assert plain_png_shape(data) == shape
    fast = _decode_plain_png(data, max_pixels=LIMIT)
    assert fast is not None, "the plain PNG took Pillow's path"
    upload = decode_upload(data, max_pixels=LIMIT)
    assert (upload.kind, upload.source_mode, upload.array.dtype) == ("png", "RGB", np.uint8)
    np.testing.assert_array_equal(upload.array, np.asarray(Image.open(io.BytesIO(data))))
    np.testing.assert_array_equal(upload.array, scene(*shape))


def test_a_png_split_over_many_idat_chunks_is_plain_and_exact():
    pytest.importorskip("imagecodecs")
    array = scene(40, 50)
    stream = zlib.compress(plain_rows(array))
    pieces = [chunk(b"IDAT", stream[i:i + 97]) for i in range(0, len(stream), 97)]
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 50, 40, 8, 2, 0, 0, 0))
    data = PNG_MAGIC + header + b"".join(pieces) + chunk(b"IEND", b"")
    assert plain_png_shape(data) == (40, 50) and _decode_plain_png(data, max_pixels=LIMIT) is not None
    np.testing.assert_array_equal(decode_upload(data, max_pixels=LIMIT).array, array)


def test_pngs_whose_pixels_pillow_changes_or_reads_otherwise_are_not_plain():
    array = scene(6, 8)
    rows = plain_rows(array)
    exif = Image.Exif()
    exif[0x0112] = 6
    assert plain_png_shape(png_of(rows, 6, 8)) == (6, 8)  # the same PNG without the chunk in question
    not_plain = {
        "palette": png_of(b"".join(b"\x00" + bytes(8) for _ in range(6)), 6, 8, chunk(b"PLTE", bytes(3)), color=3),
        "grey": png_of(b"".join(b"\x00" + bytes(8) for _ in range(6)), 6, 8, color=0),
        "rgba": png_of(b"".join(b"\x00" + bytes(32) for _ in range(6)), 6, 8, color=6),
        "16 bit": png_of(b"".join(b"\x00" + bytes(48) for _ in range(6)), 6, 8, depth=16),
        "interlaced": png_of(rows, 6, 8, interlace=1),
        "transparent colour": png_of(rows, 6, 8, chunk(b"tRNS", bytes(6))),
        "exif": encode(Image.fromarray(array), "PNG", exif=exif),
        "animated": encode(Image.fromarray(array), "PNG", save_all=True, append_images=[Image.fromarray(array[::-1])]),
        "no IEND": png_of(rows, 6, 8)[:-12],
        "chunk overruns the data": png_of(rows, 6, 8)[:-20],
        "jpeg": encode(Image.fromarray(array), "JPEG"),
        "too short": PNG_MAGIC + b"\x00" * 10,
    }
    for name, data in not_plain.items():
        assert plain_png_shape(data) is None, name


def test_a_png_of_more_chunks_than_the_walk_takes_is_left_to_pillow():
    array = scene(6, 8)
    rows = plain_rows(array)
    notes = [chunk(b"tEXt", b"k\x00v")] * (imageio._PLAIN_PNG_MAX_CHUNKS - 2)  # with IHDR, IDAT, IEND: one too many
    data = png_of(rows, 6, 8, *notes)
    assert plain_png_shape(data) is None
    assert plain_png_shape(png_of(rows, 6, 8, *notes[:-1])) == (6, 8)
    np.testing.assert_array_equal(decode_upload(data, max_pixels=LIMIT).array, array)


def test_an_exif_rotated_png_is_still_turned_upright_by_pillow():
    image = Image.fromarray(rgb(10, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = encode(image, "PNG", exif=exif)
    assert plain_png_shape(data) is None
    assert decode_upload(data, max_pixels=LIMIT).array.shape[:2] == (30, 10)


def test_an_animated_png_gives_pillows_frame_not_the_hidden_default_image():
    hidden, first = Image.fromarray(rgb(8, 8)), Image.fromarray(rgb(8, 8)[::-1].copy())
    data = encode(hidden, "PNG", save_all=True, default_image=True, append_images=[first, first])
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(decode_upload(data, max_pixels=LIMIT).array, expected)


def outcome(data: bytes) -> np.ndarray | int:
    """decode_upload's array, or the status of its APIError."""
    try:
        return decode_upload(data, max_pixels=LIMIT).array
    except APIError as error:
        return error.status


@pytest.mark.parametrize("damage", ["bad filter byte", "rows missing", "zlib stream broken", "bad IDAT CRC"])
def test_a_damaged_plain_png_gets_what_pillow_alone_gives(damage, monkeypatch):
    """Where libspng refuses, Pillow reads the upload again: the answer is Pillow's (a 400, or for a
    stream that ends early, the image Pillow makes of it); where both read it, the same pixels."""
    pytest.importorskip("imagecodecs")
    rows = plain_rows(scene(16, 16))
    if damage == "bad filter byte":
        data = png_of(b"\x09" + rows[1:], 16, 16)
    elif damage == "rows missing":
        data = png_of(rows[: len(rows) // 2], 16, 16)
    elif damage == "zlib stream broken":
        stream = bytearray(zlib.compress(rows))
        stream[len(stream) // 2] ^= 0xFF
        data = png_of(rows, 16, 16, idat=bytes(stream))
    else:
        good = png_of(rows, 16, 16)
        at = good.index(b"IEND") - 5  # the last byte of IDAT's CRC, which neither decoder checks
        data = good[:at] + bytes([good[at] ^ 0xFF]) + good[at + 1:]
    assert plain_png_shape(data) == (16, 16)
    fast = _decode_plain_png(data, max_pixels=LIMIT)
    served = outcome(data)
    monkeypatch.setattr(imageio, "_png_decode", None)
    pillow = outcome(data)
    assert (fast is None) == (damage != "bad IDAT CRC")
    if isinstance(pillow, int):
        assert served == pillow == 400
    else:
        np.testing.assert_array_equal(served, pillow)


def test_a_plain_png_over_the_pixel_limit_is_413_before_either_decoder_runs():
    data = encode(Image.fromarray(scene(100, 100)), "PNG")
    assert plain_png_shape(data) == (100, 100)
    assert _decode_plain_png(data, max_pixels=9_999) is None
    assert status_of(data, max_pixels=9_999) == 413
