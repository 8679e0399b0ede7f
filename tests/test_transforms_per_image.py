"""Per-image encryption without key management (paper 003, section II-B)."""

from __future__ import annotations

import collections
import hashlib

import numpy as np
import pytest

from seglock.client.transforms import PerImageKey, encrypt_per_image
from seglock.client.transforms.per_image import _encrypt_per_image_with_key
from seglock.client.transforms.randomness import random_permutations


def picture(height: int = 32, width: int = 48, batch: int | None = None, seed: int = 0) -> np.ndarray:
    shape = (height, width, 3) if batch is None else (batch, height, width, 3)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def banded_picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Channel c holds values 80c..80c+79 only, so every value names the channel it came from."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 80, size=(height, width, 3)) + 80 * np.arange(3)).astype(np.uint8)


def stream(seed: bytes):
    """A deterministic stand-in for os.urandom, for tests that need repeatable keys."""
    counter = iter(range(10**9))
    return lambda n: hashlib.shake_256(seed + next(counter).to_bytes(8, "little")).digest(n)


def sub_blocks(image: np.ndarray, s: int) -> np.ndarray:
    """(H/S, W/S, 3, S*S): the pixels of each sub-block, per channel."""
    h, w, _ = image.shape
    return image.reshape(h // s, s, w // s, s, 3).transpose(0, 2, 4, 1, 3).reshape(h // s, w // s, 3, s * s)


def test_two_calls_on_the_same_image_differ():
    image = picture()
    assert not np.array_equal(encrypt_per_image(image), encrypt_per_image(image))


@pytest.mark.parametrize("batch", [None, 2], ids=["HWC", "NHWC"])
def test_output_keeps_shape_and_dtype(batch):
    image = picture(batch=batch)
    encrypted = encrypt_per_image(image, block_size=16, sub_block=4)
    assert encrypted.shape == image.shape and encrypted.dtype == np.uint8


@pytest.mark.parametrize("block_size, sub_block", [(16, 16), (16, 8), (16, 4), (16, 1), (8, 2)])
def test_exposed_key_inverts_the_encryption(block_size, sub_block):
    image = picture()
    encrypted, key = _encrypt_per_image_with_key(image, block_size, sub_block)
    assert np.array_equal(key.invert(encrypted), image)
    assert np.array_equal(key.apply(image), encrypted)


def test_exposed_keys_invert_each_image_of_a_batch():
    batch = picture(batch=3)
    encrypted, keys = _encrypt_per_image_with_key(batch, 16, 4)
    assert len(keys) == 3
    assert np.array_equal(np.stack([k.invert(e) for k, e in zip(keys, encrypted, strict=False)]), batch)


@pytest.mark.parametrize("sub_block", [16, 8, 4, 2])
def test_pixels_stay_in_their_sub_block_and_channels_move_together_per_block(sub_block):
    b, s = 16, sub_block
    image = banded_picture(32, 48)
    encrypted = encrypt_per_image(image, block_size=b, sub_block=s)
    plain, shuffled = sub_blocks(image, s), sub_blocks(encrypted, s)
    source_channel = shuffled // 80  # (H/S, W/S, 3, S*S)
    r = b // s
    for by in range(32 // b):
        for bx in range(48 // b):
            block = source_channel[by * r:(by + 1) * r, bx * r:(bx + 1) * r]
            # One channel permutation for the whole block: every pixel of output channel c
            # comes from the same input channel.
            channel_perm = block[0, 0, :, 0]
            assert sorted(channel_perm.tolist()) == [0, 1, 2]
            assert np.all(block == channel_perm[None, None, :, None])
            for sy in range(by * r, (by + 1) * r):
                for sx in range(bx * r, (bx + 1) * r):
                    for c in range(3):
                        assert np.array_equal(np.sort(shuffled[sy, sx, c]),
                                              np.sort(plain[sy, sx, channel_perm[c]]))


def test_every_sub_block_and_channel_gets_its_own_shuffle():
    s = 4
    tile = np.arange(s * s * 3, dtype=np.uint8).reshape(s, s, 3)  # distinct values in a sub-block
    image = np.tile(tile, (8, 8, 1))  # 32 x 32: every sub-block alike
    encrypted = encrypt_per_image(image, block_size=16, sub_block=s)
    shuffles = sub_blocks(encrypted, s)
    orders = {tuple(np.argsort(shuffles[sy, sx, c]).tolist()) for sy in range(8) for sx in range(8) for c in range(3)}
    assert len(orders) > 150  # of 192: equal orders of 16! would be a near-impossible coincidence


def test_channel_permutations_differ_between_blocks():
    image = banded_picture(128, 128)
    encrypted = encrypt_per_image(image, block_size=16, sub_block=4)
    perms = {tuple((encrypted[y, x] // 80).tolist()) for y in range(0, 128, 16) for x in range(0, 128, 16)}
    assert len(perms) > 1


def test_each_image_of_a_batch_gets_its_own_keys():
    batch = np.repeat(picture()[None], 3, axis=0)
    encrypted = encrypt_per_image(batch)
    assert not np.array_equal(encrypted[0], encrypted[1])
    assert not np.array_equal(encrypted[1], encrypted[2])


def test_keys_come_from_the_given_random_source():
    image = picture()
    first, _ = _encrypt_per_image_with_key(image, randbytes=stream(b"a"))
    again, _ = _encrypt_per_image_with_key(image, randbytes=stream(b"a"))
    other, _ = _encrypt_per_image_with_key(image, randbytes=stream(b"b"))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_gather_index_is_a_permutation_and_its_inverse_undoes_it():
    key = PerImageKey.generate(32, 48, 16, 4)
    forward, inverse = key.gather_index(), key.gather_index(inverse=True)
    assert np.array_equal(np.sort(forward), np.arange(32 * 48 * 3))
    assert np.array_equal(forward[inverse], np.arange(32 * 48 * 3))


def test_repr_shows_geometry_only():
    key = PerImageKey.generate(32, 32, 16, 4)
    assert repr(key) == "PerImageKey(height=32, width=32, block_size=16, sub_block=4)"


@pytest.mark.parametrize("image, block_size, sub_block, message", [
    (np.zeros((32, 32, 3), np.uint8), 16, 6, "not divisible by the sub-block size 6"),
    (np.zeros((40, 32, 3), np.uint8), 16, 4, "not divisible by the block size 16"),
    (np.zeros((32, 32, 3), np.float64), 16, 4, "must be uint8"),
    (np.zeros((32, 32), np.uint8), 16, 4, "HWC or NHWC"),
    (np.zeros((32, 32, 1), np.uint8), 16, 4, "3 channels"),
    (np.zeros((32, 32, 3), np.uint8), 0, 4, "positive integer"),
    (np.zeros((32, 32, 3), np.uint8), 16, 0, "positive integer"),
])
def test_bad_input_is_a_value_error(image, block_size, sub_block, message):
    with pytest.raises(ValueError, match=message):
        encrypt_per_image(image, block_size=block_size, sub_block=sub_block)


def test_key_refuses_an_image_of_another_size():
    key = PerImageKey.generate(32, 32, 16, 4)
    with pytest.raises(ValueError, match="for 32x32x3 images"):
        key.apply(picture(32, 48))


# -- the permutation generator behind every key ------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 7, 16, 64, 256, 768, 20000])
def test_random_permutations_are_permutations(n):
    perms = random_permutations(4, n)
    assert perms.shape == (4, n)
    assert all(sorted(row) == list(range(n)) for row in perms.tolist())


@pytest.mark.parametrize("n", [3, 8])
def test_random_permutations_are_uniform(n):
    count = 24000 if n == 3 else 400000
    counts = collections.Counter(map(tuple, random_permutations(count, n).tolist()))
    expected = count / np.prod(np.arange(1, n + 1))
    if n == 3:
        assert len(counts) == 6
        assert all(abs(v - expected) < 0.1 * expected for v in counts.values())
    else:  # 40320 outcomes, about 10 each: a chi-square test with a wide margin
        observed = np.array(list(counts.values()) + [0] * (40320 - len(counts)))
        chi2 = float(((observed - expected) ** 2 / expected).sum())
        assert abs(chi2 - 40319) < 8 * np.sqrt(2 * 40319)


def test_random_permutations_redraw_rows_whose_random_words_collide():
    calls = []

    def zeros_first(n: int) -> bytes:
        calls.append(n)
        return bytes(n) if len(calls) == 1 else stream(b"redraw")(n)

    perms = random_permutations(5, 64, zeros_first)
    assert len(calls) == 2  # all-zero words collide in every row, so all five are drawn again
    assert all(sorted(row) == list(range(64)) for row in perms.tolist())
    assert not all(row == list(range(64)) for row in perms.tolist())


def test_random_permutations_redraw_numbers_past_the_last_multiple_of_n_factorial():
    calls = []

    def top_first(n: int) -> bytes:
        calls.append(n)
        return b"\xff" * n if len(calls) == 1 else stream(b"redraw")(n)

    perms = random_permutations(5, 16, top_first)
    assert calls == [40, 40]  # 2**64 - 1 lies past the last multiple of 16!, so every row is drawn again
    assert all(sorted(row) == list(range(16)) for row in perms.tolist())


@pytest.mark.parametrize("n", [7, 20])
def test_shuffled_permutations_put_every_value_everywhere_evenly(n):
    perms = random_permutations(60000, n)
    for position in (0, n // 2, n - 1):
        share = np.bincount(perms[:, position], minlength=n) / len(perms)
        assert np.abs(share - 1 / n).max() < 0.01

