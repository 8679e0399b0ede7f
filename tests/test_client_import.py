"""The SDK works on a machine without torch or the server: a subprocess where those imports fail."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BLOCKED = ("torch", "torchvision", "fastapi", "starlette", "uvicorn", "pydantic", "pydantic_settings",
           "safetensors", "cryptography", "filelock", "seglock.app", "seglock.models", "seglock.keystore")

SCRIPT = textwrap.dedent('''
    import importlib.abc, sys

    BLOCKED = set(sys.argv[1].split(","))

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED or ".".join(name.split(".")[:2]) in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())

    import httpx, numpy as np
    import seglock.client
    from seglock.client import AsyncSegLockClient, SegLockClient, Overloaded
    from seglock.client.transforms import BlockKey, decrypt_blocks, encrypt_blocks, encrypt_per_image
    import seglock.client.cli

    image = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    for method in ("shf", "np", "ffx"):
        key = BlockKey.generate(method, 4)
        assert np.array_equal(decrypt_blocks(encrypt_blocks(image, key), key), image)
    assert encrypt_per_image(image, block_size=8, sub_block=4).shape == image.shape

    models = {"models": [{"name": "m", "num_classes": 2, "input_size": [8, 8], "protection": {"mode": "per-image",
              "block_size": 8, "sub_block": 4}}]}
    from seglock.client.imaging import mask_image
    import io
    answer = io.BytesIO()
    mask_image(np.ones((8, 8), np.uint8)).save(answer, format="PNG")

    def handler(request):
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=models)
        return httpx.Response(200, content=answer.getvalue())

    with SegLockClient("http://x", "slk_a_b", transport=httpx.MockTransport(handler)) as sdk:
        assert sdk.segment(np.zeros((16, 12, 3), np.uint8), "m").shape == (16, 12)
    try:
        seglock.client.cli.main(["--help"])
    except SystemExit as exc:
        assert exc.code == 0
    leaked = sorted(name for name in sys.modules
                    if name.split(".")[0] in BLOCKED or ".".join(name.split(".")[:2]) in BLOCKED)
    assert not leaked, leaked
    print("sdk-ok")
''')


def test_sdk_and_cli_import_and_work_without_torch_fastapi_or_the_server_packages():
    done = subprocess.run([sys.executable, "-c", SCRIPT, ",".join(BLOCKED)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("sdk-ok")


def test_all_lists_exactly_the_lazy_exports():
    import seglock.client

    assert seglock.client.__all__ == sorted(seglock.client._EXPORTS)
