"""What encrypting weights at rest costs at load time, on one CPU core.

    python benchmarks/at_rest.py [--mb 100] [--repeats 5] [--json]

Prints the AES-256-GCM throughput of `seglock.models.at_rest` (seal and unseal of a random
buffer of --mb MiB, in the 4 MiB chunks a home writes) and, for the bundled demo-cp artifact,
the median time of `load_artifact` on the plain folder and on the same revision encrypted, and
their ratio. Times are medians of --repeats runs.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"  # one core, set before numpy and torch load their thread pools

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from seglock.models import at_rest, load_artifact, read_manifest
from seglock.models.zoo import zoo_dir


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100, help="buffer size in MiB (default 100)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per timing (default 5)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)

    key = at_rest.DataKey("dbenchmark000", os.urandom(32))
    aad = at_rest.associated_data("bench", 1)
    plain = os.urandom(args.mb << 20)
    sealed = at_rest.seal(plain, key, aad)
    seal_s = _median(lambda: at_rest.seal(plain, key, aad), args.repeats)
    unseal_s = _median(lambda: at_rest.unseal(sealed, key, aad), args.repeats)

    source = zoo_dir() / "demo-cp"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "r1"
        shutil.copytree(source, folder)
        weights = folder / read_manifest(folder).weights.file
        weights.write_bytes(at_rest.seal(weights.read_bytes(), key, aad))
        load_artifact(source)  # warm up: imports, first allocations
        plain_load = _median(lambda: load_artifact(source), args.repeats)
        sealed_load = _median(lambda: load_artifact(folder, unseal=lambda d: at_rest.unseal(d, key, aad)),
                              args.repeats)
        size = read_manifest(folder).weights.bytes

    result = {
        "buffer_mib": args.mb,
        "seal_mib_per_s": round(args.mb / seal_s, 1),
        "unseal_mib_per_s": round(args.mb / unseal_s, 1),
        "demo_cp_weights_bytes": size,
        "demo_cp_load_plain_ms": round(plain_load * 1000, 2),
        "demo_cp_load_encrypted_ms": round(sealed_load * 1000, 2),
        "load_ratio_encrypted_over_plain": round(sealed_load / plain_load, 3),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"AES-256-GCM at rest, {args.mb} MiB: seal {result['seal_mib_per_s']} MiB/s, "
          f"unseal {result['unseal_mib_per_s']} MiB/s (one core)")
    print(f"load_artifact demo-cp ({size} bytes): plain {result['demo_cp_load_plain_ms']} ms, encrypted "
          f"{result['demo_cp_load_encrypted_ms']} ms, ratio {result['load_ratio_encrypted_over_plain']}")


if __name__ == "__main__":
    main()
