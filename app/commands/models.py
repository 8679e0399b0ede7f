"""`seglock models protect|list|import|rotate-key|export|encrypt`: model artifacts and their keys, offline.

protect     a plain artifact becomes a cp artifact: its consumers at a tap re-indexed by a fresh key
            (DESIGN "Protection modes": no accuracy lost, no training)
list        the models of a home (the revision in use) and/or artifact folders
import      copy an artifact into a home (seglock.app.home.Home.import_artifact: cp keys are replaced)
rotate-key  re-key a home's cp model: the flow of the server's admin route (Home.rotate_key)
export      write a home's model as a plain-file artifact (cp: the keyed weights, not the folded ones)
encrypt     encrypt at rest the revisions of a home that still hold plain weights (Home.encrypt_at_rest)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from seglock.app.cli import CLIError
from seglock.app.commands.common import CLI_ACTOR, add_actions, add_home_argument, home_of, print_result
from seglock.client.modes import Mode, check_model_name, is_model_name


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="protect, list, import, re-key, export and encrypt model artifacts",
        description="Model artifacts (manifest.json + weights.safetensors) and their keys, offline.",
    )
    actions = add_actions(parser, "models_command")

    protect = actions.add_parser(
        "protect", help="make a plain model a cp model with a fresh key (no training, no accuracy lost)",
        description=(
            "Load a plain (mode none) artifact, re-index the consumers of one feature map (the tap) by a fresh "
            "channel permutation from the OS CSPRNG, and write a cp artifact that computes the same masks only "
            "with the key. The key goes to a home's keystore (--home) or a 0600 key file (--key-out)."
        ),
    )
    protect.add_argument("--model", required=True, metavar="PLAIN_DIR", help="the plain artifact folder")
    protect.add_argument("--tap", help="the feature maps to key: one (dec1), several (enc1,enc3,dec1) or 'all' "
                         "(default: the architecture's measured default, see docs/security.md)")
    protect.add_argument("--out", required=True, metavar="DIR", help="the cp artifact folder to write")
    protect.add_argument("--name", help="model name (default: DIR's name)")
    where = protect.add_mutually_exclusive_group(required=True)
    where.add_argument("--home", metavar="DIR", help="store the key in this home's keystore")
    where.add_argument("--key-out", metavar="FILE", help="write the key to this file (0600)")
    protect.add_argument("--json", action="store_true", help="print the result as JSON")
    protect.set_defaults(handler=_protect)

    listing = actions.add_parser(
        "list", help="list a home's models and/or artifact folders",
        description="List the models of a home (the revision each serves) and any artifact folders given.",
    )
    listing.add_argument("dirs", nargs="*", metavar="DIR", help="artifact folders to list as well")
    listing.add_argument("--home", metavar="DIR",
                         help="home folder (default: $SEGLOCK_HOME, else ./seglock-home, unless DIRs are given)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_list)

    imp = actions.add_parser(
        "import", help="copy an artifact into a home (cp models get a fresh key)",
        description=(
            "Copy an artifact into HOME/models/NAME/r1. Keyed models need their key: from --key-file, or from "
            "the home's keystore when the artifact was trained or protected into it. A cp model is re-keyed to "
            "a fresh key on the way in; shf/np/ffx keep theirs (a new input key needs re-training)."
        ),
    )
    add_home_argument(imp)
    imp.add_argument("--model", required=True, metavar="DIR", help="the artifact folder")
    imp.add_argument("--name", help="name in the home (default: the manifest's name)")
    imp.add_argument("--key-file", metavar="FILE", help="the model's key file")
    imp.add_argument("--json", action="store_true", help="print the result as JSON")
    imp.set_defaults(handler=_import)

    rotate = actions.add_parser(
        "rotate-key", help="re-key a home's cp model (same masks, new key, old key destroyed)",
        description=(
            "Offline key rotation of a cp model in a home: exact re-key, new revision, keystore commit, old "
            "revision and key destroyed (the flow of POST /admin/models/NAME/rotate-key). Safe beside a running "
            "server on this home: rotations take a per-model lock, and the server follows on its next request."
        ),
    )
    add_home_argument(rotate)
    rotate.add_argument("--model", required=True, metavar="NAME", help="the model's name in the home")
    rotate.add_argument("--json", action="store_true", help="print the result as JSON")
    rotate.set_defaults(handler=_rotate)

    export = actions.add_parser(
        "export", help="write a home's model as a plain-file artifact for use outside the server",
        description=(
            "Write the revision a home serves as an ordinary artifact folder (manifest.json + "
            "weights.safetensors, not encrypted at rest): a model that leaves the server. A cp model is "
            "written with its protected (keyed, not folded) weights, so the file alone is worth what the "
            "key-less model is; the key stays in the home's keystore, and --key-out also writes it to a "
            "0600 key file. `seglock models import` takes the folder back (with --key-file)."
        ),
    )
    add_home_argument(export)
    export.add_argument("--model", required=True, metavar="NAME", help="the model's name in the home")
    export.add_argument("--out", required=True, metavar="DIR", help="the artifact folder to write (new or empty)")
    export.add_argument("--key-out", metavar="FILE", help="also write the model's key to this file (0600)")
    export.add_argument("--json", action="store_true", help="print the result as JSON")
    export.set_defaults(handler=_export)

    encrypt = actions.add_parser(
        "encrypt", help="encrypt at rest the revisions of a home that still hold plain weights",
        description=(
            "A home made before at-rest encryption keeps plain weights.safetensors files until a rotation "
            "rewrites them. This encrypts them now (AES-256-GCM under each model's data key, kept in the "
            "keystore), one file at a time, each replaced atomically; revisions already encrypted are left "
            "as they are. Safe beside a running server on this home."
        ),
    )
    add_home_argument(encrypt)
    encrypt.add_argument("--model", metavar="NAME", help="only this model (default: every model of the home)")
    encrypt.add_argument("--json", action="store_true", help="print the result as JSON")
    encrypt.set_defaults(handler=_encrypt)


# -- helpers shared with `seglock evaluate` --------------------------------------------------------


def current_revision(home: Path, name: str, keystore=None) -> Path:
    """The revision of `name` a server would serve, found without changing anything."""
    from seglock.app.home import Home

    return Home(home, keystore).serving_revision(name)


def resolve_artifact(model: str, home: str | None) -> Path:
    """An artifact folder given as a path, or as a model name in `home`."""
    path = Path(model)
    if (path / "manifest.json").is_file():
        return path
    if home is not None and "/" not in model:
        from seglock.keystore import Keystore

        with Keystore.open(home) as store:
            return current_revision(Path(home), model, store)
    raise CLIError(f"{model} is not an artifact folder (no manifest.json)"
                   + ("" if home else "; to name a model in a home, give --home"))


def key_from_file(path: str, manifest) -> Any:
    """The key in a key file, checked against the manifest it is for."""
    from seglock.models.evaluate import EvaluateError, check_key
    from seglock.models.keyfile import read_key_file

    found = read_key_file(path)
    if not manifest.mode.has_model_key:
        raise CLIError(f"model {manifest.name} ({manifest.mode}) takes no key, but a key file was given")
    if found.model is not None and found.model != manifest.name:
        raise CLIError(f"key file {path} is for model {found.model!r}, not {manifest.name!r}")
    try:
        check_key(manifest, found.key)
    except EvaluateError as exc:
        raise CLIError(f"key file {path} does not fit: {exc}") from None
    return found.key


def key_from_home(home: str | Path, manifest) -> Any:
    """The key the manifest names (id and version), from the home's keystore."""
    from seglock.app.home import Home
    from seglock.keystore import Keystore

    if not manifest.mode.has_model_key:
        return None
    with Keystore.open(home) as store:
        return Home(home, store).model_key(manifest)


def _check_name(name: str) -> None:
    try:
        check_model_name(name)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def _default_name(out: Path) -> str:
    name = out.resolve().name
    if not is_model_name(name):
        raise CLIError(f"cannot use {name!r} as a model name: pass --name")
    return name


# -- handlers --------------------------------------------------------------------------------------


def _protect(args: argparse.Namespace) -> int:
    from seglock.models import KeyRef, load_artifact, protect, save_artifact
    from seglock.models.keyfile import write_key_file
    from seglock.models.protect import CPKey

    out = Path(args.out)
    name = args.name or _default_name(out)
    _check_name(name)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CLIError(f"{out} already exists and is not empty")
    key_out = Path(args.key_out) if args.key_out else None
    if key_out is not None and key_out.exists():
        raise CLIError(f"key file {key_out} already exists; refusing to overwrite it")
    model, manifest = load_artifact(args.model)
    if manifest.mode is not Mode.NONE:
        hint = "; to change a cp model's key use rotate-key" if manifest.mode is Mode.CP else ""
        raise CLIError(f"{args.model} is {manifest.mode}-protected: protect takes a plain (none) model{hint}")
    if args.home is not None:
        _check_home_free(Path(args.home), name)
    from seglock.models.protect import join_taps
    from seglock.models.taps import default_taps

    started = time.perf_counter()
    key: CPKey = protect(model, args.tap or default_taps(manifest.architecture))
    tap = join_taps(key.taps)
    seconds = time.perf_counter() - started
    if key_out is not None:
        write_key_file(key_out, key, model=name)
        import secrets

        key_ref = KeyRef(id=f"file-{secrets.token_hex(6)}", version=1)  # random: says nothing about the key
    else:
        from seglock.keystore import Keystore

        with Keystore.open(args.home, create=True) as store:
            version = store.add_model_key(name, "cp", key.to_dict(), actor=CLI_ACTOR)
        key_ref = KeyRef(id=version.id, version=version.version)
    saved = save_artifact(model, out, name=name, class_names=list(manifest.class_names),
                          input_size=list(manifest.input_size), normalization=manifest.normalization,
                          protection={"mode": Mode.CP.value, "tap": tap}, key=key_ref)
    total = time.perf_counter() - started
    stored = str(key_out) if key_out is not None else f"{args.home} keystore ({name} v{key_ref.version})"
    channels = sum(key.tap_channels.values())
    result = {"model": name, "artifact": str(out), "source": str(args.model), "tap": tap,
              "channels": saved.protection["channels"], "key_space_log2": round(key.key_space_log2, 1),
              "key": {"id": key_ref.id, "version": key_ref.version}, "key_stored": stored,
              "protect_seconds": round(seconds, 4), "seconds": round(total, 3),
              "sha256": saved.weights.sha256}
    return print_result(args.json, result, f"protected {manifest.name} at tap {tap} ({channels} channels, key space "
                               f"2^{key.key_space_log2:.0f}) in {seconds:.4f} s ({total:.2f} s with saving) -> {out}; "
                               f"key in {stored}")


def _check_home_free(home: Path, name: str) -> None:
    from seglock.app.home import Home
    from seglock.keystore import Keystore

    with Keystore.open(home, create=True) as store:
        taken = Home(home, store).is_taken(name)
    if taken:
        raise CLIError(f"{home} already has a model named {name!r}: choose another name (--name)")


def _list(args: argparse.Namespace) -> int:
    from seglock.models import read_manifest

    rows: list[dict[str, Any]] = []
    if args.home or not args.dirs:
        rows += _home_rows(home_of(args))
    for folder in args.dirs:
        manifest = read_manifest(folder)
        rows.append(_row(manifest, Path(folder), None))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no models")
        return 0
    header = ("NAME", "MODE", "ARCH", "CLASSES", "INPUT", "KEY", "REV", "PATH")
    table = [header] + [(r["name"], r["protection"]["mode"], r["architecture"], str(r["num_classes"]),
                         "x".join(map(str, r["input_size"])),
                         "-" if r["key"] is None else f"v{r['key']['version']}",
                         "-" if r["revision"] is None else f"r{r['revision']}", r["path"]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip())
    return 0


def _row(manifest, path: Path, revision: int | None) -> dict[str, Any]:
    return {"name": manifest.name, "architecture": manifest.architecture, "num_classes": manifest.num_classes,
            "input_size": list(manifest.input_size), "protection": dict(manifest.protection),
            "key": None if manifest.key is None else {"id": manifest.key.id, "version": manifest.key.version},
            "revision": revision, "path": str(path)}


def _home_rows(home: Path) -> list[dict[str, Any]]:
    from seglock.app.home import Home
    from seglock.keystore import Keystore, KeystoreError
    from seglock.models import read_manifest

    if not Home(home).models_dir.is_dir():
        if not (home / "keystore.json").exists():
            raise CLIError(f"{home} is not a seglock home (no keystore.json, no models/)")
        return []
    store = None
    try:
        store = Keystore.open(home)
    except KeystoreError:
        store = None  # still list what is on disk; the revision in use is then the newest
    rows = []
    try:
        for name in Home(home).model_names():
            try:
                path = current_revision(home, name, store)
            except CLIError:
                continue
            rows.append(_row(read_manifest(path), path, int(path.name[1:])))
    finally:
        if store is not None:
            store.close()
    return rows


def _import(args: argparse.Namespace) -> int:
    from seglock.app.home import Home
    from seglock.keystore import Keystore
    from seglock.models import read_manifest

    home = home_of(args)
    manifest = read_manifest(args.model)
    key = None
    if args.key_file:
        key = key_from_file(args.key_file, manifest)
    elif manifest.mode.has_model_key:
        if not (home / "keystore.json").exists():
            raise CLIError(f"model {manifest.name} is {manifest.mode}-protected: give its --key-file")
        key = key_from_home(home, manifest)
    made = not (home / "keystore.json").exists()
    with Keystore.open(home, create=True) as store:
        imported = Home(home, store).import_artifact(Path(args.model), name=args.name,
                                                                           key=key, actor=CLI_ACTOR)
    if made:
        print(f"made a new keystore in {home}", file=sys.stderr)
    result = {"model": imported.name, "home": str(home), "protection": dict(imported.protection),
              "key_version": None if imported.key is None else imported.key.version,
              "rekeyed": imported.mode is Mode.CP}
    note = "; re-keyed to a fresh key" if imported.mode is Mode.CP else ""
    message = f"imported {args.model} into {home} as {imported.name} ({imported.mode}){note}"
    return print_result(args.json, result, message)


def _rotate(args: argparse.Namespace) -> int:
    from seglock.app.home import Home
    from seglock.keystore import Keystore

    home = home_of(args)
    _check_name(args.model)
    with Keystore.open(home) as store:
        started = time.perf_counter()
        rotation = Home(home, store).rotate_key(args.model)
    result = {**rotation.summary(), "seconds": round(time.perf_counter() - started, 3)}
    return print_result(args.json, result, f"rotated {result['model']}: key v{result['previous_key_version']} -> "
                               f"v{result['key_version']} in {result['seconds']:.3f} s (old key destroyed)")


def _export(args: argparse.Namespace) -> int:
    from seglock.app.home import Home
    from seglock.keystore import Keystore
    from seglock.models import read_manifest
    from seglock.models.keyfile import write_key_file

    home = home_of(args)
    _check_name(args.model)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CLIError(f"{out} already exists and is not empty")
    key_out = Path(args.key_out) if args.key_out else None
    if key_out is not None and key_out.exists():
        raise CLIError(f"key file {key_out} already exists; refusing to overwrite it")
    if not (home / "keystore.json").exists():
        raise CLIError(f"{home} is not a seglock home (no keystore.json)")
    with Keystore.open(home) as store:
        target = Home(home, store)
        path = target.serving_revision(args.model)
        manifest = read_manifest(path)
        if key_out is not None and not manifest.mode.has_model_key:
            raise CLIError(f"model {args.model} ({manifest.mode}) has no key to write (drop --key-out)")
        key = target.model_key(manifest, args.model) if key_out is not None else None
        target.export_revision(args.model, path, out)
    if key_out is not None:
        write_key_file(key_out, key, model=args.model)
    stored = str(key_out) if key_out is not None else (
        f"{home} keystore ({args.model} v{manifest.key.version})" if manifest.key is not None else None)
    result = {"model": args.model, "home": str(home), "revision": int(path.name[1:]), "artifact": str(out),
              "protection": dict(manifest.protection), "sha256": manifest.weights.sha256,
              "bytes": manifest.weights.bytes,
              "key": None if manifest.key is None else {"id": manifest.key.id, "version": manifest.key.version},
              "key_stored": stored}
    keyed = "" if stored is None else f"; key in {stored}"
    return print_result(args.json, result,
                        f"exported {args.model} r{result['revision']} ({manifest.mode}) from {home} -> {out} "
                        f"(plain file, sha256 {manifest.weights.sha256[:12]}){keyed}")


def _encrypt(args: argparse.Namespace) -> int:
    from seglock.app.errors import ServiceError
    from seglock.app.home import Home
    from seglock.keystore import Keystore
    from seglock.models import ModelError

    home = home_of(args)
    if not (home / "keystore.json").exists():
        raise CLIError(f"{home} is not a seglock home (no keystore.json)")
    with Keystore.open(home) as store:
        target = Home(home, store)
        if args.model is not None:
            _check_name(args.model)
            if not target.revisions(args.model):
                raise CLIError(f"{home} has no model {args.model!r}")
        names = [args.model] if args.model is not None else target.model_names()
        done: dict[str, list[int]] = {}
        for name in names:
            try:
                done[name] = target.encrypt_at_rest(name, actor=CLI_ACTOR)
            except (ServiceError, ModelError) as exc:
                raise CLIError(f"model {name}: {exc}") from None
    count = sum(len(revs) for revs in done.values())
    result = {"home": str(home), "encrypted": done, "revisions": count}
    listed = ", ".join(f"{n} r{r}" for n, revs in done.items() for r in revs) or "none (all already encrypted)"
    return print_result(args.json, result, f"encrypted at rest in {home}: {listed}")
