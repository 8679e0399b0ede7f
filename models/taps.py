"""Named feature-map taps: where a channel permutation (CP) can sit, and which layers read it.

A tap is the output of one module (its producer). Its readers are convolutions or linears
(`consumers`: their input channels are re-indexed), possibly behind per-channel layers
(`channelwise`: BatchNorm/LayerNorm, whose per-channel tensors are re-indexed); parameterless
per-channel operations (ReLU, pooling, dropout, upsampling) need nothing. A residual stream is
never a tap: an identity read cannot be re-indexed (paper 000 §IV-B2 on feature maps 2-4).
Every tap below is read only by re-indexable layers, so CP moves into the consumers exactly.

ResNet models (fcn_resnet50/101, deeplabv3_resnet50/101), paper 000 Fig. 4 feature maps 1-6:
    stem    1    64  backbone.maxpool -> layer1.0.conv1, layer1.0.downsample.0
    layer1  2   256  -> layer2.0.conv1, layer2.0.downsample.0
    layer2  3   512  -> layer3.0.conv1, layer3.0.downsample.0
    layer3  4  1024  -> layer4.0.conv1, layer4.0.downsample.0 (+ aux_classifier.0)
    layer4  5  2048  backbone output -> FCN head conv, or the 4 ASPP convs + the ASPP pooling conv
    head    6   512 (FCN) / 256 (DeepLabv3): the classifier's last ReLU -> its final 1x1 conv
MobileNetV3-Large models (deeplabv3_mobilenet_v3_large, lraspp_mobilenet_v3_large): outputs of
the feature blocks whose next block starts with a plain 1x1 conv and has no residual:
    features3 24, features6 40, features10 80, features12 112, features15 160,
    features16 960 (backbone output -> ASPP convs, or LR-ASPP's cbr and scale convs),
    head 256 (deeplabv3 only, as for ResNet)
tiny: enc1 (width), enc2 (2 width), enc3 (4 width), dec1 (2 width), dec2 (width, -> the 1x1 classifier)
vit_seg: encoder (embed_dim: the encoded tokens as a map; its final LayerNorm is channel-wise,
    then head.0), head (head_channels: after the head's ReLU -> its final 1x1 conv)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead
from torchvision.models.segmentation.lraspp import LRASPPHead

from seglock.models.architectures import get_architecture
from seglock.models.errors import ModelError

__all__ = ["DEFAULT_TAPS", "Tap", "default_taps", "get_tap", "taps"]

# The taps `train --protect cp` and `models protect` key when none are named, per architecture family,
# chosen by measuring the thief's advantage (`seglock attack suite`; docs/security.md, docs/reproduction.md).
DEFAULT_TAPS = {"tiny": "all", "resnet": "all", "mobilenet": "all", "vit": "all"}


@dataclass(frozen=True)
class Tap:
    name: str
    channels: int
    producer: str  # module path whose output is the tap
    consumers: tuple[str, ...]  # convs/linears reading it: input channels (dim 1) re-indexed
    channelwise: tuple[str, ...] = ()  # per-channel layers between: their per-channel tensors re-indexed
    paper_number: int | None = None  # paper 000 Fig. 4 feature-map number, where one applies
    tensors: tuple[tuple[str, int], ...] = ()  # (state-dict key, channel dim): everything CP re-indexes


# (name, producer, consumers, channelwise, paper number)
_Spec = tuple[str, str, tuple[str, ...], tuple[str, ...], int | None]


def taps(model: nn.Module) -> dict[str, Tap]:
    """The model's taps by name, in network order."""
    name = getattr(model, "architecture", None)
    if name is None:
        raise ModelError("the model has no architecture name: build it with models.build_model")
    specs = _FAMILIES[get_architecture(name).family](model)
    return {spec[0]: _resolve(model, *spec) for spec in specs}


def default_taps(architecture: str) -> str:
    """The tap set keyed by default for an architecture (a spec for `models.protect.resolve_taps`)."""
    return DEFAULT_TAPS[get_architecture(architecture).family]


def get_tap(model: nn.Module, name: str) -> Tap:
    found = taps(model)
    if name not in found:
        raise ModelError(f"{model.architecture} has no tap {name!r}; its taps: {', '.join(found)}")
    return found[name]


def _resnet(model: nn.Module) -> list[_Spec]:
    specs: list[_Spec] = [("stem", "backbone.maxpool", _block_inputs(model, "backbone.layer1.0"), (), 1)]
    for i in (1, 2, 3):
        consumers = _block_inputs(model, f"backbone.layer{i + 1}.0")
        if i == 3 and model.aux_classifier is not None:
            consumers += ("aux_classifier.0",)
        specs.append((f"layer{i}", f"backbone.layer{i}", consumers, (), i + 1))
    specs.append(("layer4", "backbone.layer4", _classifier_inputs(model), (), 5))
    specs += [(*_head(model), 6)]
    return specs


def _block_inputs(model: nn.Module, path: str) -> tuple[str, ...]:
    """A bottleneck's first conv and its downsample conv (its shortcut is a conv, not an identity)."""
    block = model.get_submodule(path)
    if block.downsample is None:
        raise ModelError(f"{path} has an identity shortcut: its input is not a tap")
    return (f"{path}.conv1", f"{path}.downsample.0")


_MOBILENET_BLOCKS = (3, 6, 10, 12, 15)


def _mobilenet(model: nn.Module) -> list[_Spec]:
    specs: list[_Spec] = []
    for i in _MOBILENET_BLOCKS:
        reader = model.get_submodule(f"backbone.{i + 1}")
        if getattr(reader, "use_res_connect", False):
            raise ModelError(f"backbone.{i + 1} has a residual connection: backbone.{i} is not a tap")
        specs.append((f"features{i}", f"backbone.{i}", (_first_conv(model, f"backbone.{i + 1}"),), (), None))
    specs.append(("features16", "backbone.16", _classifier_inputs(model), (), None))
    if isinstance(model.classifier, DeepLabHead):
        specs.append((*_head(model), None))
    return specs


def _classifier_inputs(model: nn.Module) -> tuple[str, ...]:
    """The convs that read the backbone output, inside whichever head the model has."""
    head = model.classifier
    if isinstance(head, FCNHead):
        return ("classifier.0",)
    if isinstance(head, DeepLabHead):
        # ASPP: four conv branches and the image-pooling branch (pooling is per-channel, its conv reads the tap).
        return tuple(_first_conv(model, f"classifier.0.convs.{i}") for i in range(len(head[0].convs)))
    if isinstance(head, LRASPPHead):
        return ("classifier.cbr.0", "classifier.scale.1")
    raise ModelError(f"unknown classifier {type(head).__name__}")


def _head(model: nn.Module) -> tuple[str, str, tuple[str, ...], tuple[str, ...]]:
    """Paper 000 feature map 6: after the classifier's last ReLU, read by its final 1x1 conv."""
    head = model.classifier
    last = len(head) - 1
    relu = max(i for i, m in enumerate(head) if isinstance(m, nn.ReLU))
    return ("head", f"classifier.{relu}", (f"classifier.{last}",), ())


def _first_conv(model: nn.Module, path: str) -> str:
    for name, module in model.get_submodule(path).named_modules():
        if isinstance(module, nn.Conv2d):
            return f"{path}.{name}"
    raise ModelError(f"{path} has no convolution")


def _tiny(model: nn.Module) -> list[_Spec]:
    reader = {"enc1": "enc2.0", "enc2": "enc3.0", "enc3": "dec1.1", "dec1": "dec2.1", "dec2": "classifier"}
    return [(name, name, (consumer,), (), None) for name, consumer in reader.items()]


def _vit(model: nn.Module) -> list[_Spec]:
    return [("encoder", "to_map", ("head.0",), ("norm",), None), ("head", "head.2", ("head.3",), (), None)]


_FAMILIES = {"resnet": _resnet, "mobilenet": _mobilenet, "tiny": _tiny, "vit": _vit}


def _resolve(
    model: nn.Module,
    name: str,
    producer: str,
    consumers: tuple[str, ...],
    channelwise: tuple[str, ...],
    paper_number: int | None,
) -> Tap:
    """Check every reader can be re-indexed and list the tensors CP touches."""
    model.get_submodule(producer)
    channels = {_consumer_channels(model, path) for path in consumers}
    if len(channels) != 1:
        raise ModelError(f"the consumers of tap {name!r} disagree on its channel count: {sorted(channels)}")
    (c,) = channels
    tensors = [(f"{path}.weight", 1) for path in consumers]
    for path in channelwise:
        tensors += _channelwise_tensors(model, path, c)
    return Tap(name, c, producer, consumers, channelwise, paper_number, tuple(tensors))


def _consumer_channels(model: nn.Module, path: str) -> int:
    module = model.get_submodule(path)
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return module.in_channels
    if isinstance(module, nn.Linear):
        return module.in_features
    raise ModelError(f"{path} ({type(module).__name__}) cannot be re-indexed along its input channels")


def _channelwise_tensors(model: nn.Module, path: str, channels: int) -> list[tuple[str, int]]:
    module = model.get_submodule(path)
    per_channel = (
        isinstance(module, nn.modules.batchnorm._BatchNorm) and module.num_features == channels
    ) or (isinstance(module, nn.LayerNorm) and tuple(module.normalized_shape) == (channels,))
    if not per_channel:
        raise ModelError(f"{path} ({type(module).__name__}) is not a per-channel layer over {channels} channels")
    return [(f"{path}.{key}", 0) for key, t in module.state_dict().items() if tuple(t.shape) == (channels,)]
