"""`seglock data`: make the synthetic and the texture-mosaic data sets, and check a data set on disk."""

from __future__ import annotations

import argparse
import json

from seglock.app.commands.common import add_actions, progress_bar


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data",
        help="make and inspect data sets",
        description=(
            "Make the synthetic scene data set or the texture-mosaic set from real photos, or check a data "
            "set in the folder, VOC2012 or Cityscapes layout."
        ),
    )
    actions = add_actions(parser, "data_command")

    synth = actions.add_parser(
        "synth",
        help="write synthetic scenes in the folder format",
        description=(
            "Write procedural scenes whose classes are shapes and textures (colours are shared by all "
            "classes): DIR/images/*.png, DIR/masks/*.png (class indices; never 255), DIR/classes.json, "
            "DIR/splits.json. The same seed gives byte-identical files."
        ),
    )
    synth.add_argument("--out", required=True, metavar="DIR", help="output directory")
    synth.add_argument("--n", type=int, default=200, metavar="N", help="number of scenes (default 200)")
    synth.add_argument("--seed", type=int, default=0, metavar="S", help="random seed, >= 0 (default 0)")
    synth.add_argument("--size", type=int, default=256, metavar="PX", help="scene side in pixels (default 256)")
    synth.add_argument(
        "--classes", type=int, default=6, metavar="K",
        help="number of classes including background, 2..10 (default 6)",
    )
    synth.add_argument(
        "--val-fraction", type=float, default=0.1, metavar="F",
        help="share of scenes in the val split of splits.json (default 0.1)",
    )
    synth.add_argument("--force", action="store_true", help="replace a data set already in DIR")
    synth.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    synth.set_defaults(handler=_synth)

    textures = actions.add_parser(
        "textures",
        help="write texture mosaics cut from real photographs in the folder format",
        description=(
            "Write a second data set made of real photographs that scikit-image ships (needs the `data` "
            "extra: pip install 'seglock[data]'): each scene's background is a crop of a clutter photo "
            "(astronaut, Hubble deep field, camera, rocket, coffee, coins) and 1-4 shapes are filled "
            "with crops of texture photos, one class each: brick, grass, gravel, fur (chelsea) and "
            "tissue (ihc). Validation scenes crop from source regions that training scenes never "
            "touch. Same layout as `data synth`; the same seed gives byte-identical files."
        ),
    )
    textures.add_argument("--out", required=True, metavar="DIR", help="output directory")
    textures.add_argument("--n", type=int, default=400, metavar="N", help="number of scenes (default 400)")
    textures.add_argument("--seed", type=int, default=1, metavar="S", help="random seed, >= 0 (default 1)")
    textures.add_argument("--size", type=int, default=128, metavar="PX", help="scene side in pixels (default 128)")
    textures.add_argument(
        "--val-fraction", type=float, default=0.1, metavar="F",
        help="share of scenes in the val split (default 0.1); val scenes crop from held-out photo regions",
    )
    textures.add_argument("--force", action="store_true", help="replace a data set already in DIR")
    textures.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    textures.set_defaults(handler=_textures)

    info = actions.add_parser(
        "info",
        help="check a data set and summarise it",
        description=(
            "Load a data set (format detected unless --kind), check its layout, and print its size and classes."
        ),
    )
    info.add_argument("root", metavar="DIR", help="data directory")
    info.add_argument("--kind", choices=("folder", "voc", "cityscapes"), help="data format (default: detected)")
    info.add_argument("--split", help="split to check (default: all for folder, train otherwise)")
    info.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    info.set_defaults(handler=_info)


def _synth(args: argparse.Namespace) -> int:
    from seglock.models.data import write_synth_dataset

    with progress_bar(args.n, "synth", "scene") as bar:
        summary = write_synth_dataset(
            args.out, args.n, args.seed, args.size, args.classes, args.val_fraction,
            force=args.force, on_scene=lambda: bar.update(1),
        )
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"wrote {summary['scenes']} scenes ({summary['train']} train, {summary['val']} val) to {summary['out']}")
    return 0


def _textures(args: argparse.Namespace) -> int:
    from seglock.models.data.textures import photos_dir, write_textures_dataset

    photos_dir()  # the missing-extra error before a progress bar starts
    with progress_bar(args.n, "textures", "scene") as bar:
        summary = write_textures_dataset(
            args.out, args.n, args.seed, args.size, args.val_fraction,
            force=args.force, on_scene=lambda: bar.update(1),
        )
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"wrote {summary['scenes']} scenes ({summary['train']} train, {summary['val']} val) to {summary['out']}")
        pairs = zip(summary["classes"], summary["class_pixel_share"], strict=True)
        shares = ", ".join(f"{name} {100 * share:.1f} %" for name, share in pairs)
        print(f"pixel shares: {shares}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from seglock.models.data import describe, detect_format, open_dataset

    kind = args.kind or detect_format(args.root)
    split = args.split or ("all" if kind == "folder" else "train")
    dataset = open_dataset(args.root, split, kind=kind, size=None)
    dataset.load(0)  # one item read end to end: the files decode and the mask fits the classes
    summary = {"kind": kind, "split": split, **describe(dataset)}
    del summary["size"]
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{kind} data set {args.root}, split {split}: {summary['samples']} samples")
        print(f"{len(dataset.classes)} classes: {', '.join(dataset.classes)}")
    return 0
