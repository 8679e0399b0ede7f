"""`seglock keystore init|status|change-master-key|audit`: the encrypted keystore of a home folder."""

from __future__ import annotations

import argparse
import json
import os
import sys

from seglock.app.cli import CLIError
from seglock.app.commands.common import CLI_ACTOR, add_actions, add_home_argument, format_time, home_of, open_keystore
from seglock.keystore import Keystore
from seglock.keystore.master import NEW_ENV_PREFIX, master_key_from_env


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

    init = actions.add_parser("init", help="make a new keystore", description="Make HOME/keystore.json (0600).")
    add_home_argument(init)
    init.set_defaults(handler=_init)

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
    store = Keystore.init(home_of(args))
    with store:
        if store.master_key_file is not None:
            print(
                f"made {store.path} under the development master key {store.master_key_file}; in production "
                "pass the master key in from outside (SEGLOCK_MASTER_KEY(_FILE) or SEGLOCK_MASTER_PASSPHRASE(_FILE))",
                file=sys.stderr,
            )
        else:
            print(f"made {store.path} (master key from {store.master_key_origin})", file=sys.stderr)
    return 0


def _status(args: argparse.Namespace) -> int:
    with open_keystore(home_of(args)) as store:
        summary = store.status()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    tokens = summary["tokens"]
    lines = [
        f"keystore       {summary['path']} (mode {summary['file_mode'][2:]}, {summary['file_bytes']} bytes)",
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
        print(f"re-encrypted {store.path} under the master key from {now.origin}", file=sys.stderr)
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
