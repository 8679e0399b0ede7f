"""The audit log: append-only entries inside the envelope; never a secret.

Entries are written in the same transaction as the change they record, so the log and the
state cannot disagree after a crash.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from seglock.keystore.errors import InvalidRecord

OUTCOMES = ("ok", "denied", "error")
MAX_FIELD = 500
# A token that slips into a field is cut to its id: the log must never hold a secret.
_TOKEN_LIKE = re.compile(r"(slk_[0-9a-f]{12})_[0-9A-Za-z]+")


def scrub(text: str) -> str:
    """`text` with any token secret replaced by "[redacted]"."""
    return _TOKEN_LIKE.sub(r"\1_[redacted]", text)


@dataclass(frozen=True)
class AuditEntry:
    """time (epoch seconds), acting token id (or "cli"/"system"), action, target, outcome, detail."""

    time: float
    actor: str | None
    action: str
    target: str | None
    outcome: str
    detail: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "outcome": self.outcome,
            "detail": self.detail,
        }

    @cached_property
    def json_text(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AuditEntry:
        return cls(**data)


def make_entry(
    time: float, actor: str | None, action: str, target: str | None, outcome: str, detail: str | None
) -> AuditEntry:
    """A checked, scrubbed entry."""
    if outcome not in OUTCOMES:
        raise InvalidRecord(f"audit outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")
    if not isinstance(action, str) or not action:
        raise InvalidRecord("an audit action must be a non-empty string")
    fields: list[str | None] = []
    for name, value in (("actor", actor), ("action", action), ("target", target), ("detail", detail)):
        if value is None:
            fields.append(None)
            continue
        if not isinstance(value, str):
            raise InvalidRecord(f"audit {name} must be a string or None")
        fields.append(scrub(value)[:MAX_FIELD])
    actor, scrubbed_action, target, detail = fields
    assert scrubbed_action is not None  # checked to be a non-empty string above
    return AuditEntry(time, actor, scrubbed_action, target, outcome, detail)
