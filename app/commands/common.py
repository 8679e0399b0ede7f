"""What the command groups share: usage of a bare group, the home folder, JSON output, progress.

Errors are not translated here or in the handlers: `seglock.app.cli.main` turns user errors into
one line and exit code 2 (see `seglock.app.cli.user_error_message`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seglock.app.cli import CLIError

if TYPE_CHECKING:
    from tqdm import tqdm

    from seglock.keystore import Keystore

CLI_ACTOR = "cli"  # the actor the keystore's audit log records for the command line
DEFAULT_HOME = "seglock-home"  # as `seglock serve`
HOME_ENV = "SEGLOCK_HOME"


# -- command groups -----------------------------------------------------------------------------


def usage(parser: argparse.ArgumentParser) -> int:
    """A group run without its action: its help on stderr, exit code 2."""
    parser.print_help(sys.stderr)
    return 2


def add_actions(parser: argparse.ArgumentParser, dest: str) -> argparse._SubParsersAction:
    """The actions of a command group; the group alone prints its usage."""
    actions = parser.add_subparsers(dest=dest, metavar="ACTION")
    parser.set_defaults(handler=lambda args: usage(parser))
    return actions


# -- the home folder ----------------------------------------------------------------------------


def add_home_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--home", metavar="DIR",
        help=f"home folder holding keystore.json (default: ${HOME_ENV}, else ./{DEFAULT_HOME})",
    )
    parser.add_argument(
        "--keystore", metavar="URL",
        help="postgresql://... : use the database keystore instead of HOME/keystore.json "
             "(default: $SEGLOCK_KEYSTORE_URL or the file $SEGLOCK_KEYSTORE_URL_FILE names)",
    )


def home_of(args: argparse.Namespace) -> Path:
    """--home, else $SEGLOCK_HOME, else ./seglock-home. A --keystore URL goes to the environment, as
    `seglock serve` does with its flags, so every keystore this command opens is that database."""
    if getattr(args, "keystore", None):
        os.environ["SEGLOCK_KEYSTORE_URL"] = args.keystore
        os.environ.pop("SEGLOCK_KEYSTORE_URL_FILE", None)
    return Path(args.home or os.environ.get(HOME_ENV) or DEFAULT_HOME)


def open_keystore(home: str | Path, *, create: bool = False) -> Keystore:
    from seglock.keystore import Keystore

    return Keystore.open(home, create=create)


def format_time(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- results ------------------------------------------------------------------------------------


def json_text(data: Any) -> str:
    """Indented JSON of a result; NaN and infinities become null (JSON has neither)."""
    from seglock.models.report import json_ready

    return json.dumps(json_ready(data), indent=2, allow_nan=False, default=str) + "\n"


def write_json(target: str, data: Any) -> None:
    """The JSON of `data` to the file `target` (its folder made), or to stdout for '-'."""
    text = json_text(data)
    if target == "-":
        sys.stdout.write(text)
        return
    path = Path(target)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise CLIError(f"cannot write {target}: {exc.strerror or exc}") from None


def print_result(as_json: bool, result: Any, line: str) -> int:
    """The result as JSON on stdout with --json, else its one-line summary; exit code 0."""
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print(line)
    return 0


def progress_bar(total: int, desc: str, unit: str, *, quiet: bool = False) -> tqdm:
    """A progress bar on stderr, hidden when stderr is not a terminal or with --quiet."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=True if quiet else None)
