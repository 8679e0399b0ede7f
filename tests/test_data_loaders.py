"""Data set loaders (folder, VOC2012, Cityscapes) and augmentation, on fixtures in the real layouts."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from seglock.models.data import (
    CityscapesDataset,
    DatasetError,
    FolderDataset,
    RandomResizedCropFlip,
    VOC2012Dataset,
    detect_format,
    open_dataset,
    write_synth_dataset,
)

VOC_TRAIN_IDS = [f"2007_{i:06d}" for i in range(1464)]
VOC_VAL_IDS = ["2008_000001", "2008_000002"]
# Cityscapes labelId -> trainId, written out from cityscapesScripts' labels.py for ids 0..33.
CITYSCAPES_TRAIN_IDS = (
    [255] * 7 + [0, 1, 255, 255, 2, 3, 4, 255, 255, 255, 5, 255, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    + [255, 255, 16, 17, 18]
)
SIMPLEX = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0)], dtype=np.uint8)


def _voc_palette():
    # VOC's bit-interleaved colour map: only the indices matter to the loader.
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def _voc_mask(index):
    mask = np.full((4, 6), index % 21, dtype=np.uint8)
    mask[0, 0] = 255  # VOC's object borders
    return mask


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    voc = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True)
    palette = _voc_palette()
    image = Image.fromarray(np.full((4, 6, 3), 128, dtype=np.uint8))
    for index, stem in enumerate(VOC_TRAIN_IDS + VOC_VAL_IDS):
        image.save(voc / "JPEGImages" / f"{stem}.jpg")
        mask = Image.fromarray(_voc_mask(index), mode="P")
        mask.putpalette(palette)
        mask.save(voc / "SegmentationClass" / f"{stem}.png")
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(VOC_TRAIN_IDS) + "\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(VOC_VAL_IDS) + "\n")
    return root


def _cityscapes(root, split="val"):
    label_ids = np.array(list(range(34)) + [34, 40], dtype=np.uint8).reshape(4, 9)
    for city, frame in (("aachen", "000000_000019"), ("bonn", "000001_000042")):
        (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
        (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
        image = np.random.default_rng(0).integers(0, 256, (4, 9, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "leftImg8bit" / split / city / f"{city}_{frame}_leftImg8bit.png")
        Image.fromarray(label_ids).save(root / "gtFine" / split / city / f"{city}_{frame}_gtFine_labelIds.png")
        Image.fromarray(label_ids).save(root / "gtFine" / split / city / f"{city}_{frame}_gtFine_color.png")
    return root


@pytest.fixture
def synth_root(tmp_path):
    write_synth_dataset(tmp_path, 6, 0, 32, 4, 0.34)
    return tmp_path


def _read(path):
    with Image.open(path) as img:
        return np.asarray(img)


# --- folder format ---------------------------------------------------------------------------


def test_folder_items_are_the_files_as_uint8_hwc_and_int64_masks(synth_root):
    dataset = FolderDataset(synth_root, size=None)
    assert len(dataset) == 6 and dataset.classes == ["background", "disc", "square", "triangle"]
    image, mask = dataset[2]
    assert image.dtype == torch.uint8 and image.shape == (32, 32, 3)
    assert mask.dtype == torch.int64 and mask.shape == (32, 32)
    assert np.array_equal(image.numpy(), _read(synth_root / "images/000002.png"))
    assert np.array_equal(mask.numpy(), _read(synth_root / "masks/000002.png"))


def test_folder_items_are_resized_to_a_fixed_size_with_nearest_masks(synth_root):
    image, mask = FolderDataset(synth_root, size=(16, 24))[0]
    assert image.shape == (16, 24, 3) and mask.shape == (16, 24)
    original = _read(synth_root / "masks/000000.png")
    expected = np.asarray(Image.fromarray(original).resize((24, 16), Image.Resampling.NEAREST))
    assert np.array_equal(mask.numpy(), expected)


def test_folder_default_size_is_256(synth_root):
    image, mask = FolderDataset(synth_root)[0]
    assert image.shape == (256, 256, 3) and mask.shape == (256, 256)


def test_folder_splits_come_from_splits_json(synth_root):
    splits = json.loads((synth_root / "splits.json").read_text())
    assert FolderDataset(synth_root, "train").stems == splits["train"]
    assert FolderDataset(synth_root, "val").stems == splits["val"]
    assert FolderDataset(synth_root, "all").stems == [f"{i:06d}" for i in range(6)]


def test_folder_accepts_classes_json_as_an_object(synth_root):
    (synth_root / "classes.json").write_text(json.dumps({"classes": ["bg", "a", "b", "c"]}))
    assert FolderDataset(synth_root).classes == ["bg", "a", "b", "c"]


def test_folder_without_images_names_the_expected_layout(tmp_path):
    expected = r"no images/ folder in .*: expected the folder format of `seglock data synth`"
    with pytest.raises(DatasetError, match=expected):
        FolderDataset(tmp_path)


def test_missing_data_directory_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        FolderDataset(tmp_path / "nowhere")


def test_folder_without_classes_json_is_an_error(synth_root):
    (synth_root / "classes.json").unlink()
    with pytest.raises(DatasetError, match="no classes.json"):
        FolderDataset(synth_root)


def test_images_without_masks_are_listed_first_few_then_counted(synth_root):
    for i in range(1, 6):
        (synth_root / f"masks/{i:06d}.png").unlink()
    with pytest.raises(DatasetError, match=r"5 images have no mask .*: 000001, 000002, 000003, 000004, 000005$"):
        FolderDataset(synth_root)
    for i in range(6, 9):
        shutil.copy(synth_root / "images/000000.png", synth_root / f"images/{i:06d}.png")
    with pytest.raises(DatasetError, match=r"8 images have no mask .*\(and 3 more\)"):
        FolderDataset(synth_root)


def test_masks_without_images_are_an_error(synth_root):
    (synth_root / "images/000004.png").unlink()
    with pytest.raises(DatasetError, match="1 masks have no image .*: 000004"):
        FolderDataset(synth_root)


def test_split_without_splits_json_is_an_error(synth_root):
    (synth_root / "splits.json").unlink()
    with pytest.raises(DatasetError, match="no splits.json"):
        FolderDataset(synth_root, "train")


def test_unknown_split_is_an_error(synth_root):
    with pytest.raises(DatasetError, match="unknown split 'test'"):
        FolderDataset(synth_root, "test")


def test_rgb_mask_is_refused_on_load(synth_root):
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(synth_root / "masks/000001.png")
    with pytest.raises(DatasetError, match="single-channel"):
        FolderDataset(synth_root)[1]


def test_mask_class_beyond_classes_json_is_refused_on_load(synth_root):
    Image.fromarray(np.full((32, 32), 7, dtype=np.uint8)).save(synth_root / "masks/000001.png")
    with pytest.raises(DatasetError, match="holds class 7 but the data set has 4 classes"):
        FolderDataset(synth_root)[1]


def test_image_and_mask_of_different_sizes_are_refused_on_load(synth_root):
    Image.fromarray(np.zeros((16, 32), dtype=np.uint8)).save(synth_root / "masks/000001.png")
    with pytest.raises(DatasetError, match="image is 32x32 but mask is 32x16"):
        FolderDataset(synth_root)[1]


# --- VOC2012 ---------------------------------------------------------------------------------


def test_voc_masks_are_palette_indices_with_255_borders(voc_root):
    dataset = VOC2012Dataset(voc_root, "train", size=None)
    assert dataset.num_classes == 21 and dataset.classes[15] == "person"
    image, mask = dataset[5]
    assert image.shape == (4, 6, 3) and image.dtype == torch.uint8
    assert np.array_equal(mask.numpy(), _voc_mask(5))


def test_voc_splits_follow_the_list_files_in_file_order(voc_root):
    assert VOC2012Dataset(voc_root, "train").stems == VOC_TRAIN_IDS
    assert VOC2012Dataset(voc_root, "val").stems == VOC_VAL_IDS


def test_voc_paper_split_is_first_1318_and_last_146_of_train_txt(voc_root):
    train, val = VOC2012Dataset(voc_root, "train-1318"), VOC2012Dataset(voc_root, "val-146")
    assert train.stems == VOC_TRAIN_IDS[:1318] and val.stems == VOC_TRAIN_IDS[1318:]
    assert (len(train), len(val)) == (1318, 146)


def test_voc_root_may_be_the_voc2012_folder_itself(voc_root):
    assert VOC2012Dataset(voc_root / "VOCdevkit" / "VOC2012", "val").stems == VOC_VAL_IDS


def test_voc_paper_split_needs_the_full_train_list(tmp_path):
    voc = tmp_path / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "SegmentationClass").mkdir()
    (voc / "ImageSets/Segmentation").mkdir(parents=True)
    (voc / "ImageSets/Segmentation/train.txt").write_text("a\nb\n")
    with pytest.raises(DatasetError, match="lists 2 ids; the val-146 split needs VOC2012's 1464-image train.txt"):
        VOC2012Dataset(tmp_path, "val-146")


def test_voc_missing_images_are_listed(voc_root, tmp_path):
    voc = tmp_path / "VOC2012"
    shutil.copytree(voc_root / "VOCdevkit/VOC2012/ImageSets", voc / "ImageSets")
    (voc / "JPEGImages").mkdir()
    (voc / "SegmentationClass").mkdir()
    expected = r"2 images of split 'val' missing from .*JPEGImages: 2008_000001, 2008_000002"
    with pytest.raises(DatasetError, match=expected):
        VOC2012Dataset(tmp_path, "val")


def test_voc_layout_missing_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="no VOC2012 layout"):
        VOC2012Dataset(tmp_path, "train")


def test_voc_unknown_split_is_an_error(voc_root):
    with pytest.raises(DatasetError, match="unknown VOC split 'test'"):
        VOC2012Dataset(voc_root, "test")


# --- Cityscapes ------------------------------------------------------------------------------


def test_cityscapes_label_ids_map_to_the_19_train_ids(tmp_path):
    dataset = CityscapesDataset(_cityscapes(tmp_path), "val", size=None)
    assert dataset.num_classes == 19 and dataset.classes[13] == "car"
    assert dataset.stems == ["aachen_000000_000019", "bonn_000001_000042"]
    _, mask = dataset[1]
    assert mask.numpy().ravel().tolist() == CITYSCAPES_TRAIN_IDS + [255, 255]


def test_cityscapes_images_are_the_left_8bit_files(tmp_path):
    root = _cityscapes(tmp_path)
    image, _ = CityscapesDataset(root, "val", size=None)[0]
    expected = _read(root / "leftImg8bit/val/aachen/aachen_000000_000019_leftImg8bit.png")
    assert np.array_equal(image.numpy(), expected)


def test_cityscapes_missing_label_file_is_listed(tmp_path):
    root = _cityscapes(tmp_path)
    (root / "gtFine/val/bonn/bonn_000001_000042_gtFine_labelIds.png").unlink()
    with pytest.raises(DatasetError, match="1 images have no \\*_gtFine_labelIds.png .*: bonn_000001_000042"):
        CityscapesDataset(root, "val")


def test_cityscapes_missing_split_folder_is_an_error(tmp_path):
    root = _cityscapes(tmp_path)
    with pytest.raises(DatasetError, match="no leftImg8bit/train/ folder"):
        CityscapesDataset(root, "train")


# --- format detection ------------------------------------------------------------------------


def test_format_is_detected_from_the_layout(synth_root, voc_root, tmp_path):
    cityscapes = _cityscapes(tmp_path / "cs")
    assert [detect_format(r) for r in (synth_root, voc_root, cityscapes)] == ["folder", "voc", "cityscapes"]
    assert isinstance(open_dataset(cityscapes, "val"), CityscapesDataset)


# --- augmentation ----------------------------------------------------------------------------


def _blocks(seed=0):
    """A 64x48 image of 8-pixel cells in four simplex colours and its colour-index mask."""
    cells = np.random.default_rng(seed).integers(0, 4, size=(8, 6))
    mask = np.kron(cells, np.ones((8, 8), dtype=np.int64)).astype(np.uint8)
    return SIMPLEX[mask], mask


def test_augmentation_keeps_image_and_mask_aligned():
    image, mask = _blocks()
    augment = RandomResizedCropFlip(scale=(0.2, 1.0))
    for seed in range(20):
        out_image, out_mask = augment(image, mask, (40, 40), np.random.default_rng(seed))
        assert out_image.shape == (40, 40, 3) and out_mask.shape == (40, 40)
        # Bilinear blends of these colours are never one of them, so exact colours are cell interiors.
        match = (out_image[:, :, None, :] == SIMPLEX[None, None]).all(axis=-1)
        exact = match.any(axis=-1)
        assert exact.mean() > 0.5
        assert np.array_equal(match.argmax(axis=-1)[exact], out_mask[exact])


def test_full_crop_with_certain_flip_mirrors_both():
    image, mask = _blocks()
    augment = RandomResizedCropFlip(scale=(1.0, 1.0), ratio=(48 / 64, 48 / 64), flip_p=1.0)
    out_image, out_mask = augment(image, mask, None, np.random.default_rng(0))
    assert np.array_equal(out_image, image[:, ::-1]) and np.array_equal(out_mask, mask[:, ::-1])


def test_augmentation_is_deterministic_with_a_given_generator():
    image, mask = _blocks()
    augment = RandomResizedCropFlip()
    runs = [augment(image, mask, 32, np.random.default_rng(s)) for s in (7, 7, 8)]
    assert np.array_equal(runs[0][0], runs[1][0]) and np.array_equal(runs[0][1], runs[1][1])
    assert not np.array_equal(runs[0][0], runs[2][0])


def test_augmentation_accepts_a_seeded_torch_generator():
    image, mask = _blocks()
    augment = RandomResizedCropFlip()
    a = augment(image, mask, 32, torch.Generator().manual_seed(3))
    b = augment(image, mask, 32, torch.Generator().manual_seed(3))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_augmented_dataset_items_repeat_with_a_seed_and_change_with_the_epoch(synth_root):
    dataset = FolderDataset(synth_root, size=24, augment=RandomResizedCropFlip(), seed=11)
    first, again = dataset[0], dataset[0]
    assert first[0].shape == (24, 24, 3) and first[1].dtype == torch.int64
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    dataset.set_epoch(1)
    assert not torch.equal(first[0], dataset[0][0])


def test_bad_augmentation_parameters_are_refused():
    with pytest.raises(DatasetError, match="crop scale"):
        RandomResizedCropFlip(scale=(0.0, 1.0))
    with pytest.raises(DatasetError, match="flip probability"):
        RandomResizedCropFlip(flip_p=1.5)
