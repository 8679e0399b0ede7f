"""`seglock serve` flags are made from the Settings class: one per field, real defaults in --help."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import SecretStr

from seglock.app import settings as settings_module
from seglock.app.cli import build_parser
from seglock.app.commands.serve import flag_of, settings_from_args
from seglock.app.settings import Settings, cpu_quota, threads_per_worker, usable_cores

# A value other than the default for every field, and the flags that give it.
SAMPLES = {
    "home": (Path("elsewhere/home"), ["--home", "elsewhere/home"]),
    "host": ("0.0.0.0", ["--host", "0.0.0.0"]),
    "port": (9001, ["--port", "9001"]),
    "workers": (3, ["--workers", "3"]),
    "threads": (1, ["--threads", "1"]),
    "device": ("cpu", ["--device", "CPU"]),
    "amp": ("bf16", ["--amp", "bf16"]),
    "channels_last": (False, ["--no-channels-last"]),
    "backend": ("compile", ["--backend", "compile"]),
    "pin_forward": ("off", ["--pin-forward", "off"]),
    "compile_budget_s": (60.0, ["--compile-budget", "60"]),
    "compile_cache": ("/tmp/inductor", ["--compile-cache", "/tmp/inductor"]),
    "max_batch": (16, ["--max-batch", "16"]),
    "tune_batch": (False, ["--no-tune-batch"]),
    "max_wait_ms": (2.5, ["--max-wait-ms", "2.5"]),
    "queue_size": (7, ["--queue-size", "7"]),
    "max_body_bytes": (4096, ["--max-body-bytes", "4096"]),
    "max_pixels": (1000, ["--max-pixels", "1000"]),
    "max_json_body_bytes": (2048, ["--max-json-body-bytes", "2048"]),
    "max_json_mask_pixels": (500, ["--max-json-mask-pixels", "500"]),
    "max_json_tensor_bytes": (8192, ["--max-json-tensor-bytes", "8192"]),
    "decode_concurrency": (2, ["--decode-concurrency", "2"]),
    "decode_queue": (3, ["--decode-queue", "3"]),
    "audit_window_s": (60.0, ["--audit-window-s", "60"]),
    "keystore_lock_timeout_s": (5.0, ["--keystore-lock-timeout-s", "5"]),
    "initial_token_ttl_s": (3600.0, ["--initial-token-ttl-s", "3600"]),
    "metrics_public": (True, ["--metrics-public"]),
    "rate_limit_rps": (2.5, ["--rate-limit-rps", "2.5"]),
    "rate_limit_burst": (4, ["--rate-limit-burst", "4"]),
    "import_demo": (False, ["--no-import-demo"]),
    "warmup": (False, ["--no-warmup"]),
    "log_level": ("debug", ["--log-level", "debug"]),
    "models_root": (Path("/srv/seglock/models"), ["--models-root", "/srv/seglock/models"]),
    "keystore_url": (SecretStr("postgresql://seglock@db/seglock"), ["--keystore", "postgresql://seglock@db/seglock"]),
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in Settings.model_fields:
        monkeypatch.delenv(f"SEGLOCK_{name.upper()}", raising=False)


def _serve_parser():
    return build_parser()._subparsers._group_actions[0].choices["serve"]


def _settings(*flags: str) -> Settings:
    return settings_from_args(build_parser().parse_args(["serve", *flags]))


def test_every_setting_has_its_flag():
    options = {action.dest: action.option_strings for action in _serve_parser()._actions}
    for name in Settings.model_fields:
        assert flag_of(name) in options.get(name, []), name
    assert set(SAMPLES) == set(Settings.model_fields)  # a new field needs a sample here


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_a_flag_value_reaches_the_settings(name):
    value, flags = SAMPLES[name]
    assert value != Settings.model_fields[name].default
    settings = _settings(*flags)
    assert getattr(settings, name) == value
    others = {n: getattr(settings, n) for n in Settings.model_fields if n != name}
    assert others == {n: getattr(Settings(), n) for n in others}


def test_no_flag_leaves_the_environment_and_a_flag_overrides_it(monkeypatch):
    monkeypatch.setenv("SEGLOCK_MAX_BATCH", "3")
    assert _settings().max_batch == 3
    assert _settings("--max-batch", "5").max_batch == 5


def test_help_shows_the_real_defaults():
    help_text = " ".join(_serve_parser().format_help().split())
    defaults = Settings()
    for name in Settings.model_fields:
        value = getattr(defaults, name)
        shown = str(value).lower() if isinstance(value, bool) else str(value)
        assert f"(default: {shown}; env SEGLOCK_{name.upper()})" in help_text, name
    assert "(default: 8; env SEGLOCK_MAX_BATCH)" in help_text
    assert "(default: 20971520; env SEGLOCK_MAX_BODY_BYTES)" in help_text


def test_the_flag_names_used_before_still_work():
    settings = _settings("--home", "h", "--host", "::1", "--port", "8123", "--device", "cpu", "--workers", "2",
                         "--max-batch", "4", "--max-wait-ms", "10", "--queue-size", "9", "--rate-limit", "1.5",
                         "--amp", "off", "--no-demo", "--log-level", "warning")
    assert (settings.home, settings.host, settings.port, settings.device, settings.workers) == (
        Path("h"), "::1", 8123, "cpu", 2)
    assert (settings.max_batch, settings.max_wait_ms, settings.queue_size, settings.rate_limit_rps) == (4, 10.0, 9, 1.5)
    assert (settings.amp, settings.import_demo, settings.log_level) == ("off", False, "warning")


def test_a_bad_choice_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", "--amp", "fp8"])
    assert exited.value.code == 2
    assert re.search(r"--amp: invalid choice: '?fp8'?", capsys.readouterr().err)


@pytest.mark.parametrize(("threads", "workers", "cores", "environ", "expected"), [
    (0, 2, 2, {}, 1),  # a worker per core: one thread each (and `auto` pins it)
    (0, 2, 8, {}, 4),
    (0, 3, 8, {}, 2),
    (0, 4, 2, {}, 1),  # more workers than cores: still at least one
    (0, 1, 8, {}, 0),  # one worker: torch's default, a thread per core
    (3, 2, 8, {}, 3),  # set: as set
    (0, 2, 8, {"OMP_NUM_THREADS": "2"}, 0),  # the operator's OpenMP setting rules
])
def test_threads_default_to_the_cores_shared_among_the_workers(threads, workers, cores, environ, expected):
    assert threads_per_worker(threads, workers, cores, environ) == expected


@pytest.mark.parametrize(("files", "expected"), [
    ({"cpu.max": "200000 100000\n"}, 2.0),  # cgroup v2: 2 CPUs
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "max 100000\n"}, None),  # no limit
    ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),  # no cgroup files
])
def test_the_cpu_quota_is_read_from_cgroup_v2_or_v1(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu_quota(tmp_path) == expected


@pytest.mark.parametrize(("quota", "expected"), [(None, 8), (2.0, 2), (1.5, 2), (0.5, 1), (12.0, 8)])
def test_usable_cores_are_the_affinity_set_capped_by_the_quota(monkeypatch, quota, expected):
    monkeypatch.setattr(settings_module.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(settings_module, "cpu_quota", lambda: quota)
    assert usable_cores() == expected
    assert threads_per_worker(0, 2, usable_cores(), {}) == max(1, expected // 2)
