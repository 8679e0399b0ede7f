"""`seglock-client` against a real seglock app on loopback: files written, exit codes, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seglock.client import SegLockClient
from seglock.client.cli import main
from seglock.client.imaging import VOC_COLORMAP
from tests.client_fixtures import hosted, png  # noqa: F401 - hosted is a fixture
from tests.server_fixtures import scene as noise


@pytest.fixture
def env(hosted, monkeypatch):
    monkeypatch.setenv("SEGLOCK_TOKEN", hosted["tokens"]["client"])
    monkeypatch.setenv("SEGLOCK_URL", hosted["url"])
    return hosted


@pytest.fixture
def pictures(tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    images = {"a": noise(0, 48, 40), "b": noise(1, 40, 56), "c": noise(2, 32, 32)}
    for name, image in images.items():
        (folder / f"{name}.png").write_bytes(png(image))
    return folder, images


def one_error_line(captured) -> str:
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("seglock-client: error: "), captured.err
    return lines[0]


def test_models_prints_a_table_and_json(env, capsys):
    assert main(["models"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["NAME", "MODE", "INPUT", "CLASSES", "KEY", "VERSION"]
    assert {line.split()[0]: line.split()[1] for line in table[1:]} == {
        "cp": "cp", "ffx": "ffx", "np": "np", "per-image": "per-image", "plain": "none", "shf": "shf"}
    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in listed] == ["cp", "ffx", "np", "per-image", "plain", "shf"]
    assert listed[-1]["input_size"] == [32, 32] and listed[-1]["protection"]["block_size"] == 4


def test_segment_writes_one_palette_mask_per_image_equal_to_the_sdks(env, pictures, tmp_path, capsys):
    folder, images = pictures
    out = tmp_path / "out"
    assert main(["segment", str(folder / "a.png"), str(folder / "b.png"), "--model", "shf", "--out", str(out),
                 "--overlay"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote 2 masks to {out}"
    with SegLockClient(env["url"], env["tokens"]["client"]) as sdk:
        for name in ("a", "b"):
            written = Image.open(out / f"{name}.png")
            assert written.mode == "P"
            assert np.array_equal(np.asarray(written.getpalette(), np.uint8).reshape(-1, 3), VOC_COLORMAP)
            np.testing.assert_array_equal(np.asarray(written), sdk.segment(images[name], "shf"))
            overlay = np.asarray(Image.open(out / f"{name}_overlay.png"))
            assert overlay.shape == images[name].shape
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "a_overlay.png", "b.png", "b_overlay.png"]


def test_a_folder_stands_for_its_images_and_json_sums_up(env, pictures, tmp_path, capsys):
    folder, images = pictures
    out = tmp_path / "out"
    assert main(["segment", str(folder), "-m", "per-image", "-o", str(out), "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [Path(e["mask"]).name for e in summary["written"]] == ["a.png", "b.png", "c.png"]
    assert summary["failed"] == 0
    for entry, name in zip(summary["written"], "abc", strict=False):
        assert (entry["height"], entry["width"]) == images[name].shape[:2]
        assert sum(entry["pixels"].values()) == entry["height"] * entry["width"]
        assert set(entry["pixels"]) <= {"background", "disc", "square"}


def test_many_images_show_progress_on_stderr(env, pictures, tmp_path, capsys):
    folder, _ = pictures
    assert main(["segment", str(folder), "-m", "plain", "-o", str(tmp_path / "out")]) == 0
    assert "3/3" in capsys.readouterr().err


def test_a_missing_image_is_a_user_error_before_anything_is_sent(env, pictures, tmp_path, capsys):
    folder, _ = pictures
    env["recorder"].clear()
    assert main(["segment", str(folder / "a.png"), str(folder / "nope.png"), "-m", "cp", "-o",
                 str(tmp_path / "out")]) == 2
    assert "no such image" in one_error_line(capsys.readouterr())
    assert env["recorder"].received == [] and not (tmp_path / "out").exists()


def test_an_unreadable_image_is_reported_and_the_others_are_written(env, pictures, tmp_path, capsys):
    folder, _ = pictures
    (folder / "broken.png").write_bytes(b"not a picture")
    out = tmp_path / "out"
    assert main(["segment", str(folder), "-m", "np", "-o", str(out), "-q"]) == 2
    captured = capsys.readouterr()
    assert "broken.png" in one_error_line(captured)
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "c.png"]
    assert "1 image failed" in captured.out


def test_two_images_that_would_write_the_same_mask_are_refused(env, pictures, tmp_path, capsys):
    folder, images = pictures
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.jpg").write_bytes(png(images["a"]))
    assert main(["segment", str(folder / "a.png"), str(other / "a.jpg"), "-m", "cp", "-o", str(tmp_path / "o")]) == 2
    assert "would both write" in one_error_line(capsys.readouterr())


@pytest.mark.parametrize("argv,code,fragment", [
    (["models", "--token", "slk_000000000000_" + "9" * 64], 2, "401 unauthorized"),
    (["segment", "IMG", "-m", "no-such-model", "-o", "OUT"], 2, "404 not_found"),
    (["models", "--url", "http://127.0.0.1:9", "--retries", "0"], 1, "connection_failed"),
    (["segment", "IMG", "-m", "cp", "-o", "OUT", "--concurrency", "0"], 2, "--concurrency"),
])
def test_failures_exit_with_their_code_and_one_line(env, pictures, tmp_path, capsys, argv, code, fragment):
    folder, _ = pictures
    argv = [str(folder / "a.png") if a == "IMG" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == code
    line = one_error_line(capsys.readouterr())
    assert fragment in line and "9" * 64 not in line and env["tokens"]["client"] not in line
    assert not (tmp_path / "out").exists()


def test_no_token_is_a_user_error(env, monkeypatch, capsys):
    monkeypatch.delenv("SEGLOCK_TOKEN")
    assert main(["models"]) == 2
    assert "SEGLOCK_TOKEN" in one_error_line(capsys.readouterr())


@pytest.mark.parametrize("argv", [["--help"], ["models", "--help"], ["segment", "--help"]])
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0 and "usage: seglock-client" in capsys.readouterr().out


def test_no_command_prints_usage_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: seglock-client" in capsys.readouterr().err
