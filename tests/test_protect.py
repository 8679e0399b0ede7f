"""Channel permutation (paper 000 §III-C2): keys, train-time CP, and exact protect / rekey / fold_key.

The exactness tests run every architecture x tap in float64: the maths is exact, and float64 keeps
float32 rounding (amplified about 1000x through a random ResNet from its stem) out of the comparison.
One float32 test shows the serving dtype is within the same tolerance on `tiny`.
"""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from seglock.models import ModelError, build_model, fold_key, protect, rekey, taps
from seglock.models.protect import CPKey, apply_key, rekey_state_dict

ATOL = 1e-4  # |logit difference| allowed where the maths is exact
SIZE = 32  # input side: the smallest the ResNets keep a spatial map at in layer4 and the head
NUM_CLASSES = 3
ARCH_KWARGS = {"vit_seg": {"image_size": [SIZE, SIZE], "embed_dim": 32, "depth": 1, "num_heads": 2,
                           "head_channels": 32}}
RESNET_TAPS = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
MOBILENET_TAPS = ["features3", "features6", "features10", "features12", "features15", "features16"]
TAP_NAMES = {
    "tiny": ["enc1", "enc2", "enc3", "dec1", "dec2"],
    "vit_seg": ["encoder", "head"],
    "deeplabv3_mobilenet_v3_large": [*MOBILENET_TAPS, "head"],
    "lraspp_mobilenet_v3_large": MOBILENET_TAPS,
    "fcn_resnet50": RESNET_TAPS,
    "deeplabv3_resnet50": RESNET_TAPS,
    "fcn_resnet101": RESNET_TAPS,
    "deeplabv3_resnet101": RESNET_TAPS,
}
CASES = [
    pytest.param(arch, tap, id=f"{arch}-{tap}", marks=[pytest.mark.slow] if "101" in arch else [])
    for arch, names in TAP_NAMES.items()
    for tap in names
]


def _calibrated(model: nn.Module) -> nn.Module:
    """Like a trained model: norm layers with non-trivial affine parameters (a fresh one's are 1 and 0,
    which no permutation changes) and BatchNorm statistics from a few random batches (a fresh net's
    default statistics leave MobileNet's output constant)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None  # a plain average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, SIZE, SIZE))
    return model.eval()


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _substantially_different(out: torch.Tensor, plain: torch.Tensor) -> bool:
    return _max_diff(out, plain) > 0.1 * plain.abs().max().item()


class Zoo:
    """One calibrated float64 plain model per architecture, its input and logits, and scratch copies.

    A scratch copy is refilled with load_state_dict, several times faster than a deepcopy of a ResNet.
    """

    def __init__(self) -> None:
        self._plain: dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]] = {}
        self._scratch: dict[tuple[str, int], nn.Module] = {}

    def plain(self, arch: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        if arch not in self._plain:
            torch.manual_seed(0)
            model = _calibrated(build_model(arch, NUM_CLASSES, **ARCH_KWARGS.get(arch, {}))).double()
            x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
            self._plain[arch] = (model, x, _run(model, x))
        return self._plain[arch]

    def copy(self, arch: str, slot: int = 0) -> nn.Module:
        model = self.plain(arch)[0]
        if (arch, slot) not in self._scratch:
            torch.manual_seed(1)
            self._scratch[arch, slot] = build_model(arch, NUM_CLASSES, **ARCH_KWARGS.get(arch, {})).double().eval()
        scratch = self._scratch[arch, slot]
        scratch.load_state_dict(model.state_dict())
        return scratch


@pytest.fixture(scope="module")
def zoo() -> Zoo:
    return Zoo()


def _equal_states(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- keys -------------------------------------------------------------------------------------


def test_generated_key_is_a_permutation_of_the_channels():
    key = CPKey.generate(2048)
    assert sorted(key.perm.tolist()) == list(range(2048))


def test_generated_keys_differ_between_calls():
    assert CPKey.generate(256) != CPKey.generate(256)


def test_key_space_of_256_channels_is_log2_of_256_factorial():
    # paper 000 §III-E1: 256! is about 2^1684
    assert CPKey.generate(256).key_space_log2 == pytest.approx(1683.9963, abs=1e-4)
    assert CPKey.generate(256).key_space_log2 == pytest.approx(math.log2(math.factorial(256)), rel=1e-12)


def test_key_round_trips_through_json():
    key = CPKey.generate(64)
    assert CPKey.from_json(key.to_json()) == key
    assert json.loads(key.to_json())["perm"] == key.perm.tolist()


def test_key_repr_hides_the_permutation():
    key = CPKey([3, 0, 2, 1])
    assert repr(key) == "CPKey(channels=4)"
    assert str(key) == "CPKey(channels=4)"


def test_key_rejects_a_non_permutation_without_echoing_it():
    with pytest.raises(ModelError, match=r"permutation of 0\.\.3") as info:
        CPKey([0, 1, 1, 3])
    assert "[0, 1, 1, 3]" not in str(info.value)


def test_key_rejects_a_document_of_another_format():
    with pytest.raises(ModelError, match="not a CP key"):
        CPKey.from_dict({"format": "seglock-block-key", "version": 1, "perm": [1, 0]})


def test_key_perm_is_read_only():
    with pytest.raises(ValueError):
        CPKey.generate(8).perm[0] = 0


def test_inverse_key_undoes_the_key():
    key = CPKey.generate(100)
    assert np.array_equal(key.perm[key.inverse().perm], np.arange(100))


# --- train-time CP ----------------------------------------------------------------------------


def test_apply_key_permutes_the_tap_output_as_paper_000_eq_7():
    torch.manual_seed(0)
    model = build_model("tiny", NUM_CLASSES).eval()
    key = CPKey.generate(16)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        permuted = model.enc1(x)[:, torch.from_numpy(key.perm.copy())]  # x'(j) = x(K[j])
        logits = model.classifier(model.dec2(model.dec1(model.enc3(model.enc2(permuted)))))
        expected = F.interpolate(logits, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    assert torch.equal(_run(apply_key(model, "enc1", key), x), expected)


def test_apply_key_is_differentiable_and_trains_the_model():
    torch.manual_seed(0)
    model = build_model("tiny", NUM_CLASSES)
    keyed = apply_key(model, "enc2", CPKey.generate(32))
    before = model.enc2[0].weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = F.cross_entropy(keyed(torch.randn(2, 3, SIZE, SIZE)), torch.randint(0, NUM_CLASSES, (2, SIZE, SIZE)))
    loss.backward()
    optimizer.step()
    assert model.enc1[0].weight.grad.abs().sum() > 0  # the gradient flows back through the permutation
    assert not torch.equal(model.enc2[0].weight, before)


def test_keyed_forward_train_applies_the_key_to_every_output():
    torch.manual_seed(0)
    model = _calibrated(build_model("deeplabv3_mobilenet_v3_large", NUM_CLASSES))
    key = CPKey.generate(40)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        out = apply_key(model, "features6", key).forward_train(x)
    assert set(out) == {"out", "aux"}
    assert torch.equal(out["out"], _run(apply_key(model, "features6", key), x))


def test_keyed_model_keeps_the_key_out_of_its_state_dict():
    model = build_model("tiny", NUM_CLASSES)
    keyed = apply_key(model, "enc1", CPKey.generate(16))
    assert set(keyed.state_dict()) == {f"model.{k}" for k in model.state_dict()}


def test_keyed_model_leaves_no_hook_on_the_model():
    torch.manual_seed(0)
    model = build_model("tiny", NUM_CLASSES).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    plain = _run(model, x)
    _run(apply_key(model, "enc1", CPKey.generate(16)), x)
    assert not model.enc1._forward_hooks
    assert torch.equal(_run(model, x), plain)


def test_apply_key_rejects_a_key_of_another_width():
    with pytest.raises(ModelError, match="the key has 8 channels but tap 'enc1' has 16"):
        apply_key(build_model("tiny", NUM_CLASSES), "enc1", CPKey.generate(8))


def test_protect_rejects_an_unknown_tap_naming_the_taps():
    with pytest.raises(ModelError, match="tiny has no tap 'layer4'; its taps: enc1, enc2, enc3, dec1, dec2"):
        protect(build_model("tiny", NUM_CLASSES), "layer4")


# --- protect / rekey / fold_key, every architecture x tap ---------------------------------------


@pytest.mark.parametrize("arch, tap", CASES)
def test_protect_reindexes_exactly_the_tap_tensors_by_the_key(zoo, arch, tap):
    plain = zoo.plain(arch)[0]
    protected = zoo.copy(arch)
    key = protect(protected, tap)
    found = taps(plain)[tap]
    index = torch.from_numpy(key.perm.copy())
    before, after = plain.state_dict(), protected.state_dict()
    for name, dim in found.tensors:
        assert torch.equal(after[name], before[name].index_select(dim, index)), name
    untouched = before.keys() - {name for name, _ in found.tensors}
    assert all(torch.equal(after[k], before[k]) for k in untouched)


@pytest.mark.parametrize("arch, tap", CASES)
def test_protected_model_with_its_key_computes_the_plain_function(zoo, arch, tap):
    _, x, plain_out = zoo.plain(arch)
    protected = zoo.copy(arch)
    key = protect(protected, tap)
    assert _max_diff(_run(apply_key(protected, tap, key), x), plain_out) <= ATOL


@pytest.mark.parametrize("arch, tap", CASES)
def test_protected_model_without_its_key_does_not(zoo, arch, tap):
    _, x, plain_out = zoo.plain(arch)
    protected = zoo.copy(arch)
    protect(protected, tap)
    assert _substantially_different(_run(protected, x), plain_out)


@pytest.mark.parametrize("arch, tap", CASES)
def test_rekeyed_model_with_the_new_key_computes_the_plain_function(zoo, arch, tap):
    _, x, plain_out = zoo.plain(arch)
    model = zoo.copy(arch)
    new_key = rekey(model, tap, protect(model, tap))
    assert _max_diff(_run(apply_key(model, tap, new_key), x), plain_out) <= ATOL


@pytest.mark.parametrize("arch, tap", CASES)
def test_rekeyed_model_with_the_old_key_does_not(zoo, arch, tap):
    _, x, plain_out = zoo.plain(arch)
    model = zoo.copy(arch)
    old_key = protect(model, tap)
    rekey(model, tap, old_key)
    assert _substantially_different(_run(apply_key(model, tap, old_key), x), plain_out)


@pytest.mark.parametrize("arch, tap", CASES)
def test_rekey_gives_bit_for_bit_the_weights_protect_gives_with_the_new_key(zoo, arch, tap):
    rekeyed = zoo.copy(arch, slot=0)
    new_key = rekey(rekeyed, tap, protect(rekeyed, tap))
    direct = zoo.copy(arch, slot=1)
    protect(direct, tap, new_key)
    assert _equal_states(rekeyed, direct)


@pytest.mark.parametrize("arch, tap", CASES)
def test_fold_key_of_a_protected_model_restores_the_plain_weights_bit_for_bit(zoo, arch, tap):
    protected = zoo.copy(arch)
    key = protect(protected, tap)
    assert _equal_states(fold_key(protected, tap, key), zoo.plain(arch)[0])


@pytest.mark.parametrize("arch, tap", CASES)
def test_folded_model_computes_what_the_keyed_model_computes(zoo, arch, tap):
    _, x, _ = zoo.plain(arch)
    protected = zoo.copy(arch)
    key = protect(protected, tap)
    keyed_out = _run(apply_key(protected, tap, key), x)
    assert _max_diff(_run(fold_key(protected, tap, key), x), keyed_out) <= ATOL


@pytest.mark.parametrize("arch, tap", CASES)
def test_fold_key_leaves_the_protected_model_unchanged(zoo, arch, tap):
    protected = zoo.copy(arch)
    key = protect(protected, tap)
    before = {k: v.clone() for k, v in protected.state_dict().items()}
    fold_key(protected, tap, key)
    assert all(torch.equal(v, before[k]) for k, v in protected.state_dict().items())


@pytest.mark.parametrize("arch", ["fcn_resnet50", "deeplabv3_resnet50"])
def test_protected_aux_head_with_the_key_computes_the_plain_aux_logits(zoo, arch):
    plain, x, _ = zoo.plain(arch)
    protected = zoo.copy(arch)
    key = protect(protected, "layer3")  # layer3 also feeds the aux classifier
    with torch.no_grad():
        aux = apply_key(protected, "layer3", key).forward_train(x)["aux"]
        assert _max_diff(aux, plain.forward_train(x)["aux"]) <= ATOL


# --- the serving dtype and the state-dict form --------------------------------------------------


@pytest.mark.parametrize("tap", TAP_NAMES["tiny"])
def test_protect_is_exact_in_float32_on_tiny(tap):
    torch.manual_seed(0)
    plain = _calibrated(build_model("tiny", NUM_CLASSES))
    x = torch.randn(2, 3, SIZE, SIZE)
    expected = _run(plain, x)
    key = protect(plain, tap)
    assert _max_diff(_run(apply_key(plain, tap, key), x), expected) <= ATOL


def test_rekey_state_dict_equals_rekey_in_place():
    torch.manual_seed(0)
    model = build_model("tiny", NUM_CLASSES)
    old_key = protect(model, "enc3")
    new_key = CPKey.generate(64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = rekey_state_dict(state, taps(model)["enc3"], old_key, new_key)
    rekey(model, "enc3", old_key, new_key)
    assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected)


def test_rekey_returns_a_fresh_key_by_default():
    model = build_model("tiny", NUM_CLASSES)
    old_key = protect(model, "dec1")
    new_key = rekey(model, "dec1", old_key)
    assert new_key != old_key and new_key.channels == 32
