"""benchmarks/reproduce.py: the whole pipeline at the smallest scale, from data to report.

The smoke run (32 px, 1 epoch, two taps, one block size) takes about 2 s on 2 idle cores, so it is
not marked slow.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce.py"
SMOKE = [
    "--quick", "--scenes", "16", "--classes", "3", "--size", "32", "--epochs", "1", "--taps", "enc3,dec2",
    "--block-sizes", "2", "--sub-blocks", "16", "--eval-random-keys", "2", "--attack-random-keys", "3",
    "--fractions", "0.1", "--finetune-epochs", "1", "--reference-epochs", "1", "--threads", "2",
]


def _load_script():
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script loads
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce") / "runs"
    reproduce = _load_script()
    assert reproduce.main([*SMOKE, "--out", str(out)]) == 0
    return out


def test_quick_smoke_writes_every_result_and_the_report(smoke):
    evaluations = sorted(p.stem for p in (smoke / "evaluations").glob("*.json"))
    assert evaluations == ["baseline", "cp-posthoc-dec2", "cp-posthoc-enc3", "cp-trained-dec2", "cp-trained-enc3",
                           "ffx-m2", "floor", "np-m2", "per-image-s16", "shf-m2"]
    floor = json.loads((smoke / "evaluations" / "floor.json").read_text())
    assert floor["class"] == "background" and 0 < floor["mIoU"] < 100
    attacks = sorted(p.stem for p in (smoke / "attacks").glob("*.json"))
    assert "key-space" in attacks and any(a.startswith("finetune-cp-") for a in attacks)
    # weights vs the attacker's model, class profiles, BatchNorm statistics (not at dec2, read by the
    # classifier), and for post-hoc models weights vs the plain weights
    assert sum(a.startswith("weight-matching-") for a in attacks) == 2 * 3 + 2 * 4 - 2
    report = (smoke / "report" / "report.md").read_text()
    for title in ("paper 000, Table II", "paper 000, Table III", "paper 000, Table IV", "paper 001, Table 1",
                  "paper 003, Table II", "Fig. 9", "Weight matching"):
        assert title in report
    assert len(list((smoke / "report").glob("*.png"))) == 3
    run = json.loads((smoke / "run.json").read_text())
    assert run["kind"] == "run" and run["settings"]["size"] == 32


def test_post_hoc_weight_matching_against_the_plain_weights_is_exact(smoke):
    for tap in ("enc3", "dec2"):
        doc = json.loads((smoke / "attacks" / f"weight-matching-posthoc-{tap}-weights-plain.json").read_text())
        assert doc["exact"] is True and doc["mIoU"]["recovered"] == doc["mIoU"]["owner"]


def test_a_second_run_skips_the_finished_steps(smoke):
    before = {p: p.stat().st_mtime_ns for p in (smoke / "evaluations").glob("*.json")}
    assert _load_script().main([*SMOKE, "--out", str(smoke)]) == 0
    assert {p: p.stat().st_mtime_ns for p in (smoke / "evaluations").glob("*.json")} == before


def test_a_run_with_other_settings_is_refused(smoke, capsys):
    assert _load_script().main([*SMOKE, "--epochs", "2", "--out", str(smoke)]) == 2
    assert "--fresh" in capsys.readouterr().err


def test_without_quick_the_paper_setting_needs_data(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _load_script().parse_args([])
    assert exit_info.value.code == 2
    assert "--data" in capsys.readouterr().err


def test_the_paper_setting_is_deeplabv3_resnet50_at_256_px_on_all_six_feature_maps():
    _, settings = _load_script().parse_args(["--data", "/data/VOCdevkit"])
    assert (settings.arch, settings.size, settings.per_image_arch) == ("deeplabv3_resnet50", 256, "vit_seg")
    assert settings.taps == ("stem", "layer1", "layer2", "layer3", "layer4", "head")
    assert settings.device == "auto" and settings.eval_random_keys == 100
