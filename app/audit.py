"""What the server writes to the keystore's audit log, and how often.

Every admin action and every denied admin attempt is recorded; a key release is recorded once
per (token, model, key version) and time window, so a client looping on `client-key` costs one
entry, not one per call. A record that cannot be written raises (the route answers 503): a key
is never released unaudited.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

from seglock.keystore import Keystore

log = logging.getLogger("seglock.app")

MAX_REMEMBERED = 100_000  # (token, model) pairs remembered per worker; the oldest are forgotten


class Auditor:
    def __init__(self, keystore: Keystore, *, window_s: float, clock: Callable[[], float] = time.time):
        self.keystore = keystore
        self.window_s = window_s
        self._clock = clock
        self._seen: OrderedDict[Hashable, float] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, actor: str | None, action: str, target: str | None, outcome: str = "ok",
               detail: str | None = None) -> None:
        """Write one entry now (blocking: call it off the event loop); KeystoreError if it cannot be."""
        self.keystore.audit(action, target, outcome, actor=actor, detail=detail)

    def best_effort(self, grant, action: str, target: str | None, outcome: str) -> None:
        """`deps.AuditDep`'s signature: write one entry for `grant`; a failure is logged, not raised."""
        try:
            self.record(grant.token_id, action, target, "error" if outcome == "failed" else outcome)
        except Exception as exc:  # noqa: BLE001 - the console's views must not fail on the log
            log.error("audit entry not written: %s", exc)

    def record_once(self, key: Hashable, actor: str | None, action: str, target: str | None,
                    outcome: str = "ok", detail: str | None = None) -> None:
        """Write the entry unless one with the same `key` was written in this time window."""
        now = self._clock()
        window = int(now // self.window_s) if self.window_s > 0 else now
        with self._lock:
            if self._seen.get(key) == window:
                return
        self.record(actor, action, target, outcome, detail)
        with self._lock:
            self._seen[key] = window
            self._seen.move_to_end(key)
            while len(self._seen) > MAX_REMEMBERED:
                self._seen.popitem(last=False)
