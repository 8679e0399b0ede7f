"""`seglock demo`: a synthetic picture through every transform, round trips checked, PNGs written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from seglock.app.cli import main
from seglock.app.commands.demo import synthetic_picture

FILES = ("plain.png", "shf.png", "np.png", "ffx.png", "per-image.png")


def test_demo_writes_the_pngs_and_reports_round_trip_ok(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--size", "64", "--block-size", "4"]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("round trip ok")
    for method in ("shf", "np", "ffx", "per-image"):
        assert method in out
    for name in FILES:
        with Image.open(tmp_path / name) as image:
            assert image.size == (64, 64) and image.mode == "RGB"


def test_demo_plain_png_is_the_synthetic_picture(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--size", "32"]) == 0
    capsys.readouterr()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "plain.png")), synthetic_picture(32))


def test_demo_json_lists_every_method_with_timings_and_files(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "new"), "--size", "32", "--block-size", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["round_trip_ok"] is True
    assert (report["size"], report["block_size"]) == (32, 8)
    assert [r["method"] for r in report["results"]] == ["shf", "np", "ffx", "per-image"]
    for result in report["results"]:
        assert result["round_trip_ok"] is True
        assert result["encrypt_ms"] >= 0 and result["decrypt_ms"] >= 0
        assert (tmp_path / "new" / f"{result['method']}.png").is_file()


def test_demo_ffx_png_is_scaled_to_8_bits(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--size", "64"]) == 0
    capsys.readouterr()
    ffx = np.asarray(Image.open(tmp_path / "ffx.png"))
    assert ffx.dtype == np.uint8
    assert ffx.max() > 200  # values up to 999 scaled by 255/999 still reach the top of the range


@pytest.mark.parametrize("argv, message", [
    (["--size", "40"], "multiple of 16"),
    (["--size", "48", "--block-size", "32"], "multiple of 32"),
    (["--block-size", "0"], "must be positive"),
])
def test_demo_rejects_sizes_that_do_not_tile(tmp_path, capsys, argv, message):
    assert main(["demo", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_synthetic_picture_is_deterministic_and_varied():
    picture = synthetic_picture(64)
    assert picture.shape == (64, 64, 3) and picture.dtype == np.uint8
    assert np.array_equal(picture, synthetic_picture(64))
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 20
