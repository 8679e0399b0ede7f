"""The PostgreSQL keystore against the file keystore, and how fast a change reaches another process.

    python benchmarks/keystore_postgres.py --url postgresql://user@host:5432/db [--tokens 1000] [--json]

(a) one write (a token made) with `--tokens` tokens in the keystore: file vs database, and the ratio;
(b) token verification from memory (what a request pays): file vs database;
(c) propagation: a revocation committed by one keystore instance until another instance (its own
    connections, its own LISTEN) refuses the token; target <= 1 s.
The database at --url gets a schema of its own (dropped afterwards). Times are medians.
"""

from __future__ import annotations

import argparse
import base64
import json
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import psycopg

from seglock.keystore import Keystore

PROPAGATION_TARGET_S = 1.0


def populate(ks: Keystore, tokens: int) -> list[str]:
    with ks.transaction():
        return [ks.create_token(f"t{i}", ["segment"], ["*"])[1] for i in range(tokens)]


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def measure(ks: Keystore, other: Keystore, tokens: int, repeats: int) -> dict:
    made = populate(ks, tokens)
    write_ms = median_ms(lambda: ks.create_token("w", ["segment"], ["*"]), repeats)
    verify_us = median_ms(lambda: other.verify_token(made[0], model="m"), 2000) * 1000
    lags = []
    for i in range(repeats):
        record, token = ks.create_token(f"p{i}", ["segment"], ["*"])
        while other.verify_token(token, model="m") is None:  # the new token arrives first
            time.sleep(0.0005)
        ks.revoke_token(record.id)
        committed = time.perf_counter()
        while other.verify_token(token, model="m") is not None:
            time.sleep(0.0005)
        lags.append(time.perf_counter() - committed)
    return {"write_ms": write_ms, "verify_us": verify_us, "propagation_ms": statistics.median(lags) * 1000,
            "propagation_max_ms": max(lags) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="a PostgreSQL database to use (a scratch schema is made)")
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    env = {"SEGLOCK_MASTER_KEY": base64.b64encode(secrets.token_bytes(32)).decode()}
    schema = f"bench_{secrets.token_hex(4)}"
    with psycopg.connect(args.url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    url = f"{args.url}{'&' if '?' in args.url else '?'}options=-csearch_path%3D{schema}"
    results = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            home = Path(tmp) / "home"
            for name, where in (("file", {}), ("postgres", {"url": url})):
                ks = Keystore.open(home, create=True, env=env, **where)
                other = Keystore.open(home, env=env, **where)
                try:
                    results[name] = measure(ks, other, args.tokens, args.repeats)
                finally:
                    ks.close()
                    other.close()
    finally:
        with psycopg.connect(args.url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
    results["ratios"] = {
        "write_postgres_over_file": results["postgres"]["write_ms"] / results["file"]["write_ms"],
        "verify_postgres_over_file": results["postgres"]["verify_us"] / results["file"]["verify_us"],
        "propagation_max_over_target": results["postgres"]["propagation_max_ms"] / 1000 / PROPAGATION_TARGET_S,
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"keystore with {args.tokens} tokens, medians of {args.repeats}")
    for name in ("file", "postgres"):
        r = results[name]
        print(f"{name:9s} write {r['write_ms']:7.2f} ms   verify {r['verify_us']:6.1f} us   "
              f"revocation seen by another instance after {r['propagation_ms']:.1f} ms "
              f"(max {r['propagation_max_ms']:.1f})")
    for key, value in results["ratios"].items():
        print(f"{key}: {value:.2f}")


if __name__ == "__main__":
    main()
