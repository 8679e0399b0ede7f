"""The texture-mosaic data set: real photographs from scikit-image, exact masks, held-out val regions."""

import builtins
import json
import sys

import numpy as np
import pytest
from PIL import Image

from seglock.app.cli import main
from seglock.models.data import DatasetError, open_dataset, textures
from seglock.models.data.textures import (
    CLASS_NAMES,
    CLUTTER_PHOTOS,
    generate_texture_scene,
    source_regions,
    split_of,
    write_textures_dataset,
)

pytest.importorskip("skimage")


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _inside(box, region):
    x0, y0, x1, y1 = box
    rx0, ry0, rx1, ry1 = region
    return rx0 <= x0 and ry0 <= y0 and x1 <= rx1 and y1 <= ry1


def test_scene_is_uint8_rgb_with_a_mask_of_the_same_size_and_only_the_six_classes():
    image, mask = generate_texture_scene(1, 0, 32, "train")
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert mask.shape == (32, 32) and mask.dtype == np.uint8
    masks = np.stack([generate_texture_scene(1, i, 32, "train")[1] for i in range(30)])
    assert np.unique(masks).tolist() == list(range(len(CLASS_NAMES)))  # every class, never 255


def test_same_seed_writes_byte_identical_files_and_another_seed_does_not(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        write_textures_dataset(tmp_path / name, 5, seed, 24)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert a == b
    assert a["images/000000.png"] != c["images/000000.png"]
    assert json.loads(a["classes.json"]) == list(CLASS_NAMES)


def test_each_masked_region_holds_the_pixels_of_its_class_photo(monkeypatch):
    # Crops come from the class's own photo, and re-rendering the scene with one class's photo
    # replaced changes exactly the pixels that the mask gives to that class.
    provenance = []
    image, mask = generate_texture_scene(3, 6, 48, "train", provenance=provenance)
    assert provenance[0][0] == 0 and provenance[0][1] in CLUTTER_PHOTOS
    for cls, name, *_ in provenance[1:]:
        assert name == textures._CLASS_SOURCES[CLASS_NAMES[cls]][0]
    present = sorted(set(np.unique(mask).tolist()) - {0})
    assert len(present) >= 2, "scene 6 of seed 3 at 48 px shows several classes"
    real_photo = textures._photo
    for cls in [0, *present]:
        photo = {c: name for c, name, *_ in provenance}[cls]

        def inverted(name, photo=photo):
            return 255.0 - real_photo(name) if name == photo else real_photo(name)

        monkeypatch.setattr(textures, "_photo", inverted)
        recoloured, same_mask = generate_texture_scene(3, 6, 48, "train")
        assert np.array_equal(same_mask, mask)
        changed = np.any(recoloured != image, axis=-1)
        assert not changed[mask != cls].any()
        assert changed[mask == cls].mean() > 0.95  # inverted texture: all but grey-ish pixels move
    monkeypatch.setattr(textures, "_photo", real_photo)


def test_train_and_val_crops_come_from_disjoint_source_regions():
    for photo in [name for name, _ in textures._CLASS_SOURCES.values()] + list(CLUTTER_PHOTOS):
        for a in source_regions(photo, "train"):
            for b in source_regions(photo, "val"):
                overlap_x = min(a[2], b[2]) - max(a[0], b[0])
                overlap_y = min(a[3], b[3]) - max(a[1], b[1])
                assert overlap_x <= 0 or overlap_y <= 0, (photo, a, b)
    for split in ("train", "val"):
        for index in range(25):
            provenance = []
            generate_texture_scene(4, index, 32, split, provenance=provenance)
            for _, photo, *box in provenance:
                assert any(_inside(box, region) for region in source_regions(photo, split)), (split, photo, box)


def test_splits_json_matches_the_scenes_regions(tmp_path):
    summary = write_textures_dataset(tmp_path / "d", 20, 5, 24, val_fraction=0.25)
    splits = json.loads((tmp_path / "d" / "splits.json").read_text())
    assert (summary["train"], summary["val"]) == (15, 5) == (len(splits["train"]), len(splits["val"]))
    kinds = split_of(5, 20, 0.25)
    assert splits["val"] == [f"{i:06d}" for i in range(20) if kinds[i] == "val"]
    stem = splits["val"][0]
    image = np.asarray(Image.open(tmp_path / "d" / "images" / f"{stem}.png"))
    assert np.array_equal(image, generate_texture_scene(5, int(stem), 24, "val")[0])
    assert abs(sum(summary["class_pixel_share"]) - 1.0) < 1e-4
    dataset = open_dataset(tmp_path / "d", "val", size=None)  # the folder loader reads it unchanged
    assert len(dataset) == 5 and dataset.classes == list(CLASS_NAMES)


def test_refuses_a_non_empty_folder_without_force(tmp_path):
    write_textures_dataset(tmp_path, 2, 1, 24)
    with pytest.raises(DatasetError, match="--force"):
        write_textures_dataset(tmp_path, 2, 1, 24)
    write_textures_dataset(tmp_path, 1, 2, 24, force=True)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["000000.png"]


def test_bad_parameters_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="at least 16"):
        write_textures_dataset(tmp_path / "a", 2, 1, 8)
    with pytest.raises(DatasetError, match="at least 1"):
        write_textures_dataset(tmp_path / "b", 0, 1, 24)
    with pytest.raises(DatasetError, match=r"\[0, 1\)"):
        write_textures_dataset(tmp_path / "c", 2, 1, 24, val_fraction=1.0)


def test_cli_writes_the_set_and_refuses_a_second_time(tmp_path, capsys):
    out = tmp_path / "tex"
    args = ["data", "textures", "--out", str(out), "--n", "3", "--size", "24", "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["scenes"] == 3 and summary["classes"] == list(CLASS_NAMES)
    assert main(args) != 0
    err = capsys.readouterr().err.strip()
    assert "--force" in err and len(err.splitlines()) == 1


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "textures", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--out", "--n", "--seed", "--size", "--val-fraction", "--force"):
        assert flag in text


def test_missing_scikit_image_names_the_extra(tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_skimage(name, *args, **kwargs):
        if name == "skimage" or name.startswith("skimage."):
            raise ImportError("No module named 'skimage'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "skimage", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_skimage)
    assert main(["data", "textures", "--out", str(tmp_path / "x"), "--n", "2", "--size", "24"]) != 0
    err = capsys.readouterr().err.strip()
    assert "scikit-image" in err and "seglock[data]" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()
