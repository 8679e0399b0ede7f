"""Multi-tap CP keys (issue 12): one permutation per tap, exact protect / rekey / fold_key on every
architecture and every tap set tried, version 2 key documents, and version 1 keys that still open.

As in test_protect.py the exactness tests run in float64; "exact" here means the keyed model's
logits are within 1e-4 of the plain model's, relative to their largest magnitude, and the argmax
masks are identical.
"""

import json
import math

import pytest
import torch
from test_protect import SIZE, Zoo, _equal_states, _run

from seglock.keystore import Keystore
from seglock.models import ModelError, build_model, fold_key, load_artifact, protect, rekey, save_artifact, taps
from seglock.models.attacks import key_space
from seglock.models.keyfile import read_key_file, write_key_file
from seglock.models.protect import CPKey, apply_key, bind_key, rekey_state_dict, resolve_taps

RTOL = 1e-4
TAP_SETS = [
    ("tiny", "enc1,enc3,dec1"),
    ("tiny", "enc1,dec2"),
    ("tiny", "all"),
    ("vit_seg", "all"),
    ("lraspp_mobilenet_v3_large", "features3,features16"),
    ("deeplabv3_mobilenet_v3_large", "all"),
    ("fcn_resnet50", "stem,layer4"),
    ("deeplabv3_resnet50", "all"),
]
SLOW = {"deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large"}  # minutes on 2 shared cores; the slow job runs them
CASES = [pytest.param(arch, spec, id=f"{arch}-{spec}", marks=[pytest.mark.slow] if arch in SLOW else [])
         for arch, spec in TAP_SETS]
V1_KEY_FILE = "tests/fixtures/v1-cp.key.json"  # the demo zoo's key file as made before version 2


@pytest.fixture(scope="module")
def zoo() -> Zoo:
    return Zoo()


def _exact(out: torch.Tensor, plain: torch.Tensor) -> bool:
    scale = plain.abs().max().item()
    return (out - plain).abs().max().item() <= RTOL * scale and torch.equal(out.argmax(1), plain.argmax(1))


# --- keys --------------------------------------------------------------------------------------


def test_a_multi_tap_key_holds_one_permutation_per_tap():
    key = CPKey.generate({"enc1": 16, "dec1": 32})
    assert key.taps == ("enc1", "dec1") and key.tap_channels == {"enc1": 16, "dec1": 32}
    assert sorted(key["enc1"].tolist()) == list(range(16)) and sorted(key["dec1"].tolist()) == list(range(32))


def test_multi_tap_key_space_is_the_sum_of_the_taps_log2_factorials():
    key = CPKey.generate({"enc1": 16, "dec1": 32})
    assert key.key_space_log2 == pytest.approx(math.log2(math.factorial(16) * math.factorial(32)), rel=1e-12)


def test_version_2_document_is_the_documented_json():
    key = CPKey({"enc1": [1, 0, 2], "dec1": [0, 2, 1]})
    assert key.to_dict() == {"format": "seglock-cp-key", "version": 2, "taps": {"enc1": [1, 0, 2], "dec1": [0, 2, 1]}}
    assert CPKey.from_json(key.to_json()) == key


def test_version_1_document_reads_as_an_unbound_key_and_keeps_its_document():
    key = CPKey.from_dict({"format": "seglock-cp-key", "version": 1, "perm": [2, 0, 1]})
    assert not key.bound and key.taps == () and key.perm.tolist() == [2, 0, 1]
    assert key.to_dict() == {"format": "seglock-cp-key", "version": 1, "perm": [2, 0, 1]}


def test_a_version_1_key_equals_the_one_tap_key_with_its_permutation():
    assert CPKey([2, 0, 1]) == CPKey({"dec1": [2, 0, 1]})
    assert CPKey([2, 0, 1]) != CPKey({"dec1": [0, 2, 1]})
    assert CPKey([1, 0]) != CPKey({"enc1": [1, 0], "dec1": [1, 0]})


def test_an_unbound_key_binds_to_one_tap_only():
    key = CPKey([2, 0, 1])
    assert key.bind(["dec1"]) == CPKey({"dec1": [2, 0, 1]})
    with pytest.raises(ModelError, match="fits one tap, not 2"):
        key.bind(["enc1", "dec1"])


def test_a_bound_key_refuses_other_taps():
    with pytest.raises(ModelError, match="the key permutes taps enc1, but taps dec1 were asked for"):
        CPKey({"enc1": [1, 0]}).bind(["dec1"])


def test_unknown_versions_and_bad_tap_maps_are_refused_without_echoing():
    with pytest.raises(ModelError, match="version 3 is not supported"):
        CPKey.from_dict({"format": "seglock-cp-key", "version": 3, "taps": {"a": [1, 0]}})
    with pytest.raises(ModelError, match="permutation") as info:
        CPKey.from_dict({"format": "seglock-cp-key", "version": 2, "taps": {"enc1": [7, 7, 7]}})
    assert "7, 7" not in str(info.value)


def test_multi_tap_key_repr_shows_tap_widths_only():
    key = CPKey.generate({"enc1": 16, "dec1": 32})
    assert repr(key) == "CPKey(taps={'enc1': 16, 'dec1': 32})"


def test_perm_of_a_multi_tap_key_asks_for_a_tap():
    with pytest.raises(ModelError, match=r"permutes 2 taps \(enc1, dec1\)"):
        _ = CPKey.generate({"enc1": 16, "dec1": 32}).perm


# --- tap specs ----------------------------------------------------------------------------------


def test_all_names_every_tap_in_network_order():
    model = build_model("tiny", 3)
    assert [t.name for t in resolve_taps(model, "all")] == ["enc1", "enc2", "enc3", "dec1", "dec2"]


def test_a_tap_list_comes_back_in_network_order():
    model = build_model("tiny", 3)
    assert [t.name for t in resolve_taps(model, "dec1, enc1")] == ["enc1", "dec1"]
    assert [t.name for t in resolve_taps(model, ["dec2", "enc2"])] == ["enc2", "dec2"]


@pytest.mark.parametrize("spec, message", [("enc1,enc1", "named twice"), ("enc1,layer4", "has no tap 'layer4'"),
                                           (",", "no tap named")])
def test_bad_tap_specs_are_refused(spec, message):
    with pytest.raises(ModelError, match=message):
        resolve_taps(build_model("tiny", 3), spec)


# --- exactness on every architecture and tap set -------------------------------------------------


@pytest.mark.parametrize("arch, spec", CASES)
def test_protect_at_a_tap_set_keeps_the_plain_function_with_the_key(zoo, arch, spec):
    _, x, plain_out = zoo.plain(arch)
    model = zoo.copy(arch)
    key = protect(model, spec)
    assert key.taps == tuple(t.name for t in resolve_taps(model, spec))
    assert _exact(_run(apply_key(model, spec, key), x), plain_out)
    assert not _exact(_run(model, x), plain_out)


@pytest.mark.parametrize("arch, spec", CASES)
def test_protect_reindexes_each_taps_tensors_by_its_own_permutation(zoo, arch, spec):
    plain = zoo.plain(arch)[0]
    model = zoo.copy(arch)
    key = protect(model, spec)
    before, after = plain.state_dict(), model.state_dict()
    touched = set()
    for tap in resolve_taps(plain, spec):
        index = torch.from_numpy(key[tap.name].copy())
        for name, dim in tap.tensors:
            assert torch.equal(after[name], before[name].index_select(dim, index)), name
            touched.add(name)
    assert all(torch.equal(after[k], before[k]) for k in before.keys() - touched)


@pytest.mark.parametrize("arch, spec", CASES)
def test_rekey_at_a_tap_set_is_exact_and_the_old_key_stops_working(zoo, arch, spec):
    _, x, plain_out = zoo.plain(arch)
    model = zoo.copy(arch)
    old = protect(model, spec)
    new = rekey(model, spec, old)
    assert new.taps == old.taps and new != old
    assert _exact(_run(apply_key(model, spec, new), x), plain_out)
    assert not _exact(_run(apply_key(model, spec, old), x), plain_out)


@pytest.mark.parametrize("arch, spec", CASES)
def test_fold_key_at_a_tap_set_restores_the_plain_weights_bit_for_bit(zoo, arch, spec):
    model = zoo.copy(arch)
    key = protect(model, spec)
    folded = fold_key(model, spec, key)
    assert _equal_states(folded, zoo.plain(arch)[0])


def test_rekey_at_a_tap_set_gives_the_weights_protect_gives_with_the_new_key(zoo):
    rekeyed = zoo.copy("tiny", slot=0)
    new_key = rekey(rekeyed, "all", protect(rekeyed, "all"))
    direct = zoo.copy("tiny", slot=1)
    protect(direct, "all", new_key)
    assert _equal_states(rekeyed, direct)


def test_a_bound_key_names_its_own_taps(zoo):
    _, x, plain_out = zoo.plain("tiny")
    model = zoo.copy("tiny")
    key = protect(model, "enc2,dec1")
    assert _exact(_run(apply_key(model, None, key), x), plain_out)
    assert _exact(_run(fold_key(model, None, key), x), plain_out)


def test_a_key_for_other_taps_is_refused(zoo):
    model = zoo.copy("tiny")
    key = protect(model, "enc2,dec1")
    with pytest.raises(ModelError, match="the key permutes taps enc2, dec1, but taps enc2 were asked for"):
        fold_key(model, "enc2", key)


def test_rekey_state_dict_at_a_tap_set_equals_rekey_in_place():
    torch.manual_seed(0)
    model = build_model("tiny", 3)
    old_key = protect(model, "all")
    new_key = CPKey.for_model(model, "all")
    expected = rekey_state_dict({k: v.clone() for k, v in model.state_dict().items()},
                                list(taps(model).values()), old_key, new_key)
    rekey(model, "all", old_key, new_key)
    assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected)


def test_train_time_keys_at_two_taps_permute_both_feature_maps():
    torch.manual_seed(0)
    model = build_model("tiny", 3).eval()
    key = CPKey.generate({"enc1": 16, "dec1": 32})
    x = torch.randn(2, 3, SIZE, SIZE)
    k1, k2 = (torch.from_numpy(key[t].copy()) for t in ("enc1", "dec1"))
    with torch.no_grad():
        feats = model.dec1(model.enc3(model.enc2(model.enc1(x)[:, k1])))[:, k2]
        logits = torch.nn.functional.interpolate(model.classifier(model.dec2(feats)), size=(SIZE, SIZE),
                                                 mode="bilinear", align_corners=False)
    assert torch.equal(_run(apply_key(model, "enc1,dec1", key), x), logits)


# --- artifacts, key files, keystore ----------------------------------------------------------------


def _save(model, folder, spec):
    return save_artifact(model, folder, name="m", class_names=["a", "b", "c"], input_size=[SIZE, SIZE],
                         protection={"mode": "cp", "tap": spec}, key={"id": "k", "version": 1})


def test_a_multi_tap_manifest_names_the_taps_in_order_with_their_widths(tmp_path):
    model = build_model("tiny", 3)
    protect(model, "all")
    manifest = _save(model, tmp_path / "m", "all")
    assert manifest.protection == {"mode": "cp", "tap": "enc1,enc2,enc3,dec1,dec2", "channels": [16, 32, 64, 32, 16]}
    assert load_artifact(tmp_path / "m")[1].protection == manifest.protection


def test_a_single_tap_manifest_is_unchanged(tmp_path):
    model = build_model("tiny", 3)
    protect(model, "dec1")
    assert _save(model, tmp_path / "m", "dec1").protection == {"mode": "cp", "tap": "dec1", "channels": 32}


def test_a_multi_tap_key_file_round_trips(tmp_path):
    key = CPKey.generate({"enc1": 16, "dec1": 32})
    path = write_key_file(tmp_path / "k.key.json", key, model="m")
    assert read_key_file(path).key == key
    assert json.loads(path.read_text())["material"]["version"] == 2


def test_a_version_1_key_file_still_opens_and_unlocks_its_model():
    found = read_key_file(V1_KEY_FILE)
    model, manifest = load_artifact("models/zoo/demo-plain")
    protected, _ = load_artifact("models/zoo/demo-plain")
    protect(protected, "dec1", found.key)  # the one tap a v1 key binds to
    assert not found.key.bound and found.key.channels == 64
    assert _equal_states(fold_key(protected, "dec1", found.key), model)


def test_the_keystore_accepts_version_2_records_and_still_opens_version_1_records(tmp_path):
    v1 = {"format": "seglock-cp-key", "version": 1, "perm": [1, 0, 2]}
    v2 = CPKey.generate({"enc1": 16, "dec1": 32}).to_dict()
    with Keystore.open(tmp_path, create=True) as store:
        store.add_model_key("old", "cp", v1, activate=True, actor=None)
        store.add_model_key("new", "cp", v2, activate=True, actor=None)
    with Keystore.open(tmp_path) as store:
        assert CPKey.from_dict(store.active_model_key("old").material) == CPKey([1, 0, 2])
        assert CPKey.from_dict(store.active_model_key("new").material).to_dict() == v2


def test_the_keystore_refuses_a_version_2_record_that_is_not_permutations(tmp_path):
    bad = {"format": "seglock-cp-key", "version": 2, "taps": {"enc1": [0, 0]}}
    with Keystore.open(tmp_path, create=True) as store, pytest.raises(ValueError, match="permutation"):
        store.add_model_key("m", "cp", bad, activate=True, actor=None)


def test_bind_key_checks_widths_against_the_model():
    with pytest.raises(ModelError, match="the key has 8 channels but tap 'enc1' has 16"):
        bind_key(build_model("tiny", 3), "enc1,dec1", CPKey.generate({"enc1": 8, "dec1": 32}))


# --- key space ------------------------------------------------------------------------------------


def test_key_space_of_a_tap_set_multiplies_the_taps_key_spaces():
    entry = key_space("cp", channels=[16, 32, 64], tap="enc1,enc2,enc3")
    expected = math.log2(math.factorial(16)) + math.log2(math.factorial(32)) + math.log2(math.factorial(64))
    assert entry["log2"] == pytest.approx(expected, rel=1e-12)
    assert entry["formula"] == "16! * 32! * 64!"


