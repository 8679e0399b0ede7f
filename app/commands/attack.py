"""`seglock attack`: the attacks of paper 000 (brute force, random keys, fine-tuning), weight matching,
downstream retraining, the learned key, and the suite that measures the thief's advantage.

Every action prints a short summary, or the JSON report with --json, and writes the JSON report to
--out FILE; `seglock report` lays those files out as the papers' tables. The owner's key (--key-file
or --home, as for `seglock evaluate`) is optional: the attacker never has it, but given it the report
adds the owner's numbers (and, for weight matching, how many channels were recovered).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from seglock.app.cli import CLIError
from seglock.app.commands.common import add_actions, json_text, write_json
from seglock.app.commands.train import RecipeDefault, resolve_defaults


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "attack",
        help="attack a protected model: the thief's advantage (suite), key space, random keys, fine-tuning, "
             "weight matching, downstream retraining, learned key",
        description=(
            "Run an attack on a stolen model artifact and report it as JSON: the key space and brute-force time "
            "(key-space), N random wrong keys (random-key), retraining on a fraction of the training data "
            "without the key (finetune), or recovering a CP key by matching weights or activation statistics "
            "with an assignment solver (weight-matching), retraining everything after the first keyed tap "
            "(downstream), learning a relaxed key per tap (learned-key), or all of them against the thief's honest "
            "alternatives (suite: the thief's advantage)."
        ),
    )
    actions = add_actions(parser, "attack_command")
    actions.metavar = "ATTACK"

    key_space = actions.add_parser(
        "key-space", help="log2 of every mode's key space and the brute-force time",
        description=(
            "log2 of the key space of cp (c!), shf ((3M^2)!), np (2^(3M^2)), ffx (paper 001's choice of positions, "
            "plus seglock's 128-bit password) and per-image keys (paper 003), with the expected brute-force time "
            "at the measured time of one try (one forward pass and the metric on one image of --data)."
        ),
    )
    key_space.add_argument("--model", metavar="DIR", help="artifact whose own key space and try rate to report")
    key_space.add_argument("--data", metavar="DIR",
                           help="data set to take the timed image from (default: random pixels)")
    key_space.add_argument("--seconds-per-try", type=float, metavar="S", help="use this rate instead of measuring")
    key_space.add_argument("--image-size", type=int, metavar="PX",
                           help="image side for per-image keys (default: the model's)")
    key_space.add_argument("--repeats", type=int, default=5, metavar="N", help="timed tries (median; default 5)")
    _common(key_space, data=False, key=False)
    key_space.set_defaults(handler=_key_space)

    random_key = actions.add_parser(
        "random-key", help="the stolen model with N random wrong keys (paper 000 Fig. 9)",
        description="mIoU of the stolen model without its key and with N random wrong keys (mean, quartiles, values).",
    )
    random_key.add_argument("--n", type=int, default=100, metavar="N", help="wrong keys to try (default 100)")
    _common(random_key)
    random_key.set_defaults(handler=_random_key)

    finetune = actions.add_parser(
        "finetune", help="retrain the stolen weights on a fraction of the data without the key (paper 000 Table IV)",
        description=(
            "Retrain the stolen weights as a plain model on plain images of a fraction of the training split "
            "(SGD, poly schedule, crop and flip), then report mIoU without the key before and after, and the "
            "owner's mIoU with the key when --key-file/--home is given."
        ),
    )
    finetune.add_argument("--fraction", type=float, required=True, metavar="F",
                          help="the attacker's share of the training data, e.g. 0.05 or 0.10")
    _training(finetune)
    finetune.add_argument("--save", metavar="DIR", help="write the fine-tuned model as a plain artifact")
    finetune.add_argument("--recipes", metavar="NAMES",
                          help="thief's recipes to try, the best reported (e.g. sgd-0.02,adam-1e-3, or all; "
                               "default: the one SGD recipe of --lr)")
    _common(finetune)
    finetune.set_defaults(handler=_finetune)

    matching = actions.add_parser(
        "weight-matching", help="recover a CP key by matching weights or activation statistics",
        description=(
            "Recover the channel permutation of a cp model with a linear assignment: 'weights' matches the "
            "consumer layer's weight columns against a reference (--reference: a local weights file or artifact, "
            "e.g. public pretrained weights; without it, a plain model the attacker trains on --fraction of the "
            "data); 'activations' matches each producer channel's class profile to each consumer column's class "
            "sensitivity on --fraction of the data; 'statistics' finds the key under which the consumers' mean "
            "outputs on --fraction of the data agree with the BatchNorm statistics stored after "
            "them. Reports the channels recovered (given the owner's key) and the mIoU reached with the recovered key."
        ),
    )
    matching.add_argument("--method", choices=("weights", "activations", "statistics"), default="weights",
                          help="what to match (default weights)")
    matching.add_argument("--reference", metavar="PATH",
                          help="reference weights: a .safetensors/.pth file or an artifact folder")
    matching.add_argument("--fraction", type=float, default=0.1, metavar="F",
                          help="the attacker's share of the training data (default 0.1)")
    _training(matching)
    _common(matching)
    matching.set_defaults(handler=_weight_matching)

    downstream = actions.add_parser(
        "downstream", help="freeze the stolen network up to its first keyed tap, retrain the rest on the data",
        description=(
            "Keep every layer of a stolen cp model before its first keyed tap (CP leaves them untouched), frozen "
            "with its BatchNorm statistics, and train the rest of the network on --fraction of the training data "
            "(from a fresh initialisation, or from the stolen weights with --init stolen), with each recipe; "
            "reports the best mIoU without any key."
        ),
    )
    downstream.add_argument("--fraction", type=float, default=0.1, metavar="F",
                            help="the attacker's share of the training data (default 0.1)")
    downstream.add_argument("--init", choices=("fresh", "stolen"), default="fresh",
                            help="start of the retrained part (default fresh)")
    _recipes(downstream)
    _common(downstream)
    downstream.set_defaults(handler=_downstream)

    learned = actions.add_parser(
        "learned-key", help="learn a relaxed permutation per keyed tap (Sinkhorn), rounded to a key",
        description=(
            "With the stolen weights frozen, optimise one doubly-stochastic matrix per keyed tap (Sinkhorn "
            "normalisation, temperature annealed towards 0) on --fraction of the training data, round each to "
            "a permutation with an assignment solver, and report the mIoU of the stolen model with that key "
            "(and the channels recovered, given the owner's key)."
        ),
    )
    learned.add_argument("--fraction", type=float, default=0.1, metavar="F",
                         help="the attacker's share of the training data (default 0.1)")
    learned.add_argument("--epochs", type=int, default=RecipeDefault("epochs"), metavar="E",
                         help="passes over the data (default %(default)s)")
    learned.add_argument("--batch-size", type=int, default=RecipeDefault("batch_size"), metavar="B",
                         help="batch size (default %(default)s)")
    learned.add_argument("--lr", type=float, default=0.1, help="Adam learning rate of the key logits (default 0.1)")
    _common(learned)
    learned.set_defaults(handler=_learned_key)

    suite = actions.add_parser(
        "suite", help="the thief's advantage: every attack against training from scratch (and public weights)",
        description=(
            "Run every attack on the stolen model with --fraction of the training data, and the thief's honest "
            "alternatives with the same data and recipes: training from scratch and, with --backbone-weights, "
            "from public pretrained weights. Reports per attack the mIoU, wall time and advantage = attack mIoU - "
            "best alternative (points); the verdict is the largest advantage. Every training runs each recipe "
            "and keeps the best (the worst case for the owner). On a CPU, --epochs and --recipes set the budget; "
            "--cache keeps the alternatives for later suites on the same data."
        ),
    )
    suite.add_argument("--fraction", type=float, default=0.1, metavar="F",
                       help="the attacker's share of the training data (default 0.1)")
    suite.add_argument("--backbone-weights", metavar="FILE",
                       help="a local file of the architecture's public pretrained weights (the public alternative)")
    suite.add_argument("--attacks", metavar="NAMES",
                       help="attacks to run (default all): no-key, finetune, downstream, learned-key, class-profile, "
                            "statistics, weights-trained, weights-public")
    suite.add_argument("--cache", metavar="DIR", help="keep and reuse the alternatives' results in DIR")
    suite.add_argument("--repeats", type=int, default=1, metavar="N",
                       help="thief seeds per training (default 1); each training's mIoU is the mean over the seeds, "
                            "so the verdict is not one lucky run")
    _recipes(suite)
    _common(suite)
    suite.set_defaults(handler=_suite)


def _common(parser: argparse.ArgumentParser, *, data: bool = True, key: bool = True) -> None:
    if data:
        parser.add_argument("--model", required=True, metavar="DIR",
                            help="the stolen model's artifact folder (or a model name in --home)")
        parser.add_argument("--data", required=True, metavar="DIR",
                            help="data set (folder format, VOC2012, Cityscapes)")
    if key:
        where = parser.add_mutually_exclusive_group()
        where.add_argument("--key-file", metavar="FILE", help="the owner's key file, to compare against")
        where.add_argument("--home", metavar="DIR", help="the home whose keystore holds the owner's key")
    parser.add_argument("--device", default="cpu", help="cpu, auto, cuda, cuda:N or mps (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of wrong keys, the attacker's subset, training")
    parser.add_argument("--json", nargs="?", const="-", metavar="OUT",
                        help="write the JSON report to OUT; alone or with '-', print it on stdout")
    parser.add_argument("--out", metavar="FILE", help="write the JSON report to FILE")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def _training(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=RecipeDefault("epochs"), metavar="E",
                        help="attacker's training epochs (default %(default)s, the owner's recipe)")
    parser.add_argument("--batch-size", type=int, default=RecipeDefault("batch_size"), metavar="B",
                        help="batch size (default %(default)s)")
    parser.add_argument("--lr", type=float, default=RecipeDefault("lr"),
                        help="initial learning rate (default %(default)s)")


def _recipes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipes", metavar="NAMES",
                        help="thief's recipes, comma-separated or 'all' (default sgd-0.02,sgd-0.005,adam-1e-3); "
                             "known: sgd-0.02, sgd-0.05, sgd-0.005, adam-1e-3, adam-3e-4")
    parser.add_argument("--epochs", type=int, default=RecipeDefault("epochs"), metavar="E",
                        help="epochs of every training (the budget; default %(default)s, the owner's recipe)")
    parser.add_argument("--batch-size", type=int, default=RecipeDefault("batch_size"), metavar="B",
                        help="batch size (default %(default)s)")


def _check_budget(args: argparse.Namespace) -> None:
    resolve_defaults(args)
    if args.epochs < 1 or args.batch_size < 1:
        raise CLIError("--epochs and --batch-size must be at least 1")


def resolve(args: argparse.Namespace) -> Any:
    """Resolve --model (a folder, or a model name in --home) in place; the owner's key or None."""
    from seglock.app.commands.models import key_from_file, key_from_home, resolve_artifact
    from seglock.models import read_manifest

    args.model = str(resolve_artifact(args.model, getattr(args, "home", None)))
    manifest = read_manifest(args.model)
    if getattr(args, "key_file", None):
        return key_from_file(args.key_file, manifest)
    if getattr(args, "home", None):
        return key_from_home(args.home, manifest)
    return None


def emit(args: argparse.Namespace, report: dict[str, Any], summary: str) -> int:
    """The summary line (stderr when JSON goes to stdout), the JSON on stdout and/or to --out."""
    targets = [t for t in (args.out, args.json) if t]
    for target in targets:
        if target != "-":
            write_json(target, report)
    to_stdout = "-" in targets
    print(summary, file=sys.stderr if to_stdout else sys.stdout)
    if to_stdout:
        sys.stdout.write(json_text(report))
    return 0


def _key_space(args: argparse.Namespace) -> int:
    from seglock.models.attacks import key_space_attack

    if args.data and not args.model:
        raise CLIError("--data gives the timed image of --model: give --model too")
    size = (args.image_size, args.image_size) if args.image_size else None
    if args.model:
        from seglock.app.commands.models import resolve_artifact

        args.model = str(resolve_artifact(args.model, None))
    report = key_space_attack(args.model, args.data, seconds_per_try=args.seconds_per_try,
                              image_size=size, device=args.device, repeats=args.repeats)
    own = report.get("own")
    if own is not None:
        bf = own.get("brute_force") or {}
        summary = (f"{report['model']} ({own['mode']}): key space 2^{own['seglock_log2']:.1f}; "
                   f"brute force ~ {bf.get('human', 'not applicable: the model has no key')}")
    else:
        summary = f"key spaces of {len(report['entries'])} mode settings"
    return emit(args, report, summary)


def _random_key(args: argparse.Namespace) -> int:
    from seglock.models.attacks import random_key_attack

    if args.n < 1:
        raise CLIError("--n must be at least 1")
    key = resolve(args)
    report = random_key_attack(args.model, args.data, n=args.n, key=key, device=args.device,
                               seed=args.seed, progress=not args.quiet)
    stats = next((v for k, v in report["conditions"].items() if k.startswith("random")), {})
    plain = report["conditions"]["plain"]["mIoU"]
    if stats.get("applicable", True) and isinstance(stats.get("mIoU"), dict):
        s = stats["mIoU"]
        summary = (f"{report['model']}: no key mIoU {plain:.2f}; {args.n} wrong keys mIoU mean {s['mean']:.2f} "
                   f"(min {s['min']:.2f}, median {s['median']:.2f}, max {s['max']:.2f})")
    else:
        summary = f"{report['model']}: no key mIoU {plain:.2f}; {stats.get('reason', 'no key to guess')}"
    if "correct" in report["conditions"]:
        summary += f"; owner's key {report['conditions']['correct']['mIoU']:.2f}"
    return emit(args, report, summary)


def _finetune(args: argparse.Namespace) -> int:
    from seglock.models.attacks import finetune_attack

    if args.save and args.recipes:
        raise CLIError("--save keeps the single-recipe model: give it without --recipes")
    key = resolve(resolve_defaults(args))
    report = finetune_attack(args.model, args.data, fraction=args.fraction, key=key,
                             epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                             device=args.device, seed=args.seed, progress=not args.quiet, save_to=args.save,
                             recipes=args.recipes)
    summary = (f"{report['model']}: fine-tuned on {report['attacker_images']} images ({args.fraction * 100:g} %): "
               f"mIoU without the key {report['before']['mIoU']:.2f} -> {report['after']['mIoU']:.2f}")
    if report.get("owner"):
        summary += f"; owner's key {report['owner']['mIoU']:.2f}"
    return emit(args, report, summary)


def _weight_matching(args: argparse.Namespace) -> int:
    from seglock.models.attacks import weight_matching_attack

    if args.method != "weights" and args.reference:
        raise CLIError(f"--reference applies to --method weights; '{args.method}' matches against the data")
    key = resolve(resolve_defaults(args))
    report = weight_matching_attack(
        args.model, args.data, method=args.method, reference=args.reference, fraction=args.fraction, key=key,
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, device=args.device, seed=args.seed,
        progress=not args.quiet)
    miou = report["mIoU"]
    summary = (f"{report['model']} tap {report['tap']} ({args.method}): "
               f"mIoU with the recovered key {miou['recovered']:.2f}")
    if "fraction_recovered" in report:
        summary += (f"; {report['channels_recovered']}/{report['channels']} channels recovered"
                    f" (owner's key {miou['owner']:.2f}, no key {miou['plain']:.2f})")
    return emit(args, report, summary)


def _stolen_cp_model(args: argparse.Namespace):
    """The stolen cp model and the thief's share of the data, as the training attacks take them."""
    from seglock.models.attacks.stolen import load_stolen

    _check_budget(args)
    return load_stolen(args.model, args.data, fraction=args.fraction, key=resolve(args), device=args.device,
                       seed=args.seed, cp_only=True)


def _add_baselines(report: dict, stolen) -> None:
    """What the thief gets with no key and what the owner gets, beside the attack's own score."""
    report["no_key"] = stolen.score_no_key()
    report["owner"] = stolen.score_owner()


def _downstream(args: argparse.Namespace) -> int:
    from seglock.models.attacks.downstream import downstream_attack
    from seglock.models.attacks.recipes import parse_recipes

    stolen = _stolen_cp_model(args)
    report = downstream_attack(stolen, recipes=parse_recipes(args.recipes, epochs=args.epochs,
                                                             batch_size=args.batch_size),
                               init=args.init, progress=not args.quiet)
    _add_baselines(report, stolen)
    summary = (f"{report['model']}: retrained after {report['first_tap']} ({report['init']}, "
               f"{report['frozen_parameters']}/{report['parameters']} parameters kept): mIoU without the key "
               f"{report['mIoU']:.2f} (best recipe {report['best_recipe']})")
    return emit(args, report, summary)


def _learned_key(args: argparse.Namespace) -> int:
    from seglock.models.attacks.learned_key import learned_key_attack

    stolen = _stolen_cp_model(args)
    report = learned_key_attack(stolen, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                progress=not args.quiet)
    _add_baselines(report, stolen)
    summary = f"{report['model']} taps {','.join(report['taps'])}: mIoU with the learned key {report['mIoU']:.2f}"
    if "fraction_recovered" in report:
        summary += f"; {report['fraction_recovered'] * 100:.0f} % of the channels recovered"
    return emit(args, report, summary)


def _suite(args: argparse.Namespace) -> int:
    from seglock.models.attacks.suite import suite_attack

    _check_budget(args)
    key = resolve(args)
    attacks = None if not args.attacks else [a.strip() for a in args.attacks.split(",") if a.strip()]
    report = suite_attack(
        args.model, args.data, fraction=args.fraction, key=key, backbone_weights=args.backbone_weights,
        recipes=args.recipes, epochs=args.epochs, batch_size=args.batch_size, attacks=attacks,
        cache_dir=args.cache, device=args.device, seed=args.seed, repeats=args.repeats, progress=not args.quiet)
    best = report["best_alternative"]
    verdict = report["advantage"]
    summary = (f"{report['model']}: thief's advantage {verdict:+.2f} mIoU points ({report['worst_attack']}) over "
               f"the best honest alternative ({best:.2f})" if verdict is not None else
               f"{report['model']}: no attack applied")
    return emit(args, report, summary)
