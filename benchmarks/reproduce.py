"""Reproduce the papers' experiments, at small scale on a CPU (--quick) or at paper scale on a GPU.

    python benchmarks/reproduce.py --quick [--out runs/quick]              # synthetic data, tiny, 2 CPU cores
    python benchmarks/reproduce.py --data /data/VOCdevkit --out runs/paper  # VOC2012, DeepLabv3-ResNet50, GPU

Steps (each writes JSON into OUT, then `seglock.models.report.write_report(OUT, OUT/report)` lays them out):
  1. data      --quick: synthetic scenes (`seglock data synth`); otherwise the data set given
  2. baseline  a plain model: mIoU with plain images
  3. cp        CP trained in the loop at every tap (paper 000 Table II), and the baseline protected post hoc
               at every tap (seglock's `models protect`): correct key, no key, random wrong keys
  4. block     SHF, NP, FFX at each block size (paper 000 Table III, paper 001 Table 1 and Fig. 6)
  5. per-image B = 16 and S in {16, 8, 4} (paper 003 Table II)
  6. attacks   on the best trained CP model (the widest gap between key and no key among the taps within
               2 points of the baseline): key space and brute-force time, random keys, fine-tuning with
               5 % and 10 % of the training data (paper 000 Fig. 9, Table IV); weight matching at every tap
  7. report    markdown tables and PNG plots
Every model's key goes to a 0600 key file under OUT/keys. A step whose JSON is already in OUT is
skipped, so an interrupted run continues where it stopped when run again with the same options
(OUT/settings.json records them; other options are refused; --fresh starts over).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from seglock.models.report import json_ready

# Paper 000 Fig. 4: ResNet feature maps 1-6.
RESNET_TAPS = ("stem", "layer1", "layer2", "layer3", "layer4", "head")


@dataclass
class Settings:
    """Everything a run depends on; the two presets are `QUICK` and `PAPER`."""

    data: str | None = None  # None: make synthetic scenes
    scenes: int = 300
    classes: int = 4  # background + disc, square, triangle: learnable by tiny in a CPU budget
    size: int = 64
    arch: str = "tiny"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    per_image_arch: str = "tiny"
    backbone_weights: str | None = None
    taps: tuple[str, ...] = ("enc1", "enc2", "enc3", "dec1", "dec2")
    block_sizes: tuple[int, ...] = (2, 4, 8, 16)
    per_image_block: int = 16
    sub_blocks: tuple[int, ...] = (16, 8, 4)
    epochs: int = 30
    batch_size: int = 8
    lr: float = 0.1
    schedule: str = "poly"
    device: str = "cpu"
    seed: int = 0
    eval_random_keys: int = 20  # wrong keys per model in the evaluation tables
    attack_random_keys: int = 100  # paper 000 Fig. 9
    fractions: tuple[float, ...] = (0.05, 0.10)  # paper 000 Table IV
    finetune_epochs: int = 30
    matching_fraction: float = 0.10
    reference_epochs: int = 30


QUICK = Settings()
PAPER = Settings(
    size=256, arch="deeplabv3_resnet50", per_image_arch="vit_seg", taps=RESNET_TAPS,
    block_sizes=(1, 2, 4, 8, 16, 32), epochs=100, batch_size=8, lr=0.02, device="auto",
    eval_random_keys=100, finetune_epochs=30, reference_epochs=30,
)


class Run:
    """Writes each step's JSON into the runs folder; skips steps whose JSON is there already."""

    def __init__(self, out: Path, settings: Settings, *, verbose: bool) -> None:
        self.out = out
        self.settings = settings
        self.verbose = verbose
        self.started = time.perf_counter()
        self.steps: dict[str, float] = {}
        for sub in ("models", "keys", "evaluations", "attacks"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(out / "keys", 0o700)

    def say(self, text: str) -> None:
        elapsed = time.perf_counter() - self.started
        print(f"[{elapsed / 60:5.1f} min] {text}", file=sys.stderr, flush=True)

    def step(self, path: Path, what: str, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if path.is_file():
            self.say(f"{what}: done before ({path.relative_to(self.out)})")
            return json.loads(path.read_text())
        started = time.perf_counter()
        result = make()
        seconds = time.perf_counter() - started
        self.steps[str(path.relative_to(self.out))] = round(seconds, 1)
        path.write_text(json.dumps(json_ready(result), indent=2, default=str) + "\n")
        self.say(f"{what}: {_headline(result)} ({seconds:.0f} s)")
        return result


def _headline(result: dict[str, Any]) -> str:
    conditions = result.get("conditions")
    if isinstance(conditions, dict):
        parts = []
        for name, value in conditions.items():
            miou = value.get("mIoU") if isinstance(value, dict) else None
            if isinstance(miou, dict):
                miou = miou.get("mean")
            if isinstance(miou, (int, float)):
                parts.append(f"{name} {miou:.1f}")
        return "mIoU " + ", ".join(parts)
    if result.get("kind") == "finetune":
        return f"mIoU without key {result['before']['mIoU']:.1f} -> {result['after']['mIoU']:.1f}"
    if result.get("kind") == "weight-matching":
        return (f"{result.get('channels_recovered')}/{result['channels']} channels, "
                f"mIoU {result['mIoU']['recovered']:.1f} (owner {result['mIoU'].get('owner', float('nan')):.1f})")
    if result.get("kind") == "floor":
        return f"predicting {result['class']} everywhere: mIoU {result['mIoU']:.1f}"
    if result.get("kind") == "key-space":
        return f"{len(result['entries'])} settings, {result['seconds_per_try'] * 1000:.2f} ms per try"
    return "ok"


# -- steps ------------------------------------------------------------------------------------------


def make_data(run: Run) -> str:
    s = run.settings
    if s.data is not None:
        return s.data
    from seglock.models.data import write_synth_dataset

    folder = run.out / "data"
    if not (folder / "splits.json").is_file():
        run.say(f"data: {s.scenes} synthetic scenes at {s.size} px, {s.classes} classes")
        write_synth_dataset(folder, s.scenes, s.seed, s.size, s.classes, 0.1, force=True)
    return str(folder)


def train_model(run: Run, data: str, name: str, *, protect: str = "none", tap: str | None = None,
                block_size: int | None = None, sub_block: int | None = None,
                arch: str | None = None) -> tuple[Path, Path | None]:
    """(artifact folder, key file or None); trains only if the artifact is not there yet."""
    from seglock.models.train import TrainConfig, train

    s = run.settings
    out = run.out / "models" / name
    key_file = run.out / "keys" / f"{name}.key.json"
    if (out / "manifest.json").is_file():
        return out, key_file if key_file.is_file() else None
    shutil.rmtree(out, ignore_errors=True)
    key_file.unlink(missing_ok=True)
    arch = arch or s.arch
    config = TrainConfig(
        data=data, arch=arch, protect=protect, tap=tap, block_size=block_size, sub_block=sub_block,
        epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, schedule=s.schedule, size=s.size, device=s.device,
        seed=s.seed, name=name, arch_kwargs=dict(s.arch_kwargs) if arch == s.arch else {},
        backbone_weights=s.backbone_weights if arch == s.arch else None,
    )
    started = time.perf_counter()
    result = train(config, out, key_out=key_file if protect in ("cp", "shf", "np", "ffx") else None,
                   progress=run.verbose)
    best = result.history[result.best_epoch - 1]
    run.say(f"trained {name}: best epoch {result.best_epoch}/{s.epochs}, "
            f"val mIoU {best.get('val_mIoU', float('nan')):.1f} "
            f"({time.perf_counter() - started:.0f} s)")
    return out, result.key_file


def protect_post_hoc(run: Run, baseline: Path, tap: str) -> tuple[Path, Path]:
    """The baseline protected at `tap` with a fresh key: `seglock models protect`, without a keystore."""
    from seglock.models import load_artifact, protect, save_artifact
    from seglock.models.keyfile import write_key_file

    name = f"cp-posthoc-{tap}"
    out = run.out / "models" / name
    key_file = run.out / "keys" / f"{name}.key.json"
    if (out / "manifest.json").is_file() and key_file.is_file():
        return out, key_file
    model, manifest = load_artifact(baseline)
    key = protect(model, tap)
    key_file.unlink(missing_ok=True)
    write_key_file(key_file, key, model=name)
    save_artifact(model, out, name=name, class_names=list(manifest.class_names), input_size=manifest.input_size,
                  normalization=manifest.normalization, protection={"mode": "cp", "tap": tap},
                  key={"id": name, "version": 1}, overwrite=True)
    return out, key_file


def evaluate(run: Run, data: str, model: Path, key_file: Path | None, conditions: list[str],
             **extra: Any) -> dict[str, Any]:
    from seglock.models.evaluate import evaluate_conditions
    from seglock.models.keyfile import read_key_file

    key = read_key_file(key_file).key if key_file is not None else None
    result = evaluate_conditions(model, data, key=key, conditions=conditions, device=run.settings.device,
                                 seed=run.settings.seed, progress=run.verbose)
    return {**result, **extra}


def majority_floor(data: str, size: int) -> dict[str, Any]:
    """The mIoU of predicting the evaluation split's most frequent class everywhere: a model with no function."""
    import numpy as np

    from seglock.models.data import detect_format, open_dataset
    from seglock.models.evaluate import DEFAULT_SPLITS
    from seglock.models.metrics import MetricAccumulator

    kind = detect_format(data)
    dataset = open_dataset(data, DEFAULT_SPLITS[kind], kind=kind, size=size)
    counts = np.zeros(dataset.num_classes, dtype=np.int64)
    masks = [dataset[i][1] for i in range(len(dataset))]
    for mask in masks:
        valid = mask[mask < dataset.num_classes]
        counts += np.bincount(valid.numpy().ravel(), minlength=dataset.num_classes)
    majority = int(np.argmax(counts))
    accumulator = MetricAccumulator(dataset.num_classes)
    for mask in masks:
        accumulator.update(np.full(tuple(mask.shape), majority), mask)
    scores = accumulator.compute()
    return {"kind": "floor", "class": dataset.classes[majority], "mIoU": scores["mIoU"], "aAcc": scores["aAcc"],
            "images": len(dataset)}


def paper_number(arch: str, tap: str) -> int | None:
    return RESNET_TAPS.index(tap) + 1 if tap in RESNET_TAPS and "resnet" in arch else None


def reproduce(run: Run) -> None:
    s = run.settings
    data = make_data(run)
    wrong = f"random:{s.eval_random_keys}"
    ev = run.out / "evaluations"

    run.step(ev / "floor.json", "floor", lambda: majority_floor(data, s.size))
    baseline, _ = train_model(run, data, "baseline")
    run.step(ev / "baseline.json", "baseline", lambda: evaluate(run, data, baseline, None, ["correct", "plain"]))

    cp_models: dict[str, tuple[Path, Path]] = {}
    for tap in s.taps:
        model, key = train_model(run, data, f"cp-trained-{tap}", protect="cp", tap=tap)
        cp_models[f"trained-{tap}"] = (model, key)
        run.step(ev / f"cp-trained-{tap}.json", f"cp trained at {tap}",
                 lambda: evaluate(run, data, model, key, ["correct", "plain", wrong], variant="trained",
                                  paper_number=paper_number(s.arch, tap)))
    for tap in s.taps:
        model, key = protect_post_hoc(run, baseline, tap)
        cp_models[f"posthoc-{tap}"] = (model, key)
        run.step(ev / f"cp-posthoc-{tap}.json", f"cp post hoc at {tap}",
                 lambda: evaluate(run, data, model, key, ["correct", "plain", wrong], variant="posthoc",
                                  paper_number=paper_number(s.arch, tap)))

    for method in ("shf", "np", "ffx"):
        for m in s.block_sizes:
            model, key = train_model(run, data, f"{method}-m{m}", protect=method, block_size=m)
            run.step(ev / f"{method}-m{m}.json", f"{method} M={m}",
                     lambda: evaluate(run, data, model, key, ["correct", "plain", wrong]))

    per_image_base = None
    if s.per_image_arch != s.arch:  # paper 003's baseline is a plain model of the per-image architecture
        per_image_base, _ = train_model(run, data, "baseline-per-image", arch=s.per_image_arch)
        run.step(ev / "baseline-per-image.json", "per-image baseline",
                 lambda: evaluate(run, data, per_image_base, None, ["correct", "plain"], variant="per-image-baseline"))
    for sub in s.sub_blocks:
        model, _ = train_model(run, data, f"per-image-b{s.per_image_block}-s{sub}", protect="per-image",
                               block_size=s.per_image_block, sub_block=sub, arch=s.per_image_arch)
        run.step(ev / f"per-image-s{sub}.json", f"per-image B={s.per_image_block} S={sub}",
                 lambda: evaluate(run, data, model, None, ["correct", "plain"]))

    attacks(run, data, cp_models, baseline)


def best_cp(run: Run) -> str:
    """The trained CP tap with the best access control: the largest gap between the key and no key
    among taps within 2 mIoU points of the baseline with the key (paper 000 picks feature map 6 so)."""
    base = json.loads((run.out / "evaluations" / "baseline.json").read_text())["conditions"]["correct"]["mIoU"]
    gaps, correct = {}, {}
    for tap in run.settings.taps:
        conditions = json.loads((run.out / "evaluations" / f"cp-trained-{tap}.json").read_text())["conditions"]
        correct[tap] = conditions["correct"]["mIoU"]
        gaps[tap] = correct[tap] - conditions["plain"]["mIoU"]
    close = [t for t in run.settings.taps if correct[t] >= base - 2] or list(run.settings.taps)
    return max(reversed(close), key=lambda t: gaps[t])


def attacks(run: Run, data: str, cp_models: dict[str, tuple[Path, Path]], baseline: Path) -> None:
    from safetensors.torch import save_file

    from seglock.models.artifact import read_manifest
    from seglock.models.attacks import finetune_attack, key_space_attack, random_key_attack, weight_matching_attack
    from seglock.models.attacks.weight_matching import train_reference
    from seglock.models.errors import ModelError
    from seglock.models.keyfile import read_key_file

    s = run.settings
    at = run.out / "attacks"
    tap = best_cp(run)
    model, key_file = cp_models[f"trained-{tap}"]
    key = read_key_file(key_file).key
    run.say(f"attacks on the best trained CP model: tap {tap}")

    run.step(at / "key-space.json", "key space",
             lambda: key_space_attack(str(model), data, device=_device(s)))
    run.step(at / f"random-key-cp-{tap}.json", f"random keys x{s.attack_random_keys}",
             lambda: {**random_key_attack(model, data, n=s.attack_random_keys, key=key, device=s.device, seed=s.seed,
                                          progress=run.verbose), "variant": "trained"})
    for fraction in s.fractions:
        run.step(at / f"finetune-cp-{tap}-{round(fraction * 100)}.json", f"fine-tuning with {fraction * 100:g} %",
                 lambda: finetune_attack(model, data, fraction=fraction, key=key, epochs=s.finetune_epochs,
                                         batch_size=s.batch_size, lr=s.lr, device=s.device, seed=s.seed,
                                         progress=run.verbose))

    # Weight matching at every tap: against the attacker's own model (trained on its fraction), against
    # class statistics of its fraction, and, for post-hoc models, against the plain weights they came from
    # (the case of public pretrained weights whose consumers are protected post hoc).
    reference = run.out / "models" / "attacker-reference.safetensors"
    if not reference.is_file():
        started = time.perf_counter()
        ref_model = train_reference(data, read_manifest(baseline), fraction=s.matching_fraction,
                                    epochs=s.reference_epochs, batch_size=s.batch_size, lr=s.lr, device=s.device,
                                    seed=s.seed + 1, progress=run.verbose)
        save_file({k: v.contiguous() for k, v in ref_model.state_dict().items()}, str(reference))
        run.say(f"attacker's reference model on {s.matching_fraction * 100:g} % of the data "
                f"({time.perf_counter() - started:.0f} s)")
    for variant_tap, (model, key_file) in cp_models.items():
        variant, tap = variant_tap.split("-", 1)
        key = read_key_file(key_file).key
        plans = [("weights", reference, f"attacker's model ({s.matching_fraction * 100:g} % data)"),
                 ("activations", None, None), ("statistics", None, None)]
        if variant == "posthoc":
            plans.append(("weights", baseline, "owner's plain weights"))
        for method, ref, label in plans:
            tag = "plain" if ref == baseline else ("attacker" if ref is not None else "data")
            try:
                run.step(at / f"weight-matching-{variant}-{tap}-{method}-{tag}.json",
                         f"weight matching {variant} {tap} {method} vs {tag}",
                         lambda: _labelled(weight_matching_attack(
                             model, data, method=method, reference=ref, fraction=s.matching_fraction, key=key,
                             batch_size=s.batch_size, device=s.device, seed=s.seed, progress=run.verbose),
                             variant=variant, label=label))
            except ModelError as exc:  # e.g. statistics at a tap no BatchNorm follows
                run.say(f"weight matching {variant} {tap} {method}: not applicable ({exc})")


def _labelled(result: dict[str, Any], *, variant: str, label: str | None) -> dict[str, Any]:
    result["variant"] = "post hoc" if variant == "posthoc" else "trained"
    if label:
        result["reference"]["label"] = label
    return result


def _device(s: Settings) -> str:
    from seglock.models.device import resolve_device

    return str(resolve_device(s.device))


# -- command line -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small scale: synthetic data, tiny, CPU")
    parser.add_argument("--data", help="data set folder (required without --quick: e.g. a VOCdevkit folder)")
    parser.add_argument("--out", default=None, help="runs folder (default runs/quick or runs/paper)")
    parser.add_argument("--fresh", action="store_true", help="delete the runs folder first")
    parser.add_argument("--verbose", action="store_true", help="per-epoch progress of every training")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    # Overrides of the preset (for smaller smoke runs, or other models).
    for name, kind in (("scenes", int), ("classes", int), ("size", int), ("arch", str), ("per-image-arch", str),
                       ("epochs", int), ("batch-size", int), ("lr", float), ("device", str), ("seed", int),
                       ("eval-random-keys", int), ("attack-random-keys", int), ("finetune-epochs", int),
                       ("reference-epochs", int), ("backbone-weights", str)):
        parser.add_argument(f"--{name}", type=kind, default=None)
    for name, kind in (("taps", str), ("block-sizes", int), ("sub-blocks", int), ("fractions", float)):
        parser.add_argument(f"--{name}", type=lambda text, kind=kind: tuple(kind(v) for v in text.split(",")),
                            default=None, help="comma-separated")
    args = parser.parse_args(argv)
    if not args.quick and not args.data:
        parser.error("without --quick, give --data (VOC2012 in its VOCdevkit layout, or any folder data set)")
    settings = replace(QUICK if args.quick else PAPER, data=args.data)
    for name in ("scenes", "classes", "size", "arch", "per_image_arch", "epochs", "batch_size", "lr", "device", "seed",
                 "eval_random_keys", "attack_random_keys", "finetune_epochs", "reference_epochs", "backbone_weights",
                 "taps", "block_sizes", "sub_blocks", "fractions"):
        value = getattr(args, name)
        if value is not None:
            settings = replace(settings, **{name: value})
    if settings.arch != QUICK.arch and args.taps is None and settings.arch == "tiny":
        settings = replace(settings, taps=QUICK.taps)
    return args, settings


def main(argv: list[str] | None = None) -> int:
    args, settings = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or ("runs/quick" if args.quick else "runs/paper"))
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    recorded = out / "settings.json"
    wanted = json.loads(json.dumps(asdict(settings)))
    if recorded.is_file() and json.loads(recorded.read_text()) != wanted:
        print(f"reproduce: {out} holds a run with other settings ({recorded}); continue it with the same "
              "options, or start over with --fresh", file=sys.stderr)
        return 2
    recorded.write_text(json.dumps(wanted, indent=2) + "\n")
    run = Run(out, settings, verbose=args.verbose)
    load_before = _load()
    run.say(f"reproduce {'--quick' if args.quick else '(paper scale)'} into {out}: "
            f"{settings.arch} at {settings.size} px, "
            f"{settings.epochs} epochs, device {settings.device}, {torch.get_num_threads()} torch threads")
    reproduce(run)
    wall = time.perf_counter() - run.started
    given = argv if argv is not None else sys.argv[1:]
    command = "python benchmarks/reproduce.py " + " ".join(shlex.quote(a) for a in given)
    summary = {
        "kind": "run",
        "command": command.strip(),
        "settings": asdict(settings),
        "facts": {
            "wall time": f"{wall / 60:.1f} min",
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                       f"{torch.get_num_threads()} threads, device {settings.device}",
            "load average before / after (1 min)": f"{load_before} / {_load()}",
        },
        "wall_seconds": round(wall, 1),
        "steps": run.steps,
    }
    (out / "run.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    from seglock.models.report import write_report

    written = write_report(out, out / "report")
    run.say(f"done in {wall / 60:.1f} min; report: {written['report']} ({len(written['tables'])} tables, "
            f"{len(written['plots'])} plots)")
    return 0


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"


if __name__ == "__main__":
    sys.exit(main())
