"""Decoding uploads and encoding masks, with the limits that keep the server standing.

Pure functions of bytes and arrays: the routes call them off the event loop.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from seglock.app.errors import APIError, bad_request, too_large, unprocessable, unsupported_media

# One source for the pixel maths the server and the SDK must agree on bit for bit.
from seglock.client.imaging import mask_image, pil_to_rgb, resize_mask, resize_rgb  # noqa: F401 - re-exported

PLAIN_FORMATS = {"PNG", "JPEG", "WEBP"}
NPY_MAGIC = b"\x93NUMPY"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Upload:
    """A decoded upload: HWC array (uint8, or uint16 for FFX tensors), and what it was."""

    array: np.ndarray
    kind: str  # "png" | "jpeg" | "webp" | "npy"
    source_mode: str = "RGB"  # Pillow mode before conversion; encrypted PNGs must be plain RGB

    @property
    def lossless(self) -> bool:
        return self.kind in ("png", "npy")


def decode_upload(data: bytes, *, max_pixels: int) -> Upload:
    """Decode an image upload (PNG, JPEG, WebP) or an `.npy` tensor into an HWC array."""
    if not data:
        raise bad_request("the image field is empty")
    if data.startswith(NPY_MAGIC):
        return Upload(_decode_npy(data, max_pixels=max_pixels), "npy", "npy")
    return _decode_image(data, max_pixels=max_pixels)


def _decode_npy(data: bytes, *, max_pixels: int) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        # allow_pickle=False raises ValueError for object arrays: say so without echoing data
        raise bad_request(f"the .npy upload cannot be read: {_short(exc)}") from None
    except Exception as exc:
        raise bad_request(f"the .npy upload cannot be read: {type(exc).__name__}") from None
    if array.dtype not in (np.uint8, np.uint16):
        raise unprocessable(f".npy upload must be uint8 or uint16, got {array.dtype}")
    if array.ndim != 3 or array.shape[2] != 3:
        raise unprocessable(f".npy upload must be H x W x 3, got shape {tuple(array.shape)}")
    if array.shape[0] * array.shape[1] > max_pixels:
        raise too_large(f"image has {array.shape[0] * array.shape[1]} pixels; the limit is {max_pixels}")
    return np.ascontiguousarray(array)


def _decode_image(data: bytes, *, max_pixels: int) -> Upload:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            fmt = image.format
            if fmt not in PLAIN_FORMATS:
                raise unsupported_media(f"unsupported image format {fmt}; send PNG, JPEG, WebP or .npy")
            width, height = image.size
            if width * height > max_pixels:
                raise too_large(f"image has {width * height} pixels; the limit is {max_pixels}")
            image.load()
            source_mode = image.mode
            image = ImageOps.exif_transpose(image)
            array = pil_to_rgb(image)
    except APIError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise too_large("image is too large to decode safely") from None
    except UnidentifiedImageError:
        if _has_image_magic(data):  # says it is one of ours, but is broken
            raise bad_request("the image is damaged and cannot be decoded") from None
        raise unsupported_media("the upload is not a PNG, JPEG, WebP image or a .npy tensor") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise bad_request(f"the image cannot be decoded: {_short(exc)}") from None
    return Upload(array, fmt.lower(), source_mode)


def _has_image_magic(data: bytes) -> bool:
    return data.startswith((_PNG_MAGIC, b"\xff\xd8\xff")) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def encode_mask_png(mask: np.ndarray) -> bytes:
    """A palette PNG whose pixel values are the class indices (VOC colours for viewing)."""
    buffer = io.BytesIO()
    mask_image(mask).save(buffer, format="PNG", optimize=False, compress_level=1)
    return buffer.getvalue()


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
