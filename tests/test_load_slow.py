"""Issue 13's load figures as slow tests: benchmarks/load.py against a real `seglock serve`.

    python -m pytest tests/test_load_slow.py -m slow -s   # a few minutes on 2 cores; -s prints the figures
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "load.py"


def run_load(tmp_path, *args: str) -> dict:
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, str(SCRIPT), *args, "--json", str(out)], capture_output=True, text=True,
                          timeout=1500, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)  # the figures, for `pytest -s`
    return json.loads(out.read_text())


@pytest.mark.slow
def test_32_concurrent_worst_case_uploads_keep_peak_rss_under_2_gb(tmp_path):
    result = run_load(tmp_path, "worst", "--concurrency", "32", "--rounds", "2")
    assert result["only_allowed_statuses"], result["statuses"]  # every answer 200, 413, 422 or 503
    assert set(result["statuses"]["grey16-40M"]) == {"413"}  # the 6300x6300 16-bit PNG
    assert set(result["statuses"]["v2-json-answer-1.1M"]) == {"413"}  # a JSON answer over its limit
    for label in ("rgb-16M", "v2-u8-20MB", "v2-json-4MB"):  # the largest admitted: answered
        assert "200" in result["statuses"][label], result["statuses"]
    assert set(result["statuses"]["v2-u16-20MB"]) <= {"422", "503"}  # parsed in full, then refused: a plain model
    assert result["peak_rss_mb"] < 2048, result


@pytest.mark.slow
def test_10000_client_key_calls_grow_the_keystore_by_less_than_10_kb(tmp_path):
    result = run_load(tmp_path, "keystore", "--calls", "10000")
    assert result["statuses"] == {"200": 10000}
    assert result["keystore_growth_bytes"] < 10_000, result
    assert result["audit_log_growth_bytes"] < 10_000, result  # one entry per token, model and hour
