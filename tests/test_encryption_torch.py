"""The torch training path gives exactly the SDK's numpy values, on any device."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from seglock.client.transforms import BlockKey, decrypt_blocks, encrypt_blocks, input_scale
from seglock.client.transforms.per_image import _encrypt_per_image_with_key
from seglock.models.encryption import (
    BlockEncryption,
    PerImageEncryption,
    decrypt_blocks_torch,
    encrypt_blocks_torch,
    encrypt_per_image_torch,
    quantize,
    to_model_input,
)

METHODS = ("shf", "np", "ffx")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def picture(height: int = 32, width: int = 48, batch: int | None = None, seed: int = 0) -> np.ndarray:
    shape = (height, width, 3) if batch is None else (batch, height, width, 3)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def stream(seed: bytes):
    counter = iter(range(10**9))
    return lambda n: hashlib.shake_256(seed + next(counter).to_bytes(8, "little")).digest(n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("batch", [None, 3], ids=["HWC", "NHWC"])
def test_torch_encrypt_equals_numpy_encrypt(device, method, block_size, batch):
    image = picture(batch=batch)
    key = BlockKey.generate(method, block_size)
    ours = encrypt_blocks_torch(torch.from_numpy(image).to(device), key)
    assert ours.device.type == device and ours.shape == image.shape
    assert np.array_equal(ours.cpu().numpy().astype(np.int64), encrypt_blocks(image, key).astype(np.int64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS)
def test_torch_decrypt_inverts_torch_encrypt_and_numpy_encrypt(device, method):
    image = picture(batch=2)
    key = BlockKey.generate(method, 4)
    plain = torch.from_numpy(image).to(device)
    assert torch.equal(decrypt_blocks_torch(encrypt_blocks_torch(plain, key), key), plain)
    from_numpy = torch.from_numpy(encrypt_blocks(image, key)).to(device)  # uint16 for ffx
    assert torch.equal(decrypt_blocks_torch(from_numpy, key).cpu(), torch.from_numpy(image))


def test_torch_encrypt_gives_uint8_for_shf_np_and_int16_for_ffx():
    image = torch.from_numpy(picture())
    assert encrypt_blocks_torch(image, BlockKey.generate("shf", 4)).dtype == torch.uint8
    assert encrypt_blocks_torch(image, BlockKey.generate("np", 4)).dtype == torch.uint8
    assert encrypt_blocks_torch(image, BlockKey.generate("ffx", 4)).dtype == torch.int16


def test_torch_decrypt_of_numpy_ffx_output_matches_numpy_decrypt():
    key = BlockKey.generate("ffx", 2)
    encrypted = encrypt_blocks(picture(), key)
    ours = decrypt_blocks_torch(torch.from_numpy(encrypted.astype(np.int16)), key)
    assert np.array_equal(ours.numpy(), decrypt_blocks(encrypted, key))


def test_torch_ffx_decrypt_rejects_values_the_key_never_produces():
    key = BlockKey.generate("ffx", 2)
    encrypted = encrypt_blocks_torch(torch.from_numpy(picture(4, 4)), key)
    selected = tuple(np.argwhere(key.selection_mask(4, 4))[0])
    encrypted[selected] = int(np.setdiff1d(np.arange(1000), key.ffx_table())[0])
    with pytest.raises(ValueError, match="never produces"):
        decrypt_blocks_torch(encrypted, key)


@pytest.mark.parametrize("tensor, message", [
    (torch.zeros(30, 32, 3, dtype=torch.uint8), "not divisible by the block size 4"),
    (torch.zeros(32, 32, 3), "must be torch.uint8"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "3 channels"),
    (np.zeros((32, 32, 3), np.uint8), "torch tensor"),
])
def test_torch_encrypt_rejects_bad_batches(tensor, message):
    with pytest.raises(ValueError, match=message):
        encrypt_blocks_torch(tensor, BlockKey.generate("shf", 4))


def test_quantize_maps_k_over_255_back_to_k_in_nhwc():
    levels = torch.arange(256, dtype=torch.uint8).repeat(3 * 16).reshape(1, 3, 64, 64)
    assert torch.equal(quantize(levels.float() / 255), levels.permute(0, 2, 3, 1))


@pytest.mark.parametrize("method", METHODS)
def test_block_encryption_module_gives_numpy_encryption_over_input_scale(method):
    image = picture(batch=2)
    key = BlockKey.generate(method, 4)
    module = BlockEncryption(key)
    out = module(torch.from_numpy(image).permute(0, 3, 1, 2).float() / 255)
    expected = torch.from_numpy(encrypt_blocks(image, key).astype(np.float32)).permute(0, 3, 1, 2) / input_scale(method)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 32, 48)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("method", METHODS)
def test_block_encryption_keeps_the_key_out_of_state_dict_and_repr(method):
    key = BlockKey.generate(method, 4)
    module = BlockEncryption(key)
    module(torch.rand(1, 3, 16, 16))
    assert module.state_dict() == {}
    assert key.tag in repr(module)
    assert str(key.permutation.tolist()[:6])[1:-1] not in repr(module)


def test_per_image_torch_equals_numpy_with_the_same_random_source():
    batch = picture(batch=2)
    expected, _ = _encrypt_per_image_with_key(batch, 16, 4, randbytes=stream(b"same"))
    ours = encrypt_per_image_torch(torch.from_numpy(batch), 16, 4, randbytes=stream(b"same"))
    assert np.array_equal(ours.numpy(), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_per_image_module_permutes_each_image_with_fresh_keys(device):
    image = torch.from_numpy(picture()).permute(2, 0, 1).float().div(255)
    batch = torch.stack([image, image]).to(device)
    module = PerImageEncryption(16, 4)
    first, second = module(batch), module(batch)
    assert first.shape == batch.shape and first.device.type == device
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first, second)
    for out in first:  # a permutation: the multiset of values is kept
        assert torch.equal(out.flatten().sort().values, image.to(device).flatten().sort().values)


def test_to_model_input_divides_by_the_input_scale_in_nchw():
    encrypted = torch.tensor([[[[999, 0, 500]]]], dtype=torch.int16)
    out = to_model_input(encrypted, "ffx")
    assert out.shape == (1, 3, 1, 1)
    assert torch.equal(out.flatten(), torch.tensor([1.0, 0.0, 500 / 999]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", [*METHODS, "per-image"])
def test_to_model_input_is_numpys_quotient_of_every_level_on_every_device(device, method):
    """CUDA divides by a Python number as a multiplication by its reciprocal, which is 1 ulp off for
    some levels: the model input is divided by a tensor, so a GPU trains on the server's values."""
    scale = input_scale(method)
    levels = np.arange(scale + 1, dtype=np.int16 if scale > 255 else np.uint8)
    batch = torch.from_numpy(np.stack([levels] * 3, axis=-1)[None, None]).to(device)  # 1x1xLx3
    out = to_model_input(batch, method)
    expected = levels.astype(np.float32) / np.float32(scale)
    assert out.device.type == device
    for channel in out[0].cpu().numpy():
        np.testing.assert_array_equal(channel[0], expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["none", "cp", *METHODS, "per-image"])
def test_scaled_input_is_the_out_of_place_formula_exactly_and_leaves_its_input_alone(device, mode):
    """scaled_input converts and normalises in place on a tensor of its own: every value equals
    ((x / scale) - mean) / std computed out of place in float32, and the batch it was given is untouched."""
    from seglock.models.inputs import scaled_input

    norm = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    scale = input_scale(mode if mode in METHODS else "none")
    rng = np.random.default_rng(7)
    values = rng.integers(0, scale + 1, (2, 5, 7, 3)).astype(np.int16 if scale > 255 else np.uint8)
    batch = torch.from_numpy(values).to(device)
    out = scaled_input(batch, mode, norm)
    assert out.shape == (2, 3, 5, 7) and out.is_contiguous() and out.dtype == torch.float32
    mean, std = (np.asarray(norm[k], np.float32)[:, None, None] for k in ("mean", "std"))
    expected = (values.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(scale) - mean) / std
    np.testing.assert_array_equal(out.cpu().numpy(), expected)
    assert torch.equal(batch.cpu(), torch.from_numpy(values))


def test_to_model_input_never_returns_or_changes_its_argument():
    floats = torch.full((1, 2, 2, 3), 255.0)
    out = to_model_input(floats, "shf")
    assert out.data_ptr() != floats.data_ptr() and torch.equal(floats, torch.full((1, 2, 2, 3), 255.0))
    assert torch.equal(out, torch.ones(1, 3, 2, 2))
