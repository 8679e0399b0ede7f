"""`seglock tokens create|list|revoke`: API tokens in the keystore (a token is shown once)."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from datetime import UTC, datetime

from seglock.app.cli import CLIError
from seglock.app.commands.common import CLI_ACTOR, add_actions, add_home_argument, format_time, home_of, open_keystore
from seglock.keystore.tokens import ALL_MODELS, SCOPES, is_token_id, parse_token

_DURATION = re.compile(r"(\d+)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_expiry(text: str, now: float) -> float:
    """`30d`, `12h`, `90m`, `3600s`, `2w` from now, or an ISO date/time (UTC unless it says)."""
    match = _DURATION.fullmatch(text.strip())
    if match:
        seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        if seconds <= 0:
            raise CLIError(f"--expires {text}: the duration must be positive")
        return now + seconds
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CLIError(
            f"--expires {text!r}: give a duration (30d, 12h, 90m, 3600s, 2w) or an ISO date such as 2030-01-31"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if when.timestamp() <= now:
        raise CLIError(f"--expires {text}: that time has passed")
    return when.timestamp()


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tokens",
        help="make, list and revoke API tokens",
        description="API tokens (slk_<id>_<secret>) live in the keystore as hashes; a token is printed once.",
    )
    actions = add_actions(parser, "tokens_command")

    create = actions.add_parser(
        "create", help="make a token and print it once",
        description="Make a token and print it on stdout; it is never shown again.",
    )
    add_home_argument(create)
    create.add_argument("--name", required=True, help="a label for the token (who or what uses it)")
    create.add_argument(
        "--scope", action="append", choices=SCOPES, required=True,
        help="a scope: segment (use models) or admin (manage tokens and keys); repeat for both",
    )
    create.add_argument(
        "--model", action="append", default=[], metavar="M",
        help=f"a model the token may use; repeat for more, or {ALL_MODELS!r} for all",
    )
    create.add_argument("--expires", metavar="WHEN", help="30d, 12h, 90m, 2w, or an ISO date (default: never)")
    create.add_argument("--json", action="store_true", help="print {id, token, ...} as JSON")
    create.set_defaults(handler=_create)

    listing = actions.add_parser("list", help="list tokens (never their secrets)", description="List every token.")
    add_home_argument(listing)
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_list)

    revoke = actions.add_parser(
        "revoke", help="revoke a token", description="Revoke a token; servers refuse it from their next request."
    )
    add_home_argument(revoke)
    revoke.add_argument("id", metavar="ID", help="the token id (the part after slk_)")
    revoke.set_defaults(handler=_revoke)


def _create(args: argparse.Namespace) -> int:
    expires_at = parse_expiry(args.expires, time.time()) if args.expires else None
    with open_keystore(home_of(args)) as store:
        record, token = store.create_token(args.name, args.scope, args.model, expires_at=expires_at, actor=CLI_ACTOR)
    if args.json:
        print(json.dumps({**record.public_dict(), "token": token}))
    else:
        print(token)
    print(
        f"made token {record.id} ({', '.join(record.scopes)}; models {', '.join(record.models) or '-'}; "
        f"expires {format_time(record.expires_at)}): keep it now, it is not shown again",
        file=sys.stderr,
    )
    return 0


def _list(args: argparse.Namespace) -> int:
    now = time.time()
    with open_keystore(home_of(args)) as store:
        records = store.list_tokens()
    if args.json:
        print(json.dumps([{**r.public_dict(), "status": r.status(now)} for r in records], indent=2))
        return 0
    rows = [("ID", "NAME", "SCOPES", "MODELS", "STATUS", "CREATED", "EXPIRES")]
    rows += [
        (r.id, r.name, ",".join(r.scopes), ",".join(r.models) or "-", r.status(now),
         format_time(r.created_at), format_time(r.expires_at))
        for r in records
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _revoke(args: argparse.Namespace) -> int:
    token_id = args.id
    parts = parse_token(token_id)
    if parts is not None:  # a whole (leaked) token pasted in: its id is all we need
        token_id = parts[0]
    if not is_token_id(token_id):
        shown = args.id if len(args.id) <= 16 else args.id[:16] + "..."  # never echo a mistyped secret
        raise CLIError(f"{shown!r} is not a token id (12 hex characters, as `seglock tokens list` shows)")
    with open_keystore(home_of(args)) as store:
        was_revoked = store.get_token(token_id).revoked
        store.revoke_token(token_id, actor=CLI_ACTOR)
    print(f"token {token_id} {'was already' if was_revoked else 'is now'} revoked", file=sys.stderr)
    return 0
