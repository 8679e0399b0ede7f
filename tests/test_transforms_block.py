"""Block-wise transforms SHF, NP, FFX (paper 001) and their keys: the SDK's numpy path."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pyffx
import pytest
import torch

from seglock.client.transforms import (
    BlockKey,
    TransformError,
    decrypt_blocks,
    encrypt_blocks,
    input_scale,
    reference_permutation,
)

METHODS = ("shf", "np", "ffx")


def picture(height: int = 32, width: int = 48, batch: int | None = None, seed: int = 0) -> np.ndarray:
    shape = (height, width, 3) if batch is None else (batch, height, width, 3)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def reference_encrypt(image: np.ndarray, method: str, block_size: int, seed: int, password: str) -> torch.Tensor:
    """The published reference code's tensor method on an NCHW float batch in [0, 1], as it is written."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    h, w, m = image.shape[0], image.shape[1], block_size
    torch.manual_seed(seed)
    key = torch.randperm(m * m * 3)
    x = x.permute(0, 2, 3, 1).reshape(-1, h // m, m, w // m, m, 3).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(-1, h // m, w // m, m * m * 3)
    if method == "shf":
        x = x[:, :, :, key]
    elif method == "np":
        selected = key > len(key) / 2
        x[:, :, :, selected] = 1 - x[:, :, :, selected]
    else:
        selected = key > len(key) / 2
        fpe = pyffx.Integer(password.encode(), length=3)
        lookup = torch.from_numpy(np.vectorize(fpe.encrypt)(np.arange(256)))
        x = (torch.clamp(x, 0, 1) * 255).long()
        x[:, :, :, selected] = lookup[x[:, :, :, selected]].clone()
        x = x.float() / lookup.max()
    x = x.reshape(-1, h // m, w // m, m, m, 3).permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, 3)
    return x.permute(0, 3, 1, 2).contiguous()


# -- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("block_size", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("batch", [None, 3], ids=["HWC", "NHWC"])
def test_decrypt_inverts_encrypt_exactly(method, block_size, batch):
    image = picture(batch=batch)
    key = BlockKey.generate(method, block_size)
    assert np.array_equal(decrypt_blocks(encrypt_blocks(image, key), key), image)


@pytest.mark.parametrize("method, dtype", [("shf", np.uint8), ("np", np.uint8), ("ffx", np.uint16)])
def test_encrypt_keeps_shape_and_gives_the_method_dtype(method, dtype):
    image = picture(batch=2)
    encrypted = encrypt_blocks(image, BlockKey.generate(method, 4))
    assert encrypted.shape == image.shape
    assert encrypted.dtype == dtype


@pytest.mark.parametrize("method", METHODS)
def test_encrypt_changes_the_image_and_leaves_the_input_alone(method):
    image = picture()
    before = image.copy()
    encrypted = encrypt_blocks(image, BlockKey.generate(method, 4))
    assert np.array_equal(image, before)
    assert not np.array_equal(encrypted.astype(np.int64), image.astype(np.int64))


@pytest.mark.parametrize("method", METHODS)
def test_a_batch_uses_one_key_for_all_images(method):
    batch = picture(batch=3)
    key = BlockKey.generate(method, 4)
    expected = np.stack([encrypt_blocks(image, key) for image in batch])
    assert np.array_equal(encrypt_blocks(batch, key), expected)


@pytest.mark.parametrize("method", METHODS)
def test_non_contiguous_input_encrypts_like_its_copy(method):
    image = picture(64, 96)[::2, ::2]
    key = BlockKey.generate(method, 4)
    assert np.array_equal(encrypt_blocks(image, key), encrypt_blocks(image.copy(), key))


# -- the maths of each method ----------------------------------------------------------------


def test_shf_reads_block_vector_position_i_from_key_i_in_row_column_channel_order():
    m = 4
    image = picture(m, m)  # exactly one block: its HWC flattening is the block vector
    key = BlockKey.generate("shf", m)
    encrypted = encrypt_blocks(image, key)
    assert np.array_equal(encrypted.reshape(-1), image.reshape(-1)[key.permutation])


def test_shf_applies_the_same_key_to_every_block():
    m = 4
    image = picture(2 * m, 3 * m)
    key = BlockKey.generate("shf", m)
    encrypted = encrypt_blocks(image, key)
    for by in range(2):
        for bx in range(3):
            block = image[by * m:(by + 1) * m, bx * m:(bx + 1) * m].reshape(-1)
            out = encrypted[by * m:(by + 1) * m, bx * m:(bx + 1) * m].reshape(-1)
            assert np.array_equal(out, block[key.permutation])


def test_np_turns_selected_values_into_255_minus_value_and_keeps_the_rest():
    image = picture()
    key = BlockKey.generate("np", 4)
    mask = key.selection_mask(*image.shape[:2])
    encrypted = encrypt_blocks(image, key)
    assert np.array_equal(encrypted[mask], 255 - image[mask])
    assert np.array_equal(encrypted[~mask], image[~mask])


@pytest.mark.parametrize("block_size", [1, 2, 4, 16])
def test_np_and_ffx_select_positions_by_the_reference_rule(block_size):
    key = BlockKey.generate("np", block_size)
    length = block_size * block_size * 3
    assert np.array_equal(key.selection, key.permutation > length / 2)
    # A permutation of 0..L-1 has exactly L - 1 - floor(L/2) values above L/2.
    assert int(key.selection.sum()) == length - 1 - length // 2


def test_selection_mask_repeats_the_block_selection_in_every_block():
    m = 2
    key = BlockKey.generate("ffx", m)
    mask = key.selection_mask(4 * m, 3 * m)
    assert int(mask.sum()) == 12 * int(key.selection.sum())
    assert np.array_equal(mask[m:2 * m, 2 * m:3 * m].reshape(-1), key.selection)


def test_ffx_table_equals_pyffx_with_three_digits():
    key = BlockKey.from_reference("ffx", 4, seed=7, password="password")
    cipher = pyffx.Integer(b"password", length=3)
    assert key.ffx_table().tolist() == [cipher.encrypt(v) for v in range(256)]
    assert key.ffx_table().dtype == np.uint16


def test_ffx_inverse_table_undoes_the_table_and_marks_other_values():
    key = BlockKey.generate("ffx", 2)
    table, inverse = key.ffx_table(), key.ffx_inverse_table()
    assert np.array_equal(inverse[table], np.arange(256))
    outside = np.setdiff1d(np.arange(1000), table)
    assert outside.size == 1000 - 256
    assert np.all(inverse[outside] == -1)


def test_ffx_encrypts_selected_pixels_through_the_table_and_keeps_the_rest():
    image = picture()
    key = BlockKey.generate("ffx", 4)
    mask = key.selection_mask(*image.shape[:2])
    encrypted = encrypt_blocks(image, key)
    assert np.array_equal(encrypted[mask], key.ffx_table()[image[mask]])
    assert np.array_equal(encrypted[~mask], image[~mask].astype(np.uint16))
    assert int(encrypted.max()) <= 999


def test_ffx_decrypt_rejects_a_value_outside_the_tables_image():
    key = BlockKey.generate("ffx", 2)
    encrypted = encrypt_blocks(picture(4, 4), key)
    selected = np.argwhere(key.selection_mask(4, 4))[0]
    encrypted[tuple(selected)] = np.setdiff1d(np.arange(1000), key.ffx_table())[0]
    with pytest.raises(ValueError, match="never produces"):
        decrypt_blocks(encrypted, key)


def test_ffx_decrypt_rejects_an_unselected_value_above_255():
    key = BlockKey.generate("ffx", 2)
    encrypted = encrypt_blocks(picture(4, 4), key)
    unselected = np.argwhere(~key.selection_mask(4, 4))[0]
    encrypted[tuple(unselected)] = 300
    with pytest.raises(ValueError, match="never produces"):
        decrypt_blocks(encrypted, key)


def test_ffx_decrypt_rejects_values_above_999():
    key = BlockKey.generate("ffx", 2)
    encrypted = encrypt_blocks(picture(4, 4), key)
    encrypted[0, 0, 0] = 1000
    with pytest.raises(ValueError, match="at most 999"):
        decrypt_blocks(encrypted, key)


def test_input_scale_is_the_largest_encrypted_value_per_method():
    assert {m: input_scale(m) for m in ("none", "cp", "shf", "np", "ffx", "per-image")} == {
        "none": 255, "cp": 255, "shf": 255, "np": 255, "ffx": 999, "per-image": 255}
    with pytest.raises(ValueError, match="unknown method"):
        input_scale("rot13")


# -- reference keys ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 7, 42, 2**31 + 5, 2**40 + 3, -5])
@pytest.mark.parametrize("length", [3, 12, 48, 192, 768, 3072])
def test_reference_permutation_equals_torch_randperm(seed, length):
    torch.manual_seed(seed)
    assert reference_permutation(seed, length).tolist() == torch.randperm(length).tolist()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("block_size, seed", [(2, 0), (4, 7), (8, 123)])
def test_reference_key_reproduces_the_reference_code_output(method, block_size, seed):
    image = picture(32, 48, seed=seed)
    key = BlockKey.from_reference(method, block_size, seed=seed, password="password" if method == "ffx" else None)
    ours = encrypt_blocks(image, key)
    reference = reference_encrypt(image, method, block_size, seed, "password")[0].permute(1, 2, 0)
    scale = int(key.ffx_table().max()) if method == "ffx" else 255  # the reference divides by lookup.max()
    assert np.array_equal((reference * scale).round().to(torch.int64).numpy(), ours.astype(np.int64))


def test_from_reference_defaults_the_ffx_password_to_the_reference_one():
    assert BlockKey.from_reference("ffx", 4, seed=7) == BlockKey.from_reference("ffx", 4, seed=7, password="password")


def test_from_reference_rejects_a_password_for_shf():
    with pytest.raises(ValueError, match="only to ffx"):
        BlockKey.from_reference("shf", 4, seed=7, password="password")


# -- generated keys ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_generated_keys_are_permutations_and_differ_across_calls(method):
    keys = [BlockKey.generate(method, 4) for _ in range(3)]
    for key in keys:
        assert sorted(key.permutation.tolist()) == list(range(48))
    perms = {tuple(key.permutation.tolist()) for key in keys}
    assert len(perms) == 3


def test_generated_ffx_passwords_are_random_hex_and_differ():
    first, second = BlockKey.generate("ffx", 2), BlockKey.generate("ffx", 2)
    assert first.password != second.password
    assert len(first.password) == 32 and int(first.password, 16) >= 0
    assert BlockKey.generate("shf", 2).password is None


def test_generate_draws_from_the_given_random_source():
    def counting_source():
        calls = iter(range(1, 1000))
        return lambda n: bytes((next(calls) + i) % 256 for i in range(n))

    first = BlockKey.generate("ffx", 2, randbytes=counting_source())
    assert first == BlockKey.generate("ffx", 2, randbytes=counting_source())
    assert first != BlockKey.generate("ffx", 2)


# -- serialisation and secrecy -----------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_json_round_trip_gives_an_equal_key_that_encrypts_the_same(method):
    key = BlockKey.generate(method, 4)
    text = key.to_json()
    restored = BlockKey.from_json(text)
    assert restored == key
    assert restored.tag == key.tag
    assert json.loads(text)["format"] == "seglock-block-key"
    image = picture()
    assert np.array_equal(encrypt_blocks(image, restored), encrypt_blocks(image, key))


def test_dict_round_trip_keeps_method_block_size_and_material():
    key = BlockKey.generate("ffx", 8)
    restored = BlockKey.from_dict(key.to_dict())
    assert (restored.method, restored.block_size, restored.password) == ("ffx", 8, key.password)
    assert np.array_equal(restored.permutation, key.permutation)


@pytest.mark.parametrize("method", METHODS)
def test_repr_and_str_hide_the_permutation_and_password(method):
    key = BlockKey.generate(method, 4)
    if method == "shf":  # fill the caches too
        key.gather_index(8, 8)
    else:
        key.selection_mask(8, 8)
    for text in (repr(key), str(key)):
        assert f"method={method!r}" in text and "block_size=4" in text
        assert str(key.permutation.tolist()[:6])[1:-1] not in text
        assert "permutation" not in text
        if key.password:
            assert key.password not in text


def test_keys_with_other_material_are_not_equal():
    key = BlockKey.generate("shf", 4)
    other = BlockKey("shf", 4, key.permutation[::-1].copy())
    assert key != other
    assert key == BlockKey("shf", 4, key.permutation)


def test_pickled_key_is_equal_and_encrypts_the_same():
    key = BlockKey.generate("ffx", 4)
    image = picture()
    expected = encrypt_blocks(image, key)
    restored = pickle.loads(pickle.dumps(key))
    assert restored == key
    assert np.array_equal(encrypt_blocks(image, restored), expected)


@pytest.mark.parametrize("data, message", [
    ({"format": "other"}, "not a seglock-block-key"),
    ({"format": "seglock-block-key", "version": 99}, "unsupported"),
    ({"format": "seglock-block-key", "version": 1, "method": "shf", "block_size": 1,
      "permutation": [0, 1, 1]}, "permutation of range"),
    ({"format": "seglock-block-key", "version": 1, "method": "shf", "block_size": 2,
      "permutation": [0, 1, 2]}, "permutation of range"),
    ({"format": "seglock-block-key", "version": 1, "method": "ffx", "block_size": 1,
      "permutation": [0, 1, 2]}, "needs a non-empty password"),
    ({"format": "seglock-block-key", "version": 1, "method": "shf", "block_size": 1}, "lacks 'permutation'"),
])
def test_from_dict_rejects_malformed_keys(data, message):
    with pytest.raises(ValueError, match=message):
        BlockKey.from_dict(data)


def test_from_json_rejects_text_that_is_not_json():
    with pytest.raises(ValueError, match="not valid"):
        BlockKey.from_json("{not json")


def test_rejection_messages_do_not_echo_the_material():
    perm = [5, 4, 3, 2, 1, 0, 7, 11, 9, 8, 10, 10]
    with pytest.raises(ValueError) as caught:
        BlockKey("shf", 2, perm)
    assert "5, 4, 3" not in str(caught.value)


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("image, message", [
    (np.zeros((30, 32, 3), np.uint8), "not divisible by the block size 4"),
    (np.zeros((32, 30, 3), np.uint8), "not divisible by the block size 4"),
    (np.zeros((32, 32, 3), np.float32), "must be uint8"),
    (np.zeros((32, 32, 3), np.uint16), "must be uint8"),
    (np.zeros((32, 32), np.uint8), "HWC or NHWC"),
    (np.zeros((1, 1, 32, 32, 3), np.uint8), "HWC or NHWC"),
    (np.zeros((32, 32, 4), np.uint8), "3 channels"),
    (np.zeros((0, 32, 3), np.uint8), "must not be empty"),
    ([[1, 2, 3]], "numpy array"),
])
def test_encrypt_rejects_bad_images(image, message):
    with pytest.raises(ValueError, match=message):
        encrypt_blocks(image, BlockKey.generate("shf", 4))


def test_ffx_decrypt_needs_uint16_and_shf_decrypt_needs_uint8():
    with pytest.raises(ValueError, match="must be uint16"):
        decrypt_blocks(picture(), BlockKey.generate("ffx", 4))
    with pytest.raises(ValueError, match="must be uint8"):
        decrypt_blocks(picture().astype(np.uint16), BlockKey.generate("shf", 4))


@pytest.mark.parametrize("method, block_size, message", [
    ("rot13", 4, "unknown block method"),
    ("shf", 0, "positive integer"),
    ("shf", 2.5, "positive integer"),
    ("shf", True, "positive integer"),
])
def test_generate_rejects_bad_parameters(method, block_size, message):
    with pytest.raises(ValueError, match=message):
        BlockKey.generate(method, block_size)


def test_index_maths_belong_to_their_methods():
    with pytest.raises(ValueError, match="shf keys"):
        BlockKey.generate("np", 2).gather_index(4, 4)
    with pytest.raises(ValueError, match="np/ffx keys"):
        BlockKey.generate("shf", 2).selection_mask(4, 4)
    with pytest.raises(ValueError, match="ffx keys"):
        BlockKey.generate("np", 2).ffx_table()


def test_transform_errors_are_value_errors():
    assert issubclass(TransformError, ValueError)


def test_gather_index_and_its_inverse_compose_to_the_identity():
    key = BlockKey.generate("shf", 4)
    forward, inverse = key.gather_index(16, 24), key.gather_index(16, 24, inverse=True)
    assert np.array_equal(forward[inverse], np.arange(16 * 24 * 3))
    assert not forward.flags.writeable


def test_client_transforms_import_without_torch():
    code = "import sys, seglock.client.transforms; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
