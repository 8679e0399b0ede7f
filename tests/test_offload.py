"""Request work runs in place on a one-core worker when it is small, in a thread otherwise; the
answers are the same either way."""

from __future__ import annotations

import asyncio
import io
import json
import os
import threading

import numpy as np
import pytest
from PIL import Image

from seglock.app import imageio, offload, oip
from tests.server_fixtures import (
    MASTER_KEY,
    imported_home,
    in_process_servers,
    make_artifacts,
    npy_bytes,
    open_keystore,
    png_bytes,
    scene,
)

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs thread affinity (Linux)")


def on_one_core(fn):
    """`fn()` in a fresh thread confined to one core (the threads it starts inherit that), as a
    pinned worker's event loop is; its result back, or its exception raised here."""
    outcome: dict = {}

    def run():
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # 0: the calling thread only
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def where(nbytes: int | None) -> bool:
    """Whether `run_off_loop` ran its function on the calling thread."""
    async def check():
        return await offload.run_off_loop(nbytes, threading.get_ident) == threading.get_ident()

    return asyncio.run(check())


def test_small_work_on_a_one_core_thread_runs_in_place():
    assert on_one_core(offload.one_core)
    assert on_one_core(lambda: where(0)) and on_one_core(lambda: where(offload.INLINE_MAX_BYTES))


def test_large_or_unsized_work_goes_to_a_thread_even_on_one_core():
    assert not on_one_core(lambda: where(offload.INLINE_MAX_BYTES + 1))
    assert not on_one_core(lambda: where(None))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_with_more_than_one_core_even_small_work_goes_to_a_thread():
    assert not offload.one_core() and not where(0)


def test_decoded_nbytes_reads_the_header_only():
    rgb = scene(1, 30, 20)
    assert imageio.decoded_nbytes(npy_bytes(rgb)) == len(npy_bytes(rgb))
    assert imageio.decoded_nbytes(png_bytes(rgb)) == 30 * 20 * 3
    rgba = io.BytesIO()
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(rgba, format="PNG")
    assert imageio.decoded_nbytes(rgba.getvalue()) == 30 * 20 * 8  # the most a PNG pixel can take
    jpeg = io.BytesIO()
    Image.fromarray(rgb).save(jpeg, format="JPEG")
    assert imageio.decoded_nbytes(jpeg.getvalue()) is None
    assert imageio.decoded_nbytes(png_bytes(rgb)[:20]) is None


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload")
    previous = os.environ.get("SEGLOCK_MASTER_KEY")
    os.environ["SEGLOCK_MASTER_KEY"] = MASTER_KEY
    home, _ = imported_home(root / "home", make_artifacts(root / "artifacts"))
    token = open_keystore(home).create_token("client", ["segment"], ["*"])[1]
    yield home, token
    if previous is None:
        os.environ.pop("SEGLOCK_MASTER_KEY", None)
    else:
        os.environ["SEGLOCK_MASTER_KEY"] = previous


def answers(home, token: str) -> tuple[list[bytes], int]:
    """The answers of /v1 (a PNG and a .npy, PNG and JSON masks) and /v2 (binary and JSON tensors)
    for cp and shf, and how many hops to a thread the routes' work took."""
    image = scene(4)
    header = json.dumps({"inputs": [{"name": "image", "shape": [1, *image.shape], "datatype": "UINT8",
                                     "parameters": {"binary_data_size": image.nbytes}}],
                         "outputs": [{"name": "mask", "parameters": {"binary_data": True}}]}).encode()
    tensor_json = json.dumps({"inputs": [{"name": "image", "shape": [1, *image.shape], "datatype": "UINT8",
                                          "data": image.reshape(-1).tolist()}]}).encode()
    hops = []
    real = offload.to_thread

    async def counted(fn, *args, **kwargs):
        hops.append(fn)
        return await real(fn, *args, **kwargs)

    offload.to_thread = counted
    try:
        with in_process_servers(home) as make:
            client = make()
            auth = {"Authorization": f"Bearer {token}"}
            bodies = []
            for model in ("cp", "shf"):
                for upload in (("x.png", png_bytes(image)), ("x.npy", npy_bytes(image))):
                    for accept in ("image/png", "application/json"):
                        answer = client.post(f"/v1/models/{model}/segment", files={"image": upload},
                                             headers={**auth, "Accept": accept})
                        assert answer.status_code == 200, answer.text
                        bodies.append(answer.content)
                binary = client.post(f"/v2/models/{model}/infer", content=header + image.tobytes(),
                                     headers={**auth, oip.HEADER_LENGTH: str(len(header))})
                as_json = client.post(f"/v2/models/{model}/infer", content=tensor_json, headers=auth)
                assert binary.status_code == as_json.status_code == 200, (binary.text, as_json.text)
                bodies += [binary.content, json.dumps(as_json.json()["outputs"]).encode()]
    finally:
        offload.to_thread = real
    return bodies, len(hops)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_a_one_core_worker_answers_exactly_as_one_with_threads(home):
    threaded, threaded_hops = answers(*home)
    in_place, in_place_hops = on_one_core(lambda: answers(*home))
    assert in_place == threaded
    # per model, hops with threads and without: /v1's four decodes (PNG and .npy, each answered as a
    # PNG and as JSON) and two PNG masks, 6 and 0 (its JSON masks always go to a thread, not counted
    # here); /v2 binary: parse, inputs, answer, 3 and 0; /v2 JSON: parse and answer always in a
    # thread, the inputs in place, 3 and 2
    assert threaded_hops == 2 * (6 + 3 + 3)
    assert in_place_hops == 2 * (0 + 0 + 2)
