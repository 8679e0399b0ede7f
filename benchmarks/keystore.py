"""Time the keystore's hot paths at the sizes issue 3 names, on one CPU core.

    python benchmarks/keystore.py [--tokens 10000] [--model-keys 100] [--json]

(a) token verification from the in-memory state (what every request pays, including the one
    stat that notices another process's change), target <= 50 us;
(b) one write (lock, reload check, encrypt, temp file, fsync, rename, fsync dir) of a keystore
    holding that many tokens and model keys, target <= 100 ms.
Times are medians; ratios are measured / target, so <= 1.0 meets the target.
"""

from __future__ import annotations

import os
import sys

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import base64  # noqa: E402
import json  # noqa: E402
import secrets  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from seglock.keystore import Keystore  # noqa: E402

VERIFY_TARGET_US = 50.0
WRITE_TARGET_MS = 100.0


def populate(home: Path, tokens: int, model_keys: int) -> tuple[Keystore, list[str]]:
    env = {"SEGLOCK_MASTER_KEY": base64.b64encode(secrets.token_bytes(32)).decode()}
    ks = Keystore.open(home, create=True, env=env)
    made = []
    with ks.transaction():  # one write for the whole population
        for i in range(tokens):
            made.append(ks.create_token(f"client-{i}", ["segment"], [f"model-{i % model_keys}"])[1])
        for i in range(model_keys):
            perm = [int(x) for x in secrets.SystemRandom().sample(range(512), 512)]
            ks.add_model_key(f"model-{i}", "cp", {"perm": perm})
    return ks, made


def median_us(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1000.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=10_000)
    parser.add_argument("--model-keys", type=int, default=100)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="seglock-bench-") as tmp:
        start = time.perf_counter()
        ks, tokens = populate(Path(tmp), args.tokens, args.model_keys)
        populate_s = time.perf_counter() - start
        size = ks.path.stat().st_size
        sample = tokens[:: max(1, len(tokens) // 500)]
        index = iter(range(10**9))

        def verify_ok():
            token = sample[next(index) % len(sample)]
            assert ks.verify_token(token, model=None, scope="segment") is not None

        def verify_bad():
            token = sample[next(index) % len(sample)]
            assert ks.verify_token(token[:-1] + ("0" if token[-1] != "0" else "1")) is None

        for _ in range(200):
            verify_ok()
        verify_us = median_us(verify_ok, 5000)
        verify_bad_us = median_us(verify_bad, 5000)
        write_ms = median_us(lambda: ks.audit("bench.write", "keystore", "ok"), 15) / 1000.0

    result = {
        "tokens": args.tokens,
        "model_keys": args.model_keys,
        "file_bytes": size,
        "populate_s": round(populate_s, 2),
        "verify_us": round(verify_us, 2),
        "verify_wrong_secret_us": round(verify_bad_us, 2),
        "verify_ratio": round(verify_us / VERIFY_TARGET_US, 3),
        "write_ms": round(write_ms, 2),
        "write_ratio": round(write_ms / WRITE_TARGET_MS, 3),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"keystore with {args.tokens} tokens and {args.model_keys} model keys ({size / 1e6:.1f} MB on disk)")
        print(f"  verify (valid token)      {verify_us:8.2f} us   target {VERIFY_TARGET_US:.0f} us   "
              f"ratio {result['verify_ratio']:.3f}")
        print(f"  verify (wrong secret)     {verify_bad_us:8.2f} us")
        print(f"  one atomic write          {write_ms:8.2f} ms   target {WRITE_TARGET_MS:.0f} ms  "
              f"ratio {result['write_ratio']:.3f}")
    ok = result["verify_ratio"] <= 1.0 and result["write_ratio"] <= 1.0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
