"""The shared vocabulary: protection modes and the model-name rule."""

from __future__ import annotations

import json
import re

import pytest

from seglock.client.modes import Mode, check_model_name, is_model_name


def test_mode_values_are_the_stored_strings_in_declaration_order():
    assert [m.value for m in Mode] == ["none", "cp", "shf", "np", "ffx", "per-image"]
    assert [m.name for m in Mode] == ["NONE", "CP", "SHF", "NP", "FFX", "PER_IMAGE"]


@pytest.mark.parametrize(
    ("mode", "is_block", "is_keyed", "has_model_key", "encrypts_input"),
    [
        (Mode.NONE, False, False, False, False),
        (Mode.CP, False, True, True, False),
        (Mode.SHF, True, True, True, True),
        (Mode.NP, True, True, True, True),
        (Mode.FFX, True, True, True, True),
        (Mode.PER_IMAGE, False, True, False, True),
    ],
)
def test_mode_properties(mode, is_block, is_keyed, has_model_key, encrypts_input):
    assert (mode.is_block, mode.is_keyed, mode.has_model_key, mode.encrypts_input) == (
        is_block, is_keyed, has_model_key, encrypts_input)


def test_block_modes_and_parse():
    assert Mode.block_modes() == (Mode.SHF, Mode.NP, Mode.FFX)
    assert Mode.parse("per-image") is Mode.PER_IMAGE
    assert Mode.parse("PER-IMAGE") is None and Mode.parse("") is None and Mode.parse(None) is None
    assert Mode.parse(["cp"]) is None


def test_a_mode_is_its_string():
    assert Mode.CP == "cp" and "cp" == Mode.CP and hash(Mode.CP) == hash("cp")
    assert {"shf": 1}[Mode.SHF] == 1 and Mode.FFX in ("shf", "np", "ffx")
    assert f"{Mode.PER_IMAGE}" == str(Mode.PER_IMAGE) == "per-image"
    assert ", ".join(Mode) == "none, cp, shf, np, ffx, per-image"


def test_json_of_a_manifest_is_unchanged_by_modes(tmp_path):
    plain = {"name": "m", "protection": {"mode": "per-image", "block_size": 16, "sub_block": 4},
             "modes": {"cp": ["cp", "shf"]}}
    typed = {"name": "m", "protection": {"mode": Mode.PER_IMAGE, "block_size": 16, "sub_block": 4},
             "modes": {Mode.CP: [Mode.CP, Mode.SHF]}}
    assert json.dumps(typed) == json.dumps(plain)
    assert json.dumps(typed, indent=2, sort_keys=True) == json.dumps(plain, indent=2, sort_keys=True)
    assert json.dumps(Mode.NP) == '"np"'


def test_a_saved_manifest_stores_the_mode_as_the_plain_string(tmp_path):
    torch = pytest.importorskip("torch")
    from seglock.models import build_model, read_manifest, save_artifact

    torch.manual_seed(0)
    model = build_model("tiny", 3)
    texts = []
    for folder, mode in (("a", Mode.SHF), ("b", "shf")):
        save_artifact(model, tmp_path / folder, name="a", class_names=["x", "y", "z"], input_size=[32, 32],
                      protection={"mode": mode, "block_size": 4})
        text = (tmp_path / folder / "manifest.json").read_text()
        # the creation time and the weights' digest differ between any two saves; the rest is byte-equal
        texts.append(re.sub(r'"(created|sha256)": "[^"]*"', r'"\1": ""', text))
    assert texts[0] == texts[1]
    doc = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert doc["protection"] == {"mode": "shf", "block_size": 4}
    manifest = read_manifest(tmp_path / "a")
    assert manifest.mode is Mode.SHF and manifest.protection["mode"] == "shf"
    assert json.dumps(manifest.to_dict(), sort_keys=True) == json.dumps(doc, sort_keys=True)


# The rule as it was written four times before it had one home.
_OLD_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ACCEPTED = ["a", "Z", "0", "demo-cp", "demo.cp_v2", "A" * 64, "9-._", "a" + "-" * 63]
REFUSED = ["", "-a", ".a", "_a", "a" * 65, "../x", "a/b", "a b", "é", "a\n", "\na", "a\x00", "ä", "a:b"]


@pytest.mark.parametrize("name", ACCEPTED)
def test_the_name_rule_accepts(name):
    assert _OLD_RULE.fullmatch(name)
    assert is_model_name(name) is True
    assert check_model_name(name) == name


@pytest.mark.parametrize("name", REFUSED)
def test_the_name_rule_refuses(name):
    assert not _OLD_RULE.fullmatch(name)
    assert is_model_name(name) is False
    with pytest.raises(ValueError) as caught:
        check_model_name(name)
    assert str(caught.value) == (f"invalid model name {name!r}: use 1-64 characters of letters, digits, "
                                 "'.', '_' and '-', starting with a letter or digit")


@pytest.mark.parametrize("value", [None, 3, b"abc", ["abc"]])
def test_the_name_rule_refuses_non_strings(value):
    assert is_model_name(value) is False
    with pytest.raises(ValueError, match="invalid model name"):
        check_model_name(value)
