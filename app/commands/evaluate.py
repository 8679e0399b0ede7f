"""`seglock evaluate`: aAcc, mIoU, mAcc of a model with its key, without it, and with wrong keys."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

from seglock.app.cli import CLIError
from seglock.app.commands.common import write_json
from seglock.app.commands.models import key_from_file, key_from_home, resolve_artifact


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="measure a model with its key, without it, and with wrong keys",
        description=(
            "Score a model on a data set under access-control conditions: correct (its key; per-image: fresh "
            "keys), plain (no key: cp weights as they are, unencrypted images for block and per-image models), "
            "random:N (N random wrong keys of the model's kind; mean, min, quartiles, max). Metrics: aAcc, "
            "mIoU, mAcc (percent) and per-class IoU."
        ),
    )
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="artifact folder (or a model name in --home)")
    parser.add_argument("--data", required=True, metavar="DIR", help="data set folder")
    parser.add_argument("--split", help="split to score (default: val, or all for a folder without splits.json)")
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument("--key-file", metavar="FILE", help="the model's key file")
    keys.add_argument("--home", metavar="DIR", help="take the model's key from this home's keystore")
    parser.add_argument("--conditions", default="correct,plain,random:100",
                        help="comma-separated: correct, plain, random:N (default correct,plain,random:100)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="B", help="batch size (default 8)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the wrong keys and per-image keys, for a repeatable report (default 0)")
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT ('-' for stdout)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from seglock.models import read_manifest
    from seglock.models.evaluate import evaluate_conditions, parse_conditions

    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be positive, got {args.batch_size}")
    if args.seed < 0:
        raise CLIError(f"--seed must be non-negative, got {args.seed}")
    parse_conditions(args.conditions)
    artifact = resolve_artifact(args.model, args.home)
    manifest = read_manifest(artifact)
    key = None
    if args.key_file:
        key = key_from_file(args.key_file, manifest)
    elif args.home:
        key = key_from_home(args.home, manifest)
    with contextlib.ExitStack() as stack:
        unseal = None
        if args.home and Path(args.home).resolve() / "models" in Path(artifact).resolve().parents:
            # a model of the home, by name: its weights are decrypted in memory with the home's data key
            from seglock.app.home import Home
            from seglock.keystore import Keystore

            store = stack.enter_context(Keystore.open(args.home))
            unseal = Home(args.home, store).unsealer(Path(artifact).parent.name, Path(artifact))
        results = evaluate_conditions(artifact, args.data, key=key, conditions=args.conditions,
                                      device=args.device, seed=args.seed, progress=not args.quiet,
                                      batch_size=args.batch_size, split=args.split, unseal=unseal)
    out = sys.stderr if args.json == "-" else sys.stdout
    print(format_table(results), file=out)
    if args.json:
        write_json(args.json, results)
    return 0


def format_table(results: dict[str, Any]) -> str:
    lines = [f"{results['model']} ({results['protection']['mode']}) on {results['data']} "
             f"[{results['split']}, {results['images']} images]",
             f"{'condition':<14} {'aAcc':>7} {'mIoU':>7} {'mAcc':>7}"]
    for label, scores in results["conditions"].items():
        if label.startswith("random"):
            if not scores.get("applicable"):
                lines.append(f"{label:<14} n/a ({scores['reason']})")
                continue
            lines.append(f"{label:<14} " + " ".join(f"{scores[m]['mean']:7.2f}" for m in ("aAcc", "mIoU", "mAcc"))
                         + "  (mean; mIoU min {min:.2f} q1 {q1:.2f} median {median:.2f} q3 {q3:.2f} "
                           "max {max:.2f})".format(**scores["mIoU"]))
        else:
            lines.append(f"{label:<14} " + " ".join(f"{scores[m]:7.2f}" for m in ("aAcc", "mIoU", "mAcc")))
    return "\n".join(lines)
