"""`seglock report`: the papers' tables and the plots, rendered from sample JSON results."""

import json

import pytest

from seglock.app.cli import main
from seglock.models.attacks.key_space import key_space_table
from seglock.models.report import load_runs, render_tables, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _scores(miou, aacc=None, macc=None):
    return {"aAcc": aacc if aacc is not None else miou + 20, "mIoU": miou,
            "mAcc": macc if macc is not None else miou + 5}


def _random(values):
    values = sorted(values)
    n = len(values)
    return {"applicable": True, "n": n, "mIoU": {"mean": sum(values) / n, "min": values[0], "q1": values[n // 4],
                                                 "median": values[n // 2], "q3": values[3 * n // 4], "max": values[-1],
                                                 "values": values}}


def _evaluation(protection, correct, plain, wrong=None, **extra):
    conditions = {"correct": _scores(correct), "plain": _scores(plain)}
    if wrong is not None:
        conditions["random:4"] = _random(wrong)
    return {"model": "m", "artifact": f"models/{protection['mode']}-{len(json.dumps(protection))}-{correct}",
            "protection": protection, "conditions": conditions, **extra}


@pytest.fixture
def runs_dir(tmp_path):
    runs = tmp_path / "runs"
    (runs / "evaluations").mkdir(parents=True)
    (runs / "attacks").mkdir()
    docs = {
        "baseline": _evaluation({"mode": "none"}, 61.25, 61.25),
        "cp-trained-dec2": _evaluation({"mode": "cp", "tap": "dec2", "channels": 16}, 60.5, 4.25, [3.0, 4.0, 5.0, 6.0],
                                       variant="trained"),
        "cp-posthoc-dec2": _evaluation({"mode": "cp", "tap": "dec2", "channels": 16}, 61.25, 7.5, [5.0, 6.0, 7.0, 9.0],
                                       variant="posthoc"),
        "shf-m2": _evaluation({"mode": "shf", "block_size": 2}, 55.0, 50.0, [45.0, 48.0, 50.0, 52.0]),
        "shf-m8": _evaluation({"mode": "shf", "block_size": 8}, 30.0, 12.0, [10.0, 11.0, 12.0, 13.0]),
        "np-m2": _evaluation({"mode": "np", "block_size": 2}, 52.0, 20.0, [20.0, 21.0, 22.0, 23.0]),
        "ffx-m2": _evaluation({"mode": "ffx", "block_size": 2}, 48.0, 8.0, [8.0, 9.0, 9.5, 10.0]),
        "per-image-s16": _evaluation({"mode": "per-image", "block_size": 16, "sub_block": 16}, 30.0, 10.0),
        "per-image-s4": _evaluation({"mode": "per-image", "block_size": 16, "sub_block": 4}, 45.0, 20.0),
    }
    for name, doc in docs.items():
        (runs / "evaluations" / f"{name}.json").write_text(json.dumps(doc))
    attacks = {
        "key-space": {"kind": "key-space", "model": "m", "seconds_per_try": 0.004,
                      "measured_on": {"device": "cpu", "image_size": [64, 64]},
                      "entries": key_space_table(taps={"dec2": 16}, block_sizes=(2,), image_size=(64, 64),
                                                 seconds_per_try=0.004)},
        "random-key": {"kind": "random-key", "n": 4, **docs["cp-trained-dec2"], "artifact": "models/cp-best"},
        "finetune-5": {"kind": "finetune", "model": "cp-trained-dec2", "fraction": 0.05, "before": _scores(4.25),
                       "after": _scores(27.5), "owner": _scores(60.5)},
        "finetune-10": {"kind": "finetune", "model": "cp-trained-dec2", "fraction": 0.1, "before": _scores(4.25),
                        "after": _scores(41.75), "owner": _scores(60.5)},
        "wm": {"kind": "weight-matching", "tap": "dec2", "variant": "post hoc", "method": "weights",
               "reference": {"kind": "file", "path": "models/baseline", "label": "owner's plain weights"},
               "channels": 16, "channels_recovered": 16, "fraction_recovered": 1.0,
               "mIoU": {"plain": 7.5, "recovered": 61.25, "owner": 61.25}},
    }
    for name, doc in attacks.items():
        (runs / "attacks" / f"{name}.json").write_text(json.dumps(doc))
    (runs / "run.json").write_text(json.dumps({"kind": "run", "command": "python benchmarks/reproduce.py --quick",
                                               "facts": {"wall time": "12.0 min"}}))
    (runs / "keys").mkdir()
    (runs / "keys" / "secret.key.json").write_text("{not even JSON")  # never opened
    (runs / "models" / "m" / ".checkpoint").mkdir(parents=True)
    (runs / "models" / "m" / ".checkpoint" / "key.json").write_text("{not even JSON")  # a run's key: never opened
    return runs


def test_load_runs_sorts_results_by_kind_and_never_reads_key_files(runs_dir):
    runs = load_runs(runs_dir)
    assert len(runs.evaluations) == 9
    assert {k: len(v) for k, v in runs.attacks.items()} == {"key-space": 1, "random-key": 1, "finetune": 2,
                                                            "weight-matching": 1, "downstream": 0,
                                                            "learned-key": 0, "suite": 0}
    assert runs.run["command"].endswith("--quick")
    assert runs.skipped == []


def test_cp_table_is_laid_out_like_paper_000_table_ii(runs_dir):
    table = render_tables(load_runs(runs_dir))["Channel permutation per feature map (paper 000, Table II)"]
    lines = table.splitlines()
    assert lines[0].startswith("| Tap | Paper no. | Trained: correct | Trained: no key")
    assert "| dec2 | – | 60.50 | 4.25 | 4.50 | 61.25 | 7.50 | 6.75 |" in lines
    assert lines[-1].startswith("| Baseline (non-protected) | – | 61.25 |")


def test_shf_table_is_laid_out_like_paper_000_table_iii(runs_dir):
    table = render_tables(load_runs(runs_dir))["SHF on input images per block size (paper 000, Table III)"]
    assert "| 2 | 55.00 | 50.00 | 48.75 |" in table
    assert "| 8 | 30.00 | 12.00 | 11.50 |" in table


def test_finetune_table_is_laid_out_like_paper_000_table_iv(runs_dir):
    table = render_tables(load_runs(runs_dir))["Fine-tuning attack (paper 000, Table IV): mIoU without the key"]
    lines = table.splitlines()
    assert lines[0] == "| D' | cp-trained-dec2 |"
    assert lines[2:] == ["| 0 % | 4.25 |", "| 5 % | 27.50 |", "| 10 % | 41.75 |",
                         "| No fine-tuning (test with key) | 60.50 |"]


def test_block_table_is_laid_out_like_paper_001_table_1(runs_dir):
    table = render_tables(load_runs(runs_dir))["Block-wise transforms with the correct key (paper 001, Table 1)"]
    lines = table.splitlines()
    assert lines[0] == "| Block size | SHF | NP | FFX | Baseline |"
    assert lines[2] == "| 2 | 55.00 | 52.00 | 48.00 | 61.25 |"
    assert lines[3] == "| 8 | 30.00 | – | – |  |"


def test_per_image_table_orders_sub_blocks_like_paper_003(runs_dir):
    table = render_tables(load_runs(runs_dir))["Per-image encryption (paper 003, Table II)"]
    rows = [line.split(" | ")[0] for line in table.splitlines()[2:]]
    assert rows == ["| Baseline", "| B = 16, S = 16", "| B = 16, S = 4"]


def test_trend_table_checks_the_papers_trends_with_the_measured_numbers(runs_dir):
    table = render_tables(load_runs(runs_dir))["The papers' trends, checked"]
    assert "| CP trained at dec2: correct key within 2 points of the baseline | 60.50 vs 61.25 (-0.75) | yes |" in table
    assert ("| CP trained at dec2: no key and wrong keys below 15 % of the baseline "
            "| no key 4.25, wrong keys 4.50 vs 9.19 | yes |") in table
    assert "| SHF: accuracy with the key falls as M grows | M=2: 55.00, M=8: 30.00 | yes |" in table
    assert "plain 50.00 vs correct 55.00 (91 %) | yes |" in table
    assert "| Per-image: accuracy rises as S shrinks | S=16: 30.00, S=4: 45.00 | yes |" in table


def test_trend_table_states_the_floor_of_the_data(runs_dir):
    (runs_dir / "evaluations" / "floor.json").write_text(json.dumps({"kind": "floor", "class": "background",
                                                                    "mIoU": 19.25}))
    table = render_tables(load_runs(runs_dir))["The papers' trends, checked"]
    assert "scores mIoU 19.25 on these data (31 % of the baseline)" in table
    # wrong keys 4.50 are below the floor: nothing of the baseline's gain over it is kept
    assert ("| CP trained at dec2: no key and wrong keys keep below 15 % of the baseline's gain over the floor "
            "| -35 % (floor 19.25) | yes |") in table


def test_a_trend_that_does_not_hold_is_marked(runs_dir):
    doc = json.loads((runs_dir / "evaluations" / "per-image-s4.json").read_text())
    doc["conditions"]["correct"]["mIoU"] = 20.0
    (runs_dir / "evaluations" / "per-image-s4.json").write_text(json.dumps(doc))
    table = render_tables(load_runs(runs_dir))["The papers' trends, checked"]
    assert "| Per-image: accuracy rises as S shrinks | S=16: 30.00, S=4: 20.00 | **no** |" in table


def test_attack_tables_render_key_space_wrong_keys_and_weight_matching(runs_dir):
    tables = render_tables(load_runs(runs_dir))
    key_spaces = tables["Key spaces and brute force (paper 000, Table I and §III-E1)"]
    assert "| cp | channels=16, tap=dec2 | 44.3 | 44.3 | 44.3 |" in key_spaces
    assert "4.00 ms" in tables["Key spaces and brute force (paper 000, Table I and §III-E1)"]
    wrong = tables["Random wrong keys (paper 000, Fig. 9)"]
    assert "| cp dec2 | 4 | 3.00 |" in wrong and "| shf M=8 | 4 | 10.00 |" in wrong
    assert "| dec2 | post hoc | weights | owner's plain weights | 16/16 (100 %) | 61.25 | 7.50 | 61.25 |" in (
        tables["Weight matching (beyond the papers)"])


def test_report_command_writes_markdown_tables_and_plots(runs_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(runs_dir), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert len(summary["tables"]) == 10
    markdown = (out / "report.md").read_text()
    assert "python benchmarks/reproduce.py --quick" in markdown and "![wrong_keys.png](wrong_keys.png)" in markdown
    for name in ("wrong_keys.png", "miou_vs_block_size.png", "conditions_per_mode.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert json.loads((out / "tables.json").read_text()).keys() == set(summary["tables"])


def test_report_inside_the_runs_folder_does_not_read_itself(runs_dir):
    write_report(runs_dir, runs_dir / "report")
    again = write_report(runs_dir, runs_dir / "report")
    assert again["skipped"] == [] and again["evaluations"] == 9


def test_report_of_an_empty_folder_has_no_tables_and_no_plots(tmp_path):
    (tmp_path / "runs").mkdir()
    summary = write_report(tmp_path / "runs", tmp_path / "out")
    assert summary["tables"] == [] and summary["plots"] == []


def test_report_of_a_missing_folder_is_a_user_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
