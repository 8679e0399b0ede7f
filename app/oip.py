"""Open Inference Protocol (KServe v2 REST) bodies: parse an infer request, write an infer response.

Pure functions of bytes and arrays; `app/routes/v2.py` runs them off the event loop. The wire
format is the protocol's JSON body with the binary tensor extension: when the request carries
`Inference-Header-Content-Length: N`, the first N bytes are the JSON header and the tensors whose
`parameters.binary_data_size` is set follow it, in input order, as raw little-endian bytes.
(https://github.com/kserve/open-inference-protocol, "binary tensor data" extension.)
The body is read from raw bytes whatever its content type: tritonclient sends none.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from seglock.app.errors import bad_request, too_large, unprocessable

HEADER_LENGTH = "Inference-Header-Content-Length"
INPUT_NAME = "image"
OUTPUTS = {"mask": "UINT8", "score": "FP32"}
INPUT_DTYPES = {"UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2")}
_OUTPUT_DTYPES = {"UINT8": np.dtype("<u1"), "FP32": np.dtype("<f4")}


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass
class InferRequest:
    """What a client asked for: the NHWC `image` tensor, the outputs, and request parameters."""

    image: np.ndarray
    outputs: list[RequestedOutput]
    parameters: dict[str, Any] = field(default_factory=dict)
    id: str | None = None

    @property
    def wants_score(self) -> bool:
        return any(output.name == "score" for output in self.outputs)

    def json_output_pixels(self) -> int:
        """Pixels the answer would hold as JSON lists (outputs asked for without binary_data)."""
        images, height, width = (int(d) for d in self.image.shape[:3])
        return sum(images * height * width for output in self.outputs if not output.binary)

    def answer_nbytes(self) -> int:
        """About what the answer's arrays take while it is built: 1 byte a mask pixel, 4 a score,
        and a pointer and its text (8) per value for JSON outputs."""
        images, height, width = (int(d) for d in self.image.shape[:3])
        per_pixel = {"mask": 1, "score": 4}
        return sum(images * height * width * (per_pixel.get(output.name, 4) if output.binary else 8)
                   for output in self.outputs)


def parse_request(body: bytes, header_length: str | None, *, max_pixels: int, max_images: int,
                  max_json_bytes: int | None = None) -> InferRequest:
    """An infer request body (JSON, or JSON + binary tensors) -> `InferRequest`; 4xx `APIError` if malformed.

    `max_pixels` counts 8-bit RGB pixels (a UINT16 pixel counts double, as a 16-bit PNG does on /v1);
    `max_json_bytes` bounds the JSON part, which is parsed into Python objects (tens of bytes per
    value), so large tensors must come as binary tensor data."""
    header, binary = _split(body, header_length, max_json_bytes)
    if not isinstance(header, dict):
        raise bad_request("the inference request must be a JSON object")
    parameters = _parameters(header.get("parameters"), "parameters")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise bad_request("'inputs' must be a non-empty list")
    image = None
    offset = 0
    for index, spec in enumerate(inputs):
        if not isinstance(spec, dict):
            raise bad_request(f"inputs[{index}] must be an object")
        name = spec.get("name")
        if name != INPUT_NAME:
            raise bad_request(f"unknown input {name!r}: this model takes one input named {INPUT_NAME!r}")
        if image is not None:
            raise bad_request(f"input {INPUT_NAME!r} is given twice")
        image, used = _input_tensor(spec, binary, offset, max_pixels=max_pixels, max_images=max_images)
        offset += used
    if offset != len(binary):
        raise bad_request(f"the request has {len(binary) - offset} bytes of binary data no input declares")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise bad_request("'id' must be a string")
    default_binary = parameters.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise bad_request("parameters.binary_data_output must be true or false")
    return InferRequest(image, _requested_outputs(header.get("outputs"), default_binary), parameters, request_id)


def _split(body: bytes, header_length: str | None, max_json_bytes: int | None = None) -> tuple[Any, bytes]:
    if not body:
        raise bad_request("the request body is empty")
    if header_length is None:
        length = len(body)
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise bad_request(f"{HEADER_LENGTH} must be an integer") from None
        if not 0 < length <= len(body):
            raise bad_request(f"{HEADER_LENGTH} is {length}, but the body has {len(body)} bytes")
    if max_json_bytes is not None and length > max_json_bytes:
        raise too_large(f"the JSON part of the request is {length} bytes; the limit is {max_json_bytes}: "
                        f"send the image as binary tensor data ({HEADER_LENGTH})")
    try:
        header = json.loads(body[:length])
    except (ValueError, RecursionError):
        raise bad_request("the inference request header is not valid JSON") from None
    return header, body[length:]


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request(f"{where} must be an object")
    return value


def _input_tensor(spec: dict, binary: bytes, offset: int, *, max_pixels: int,
                  max_images: int) -> tuple[np.ndarray, int]:
    """The NHWC array of one input and how many binary bytes it used."""
    datatype = spec.get("datatype")
    if not isinstance(datatype, str) or datatype not in INPUT_DTYPES:
        raise unprocessable(f"input {INPUT_NAME!r} must be UINT8 (or UINT16 for ffx-encrypted input), "
                            f"not {datatype!r}")
    shape = _shape(spec.get("shape"))
    count, images = math.prod(shape), shape[0]
    if images > max_images:
        raise too_large(f"the request holds {images} images; at most {max_images} per request")
    dtype = INPUT_DTYPES[datatype]
    cost = 2 if dtype.itemsize > 1 else 1  # the decode budget is in 8-bit pixels
    if shape[1] * shape[2] * cost > max_pixels:
        raise too_large(f"image has {shape[1] * shape[2]} {datatype} pixels; the limit is {max_pixels // cost}")
    parameters = _parameters(spec.get("parameters"), f"input {INPUT_NAME!r} parameters")
    size = parameters.get("binary_data_size")
    if size is not None:
        if spec.get("data") is not None:
            raise bad_request(f"input {INPUT_NAME!r} has both 'data' and binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or size != count * dtype.itemsize:
            raise bad_request(f"input {INPUT_NAME!r}: binary_data_size must be {count * dtype.itemsize} "
                              f"for shape {shape} {datatype}, got {size!r}")
        if offset + size > len(binary):
            raise bad_request(f"input {INPUT_NAME!r} declares {size} binary bytes; the body has "
                              f"{len(binary) - offset} left")
        array = np.frombuffer(binary, dtype=dtype, count=count, offset=offset).reshape(shape)
        return array.astype(dtype.newbyteorder("="), copy=True), size
    return _json_tensor(spec.get("data"), shape, datatype), 0


def _shape(value: Any) -> list[int]:
    if (not isinstance(value, list) or len(value) != 4
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in value)):
        raise unprocessable(f"input {INPUT_NAME!r} must have shape [N, H, W, 3] (NHWC), got {value!r}")
    if value[3] != 3 or min(value) < 1:
        raise unprocessable(f"input {INPUT_NAME!r} must have shape [N, H, W, 3] with N, H, W >= 1, got {value}")
    return value


def _json_tensor(data: Any, shape: list[int], datatype: str) -> np.ndarray:
    """A JSON tensor: a flat row-major list (or the nested lists of the same shape)."""
    if not isinstance(data, list):
        raise bad_request(f"input {INPUT_NAME!r} needs 'data' (a list) or parameters.binary_data_size")
    try:
        array = np.asarray(data)
    except (ValueError, OverflowError, TypeError, RecursionError):
        raise bad_request(f"input {INPUT_NAME!r}: 'data' is not a regular list of integers") from None
    if array.dtype.kind not in "iu":
        raise bad_request(f"input {INPUT_NAME!r}: 'data' must hold integers only")
    if array.size != math.prod(shape):
        raise unprocessable(f"input {INPUT_NAME!r}: shape {shape} needs {math.prod(shape)} values, "
                            f"'data' has {array.size}")
    limit = np.iinfo(INPUT_DTYPES[datatype]).max
    if array.size and (int(array.min()) < 0 or int(array.max()) > limit):
        raise unprocessable(f"input {INPUT_NAME!r}: {datatype} values must lie in 0..{limit}")
    return array.reshape(shape).astype(INPUT_DTYPES[datatype].newbyteorder("="))


def _requested_outputs(value: Any, default_binary: bool) -> list[RequestedOutput]:
    """The outputs asked for; none named = the mask alone."""
    if value is None:
        return [RequestedOutput("mask", default_binary)]
    if not isinstance(value, list) or not value:
        raise bad_request("'outputs' must be a non-empty list when given")
    outputs = []
    for index, spec in enumerate(value):
        if not isinstance(spec, dict):
            raise bad_request(f"outputs[{index}] must be an object")
        name = spec.get("name")
        if not isinstance(name, str) or name not in OUTPUTS:
            raise bad_request(f"unknown output {name!r}: this model answers {', '.join(map(repr, OUTPUTS))}")
        if any(output.name == name for output in outputs):
            raise bad_request(f"output {name!r} is asked for twice")
        binary = _parameters(spec.get("parameters"), f"output {name!r} parameters").get("binary_data",
                                                                                        default_binary)
        if not isinstance(binary, bool):
            raise bad_request(f"output {name!r}: parameters.binary_data must be true or false")
        outputs.append(RequestedOutput(name, binary))
    return outputs


def encode_response(*, model_name: str, model_version: str, request_id: str | None,
                    outputs: list[tuple[RequestedOutput, np.ndarray]],
                    parameters: dict[str, Any] | None = None) -> tuple[bytes, int | None]:
    """(body, JSON header length or None when the body is JSON alone)."""
    header: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        header["id"] = request_id
    if parameters:
        header["parameters"] = parameters
    tensors, blobs = [], []
    for requested, array in outputs:
        datatype = OUTPUTS[requested.name]
        array = np.ascontiguousarray(array, dtype=_OUTPUT_DTYPES[datatype])
        tensor: dict[str, Any] = {"name": requested.name, "datatype": datatype, "shape": list(array.shape)}
        if requested.binary:
            blob = array.tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = array.reshape(-1).tolist()
        tensors.append(tensor)
    header["outputs"] = tensors
    text = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return text, None
    return b"".join([text, *blobs]), len(text)
