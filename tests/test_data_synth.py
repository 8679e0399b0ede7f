"""Synthetic scenes: deterministic, valid masks, every class present, colour not a shortcut."""

import json

import numpy as np
import pytest
from PIL import Image

from seglock.app.cli import main
from seglock.models.data import DatasetError
from seglock.models.data.synth import CLASS_NAMES, MAX_CLASSES, generate_scene, split_stems, write_synth_dataset


def _scenes(seed, n, size, classes):
    pairs = [generate_scene(seed, i, size, classes) for i in range(n)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _run_cli(argv):
    return main(argv)


def test_scene_is_uint8_rgb_with_a_uint8_mask_of_the_same_size():
    image, mask = generate_scene(0, 0, 48)
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8
    assert mask.shape == (48, 48) and mask.dtype == np.uint8


def test_same_seed_and_index_give_the_same_scene():
    a, b = generate_scene(5, 3, 64), generate_scene(5, 3, 64)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_another_seed_or_index_gives_another_scene():
    base = generate_scene(5, 3, 64)[0]
    assert not np.array_equal(base, generate_scene(6, 3, 64)[0])
    assert not np.array_equal(base, generate_scene(5, 4, 64)[0])


def test_same_seed_writes_byte_identical_files_and_another_seed_does_not(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        write_synth_dataset(tmp_path / name, 4, seed, 32)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert a == b
    assert a["images/000000.png"] != c["images/000000.png"]
    assert a["masks/000000.png"] != c["masks/000000.png"]


def test_a_scene_does_not_depend_on_how_many_scenes_are_written(tmp_path):
    write_synth_dataset(tmp_path / "few", 2, 9, 32)
    write_synth_dataset(tmp_path / "many", 5, 9, 32)
    for part in ("images", "masks"):
        for stem in ("000000", "000001"):
            name = f"{part}/{stem}.png"
            assert (tmp_path / "few" / name).read_bytes() == (tmp_path / "many" / name).read_bytes()


@pytest.mark.parametrize("classes", [2, 6, MAX_CLASSES])
def test_masks_hold_only_valid_class_ids_and_never_ignore(classes):
    _, masks = _scenes(0, 10, 48, classes)
    assert set(np.unique(masks).tolist()) <= set(range(classes))


@pytest.mark.parametrize("classes, scenes", [(6, 8), (MAX_CLASSES, 20)])
def test_every_class_appears_across_a_small_set(classes, scenes):
    _, masks = _scenes(0, scenes, 64, classes)
    assert np.unique(masks).tolist() == list(range(classes))


def test_colour_alone_does_not_predict_the_class():
    # Fit the best colour -> class lookup on object pixels of one set; score it on another.
    def colour_bins(images):
        q = images.astype(np.int64) // 32
        return (q[..., 0] * 64 + q[..., 1] * 8 + q[..., 2]).ravel()

    classes = 6
    images, masks = _scenes(3, 24, 64, classes)
    test_images, test_masks = _scenes(4, 24, 64, classes)
    bins, labels = colour_bins(images), masks.ravel()
    objects = labels > 0
    counts = np.zeros((512, classes), dtype=np.int64)
    np.add.at(counts, (bins[objects], labels[objects]), 1)
    lookup = counts.argmax(axis=1)
    test_bins, test_labels = colour_bins(test_images), test_masks.ravel()
    test_objects = test_labels > 0
    accuracy = (lookup[test_bins[test_objects]] == test_labels[test_objects]).mean()
    assert accuracy < 0.35  # a colour-coded data set would score near 1


def test_each_object_class_is_drawn_in_several_palette_colours():
    images, masks = _scenes(0, 30, 64, 6)
    for cls in range(1, 6):
        pixels = images[masks == cls].astype(np.int64) // 64
        codes, counts = np.unique(pixels[:, 0] * 16 + pixels[:, 1] * 4 + pixels[:, 2], return_counts=True)
        assert (counts > 0.05 * counts.sum()).sum() >= 3, CLASS_NAMES[cls]


def test_writer_makes_the_folder_layout(tmp_path):
    classes = 4
    summary = write_synth_dataset(tmp_path, 10, 0, 32, classes, 0.2)
    stems = [f"{i:06d}" for i in range(10)]
    assert sorted(p.stem for p in (tmp_path / "images").iterdir()) == stems
    assert sorted(p.stem for p in (tmp_path / "masks").iterdir()) == stems
    assert json.loads((tmp_path / "classes.json").read_text()) == list(CLASS_NAMES[:classes])
    splits = json.loads((tmp_path / "splits.json").read_text())
    assert len(splits["val"]) == 2 and sorted(splits["train"] + splits["val"]) == stems
    with Image.open(tmp_path / "images/000000.png") as img:
        assert (img.mode, img.size) == ("RGB", (32, 32))
    with Image.open(tmp_path / "masks/000000.png") as mask:
        assert (mask.mode, mask.size) == ("L", (32, 32))
    assert (summary["scenes"], summary["train"], summary["val"]) == (10, 8, 2)
    assert sum(summary["class_pixel_share"]) == pytest.approx(1.0, abs=1e-5)


def test_split_keeps_one_val_scene_for_a_small_positive_fraction_and_none_for_zero():
    stems = [str(i) for i in range(5)]
    assert len(split_stems(stems, 0, 0.1)["val"]) == 1
    assert split_stems(stems, 0, 0.0) == {"train": stems, "val": []}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_classes": MAX_CLASSES + 1}, "number of classes"),
        ({"num_classes": 1}, "number of classes"),
        ({"size": 8}, "scene size"),
        ({"n": 0}, "number of scenes"),
        ({"seed": -1}, "seed"),
        ({"val_fraction": 1.0}, "validation fraction"),
    ],
)
def test_bad_parameters_are_refused(tmp_path, kwargs, message):
    params = {"n": 2, "seed": 0, "size": 32, **kwargs}
    with pytest.raises(DatasetError, match=message):
        write_synth_dataset(tmp_path, **params)


def test_writer_refuses_an_existing_data_set_unless_forced_and_then_drops_stale_scenes(tmp_path):
    write_synth_dataset(tmp_path, 3, 0, 32)
    with pytest.raises(DatasetError, match="already holds a data set"):
        write_synth_dataset(tmp_path, 2, 0, 32)
    write_synth_dataset(tmp_path, 2, 0, 32, force=True)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["000000.png", "000001.png"]


def test_cli_synth_writes_the_layout_and_prints_a_json_summary(tmp_path, capsys):
    out = tmp_path / "synth"
    argv = ["data", "synth", "--out", str(out), "--n", "5", "--seed", "3", "--size", "32", "--classes", "5"]
    assert _run_cli(argv + ["--val-fraction", "0.4", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["scenes"], summary["seed"], summary["size"], summary["val"]) == (5, 3, 32, 2)
    assert summary["classes"] == list(CLASS_NAMES[:5])
    assert len(list((out / "masks").glob("*.png"))) == 5
    assert (out / "splits.json").is_file()


def test_cli_synth_reports_user_errors_as_one_line_and_exit_code_2(tmp_path, capsys):
    argv = ["data", "synth", "--out", str(tmp_path), "--n", "2", "--size", "32"]
    assert _run_cli(argv) == 0
    capsys.readouterr()
    assert _run_cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("seglock: error: ") and "--force" in err and err.count("\n") == 1
    assert _run_cli(argv + ["--force", "--classes", "11"]) == 2
    assert "number of classes" in capsys.readouterr().err


def test_cli_info_summarises_a_folder_data_set(tmp_path, capsys):
    write_synth_dataset(tmp_path, 4, 0, 32, 3, 0.25)
    assert _run_cli(["data", "info", str(tmp_path), "--split", "val", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["kind"], summary["split"], summary["samples"]) == ("folder", "val", 1)
    assert summary["classes"] == ["background", "disc", "square"]


def test_cli_info_on_a_directory_of_no_known_format_is_a_cli_error(tmp_path, capsys):
    assert _run_cli(["data", "info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seglock: error: ") and "cannot tell the data format" in err
