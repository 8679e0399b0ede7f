"""`seglock keystore init|status|change-master-key|audit`: the encrypted keystore of a home folder."""

from __future__ import annotations

import argparse
import json
import os
import sys

from seglock.app.cli import CLIError
from seglock.app.commands.common import CLI_ACTOR, add_actions, add_home_argument, format_time, home_of, open_keystore
from seglock.keystore import Keystore, KeystoreExists
from seglock.keystore.errors import KeystoreError
from seglock.keystore.master import NEW_ENV_PREFIX, master_key_from_env
from seglock.keystore.storage import URL_VARIABLE, keystore_url


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "keystore",
        help="make and inspect the encrypted keystore",
        description=(
            "The keystore (HOME/keystore.json) holds model keys, hashed API tokens and the audit log, "
            "encrypted under a master key from SEGLOCK_MASTER_KEY(_FILE), SEGLOCK_MASTER_PASSPHRASE(_FILE), "
            "or HOME/master.key (made on a developer's first start)."
        ),
    )
    actions = add_actions(parser, "keystore_command")

    init = actions.add_parser(
        "init", help="make a new keystore (file), or bring a database's schema up to date and make one there",
        description="Make HOME/keystore.json (0600). With --keystore postgresql://... (or SEGLOCK_KEYSTORE_URL): "
                    "apply the schema migrations the database lacks, in order, then make the keystore there "
                    "unless it has one (then it is left as it is, and the exit code is 0).")
    add_home_argument(init)
    init.set_defaults(handler=_init)

    migrate = actions.add_parser(
        "migrate", help="copy a home's keystore file into a PostgreSQL keystore",
        description="Copy every token, model key version and audit entry of FROM_HOME/keystore.json into the "
                    "empty database keystore at URL (schema made first), sealed under the same master key, and "
                    "check the copy entry by entry. The file is left as it is. Servers then need that master "
                    "key from SEGLOCK_MASTER_KEY(_FILE) or SEGLOCK_MASTER_PASSPHRASE(_FILE).")
    migrate.add_argument("--from", dest="source", required=True, metavar="FROM_HOME",
                         help="the home folder whose keystore.json is copied")
    migrate.add_argument("--to", dest="target", metavar="URL",
                         help=f"postgresql://... (default: ${URL_VARIABLE} or the file ${URL_VARIABLE}_FILE names)")
    migrate.set_defaults(handler=_migrate)

    status = actions.add_parser(
        "status", help="check that the keystore opens and summarise it",
        description="Open the keystore (checking the master key and the file) and print a summary without secrets.",
    )
    add_home_argument(status)
    status.add_argument("--json", action="store_true", help="print the summary as JSON")
    status.set_defaults(handler=_status)

    change = actions.add_parser(
        "change-master-key", help="re-encrypt the keystore under a new master key",
        description=(
            "Re-encrypt the keystore atomically. The current key comes from the usual sources; the new one from "
            "SEGLOCK_NEW_MASTER_KEY(_FILE) or SEGLOCK_NEW_MASTER_PASSPHRASE(_FILE). A keystore opened with "
            "HOME/master.key and no new key given gets a fresh random key in HOME/master.key."
        ),
    )
    add_home_argument(change)
    change.set_defaults(handler=_change_master_key)

    audit = actions.add_parser("audit", help="print the audit log", description="Print the audit log, oldest first.")
    add_home_argument(audit)
    audit.add_argument("--limit", type=int, metavar="N", help="only the last N entries")
    audit.add_argument("--json", action="store_true", help="print JSON lines")
    audit.add_argument("--verify", action="store_true",
                       help="check the audit log's HMAC chain instead of printing it (exit 1 if broken)")
    audit.set_defaults(handler=_audit)


def _init(args: argparse.Namespace) -> int:
    home = home_of(args)  # --keystore, if given, is in the environment now
    url = keystore_url(os.environ)
    if url:
        return _init_database(url)
    store = Keystore.init(home)
    with store:
        if store.master_key_file is not None:
            print(
                f"made {store.location} under the development master key {store.master_key_file}; in production "
                "pass the master key in from outside (SEGLOCK_MASTER_KEY(_FILE) or SEGLOCK_MASTER_PASSPHRASE(_FILE))",
                file=sys.stderr,
            )
        else:
            print(f"made {store.location} (master key from {store.master_key_origin})", file=sys.stderr)
    return 0


def _init_database(url: str) -> int:
    from seglock.keystore.postgres import SCHEMA_VERSION, PostgresStorage

    storage = PostgresStorage(url)
    try:
        applied = storage.prepare()
    finally:
        storage.close()
    done = f"applied migration {', '.join(map(str, applied))}" if applied else "nothing to apply"
    print(f"schema of {storage.location} at version {SCHEMA_VERSION} ({done})", file=sys.stderr)
    try:
        store = Keystore.init(None, url=url)
    except KeystoreExists:
        print(f"a keystore already exists at {storage.location}; it was left as it is", file=sys.stderr)
        return 0
    with store:
        print(f"made the keystore at {store.location} (master key from {store.master_key_origin})", file=sys.stderr)
    return 0


def _migrate(args: argparse.Namespace) -> int:
    url = args.target or keystore_url(os.environ)
    if not url:
        raise CLIError(f"give the database keystore: --to postgresql://... or {URL_VARIABLE}(_FILE)")
    file_env = {k: v for k, v in os.environ.items() if not k.startswith(URL_VARIABLE)}  # --from is a file
    with Keystore.open(args.source, env=file_env) as source:
        with source.copy_to(url, actor=CLI_ACTOR) as target:
            _check_copy(source, target)
            tokens, models, entries = len(target.list_tokens()), len(target.models()), len(target.audit_log())
            print(f"copied {source.location} to {target.location}: {tokens} tokens, {models} models' keys, "
                  f"{entries} audit entries; checked entry by entry", file=sys.stderr)
        if source.master_key_file is not None:
            print(f"the copy is sealed under the development master key {source.master_key_file}: give every "
                  "server that key as SEGLOCK_MASTER_KEY_FILE", file=sys.stderr)
    return 0


def _check_copy(source: Keystore, target: Keystore) -> None:
    """Every record of `source` is in `target`, equal, material and hashes included."""
    problems = []
    if target.list_tokens() != source.list_tokens():
        problems.append("tokens")
    for model in source.models():
        versions = [v.version for v in source.model_key_versions(model)]
        originals = [source.get_model_key(model, v) for v in versions]
        copies = [target.get_model_key(model, v) for v in versions]
        if copies != originals or [c.material for c in copies] != [o.material for o in originals]:
            problems.append(f"model {model}")
    if target.models() != source.models():
        problems.append("models")
    copied = target.audit_log()[:-1]  # a database keeps the newest DB_AUDIT_KEEP entries (the last: the migration)
    originals = source.audit_log()
    if copied != originals[len(originals) - len(copied):]:
        problems.append("audit log")
    if problems:
        raise KeystoreError(f"the copy at {target.location} differs from {source.location} in: {', '.join(problems)}")


def _status(args: argparse.Namespace) -> int:
    with open_keystore(home_of(args)) as store:
        summary = store.status()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    tokens = summary["tokens"]
    if summary.get("backend") == "postgresql":
        where = (f"keystore       {summary['path']} (schema version {summary['schema_version']}, row version "
                 f"{summary['row_version']}, {summary['envelope_bytes']} bytes)")
    else:
        where = f"keystore       {summary['path']} (mode {summary['file_mode'][2:]}, {summary['file_bytes']} bytes)"
    lines = [
        where,
        f"format         version {summary['format_version']}, {summary['cipher']}, kdf {summary['kdf']['name']}",
        f"master key     from {summary['master_key_source']}",
        f"generation     {summary['generation']} (created {format_time(summary['created_at'])})",
        f"tokens         {tokens['active']} active, {tokens['revoked']} revoked, {tokens['expired']} expired",
        f"audit entries  {summary['audit_entries']}",
    ]
    for model, versions in summary["models"].items():
        states = ", ".join(f"v{v['version']} {v['kind']} {v['state']}" for v in versions)
        lines.append(f"model key      {model}: {states}")
    print("\n".join(lines))
    return 0


def _change_master_key(args: argparse.Namespace) -> int:
    new = master_key_from_env(os.environ, NEW_ENV_PREFIX)
    with open_keystore(home_of(args)) as store:
        now = store.change_master_key(new, actor=CLI_ACTOR)
        print(f"re-encrypted {store.location} under the master key from {now.origin}", file=sys.stderr)
    return 0


def _audit(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise CLIError("--limit must be a positive integer")
    if args.verify:
        with open_keystore(home_of(args)) as store:
            report = store.verify_audit()
        if args.json:
            print(json.dumps({"ok": report.ok, "entries": report.entries, "segments": report.segments,
                              "first_seq": report.first_seq, "earlier_key_entries": report.earlier_key_entries,
                              "problem": report.problem}))
        elif report.ok:
            print(f"audit log intact: {report.entries} entries in {report.segments} segments "
                  f"(from entry {report.first_seq})")
        else:
            print(f"audit log BROKEN: {report.problem}", file=sys.stderr)
        return 0 if report.ok else 1
    with open_keystore(home_of(args)) as store:
        entries = store.audit_log(limit=args.limit)
    for entry in entries:
        if args.json:
            print(json.dumps(entry.to_json()))
        else:
            print(
                f"{format_time(entry.time)}  {entry.actor or '-'}  {entry.action}  {entry.target or '-'}  "
                f"{entry.outcome}{'  ' + entry.detail if entry.detail else ''}"
            )
    return 0
