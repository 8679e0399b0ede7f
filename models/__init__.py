"""seglock models: architectures, feature-map taps, channel permutation (CP) and artifacts.

    model = build_model("deeplabv3_resnet50", num_classes=21)   # random init unless local weights are given
    key = protect(model, "layer4")                               # in place; returns the new CPKey
    new_key = rekey(model, "layer4", key)                        # in place; the old key stops working
    serving = fold_key(model, "layer4", new_key)                 # a plain copy with the key inside
    keyed = apply_key(model, "layer4", new_key)                  # CP at the tap in forward (training, attacks)
    key = protect(other, "stem,layer4")                          # one permutation per tap ("all": every tap)
    key.taps, key["stem"]                                        # ("stem", "layer4"), stem's permutation

`seglock.models.taps` and `seglock.models.protect` here are the functions of those names; import the rest of those
modules with `from seglock.models.taps import Tap` and `from seglock.models.protect import CPKey`.
"""

from seglock.models.architectures import build_model, list_architectures
from seglock.models.artifact import KeyRef, Manifest, load_artifact, read_manifest, save_artifact
from seglock.models.errors import ArtifactError, ModelError
from seglock.models.protect import CPKey, KeyedModel, apply_key, fold_key, protect, rekey, rekey_state_dict
from seglock.models.taps import Tap, get_tap, taps

__all__ = [
    "ArtifactError",
    "CPKey",
    "KeyRef",
    "KeyedModel",
    "Manifest",
    "ModelError",
    "Tap",
    "apply_key",
    "build_model",
    "fold_key",
    "get_tap",
    "list_architectures",
    "load_artifact",
    "protect",
    "read_manifest",
    "rekey",
    "rekey_state_dict",
    "save_artifact",
    "taps",
]
