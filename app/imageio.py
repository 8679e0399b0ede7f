"""Decoding uploads and encoding masks, with the limits that keep the server standing.

Pure functions of bytes and arrays: the routes call them off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import struct
import warnings
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:  # libspng, through imagecodecs (the server extra): see _decode_plain_png
    from imagecodecs import spng_decode as _png_decode
except ImportError:  # pragma: no cover - a server installed without it decodes every PNG with Pillow
    _png_decode = None

from seglock.app import memory
from seglock.app.errors import APIError, bad_request, overloaded, too_large, unprocessable, unsupported_media

# One source for the pixel maths the server and the SDK must agree on bit for bit.
from seglock.client.imaging import VOC_COLORMAP, mask_image, pil_to_rgb, resize_mask, resize_rgb  # noqa: F401 - re-exported

PLAIN_FORMATS = {"PNG", "JPEG", "WEBP"}
_DECODERS = ("PNG", "JPEG", "WEBP")  # the only Pillow plugins that ever see an upload's bytes
# What a pixel costs against `max_pixels`, by Pillow mode: the limit is in 8-bit RGB pixels, and a
# 16-bit or transparent image takes more memory on its way to RGB (wider buffers, a compositing pass).
_PIXEL_COST = {"I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "I": 2, "F": 2, "RGBA": 2, "LA": 2, "PA": 2,
               "RGBa": 2, "La": 2, "CMYK": 2}
_NPY_HEADER_MAX = 4096
NPY_MAGIC = b"\x93NUMPY"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_NOT_PLAIN = (b"tRNS", b"eXIf", b"acTL")  # PNG chunks after which Pillow's pixels are not the IDAT's as stored
# More chunks than this and the walk is left to Pillow (libpng writes 8 KiB IDATs: 2,500 for a 20 MB PNG);
# 20 MiB of empty chunks would otherwise be 1.7 million steps of Python holding the GIL.
_PLAIN_PNG_MAX_CHUNKS = 4096


@dataclass(frozen=True)
class Upload:
    """A decoded upload: HWC array (uint8, or uint16 for FFX tensors), and what it was."""

    array: np.ndarray
    kind: str  # "png" | "jpeg" | "webp" | "npy"
    source_mode: str = "RGB"  # Pillow mode before conversion; encrypted PNGs must be plain RGB
    original_size: tuple[int, int] | None = None  # (H, W) as uploaded, when decoded smaller (JPEG draft)

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the upload as sent: the size its mask is answered at."""
        return self.original_size or (int(self.array.shape[0]), int(self.array.shape[1]))

    @property
    def lossless(self) -> bool:
        return self.kind in ("png", "npy")


class Slot:
    """What one upload slot held: the largest buffer it noted decides whether freed memory is handed
    back to the system when the slot is released (`memory.TRIM_ABOVE_BYTES`)."""

    def __init__(self) -> None:
        self.largest = 0

    def holds(self, nbytes: int) -> None:
        self.largest = max(self.largest, int(nbytes))


class UploadGate:
    """At most `slots` uploads read, decoded or encoded at once (taken before the body is read);
    at most `queue` more wait for a slot, the rest are answered 503 at once. Bounds a worker's memory.

    A slot that held a large buffer (noted with `Slot.holds`) trims the C heap when it is released,
    so a few large uploads do not leave their peak resident. Small ones do not: trimming hands back
    the pages the next forward pass reuses, which it then faults in again (1.3x slower serving at
    256 px when every request trimmed)."""

    def __init__(self, slots: int, queue: int):
        self.slots, self.queue = slots, queue
        self._semaphore = asyncio.Semaphore(slots)
        self._waiting = 0

    @contextlib.asynccontextmanager
    async def slot(self):
        if self._semaphore.locked() and self._waiting >= self.queue:
            raise overloaded("too many uploads are being decoded; try again shortly")
        self._waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self._waiting -= 1
        held = Slot()
        try:
            yield held
        finally:
            self._semaphore.release()
            if held.largest >= memory.TRIM_ABOVE_BYTES:
                await asyncio.to_thread(memory.trim)  # what a large decode freed goes back to the system


def decode_upload(data: bytes, *, max_pixels: int, draft_size: tuple[int, int] | None = None) -> Upload:
    """Decode an image upload (PNG, JPEG, WebP) or an `.npy` tensor into an HWC array.

    `max_pixels` counts 8-bit RGB pixels (16-bit and alpha images count double). With
    `draft_size` (H, W), a JPEG much larger than that is decoded at 1/2, 1/4 or 1/8 scale (never
    below it); `Upload.size` keeps the size as sent.
    """
    if not data:
        raise bad_request("the image field is empty")
    if data.startswith(NPY_MAGIC):
        return Upload(_decode_npy(data, max_pixels=max_pixels), "npy", "npy")
    return _decode_image(data, max_pixels=max_pixels, draft_size=draft_size)


def _decode_npy(data: bytes, *, max_pixels: int) -> np.ndarray:
    """The header is parsed and checked first; the data is a view of the upload, never a fresh allocation."""
    stream = io.BytesIO(data[:_NPY_HEADER_MAX])
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream, max_header_size=_NPY_HEADER_MAX)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream, max_header_size=_NPY_HEADER_MAX)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except Exception as exc:
        raise bad_request(f"the .npy upload cannot be read: {_short(exc)}") from None
    if dtype.hasobject:
        raise bad_request("the .npy upload cannot be read: object arrays are not accepted")
    if dtype not in (np.uint8, np.uint16, np.dtype("<u2"), np.dtype(">u2")):
        raise unprocessable(f".npy upload must be uint8 or uint16, got {dtype}")
    if len(shape) != 3 or shape[2] != 3:
        raise unprocessable(f".npy upload must be H x W x 3, got shape {tuple(shape)}")
    if shape[0] * shape[1] > max_pixels:
        raise too_large(f"image has {shape[0] * shape[1]} pixels; the limit is {max_pixels}")
    offset = stream.tell()
    count = shape[0] * shape[1] * shape[2]
    if len(data) - offset != count * dtype.itemsize:
        raise bad_request(f"the .npy upload cannot be read: {len(data) - offset} data bytes for shape {tuple(shape)}")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    array = array.reshape(shape[::-1]).transpose() if fortran else array.reshape(shape)
    return np.ascontiguousarray(array.astype(dtype.newbyteorder("="), copy=False))


def _decode_image(data: bytes, *, max_pixels: int, draft_size: tuple[int, int] | None = None) -> Upload:
    plain = _decode_plain_png(data, max_pixels=max_pixels)
    if plain is not None:
        return Upload(plain, "png", "RGB")
    original_size = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=_DECODERS)
            fmt = image.format
            if fmt not in PLAIN_FORMATS:
                raise unsupported_media(f"unsupported image format {fmt}; send PNG, JPEG, WebP or .npy")
            width, height = image.size
            cost = width * height * _PIXEL_COST.get(image.mode, 1)
            if cost > max_pixels:
                raise too_large(f"image has {width * height} pixels of mode {image.mode} (cost {cost}); "
                                f"the limit is {max_pixels}")
            if fmt == "JPEG" and draft_size is not None and not _exif_rotates(image):
                # DCT scaling: decode at 1/2..1/8 of the size, at least the model's input size
                image.draft("RGB", (draft_size[1], draft_size[0]))
                if image.size != (width, height):
                    original_size = (height, width)
            image.load()
            source_mode = image.mode
            ImageOps.exif_transpose(image, in_place=True)  # the same pixels as the SDK's copy, without a copy
            array = np.asarray(image) if image.mode == "RGB" else pil_to_rgb(image)
            image.close()
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
    return Upload(array, fmt.lower(), source_mode, original_size)


def decoded_nbytes(data: bytes) -> int | None:
    """About the bytes `decode_upload` makes of `data`, from its header alone (the CPU work of
    decoding it grows with them): a .npy's size; a PNG's width x height x 3, or x 8 (16-bit RGBA,
    the most a PNG pixel holds) unless it is 8-bit RGB; None for anything else."""
    if data.startswith(NPY_MAGIC):
        return len(data)
    if len(data) < 29 or not data.startswith(_PNG_MAGIC) or data[12:16] != b"IHDR":
        return None
    width, height, depth, color = struct.unpack(">IIBB", data[16:26])
    return width * height * (3 if (depth, color) == (8, 2) else 8)


def plain_png_shape(data: bytes) -> tuple[int, int] | None:
    """(H, W) when `data` is a whole PNG of 8-bit RGB pixels, not interlaced, with no transparency
    (tRNS), no EXIF (eXIf: Pillow's copy is turned upright) and no animation (acTL: Pillow shows the
    first frame, which need not be the IDAT image): a PNG whose pixels every conforming decoder gives
    alike, and Pillow as `_decode_image` uses it (no conversion, no transposition). None for anything
    else, for chunks that overrun the data, no IEND or more than `_PLAIN_PNG_MAX_CHUNKS` chunks:
    Pillow decides what those are."""
    if len(data) < 33 or not data.startswith(_PNG_MAGIC) or data[12:16] != b"IHDR":
        return None
    width, height, depth, color, compression, filtering, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if not width or not height or (depth, color, compression, filtering, interlace) != (8, 2, 0, 0, 0):
        return None
    position = 8
    for _ in range(_PLAIN_PNG_MAX_CHUNKS):
        if position + 12 > len(data):
            return None
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        position += 12 + length
        if kind in _NOT_PLAIN or position > len(data):
            return None
        if kind == b"IEND":
            return height, width
    return None


def _decode_plain_png(data: bytes, *, max_pixels: int) -> np.ndarray | None:
    """The HWC pixels of a plain RGB PNG (`plain_png_shape`) decoded by libspng, or None: not such a
    PNG, over the pixel limit, no imagecodecs, or a decode that failed (Pillow then reads it again and
    names the error as for any image). The same array Pillow gives, in two thirds of its time for a
    256 px image (1.2 against 1.9 ms here); it releases the GIL while it works, as Pillow does, and
    never writes to stderr (libpng's warnings would: a client could fill the server's log)."""
    if _png_decode is None:
        return None
    shape = plain_png_shape(data)
    if shape is None or shape[0] * shape[1] > max_pixels:
        return None
    try:
        array = _png_decode(data)
    except Exception:  # damaged: Pillow reads it again and names the error as for any image
        return None
    if array.shape != (*shape, 3) or array.dtype != np.uint8:
        return None
    return array


def _exif_rotates(image: Image.Image) -> bool:
    try:
        return image.getexif().get(0x0112, 1) not in (1, None)
    except Exception:
        return True


def _has_image_magic(data: bytes) -> bool:
    return data.startswith((_PNG_MAGIC, b"\xff\xd8\xff")) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def encode_mask_png(mask: np.ndarray) -> bytes:
    """A palette PNG whose pixel values are the class indices (VOC colours for viewing): the image
    `mask_image` makes, written directly (8-bit palette, filter none, zlib level 1). Pillow's save
    of the same image took twice as long (0.22 against 0.10 ms for a 256 px mask here), most of it
    in its palette conversion and plumbing, on every /v1 answer."""
    mask = np.asarray(mask, dtype=np.uint8)
    height, width = mask.shape
    rows = np.zeros((height, width + 1), dtype=np.uint8)  # each row: filter type 0, then its indices
    rows[:, 1:] = mask
    return b"".join((_PNG_MAGIC, _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)),
                     _VOC_PLTE, _png_chunk(b"IDAT", zlib.compress(rows.data, 1)), _png_chunk(b"IEND", b"")))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


_VOC_PLTE = _png_chunk(b"PLTE", VOC_COLORMAP.tobytes())


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
