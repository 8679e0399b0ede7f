"""`seglock train`: train a model under a protection mode and write its artifact and key."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from seglock.app.cli import CLIError
from seglock.app.commands.common import write_json
from seglock.client.modes import Mode


class RecipeDefault:
    """A flag's default read from `seglock.models.training.config.TrainConfig` when it is shown
    (`--help`) or used, so the defaults live in one place and building the parser imports no torch."""

    def __init__(self, name: str) -> None:
        self.name = name

    def value(self) -> Any:
        from seglock.models.training.config import TrainConfig

        return getattr(TrainConfig, self.name)

    def __str__(self) -> str:
        return str(self.value())

    __repr__ = __str__


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Replace every `RecipeDefault` left in `args` (flags not given) by its value."""
    for name, value in vars(args).items():
        if isinstance(value, RecipeDefault):
            setattr(args, name, value.value())
    return args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a (protected) segmentation model and write its artifact",
        description=(
            "Train a segmentation model on a data set (seglock folder format, VOC2012 or Cityscapes) with "
            "SGD (momentum 0.9) and the poly schedule of paper 000, cross-entropy ignoring 255, keeping the "
            "epoch with the lowest validation loss. Keyed modes (cp, shf, np, ffx) make a fresh key from the "
            "OS CSPRNG and store it in a keystore (--home) or a 0600 key file (--key-out). Each epoch ends "
            "with a checkpoint in OUT/.checkpoint; --resume continues an interrupted run."
        ),
    )
    parser.add_argument("--data", required=True, metavar="DIR", help="data set folder")
    parser.add_argument("--arch", default="tiny", help="architecture (see models.list_architectures; default tiny)")
    parser.add_argument("--protect", default=Mode.NONE.value, choices=[mode.value for mode in Mode],
                        help="protection mode (default none)")
    parser.add_argument("--tap", help="cp: the feature maps the key permutes: one (dec1), several (enc1,enc3,dec1) "
                        "or 'all' (default: the architecture's measured default, see docs/security.md)")
    parser.add_argument("--block-size", type=int, metavar="M",
                        help="shf/np/ffx: block size M (default 4); per-image: block size B (default 16)")
    parser.add_argument("--sub-block", type=int, metavar="S", help="per-image: sub-block size S (default 4)")
    parser.add_argument("--epochs", type=int, default=RecipeDefault("epochs"), metavar="E",
                        help="epochs (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=RecipeDefault("batch_size"), metavar="B",
                        help="batch size (default %(default)s)")
    parser.add_argument("--lr", type=float, default=RecipeDefault("lr"),
                        help="initial learning rate (default %(default)s, paper 000)")
    parser.add_argument("--momentum", type=float, default=RecipeDefault("momentum"),
                        help="SGD momentum (default %(default)s)")
    parser.add_argument("--weight-decay", type=float, default=RecipeDefault("weight_decay"),
                        help="weight decay (default %(default)s)")
    parser.add_argument("--schedule", default=RecipeDefault("schedule"), choices=("poly", "cosine"),
                        help="poly: paper 000 eq. (8); cosine: warm restarts every 10 epochs (paper 001) "
                             "(default %(default)s)")
    parser.add_argument("--size", type=int, default=RecipeDefault("size"), metavar="PX",
                        help="input side in pixels (default %(default)s)")
    parser.add_argument("--device", default=RecipeDefault("device"),
                        help="auto, cpu, cuda, cuda:N or mps (default %(default)s)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="mixed precision (default: on for CUDA)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of initialisation, order and augmentation (default: a secret seed from the OS's "
                             "CSPRNG, recorded nowhere: a guessable seed lets a thief align a CP model's channels)")
    parser.add_argument("--train-split", metavar="SPLIT", help="default: train (folder), train-1318 (VOC), train")
    parser.add_argument("--val-split", metavar="SPLIT", help="default: val (folder), val-146 (VOC), val")
    parser.add_argument("--workers", type=int, default=0, metavar="N", help="data loader processes (default 0)")
    parser.add_argument("--no-augment", dest="augment", action="store_false",
                        help="no random resized crop or flip")
    parser.add_argument("--arch-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="an architecture argument, e.g. width=32 (value read as JSON); repeatable")
    parser.add_argument("--backbone-weights", metavar="FILE", help="a local pretrained backbone weights file")
    parser.add_argument("--out", required=True, metavar="MODEL_DIR", help="artifact folder to write")
    parser.add_argument("--name", help="model name in the manifest and keystore (default: MODEL_DIR's name)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--home", metavar="DIR", help="store the key in this home's keystore")
    where.add_argument("--key-out", metavar="FILE", help="write the key to this file (0600)")
    parser.add_argument("--resume", action="store_true", help="continue from MODEL_DIR/.checkpoint")
    parser.add_argument("--json", metavar="OUT", help="write the run summary as JSON to OUT ('-' for stdout)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.set_defaults(handler=run)


def parse_arch_args(items: list[str]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.isidentifier():
            raise CLIError(f"--arch-arg {item!r}: expected KEY=VALUE, e.g. width=32")
        try:
            kwargs[name] = json.loads(text)
        except json.JSONDecodeError:
            kwargs[name] = text
    return kwargs


def run(args: argparse.Namespace) -> int:
    from seglock.app.home import HomeKeySink
    from seglock.models.train import TrainConfig, train

    resolve_defaults(args)
    config = TrainConfig(
        data=args.data, arch=args.arch, protect=args.protect, tap=args.tap, block_size=args.block_size,
        sub_block=args.sub_block, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule, size=args.size,
        device=args.device, seed=args.seed, name=args.name, train_split=args.train_split,
        val_split=args.val_split, workers=args.workers, augment=args.augment,
        arch_kwargs=parse_arch_args(args.arch_arg), backbone_weights=args.backbone_weights, amp=args.amp,
        resume=args.resume,
    )
    key_sink = HomeKeySink(args.home) if args.home else None
    result = train(config, args.out, key_sink=key_sink, key_out=args.key_out, progress=not args.quiet)
    best = result.history[result.best_epoch - 1]
    where = ""
    if result.key_ref is not None and result.home is not None:
        where = f"; key in {result.home} keystore as {result.manifest.name} v{result.key_ref.version}"
    elif result.key_file is not None:
        where = f"; key in {result.key_file} (0600, a plain secret)"
    mIoU = best.get("val_mIoU")
    shown = "" if mIoU is None else f", val mIoU {mIoU:.2f}"
    print(f"trained {result.manifest.name} ({config.arch}, {result.manifest.mode}) in {result.seconds:.1f} s: "
          f"best epoch {result.best_epoch}/{config.epochs}{shown} -> {result.artifact}{where}",
          file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        write_json(args.json, {**result.summary(), "config": config.to_dict()})
    return 0
