"""Images in and masks out for the SDK: reading, resizing, encoding, palettes (numpy + Pillow only).

Decoding and resizing follow the server's `app/imageio.py` step for step (EXIF orientation,
alpha over white, 16-bit scaling, Pillow bilinear for images and nearest for masks), so an
image the SDK prepares is the exact array the server would have made from the same file.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import IO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from seglock.client.errors import InvalidInput, ServerError

ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Image.Image, np.ndarray, IO[bytes]]

SERVER_FORMATS = frozenset({"PNG", "JPEG", "WEBP"})  # what the server decodes; others are re-encoded
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_PNG_LEVEL = 1  # fastest zlib level: encrypted blocks barely compress, so higher levels only cost time
_JPEG_QUALITY = 95


# -- reading ------------------------------------------------------------------------------

def read_bytes(image: ImageInput) -> bytes | None:
    """The encoded bytes behind a path, bytes-like or binary file; None for decoded images."""
    if isinstance(image, (str, os.PathLike)):
        try:
            return Path(image).read_bytes()
        except OSError as exc:
            raise InvalidInput(f"cannot read image {os.fspath(image)}: {exc.strerror or exc}",
                               code="unreadable_image") from None
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if hasattr(image, "read") and not isinstance(image, Image.Image):
        data = image.read()
        if not isinstance(data, bytes):
            raise InvalidInput("an image file object must be opened in binary mode", code="invalid_image")
        return data
    return None


def open_encoded(data: bytes) -> Image.Image:
    """A lazily decoded Pillow image from encoded bytes; InvalidInput if Pillow cannot read it."""
    if not data:
        raise InvalidInput("the image is empty", code="invalid_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidInput("the image is too large to decode safely", code="too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidInput(f"not an image Pillow can read ({type(exc).__name__})", code="invalid_image") from None


def load_rgb(image: ImageInput) -> np.ndarray:
    """Any accepted input as an HWC uint8 RGB array, decoded the way the server decodes uploads."""
    if isinstance(image, np.ndarray):
        return array_to_rgb(image)
    if isinstance(image, Image.Image):
        return pil_to_rgb(image)
    data = read_bytes(image)
    if data is None:
        raise InvalidInput(f"cannot use a {type(image).__name__} as an image: pass a path, bytes, "
                           "a PIL image or an HWC uint8 array", code="invalid_image")
    decoded = open_encoded(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            decoded.load()
            decoded = ImageOps.exif_transpose(decoded)  # as the server does, so sizes agree
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidInput("the image is too large to decode safely", code="too_large") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidInput(f"the image cannot be decoded ({type(exc).__name__})", code="invalid_image") from None
    return pil_to_rgb(decoded)


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow mode as HWC uint8 RGB: 16-bit greyscale scaled, transparency over white."""
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = _sixteen_bit_grey(image)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.array(image.convert("RGB"), dtype=np.uint8)


def _sixteen_bit_grey(image: Image.Image) -> np.ndarray:
    """16-bit (or 32-bit "I") greyscale as uint8: round(v * 255 / 65535) = round(v / 257), exactly,
    in 16-bit integer maths (no 64-bit or float temporaries: a large upload costs a few bytes a pixel)."""
    wide = np.asarray(image)
    if not image.mode.startswith("I;16") and int(wide.max(initial=0)) <= 255:
        small: np.ndarray = np.clip(wide, 0, 255).astype(np.uint8)  # an "I" image that holds 8-bit values
        return small
    if wide.dtype != np.uint16:
        wide = np.clip(wide, 0, 65535).astype(np.uint16)
    quotient = wide // np.uint16(257)
    remainder = wide - quotient * np.uint16(257)
    quotient += remainder >= 129  # v / 257 is never exactly .5, so this is round-half-anything
    grey: np.ndarray = quotient.astype(np.uint8)
    return grey


def array_to_rgb(array: np.ndarray) -> np.ndarray:
    """An HW, HW1, HWC (RGB) or HW4 (RGBA) uint8 array as HWC uint8 RGB."""
    if array.dtype != np.uint8:
        raise InvalidInput(f"an image array must be uint8, got {array.dtype}", code="invalid_image")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or 0 in array.shape[:2]:
        raise InvalidInput(f"an image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {array.shape}",
                           code="invalid_image")
    if array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    if array.shape[2] == 4:
        return pil_to_rgb(Image.fromarray(array))
    return np.ascontiguousarray(array)


# -- geometry -----------------------------------------------------------------------------

def resize_rgb(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HWC uint8 to (height, width) with Pillow bilinear, as the server does; no copy if it fits."""
    height, width = size
    if array.shape[:2] == (height, width):
        return array
    return np.asarray(Image.fromarray(array).resize((width, height), Image.Resampling.BILINEAR))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A class-index mask to (height, width) with nearest neighbour, as the server does."""
    height, width = size
    if mask.shape == (height, width):
        return mask
    return np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))


# -- encoding -----------------------------------------------------------------------------

def encode_png(array: np.ndarray) -> bytes:
    """HWC uint8 -> PNG bytes (lossless)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=_PNG_LEVEL)
    return buffer.getvalue()


def encode_jpeg(array: np.ndarray, quality: int = _JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    """An array as `.npy` bytes that `np.load(..., allow_pickle=False)` reads."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def decode_mask_png(data: bytes) -> np.ndarray:
    """The server's mask PNG (palette or greyscale, values = class indices) as HxW uint8."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.format != "PNG" or image.mode not in ("P", "L"):
            raise ValueError(f"expected a palette PNG, got {image.format} {image.mode}")
        return np.array(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ServerError(f"the server's mask is not a readable PNG ({exc})", code="bad_mask") from None


# -- palettes and overlays ----------------------------------------------------------------

def voc_colormap() -> np.ndarray:
    """uint8[256, 3]: the PASCAL VOC colour map (bits of the class index interleaved into R, G, B)."""
    index = np.arange(256)
    colours = np.zeros((256, 3), dtype=np.int64)
    for shift in range(7, -1, -1):
        for channel in range(3):
            colours[:, channel] |= ((index >> channel) & 1) << shift
        index = index >> 3
    return colours.astype(np.uint8)


VOC_COLORMAP = voc_colormap()
VOC_COLORMAP.flags.writeable = False


def mask_image(mask: np.ndarray) -> Image.Image:
    """A palette ("P") image whose pixel values are the class indices, coloured with the VOC map."""
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8)).convert("P")
    image.putpalette(VOC_COLORMAP.reshape(-1).tolist())
    return image


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """HWC uint8: the image with each non-background pixel blended towards its class colour."""
    if image.shape[:2] != mask.shape:
        raise InvalidInput(f"image {image.shape[:2]} and mask {mask.shape} differ in size", code="invalid_image")
    colours = VOC_COLORMAP[mask].astype(np.float32)
    blended = image.astype(np.float32) * (1 - alpha) + colours * alpha
    out = np.where((mask != 0)[:, :, None], np.rint(blended), image)
    return out.astype(np.uint8)
