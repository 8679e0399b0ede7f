"""Architectures by name, local weight files only, and named feature-map taps."""

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from seglock.models import ModelError, build_model, list_architectures, taps
from seglock.models.taps import get_tap

NUM_CLASSES = 3
SMALL_VIT = {"image_size": [32, 32], "embed_dim": 32, "depth": 1, "num_heads": 2, "head_channels": 32}
FAST = {
    "tiny": {},
    "vit_seg": SMALL_VIT,
    "deeplabv3_mobilenet_v3_large": {},
    "lraspp_mobilenet_v3_large": {},
    "fcn_resnet50": {},
    "deeplabv3_resnet50": {},
}


def _on_meta(name: str, **kwargs: object) -> nn.Module:
    """The module structure without allocating weights: enough for taps."""
    with torch.device("meta"):
        return build_model(name, NUM_CLASSES, **kwargs)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


# --- building -----------------------------------------------------------------------------------


def test_list_architectures_names_all_eight():
    assert list_architectures() == [
        "deeplabv3_mobilenet_v3_large",
        "deeplabv3_resnet101",
        "deeplabv3_resnet50",
        "fcn_resnet101",
        "fcn_resnet50",
        "lraspp_mobilenet_v3_large",
        "tiny",
        "vit_seg",
    ]


@pytest.mark.parametrize("name", list(FAST))
def test_forward_returns_logits_n_k_h_w_as_a_plain_tensor(name):
    model = build_model(name, NUM_CLASSES, **FAST[name])
    out = _logits(model, torch.randn(2, 3, 32, 32))
    assert type(out) is torch.Tensor
    assert out.shape == (2, NUM_CLASSES, 32, 32)


def test_forward_train_adds_the_aux_logits_of_an_aux_head():
    model = build_model("deeplabv3_mobilenet_v3_large", NUM_CLASSES).train()
    out = model.forward_train(torch.randn(2, 3, 32, 32))
    assert set(out) == {"out", "aux"}
    assert out["aux"].shape == (2, NUM_CLASSES, 32, 32)


def test_forward_train_has_no_aux_without_an_aux_head():
    model = build_model("deeplabv3_mobilenet_v3_large", NUM_CLASSES, aux_loss=False)
    assert set(model.forward_train(torch.randn(2, 3, 32, 32))) == {"out"}


def test_build_model_records_what_rebuilds_it():
    model = build_model("vit_seg", 5, **SMALL_VIT)
    assert model.architecture == "vit_seg"
    assert model.num_classes == 5
    assert model.architecture_kwargs == {
        "image_size": [32, 32],
        "patch_size": 16,
        "embed_dim": 32,
        "depth": 1,
        "num_heads": 2,
        "mlp_ratio": 4.0,
        "head_channels": 32,
        "in_channels": 3,
        "dropout": 0.0,
    }


def test_tiny_width_sets_its_channels():
    model = build_model("tiny", NUM_CLASSES, width=8)
    assert [t.channels for t in taps(model).values()] == [8, 16, 32, 16, 8]


def test_unknown_architecture_is_refused_listing_the_known_ones():
    known = "known: deeplabv3_mobilenet_v3_large, .*, vit_seg"
    with pytest.raises(ModelError, match=f"unknown architecture 'unet'; {known}"):
        build_model("unet", NUM_CLASSES)


def test_unknown_architecture_argument_is_refused_listing_the_known_ones():
    with pytest.raises(ModelError, match="tiny takes no argument 'depth'; it takes: width, in_channels"):
        build_model("tiny", NUM_CLASSES, depth=3)


def test_architecture_argument_of_the_wrong_type_is_refused():
    with pytest.raises(ModelError, match="tiny argument 'width' must look like 16, got '8'"):
        build_model("tiny", NUM_CLASSES, width="8")


@pytest.mark.parametrize("num_classes", [0, -1, 2.0, True])
def test_num_classes_must_be_a_positive_integer(num_classes):
    with pytest.raises(ModelError, match="num_classes must be a positive integer"):
        build_model("tiny", num_classes)


@pytest.mark.parametrize("argument", ["weights", "backbone_weights"])
def test_a_weights_path_that_does_not_exist_is_refused_by_name(tmp_path, argument):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(ModelError, match=f"weights file {missing} does not exist"):
        build_model("fcn_resnet50", NUM_CLASSES, **{argument: missing})


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_round_trips_the_model(tmp_path, suffix):
    torch.manual_seed(0)
    model = build_model("tiny", NUM_CLASSES)
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save(model.state_dict(), path)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(_logits(build_model("tiny", NUM_CLASSES, weights=path), x), _logits(model, x))


def test_weights_file_for_another_class_count_is_refused(tmp_path):
    path = tmp_path / "five.safetensors"
    save_file({k: v.contiguous() for k, v in build_model("tiny", 5).state_dict().items()}, str(path))
    with pytest.raises(ModelError, match=r"do not fit the model: 2 of the wrong shape \(e\.g\. classifier\.bias\)"):
        build_model("tiny", NUM_CLASSES, weights=path)


def test_weights_file_that_is_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=f"weights file {path} is not a readable state dict"):
        build_model("tiny", NUM_CLASSES, weights=path)


def test_backbone_weights_load_from_a_mobilenet_classification_checkpoint(tmp_path):
    torch.manual_seed(0)
    classifier = torchvision.models.mobilenet_v3_large(weights=None)
    path = tmp_path / "mobilenet_v3_large.safetensors"
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(path))
    model = build_model("lraspp_mobilenet_v3_large", NUM_CLASSES, backbone_weights=path)
    source = classifier.state_dict()
    assert all(torch.equal(v, source[f"features.{k}"]) for k, v in model.backbone.state_dict().items())


def test_backbone_weights_load_from_a_resnet_classification_checkpoint(tmp_path):
    torch.manual_seed(0)
    classifier = torchvision.models.resnet50(weights=None)
    path = tmp_path / "resnet50.pth"
    torch.save(classifier.state_dict(), path)
    model = build_model("fcn_resnet50", NUM_CLASSES, backbone_weights=path)
    source = classifier.state_dict()
    assert all(torch.equal(v, source[k]) for k, v in model.backbone.state_dict().items())


def test_backbone_weights_are_refused_for_a_model_without_a_backbone(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_file({"w": torch.zeros(1)}, str(path))
    with pytest.raises(ModelError, match="tiny has no pretrained backbone to load"):
        build_model("tiny", NUM_CLASSES, backbone_weights=path)


def test_vit_seg_refuses_an_input_of_another_size():
    model = build_model("vit_seg", NUM_CLASSES, **SMALL_VIT)
    with pytest.raises(ModelError, match="vit_seg was built for 32x32 inputs, got 64x64"):
        model(torch.randn(1, 3, 64, 64))


def test_vit_seg_refuses_an_image_size_that_patches_do_not_tile():
    with pytest.raises(ModelError, match="image_size 40x32 is not a multiple of patch_size 16"):
        build_model("vit_seg", NUM_CLASSES, **{**SMALL_VIT, "image_size": [40, 32]})


# --- taps ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101"])
def test_resnet_taps_are_paper_000_feature_maps_1_to_6(name):
    head = 512 if name.startswith("fcn") else 256
    found = taps(_on_meta(name))
    assert [(t.name, t.paper_number, t.channels) for t in found.values()] == [
        ("stem", 1, 64),
        ("layer1", 2, 256),
        ("layer2", 3, 512),
        ("layer3", 4, 1024),
        ("layer4", 5, 2048),
        ("head", 6, head),
    ]


def test_resnet_layer_taps_feed_the_next_block_and_its_downsample_conv():
    found = taps(_on_meta("fcn_resnet50", aux_loss=False))
    assert found["stem"].producer == "backbone.maxpool"
    assert found["layer2"].consumers == ("backbone.layer3.0.conv1", "backbone.layer3.0.downsample.0")
    assert found["layer3"].consumers == ("backbone.layer4.0.conv1", "backbone.layer4.0.downsample.0")


def test_resnet_layer3_tap_also_feeds_the_aux_classifier():
    assert taps(_on_meta("fcn_resnet50"))["layer3"].consumers[-1] == "aux_classifier.0"


def test_deeplabv3_layer4_tap_feeds_every_aspp_branch_and_the_pooling_conv():
    assert taps(_on_meta("deeplabv3_resnet50"))["layer4"].consumers == (
        "classifier.0.convs.0.0",
        "classifier.0.convs.1.0",
        "classifier.0.convs.2.0",
        "classifier.0.convs.3.0",
        "classifier.0.convs.4.1",
    )


def test_head_tap_sits_after_the_classifier_relu_before_the_final_conv():
    fcn, deeplab = taps(_on_meta("fcn_resnet50"))["head"], taps(_on_meta("deeplabv3_resnet50"))["head"]
    assert (fcn.producer, fcn.consumers) == ("classifier.2", ("classifier.4",))
    assert (deeplab.producer, deeplab.consumers) == ("classifier.3", ("classifier.4",))


def test_mobilenet_taps_and_their_channels():
    deeplab = taps(_on_meta("deeplabv3_mobilenet_v3_large"))
    lraspp = taps(_on_meta("lraspp_mobilenet_v3_large"))
    blocks = {"features3": 24, "features6": 40, "features10": 80, "features12": 112, "features15": 160,
              "features16": 960}
    assert {n: t.channels for n, t in deeplab.items()} == {**blocks, "head": 256}
    assert {n: t.channels for n, t in lraspp.items()} == blocks
    assert lraspp["features16"].consumers == ("classifier.cbr.0", "classifier.scale.1")
    assert all(t.paper_number is None for t in deeplab.values())


def test_vit_seg_encoder_tap_reindexes_its_final_layernorm():
    tap = taps(build_model("vit_seg", NUM_CLASSES, **SMALL_VIT))["encoder"]
    assert (tap.channels, tap.producer, tap.channelwise) == (32, "to_map", ("norm",))
    assert tap.tensors == (("head.0.weight", 1), ("norm.weight", 0), ("norm.bias", 0))


def test_tiny_taps_are_its_stage_outputs():
    found = taps(build_model("tiny", NUM_CLASSES))
    assert {n: (t.channels, t.consumers) for n, t in found.items()} == {
        "enc1": (16, ("enc2.0",)),
        "enc2": (32, ("enc3.0",)),
        "enc3": (64, ("dec1.1",)),
        "dec1": (32, ("dec2.1",)),
        "dec2": (16, ("classifier",)),
    }


def test_taps_of_a_model_not_built_by_name_are_refused():
    with pytest.raises(ModelError, match="build it with models.build_model"):
        taps(nn.Conv2d(3, 3, 1))


def test_get_tap_names_the_known_taps_for_an_unknown_one():
    with pytest.raises(ModelError, match="vit_seg has no tap 'stem'; its taps: encoder, head"):
        get_tap(build_model("vit_seg", NUM_CLASSES, **SMALL_VIT), "stem")
