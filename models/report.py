"""Reports: the JSON results of a runs folder laid out as the papers' tables, and PNG plots.

A runs folder holds JSON files (any depth). Each is recognised by its content:
- an evaluation (`seglock evaluate --json`, `seglock.models.evaluate.evaluate_conditions`): "conditions" and
  "protection"; an optional "variant" ("trained" or "posthoc") says how a cp model got its key;
- an attack (`seglock attack ... --out`): "kind" = "key-space", "random-key", "finetune", "weight-matching",
  "downstream", "learned-key", or "suite" (the thief's advantage, issue 12);
- a run summary (`benchmarks/reproduce.py`): "kind" = "run" (command, settings, wall time);
- the data's floor: "kind" = "floor", the mIoU of predicting the most frequent class everywhere,
  which is what a model that has lost all function scores (about 3.5 on VOC2012's 21 classes).

Tables (mIoU in percent, as `seglock.models.metrics` gives it; paper 001 prints fractions):
- the thief's advantage: per suite, the owner's mIoU, no key, the best honest alternative, each
  attack's mIoU and advantage, and the verdict (the largest advantage);
- Table II of paper 000 (000_03ca646f856607f9.txt): cp per tap, correct key vs no key (+ wrong keys),
  trained with CP and protected post hoc, and the baseline;
- Table III of paper 000: SHF per block size, correct vs no key;
- Fig. 9 of paper 000 as a table and a box plot: N random wrong keys;
- Table IV of paper 000: fine-tuning attack, mIoU without the key for D' = 0 %, 5 %, 10 %;
- Table 1 of paper 001 (001_1d6747102c10f252.txt): mIoU with the key per method and block size,
  and its Fig. 6 as a table: correct, plain, incorrect;
- Table II of paper 003 (003_b5ba2da3aed36e6d.txt): aAcc, mIoU, mAcc per sub-block size;
- key spaces with brute-force times, and weight matching (beyond the papers).
Plots: wrong_keys.png (box plot), miou_vs_block_size.png, conditions_per_mode.png.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seglock.client.modes import Mode

__all__ = ["Runs", "json_ready", "load_runs", "render_tables", "render_plots", "write_report"]

ATTACK_KINDS = ("key-space", "random-key", "finetune", "weight-matching", "downstream", "learned-key", "suite")
BLOCK_METHODS = Mode.block_modes()
DASH = "–"


@dataclass
class Runs:
    """The results of a runs folder, by kind."""

    evaluations: list[dict[str, Any]] = field(default_factory=list)
    attacks: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {k: [] for k in ATTACK_KINDS})
    run: dict[str, Any] | None = None
    floor: dict[str, Any] | None = None  # mIoU of predicting the most frequent class everywhere
    skipped: list[str] = field(default_factory=list)


_NOT_RESULTS = ("manifest.json", "classes.json", "splits.json", "tables.json", "settings.json")


def json_ready(value: Any) -> Any:
    """`value` with NaN and infinities as None, so the JSON written is strict (RFC 8259)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def load_runs(folder: str | os.PathLike[str], *, exclude: str | os.PathLike[str] | None = None) -> Runs:
    """Every recognised JSON file under `folder` (not under `exclude`), sorted by path.

    Key files (key.json, *.key.json) and hidden folders (training checkpoints) are never opened;
    artifacts' and data sets' own JSON files are passed over; other unrecognised ones are in `skipped`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"runs folder {folder} does not exist")
    excluded = Path(exclude).resolve() if exclude is not None else None
    runs = Runs()
    for path in sorted(folder.rglob("*.json")):
        hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
        if hidden or path.name == "key.json" or path.name.endswith(".key.json") or path.name in _NOT_RESULTS:
            continue  # training checkpoints, key files (never opened), artifacts' and data sets' own files
        if excluded is not None and excluded in path.resolve().parents:
            continue
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            runs.skipped.append(str(path))
            continue
        if not isinstance(doc, dict):
            runs.skipped.append(str(path))
            continue
        doc.setdefault("_file", str(path.relative_to(folder)))
        kind = doc.get("kind")
        if kind in ATTACK_KINDS:
            runs.attacks[kind].append(doc)
        elif kind == "run":
            runs.run = doc
        elif kind == "floor":
            runs.floor = doc
        elif isinstance(doc.get("conditions"), dict) and isinstance(doc.get("protection"), dict):
            runs.evaluations.append(doc)
        else:
            runs.skipped.append(str(path))
    return runs


# -- reading values ---------------------------------------------------------------------------------


def _condition(doc: Mapping[str, Any], name: str) -> Any:
    conditions = doc.get("conditions", {})
    if name == "random":
        for label, value in conditions.items():
            if label.startswith("random") and isinstance(value, dict) and value.get("applicable", True):
                return value
        return None
    return conditions.get(name)


def _metric(entry: Any, metric: str = "mIoU") -> float | None:
    """A metric of one condition: a number, or the mean of a random-key summary."""
    if not isinstance(entry, Mapping):
        return None
    value = entry.get(metric)
    if isinstance(value, Mapping):
        value = value.get("mean")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _stats(entry: Any, metric: str = "mIoU") -> Mapping[str, Any] | None:
    if isinstance(entry, Mapping) and isinstance(entry.get(metric), Mapping):
        return entry[metric]
    return None


def _fmt(value: float | None, digits: int = 2) -> str:
    return DASH if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _table(header: list[str], rows: Iterable[list[str]]) -> str:
    rows = list(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _mode(doc: Mapping[str, Any]) -> str:
    return str(doc.get("protection", {}).get("mode", "none"))


def _variant(doc: Mapping[str, Any]) -> str:
    return str(doc.get("variant") or "trained")


def _baseline(runs: Runs) -> Mapping[str, Any] | None:
    plain = [d for d in runs.evaluations if _mode(d) == Mode.NONE]
    return plain[0] if plain else None


def _by_block(runs: Runs, method: str) -> dict[int, Mapping[str, Any]]:
    found = {}
    for doc in runs.evaluations:
        if _mode(doc) == method:
            found[int(doc["protection"]["block_size"])] = doc
    return dict(sorted(found.items()))


def _cp_by_tap(runs: Runs) -> dict[str, dict[str, Mapping[str, Any]]]:
    """{tap: {"trained": doc, "posthoc": doc}} in network order (input to output)."""
    found: dict[str, dict[str, Mapping[str, Any]]] = {}
    architectures = []
    for doc in runs.evaluations:
        if _mode(doc) == Mode.CP:
            found.setdefault(str(doc["protection"]["tap"]), {})[_variant(doc)] = doc
            architectures.append(doc.get("architecture"))
    order = _tap_order(architectures[0]) if architectures else []
    rank = {tap: i for i, tap in enumerate(order)}
    return dict(sorted(found.items(), key=lambda item: rank.get(item[0], len(rank))))


def _tap_order(architecture: str | None) -> list[str]:
    """The architecture's taps from input to output (an empty list where it cannot be built)."""
    try:
        from seglock.models.architectures import build_model
        from seglock.models.taps import taps

        return list(taps(build_model(architecture, 2)))
    except Exception:  # an unknown or unbuildable architecture: keep the order the files gave
        return []


def _label(doc: Mapping[str, Any]) -> str:
    p = doc.get("protection", {})
    mode = p.get("mode", "none")
    if mode == Mode.CP:
        return f"cp {p.get('tap')}" + (" (post hoc)" if _variant(doc) == "posthoc" else "")
    if mode in BLOCK_METHODS:
        return f"{mode} M={p.get('block_size')}"
    if mode == Mode.PER_IMAGE:
        return f"per-image B={p.get('block_size')} S={p.get('sub_block')}"
    return "baseline"


# -- tables -----------------------------------------------------------------------------------------


def table_cp(runs: Runs) -> str | None:
    """Paper 000 Table II: mIoU with the correct key and without it (No-enc), per selected feature map."""
    taps = _cp_by_tap(runs)
    if not taps:
        return None
    header = ["Tap", "Paper no.", "Trained: correct", "Trained: no key", "Trained: wrong keys (mean)",
              "Post hoc: correct", "Post hoc: no key", "Post hoc: wrong keys (mean)"]
    rows = []
    for tap, variants in taps.items():
        number = next((d.get("paper_number") for d in variants.values() if d.get("paper_number")), None)
        row = [tap, str(number) if number else DASH]
        for variant in ("trained", "posthoc"):
            doc = variants.get(variant)
            row += [_fmt(_metric(_condition(doc, name))) if doc else DASH for name in ("correct", "plain", "random")]
        rows.append(row)
    base = _baseline(runs)
    if base is not None:
        rows.append(["Baseline (non-protected)", DASH, _fmt(_metric(_condition(base, "correct"))), DASH, DASH,
                     DASH, DASH, DASH])
    return _table(header, rows)


def table_shf(runs: Runs) -> str | None:
    """Paper 000 Table III: SHF on input images, correct key vs plain images, per block size."""
    shf = _by_block(runs, Mode.SHF)
    if not shf:
        return None
    rows = [[str(m), _fmt(_metric(_condition(d, "correct"))), _fmt(_metric(_condition(d, "plain"))),
             _fmt(_metric(_condition(d, "random")))] for m, d in shf.items()]
    base = _baseline(runs)
    if base is not None:
        rows.append(["Baseline", _fmt(_metric(_condition(base, "correct"))), DASH, DASH])
    return _table(["Block size M", "Correct", "No-enc (plain)", "Wrong keys (mean)"], rows)


def table_wrong_keys(runs: Runs) -> str | None:
    """Paper 000 Fig. 9 as numbers: mIoU over N random wrong keys (quartiles as in the box plot)."""
    rows = []
    for doc in _random_docs(runs):
        stats = _stats(_condition(doc, "random"))
        if stats is None:
            continue
        n = _condition(doc, "random").get("n", len(stats.get("values", [])))
        rows.append([_label(doc), str(n), *(_fmt(stats.get(k)) for k in ("min", "q1", "median", "q3", "max", "mean")),
                     _fmt(_metric(_condition(doc, "correct")))])
    if not rows:
        return None
    return _table(["Model", "N", "min", "Q1", "median", "Q3", "max", "mean", "correct key"], rows)


def table_finetune(runs: Runs) -> str | None:
    """Paper 000 Table IV: mIoU of fine-tuned models tested without the key, per D'."""
    docs = sorted(runs.attacks["finetune"], key=lambda d: d.get("fraction", 0))
    if not docs:
        return None
    models = list(dict.fromkeys(d.get("model", "?") for d in docs))
    header = ["D'", *models]
    rows = [["0 %", *(_fmt(_metric(next((d["before"] for d in docs if d.get("model") == m), None))) for m in models)]]
    for fraction in sorted({d["fraction"] for d in docs}):
        cells = []
        for m in models:
            doc = next((d for d in docs if d.get("model") == m and d["fraction"] == fraction), None)
            cells.append(_fmt(_metric(doc["after"])) if doc else DASH)
        rows.append([f"{fraction * 100:g} %", *cells])
    owner_row = ["No fine-tuning (test with key)"]
    for m in models:
        owner = next((d.get("owner") for d in docs if d.get("model") == m and d.get("owner")), None)
        owner_row.append(_fmt(_metric(owner)))
    rows.append(owner_row)
    return _table(header, rows)


def table_suite(runs: Runs) -> str | None:
    """The thief's advantage: one row per suite (verdict), then one row per attack of each suite."""
    docs = runs.attacks["suite"]
    if not docs:
        return None
    docs = sorted(docs, key=lambda d: (d.get("model", ""), str(d.get("protection", {}).get("tap", ""))))
    verdicts = []
    for d in docs:
        alts = d.get("alternatives") or {}
        public = alts.get("public")
        verdicts.append([
            str(d.get("model", "?")), str((d.get("protection") or {}).get("tap", DASH)),
            f"{d.get('fraction', 0) * 100:g} %", _fmt(_metric(d.get("owner"))), _fmt(_metric(d.get("no_key"))),
            _fmt(_metric(alts.get("scratch"))), _fmt(_metric(public)) if public else DASH,
            str(d.get("worst_attack") or DASH), _signed(d.get("advantage")),
        ])
    text = _table(["Model", "Taps", "D'", "Owner (key)", "No key", "Scratch (best recipe)", "Public start",
                   "Worst attack", "Advantage (points)"], verdicts)
    rows = []
    for d in docs:
        for attack in d.get("attacks", []):
            rows.append([str(d.get("model", "?")), str(attack.get("name")), _fmt(attack.get("mIoU")),
                         _signed(attack.get("advantage")), _fmt(attack.get("seconds"), 0),
                         str((attack.get("details") or {}).get("best_recipe") or attack.get("error") or DASH)])
    return text + "\n\n" + _table(["Model", "Attack", "mIoU", "Advantage", "Seconds", "Best recipe / note"], rows)


def _signed(value: float | None) -> str:
    return DASH if value is None else f"{value:+.2f}"


def table_block_methods(runs: Runs) -> str | None:
    """Paper 001 Table 1: mIoU with the correct key per method and block size, and the baseline."""
    methods = {m: _by_block(runs, m) for m in BLOCK_METHODS}
    sizes = sorted({size for found in methods.values() for size in found})
    if not sizes:
        return None
    base = _baseline(runs)
    rows = []
    for i, size in enumerate(sizes):
        row = [str(size)] + [_fmt(_metric(_condition(methods[m].get(size, {}), "correct"))) for m in BLOCK_METHODS]
        row.append(_fmt(_metric(_condition(base, "correct"))) if base is not None and i == 0 else "")
        rows.append(row)
    return _table(["Block size", "SHF", "NP", "FFX", "Baseline"], rows)


def table_block_access(runs: Runs) -> str | None:
    """Paper 001 Fig. 6 as a table: correct key, plain images, incorrect keys (mean), per method and M."""
    rows = []
    for method in BLOCK_METHODS:
        for size, doc in _by_block(runs, method).items():
            cells = (_fmt(_metric(_condition(doc, c))) for c in ("correct", "plain", "random"))
            rows.append([method.upper(), str(size), *cells])
    if not rows:
        return None
    return _table(["Method", "Block size", "Correct", "Plain", "Incorrect (mean)"], rows)


def table_per_image(runs: Runs) -> str | None:
    """Paper 003 Table II: aAcc, mIoU, mAcc of the baseline and per-image encryption per sub-block size."""
    docs = sorted((d for d in runs.evaluations if _mode(d) == Mode.PER_IMAGE),
                  key=lambda d: -int(d["protection"]["sub_block"]))
    if not docs:
        return None
    rows = []
    base = _baseline(runs)
    if base is not None:
        rows.append(["Baseline", *(_fmt(_metric(_condition(base, "correct"), k)) for k in ("aAcc", "mIoU", "mAcc")),
                     DASH])
    for doc in docs:
        p = doc["protection"]
        correct, plain = _condition(doc, "correct"), _condition(doc, "plain")
        rows.append([f"B = {p['block_size']}, S = {p['sub_block']}",
                     *(_fmt(_metric(correct, k)) for k in ("aAcc", "mIoU", "mAcc")), _fmt(_metric(plain))])
    return _table(["Method", "aAcc", "mIoU", "mAcc", "mIoU, plain images"], rows)


def table_key_space(runs: Runs) -> str | None:
    """log2 of every mode's key space and the expected brute-force time at the measured rate."""
    docs = runs.attacks["key-space"]
    if not docs:
        return None
    doc = docs[0]
    rows = []
    for entry in doc.get("entries", []):
        params = ", ".join(f"{k}={v}" for k, v in entry.get("params", {}).items() if k != "image_size")
        bf = entry.get("brute_force") or {}
        rows.append([entry["mode"], params, _fmt(entry.get("log2"), 1), _fmt(entry.get("seglock_log2"), 1),
                     _fmt(entry.get("model_log2"), 1), bf.get("human", DASH)])
    rate = doc.get("seconds_per_try")
    note = (f"Brute force expects to try half the keys of seglock's key space; one try (one forward pass and the "
            f"metric on one image) took {rate * 1000:.2f} ms" if rate else "No rate was measured")
    where = doc.get("measured_on", {})
    if where:
        note += f" on {where.get('device')} at {where.get('image_size')} px, model {doc.get('model')}"
    return _table(["Mode", "Parameters", "log2 (papers)", "log2 (seglock keys)", "log2 (model access)",
                   "Brute force (expected)"], rows) + "\n\n" + note + "."


def table_weight_matching(runs: Runs) -> str | None:
    """Weight matching (beyond the papers): channels of the key recovered, mIoU reached with them."""
    docs = runs.attacks["weight-matching"]
    if not docs:
        return None
    taps = {tap: i for i, tap in enumerate(_tap_order(docs[0].get("architecture")))}
    methods = {"weights": 0, "activations": 1, "statistics": 2}
    docs = sorted(docs, key=lambda d: (d.get("variant") != "trained", taps.get(d.get("tap"), len(taps)),
                                       methods.get(d.get("method"), 3), d.get("reference", {}).get("kind") == "file"))
    rows = []
    for doc in docs:
        ref = doc.get("reference", {})
        reference = {"file": f"file {Path(str(ref.get('path', ''))).name}",
                     "trained": f"attacker's model ({ref.get('fraction', 0) * 100:g} % data)",
                     "data": f"class profiles ({ref.get('fraction', 0) * 100:g} % data)",
                     "statistics": f"BatchNorm statistics ({ref.get('fraction', 0) * 100:g} % data)",
                     }.get(ref.get("kind"), DASH)
        if ref.get("label"):
            reference = str(ref["label"])
        miou = doc.get("mIoU", {})
        recovered = doc.get("fraction_recovered")
        rows.append([doc.get("tap", DASH), doc.get("variant", DASH), doc.get("method", DASH), reference,
                     DASH if recovered is None else f"{doc.get('channels_recovered')}/{doc.get('channels')} "
                                                    f"({recovered * 100:.0f} %)",
                     _fmt(miou.get("recovered")), _fmt(miou.get("plain")), _fmt(miou.get("owner"))])
    return _table(["Tap", "Model", "Method", "Reference", "Channels recovered", "mIoU, recovered key",
                   "mIoU, no key", "mIoU, owner's key"], rows)


def table_trends(runs: Runs) -> str | None:
    """The papers' trends that issue 6 asks to check, each with the measured numbers and a verdict."""
    rows = []
    base = _metric(_condition(_baseline(runs), "correct")) if _baseline(runs) is not None else None
    taps = _cp_by_tap(runs)
    deep = [t for t, v in taps.items() if any(d.get("paper_number") in (5, 6) for d in v.values())] or list(taps)[-2:]
    if base is not None:
        for tap in deep:
            doc = taps[tap].get("trained")
            if doc is None:
                continue
            correct, plain = _metric(_condition(doc, "correct")), _metric(_condition(doc, "plain"))
            wrong = _metric(_condition(doc, "random"))
            attack = next((a for a in runs.attacks["random-key"] if a.get("artifact") == doc.get("artifact")), None)
            if attack is not None and _metric(_condition(attack, "random")) is not None:
                wrong = _metric(_condition(attack, "random"))  # the random-key attack tries more keys
            if correct is not None:
                rows.append([f"CP trained at {tap}: correct key within 2 points of the baseline",
                             f"{correct:.2f} vs {base:.2f} ({correct - base:+.2f})",
                             _verdict(abs(correct - base) <= 2)])
            worst = max(v for v in (plain, wrong) if v is not None) if (plain, wrong) != (None, None) else None
            if worst is not None:
                rows.append([f"CP trained at {tap}: no key and wrong keys below 15 % of the baseline",
                             f"no key {_fmt(plain)}, wrong keys {_fmt(wrong)} vs {0.15 * base:.2f}",
                             _verdict(worst < 0.15 * base)])
                if runs.floor is not None and base > runs.floor["mIoU"]:
                    floor = runs.floor["mIoU"]
                    kept = (worst - floor) / (base - floor)
                    rows.append([f"CP trained at {tap}: no key and wrong keys keep below 15 % of the baseline's "
                                 "gain over the floor", f"{kept * 100:.0f} % (floor {floor:.2f})",
                                 _verdict(kept < 0.15)])
    shf = _by_block(runs, Mode.SHF)
    if len(shf) >= 2:
        values = [_metric(_condition(d, "correct")) for d in shf.values()]
        falls = all(a is not None and b is not None and b <= a + 1.0 for a, b in zip(values, values[1:], strict=False))
        rows.append(["SHF: accuracy with the key falls as M grows",
                     ", ".join(f"M={m}: {_fmt(v)}" for m, v in zip(shf, values, strict=False)),
                     _verdict(falls and values[-1] < values[0])])
        m0, doc = next(iter(shf.items()))
        correct, plain = _metric(_condition(doc, "correct")), _metric(_condition(doc, "plain"))
        if correct and plain is not None:
            rows.append([f"SHF: plain images work almost as well for small M (M={m0}, weak access control)",
                         f"plain {plain:.2f} vs correct {correct:.2f} ({plain / correct * 100:.0f} %)",
                         _verdict(plain >= 0.8 * correct)])
    per_image = sorted((d for d in runs.evaluations if _mode(d) == Mode.PER_IMAGE),
                       key=lambda d: -int(d["protection"]["sub_block"]))
    if len(per_image) >= 2:
        values = [_metric(_condition(d, "correct")) for d in per_image]
        rises = all(a is not None and b is not None and b >= a - 1.0 for a, b in zip(values, values[1:], strict=False))
        summary = ", ".join(f"S={d['protection']['sub_block']}: {_fmt(v)}"
                            for d, v in zip(per_image, values, strict=False))
        rows.append(["Per-image: accuracy rises as S shrinks",
                     summary,
                     _verdict(rises and values[-1] > values[0])])
    if not rows:
        return None
    note = "A fall (rise) may pause by up to 1 point between neighbours and still count; the ends must differ."
    if runs.floor is not None and base is not None:
        floor = runs.floor["mIoU"]
        note += (f" Predicting the most frequent class everywhere scores mIoU {floor:.2f} on these data "
                 f"({floor / base * 100:.0f} % of the baseline): a model that has lost its function scores about that.")
    return _table(["Trend (papers)", "Measured (mIoU)", "Reproduced"], rows) + "\n\n" + note


def _verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _random_docs(runs: Runs) -> list[Mapping[str, Any]]:
    """Models with random-key results: the random-key attacks, then evaluations not already covered."""
    docs = list(runs.attacks["random-key"])
    seen = {d.get("artifact") for d in docs}
    docs += [d for d in runs.evaluations if _condition(d, "random") is not None and d.get("artifact") not in seen]
    return sorted(docs, key=_order(runs))


_MODE_ORDER = {mode.value: i for i, mode in enumerate(Mode)}  # declaration order: none, cp, shf, np, ffx, per-image


def _order(runs: Runs):
    """A sort key: baseline, cp (trained, then post hoc; taps in network order), shf, np, ffx by M, per-image."""
    taps = {tap: i for i, tap in enumerate(_cp_by_tap(runs))}

    def key(doc: Mapping[str, Any]) -> tuple:
        p = doc.get("protection", {})
        detail = taps.get(p.get("tap"), 0) if p.get("mode") == Mode.CP else -int(p.get("sub_block", 0) or 0) or int(
            p.get("block_size", 0) or 0)
        return (_MODE_ORDER.get(p.get("mode"), 9), _variant(doc) != "trained", detail)

    return key


SECTIONS = (
    ("The thief's advantage (attack suite)", table_suite),
    ("The papers' trends, checked", table_trends),
    ("Channel permutation per feature map (paper 000, Table II)", table_cp),
    ("SHF on input images per block size (paper 000, Table III)", table_shf),
    ("Random wrong keys (paper 000, Fig. 9)", table_wrong_keys),
    ("Fine-tuning attack (paper 000, Table IV): mIoU without the key", table_finetune),
    ("Block-wise transforms with the correct key (paper 001, Table 1)", table_block_methods),
    ("Block-wise transforms: access control (paper 001, Fig. 6)", table_block_access),
    ("Per-image encryption (paper 003, Table II)", table_per_image),
    ("Key spaces and brute force (paper 000, Table I and §III-E1)", table_key_space),
    ("Weight matching (beyond the papers)", table_weight_matching),
)


def render_tables(runs: Runs) -> dict[str, str]:
    """{section title: markdown table} for every section the runs have data for."""
    tables = {}
    for title, make in SECTIONS:
        text = make(runs)
        if text:
            tables[title] = text
    return tables


# -- plots ------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_wrong_keys(runs: Runs, path: Path) -> bool:
    """Box plot of mIoU over the random wrong keys of each model (paper 000 Fig. 9)."""
    stats, labels = [], []
    for doc in _random_docs(runs):
        s = _stats(_condition(doc, "random"))
        if s is None:
            continue
        values = s.get("values")
        if values:
            stats.append(_box_from_values(values))
        else:
            stats.append({"whislo": s["min"], "q1": s["q1"], "med": s["median"], "q3": s["q3"], "whishi": s["max"],
                          "fliers": []})
        stats[-1]["label"] = _label(doc)
        labels.append(_label(doc))
    if not stats:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(stats) + 2), 4))
    ax.bxp(stats, showfliers=True)
    correct = [_metric(_condition(doc, "correct")) for doc in _random_docs(runs) if _stats(_condition(doc, "random"))]
    if any(v is not None for v in correct):
        ax.plot(range(1, len(correct) + 1), [float("nan") if v is None else v for v in correct], "x", color="tab:red",
                label="correct key")
    _floor_line(ax, runs)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax.set_ylabel("mIoU (%) with a wrong key")
    ax.set_title("Random wrong keys")
    ax.tick_params(axis="x", labelrotation=60)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _floor_line(ax, runs: Runs) -> None:
    if runs.floor is not None:
        ax.axhline(runs.floor["mIoU"], color="grey", linestyle="--", linewidth=1,
                   label=f"floor: {runs.floor.get('class', 'one class')} everywhere")


def _box_from_values(values: list[float]) -> dict[str, Any]:
    """Quartiles, whiskers at the furthest points within 1.5 IQR, and outliers (paper 000 Fig. 9's box)."""
    import numpy as np

    arr = np.asarray(values, dtype=float)
    q1, med, q3 = np.percentile(arr, [25, 50, 75])
    low, high = q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1)
    inside = arr[(arr >= low) & (arr <= high)]
    return {"whislo": float(inside.min()), "q1": float(q1), "med": float(med), "q3": float(q3),
            "whishi": float(inside.max()), "fliers": arr[(arr < low) | (arr > high)].tolist()}


def plot_block_sizes(runs: Runs, path: Path) -> bool:
    """mIoU against block size for SHF, NP, FFX: correct key (solid) and plain images (dashed)."""
    methods = {m: _by_block(runs, m) for m in BLOCK_METHODS}
    if not any(methods.values()):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, found in methods.items():
        if not found:
            continue
        sizes = list(found)
        line, = ax.plot(sizes, [_metric(_condition(d, "correct")) for d in found.values()], "o-",
                        label=f"{method.upper()} correct key")
        ax.plot(sizes, [_metric(_condition(d, "plain")) for d in found.values()], "s--", color=line.get_color(),
                alpha=0.7, label=f"{method.upper()} plain images")
    base = _baseline(runs)
    if base is not None and _metric(_condition(base, "correct")) is not None:
        ax.axhline(_metric(_condition(base, "correct")), color="black", linestyle=":", label="baseline")
    _floor_line(ax, runs)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("block size M")
    ax.set_ylabel("mIoU (%)")
    ax.set_title("Block-wise transforms: mIoU against block size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_conditions(runs: Runs, path: Path) -> bool:
    """Grouped bars per model: correct key, plain (no key), wrong keys (mean)."""
    docs = [d for d in runs.evaluations if _condition(d, "correct") is not None]
    if not docs:
        return False
    docs.sort(key=_order(runs))
    plt = _pyplot()
    import numpy as np

    x = np.arange(len(docs))
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(docs) + 2), 4.5))
    for offset, (name, label) in zip((-width, 0, width), (("correct", "correct key"), ("plain", "no key / plain"),
                                                           ("random", "wrong keys (mean)")), strict=False):
        values = [_metric(_condition(d, name)) for d in docs]
        ax.bar(x + offset, [np.nan if v is None else v for v in values], width, label=label)
    _floor_line(ax, runs)
    ax.set_xticks(x, [_label(d) for d in docs], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("mIoU (%)")
    ax.set_title("Correct key vs no key vs wrong keys, per protection mode")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


PLOTS = (
    ("wrong_keys.png", plot_wrong_keys),
    ("miou_vs_block_size.png", plot_block_sizes),
    ("conditions_per_mode.png", plot_conditions),
)


def render_plots(runs: Runs, out_dir: str | os.PathLike[str]) -> list[str]:
    """Write the PNG plots the runs have data for; their file names."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [name for name, make in PLOTS if make(runs, out_dir / name)]


# -- the report -------------------------------------------------------------------------------------


def render_markdown(runs: Runs, tables: Mapping[str, str], plots: list[str]) -> str:
    lines = ["# seglock report", ""]
    if runs.run:
        run = runs.run
        if run.get("command"):
            lines += ["Command:", "", "```", str(run["command"]), "```", ""]
        facts = [f"{k.replace('_', ' ')}: {v}" for k, v in run.get("facts", {}).items()]
        if facts:
            lines += [f"- {fact}" for fact in facts] + [""]
    lines.append("mIoU, aAcc and mAcc are percentages (paper 001 prints mIoU as a fraction).")
    lines.append("")
    for title, text in tables.items():
        lines += [f"## {title}", "", text, ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in plots] + [""]
    return "\n".join(lines)


def write_report(runs_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read `runs_dir`, write OUT/report.md, OUT/tables.json and the plots; a summary of what was written."""
    out_dir = Path(out_dir)
    runs = load_runs(runs_dir, exclude=out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = render_tables(runs)
    plots = render_plots(runs, out_dir)
    report = out_dir / "report.md"
    report.write_text(render_markdown(runs, tables, plots), encoding="utf-8")
    (out_dir / "tables.json").write_text(json.dumps(tables, indent=2) + "\n", encoding="utf-8")
    return {
        "report": str(report),
        "tables": list(tables),
        "plots": [str(out_dir / name) for name in plots],
        "evaluations": len(runs.evaluations),
        "attacks": {kind: len(docs) for kind, docs in runs.attacks.items()},
        "skipped": runs.skipped,
    }
