"""First start on an empty home: once, even with several workers, and finished after a crash."""

from __future__ import annotations

import json
import stat
import threading

from seglock.app.bootstrap import INITIAL_TOKENS, PENDING, first_start
from seglock.keystore import Keystore
from tests.server_fixtures import MASTER_KEY

ENV = {"SEGLOCK_MASTER_KEY": MASTER_KEY}


def test_first_start_writes_working_tokens_once(tmp_path):
    keystore = Keystore.open(tmp_path, create=True, env=ENV)
    path = first_start(tmp_path, keystore, import_demo=False)
    assert path == tmp_path / INITIAL_TOKENS
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    tokens = json.loads(path.read_text())
    assert keystore.verify_token(tokens["admin"], scope="admin") is not None
    assert list(tokens) == ["admin"]  # no demo models, so no client token to grant them
    assert first_start(tmp_path, keystore, import_demo=False) is None
    assert json.loads(path.read_text()) == tokens


def test_a_home_whose_initial_tokens_were_deleted_is_not_set_up_again(tmp_path):
    keystore = Keystore.open(tmp_path, create=True, env=ENV)
    (tmp_path / "models" / "mine").mkdir(parents=True)
    assert first_start(tmp_path, keystore, import_demo=False) is None
    assert not (tmp_path / INITIAL_TOKENS).exists()


def test_workers_starting_together_set_the_home_up_once(tmp_path):
    keystores = [Keystore.open(tmp_path, create=True, env=ENV) for _ in range(4)]
    results = []
    barrier = threading.Barrier(len(keystores))

    def start(keystore):
        barrier.wait()
        results.append(first_start(tmp_path, keystore, import_demo=False))

    threads = [threading.Thread(target=start, args=(ks,)) for ks in keystores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(str(r) for r in results) == sorted(["None"] * 3 + [str(tmp_path / INITIAL_TOKENS)])
    assert [t.name for t in keystores[0].list_tokens()] == ["initial-admin"]


def test_a_first_start_cut_off_half_way_is_finished_by_the_next(tmp_path):
    keystore = Keystore.open(tmp_path, create=True, env=ENV)
    (tmp_path / "models" / "half-imported").mkdir(parents=True)
    (tmp_path / PENDING).touch()
    path = first_start(tmp_path, keystore, import_demo=False)
    assert path is not None and path.exists()
    assert not (tmp_path / PENDING).exists()


def test_a_home_without_demo_models_is_set_up_once_even_when_its_tokens_file_is_deleted(tmp_path):
    keystore = Keystore.open(tmp_path, create=True, env=ENV)
    assert first_start(tmp_path, keystore, import_demo=False) is not None
    (tmp_path / INITIAL_TOKENS).unlink()  # as the docs say: read it, then delete it
    assert first_start(tmp_path, keystore, import_demo=False) is None
    assert [t.name for t in keystore.list_tokens()] == ["initial-admin"]


def test_initial_tokens_expire_after_a_day_by_default(tmp_path):
    import time

    keystore = Keystore.open(tmp_path, create=True, env=ENV)
    before = time.time()
    first_start(tmp_path, keystore, import_demo=False)
    (admin,) = keystore.list_tokens()
    assert before + 86_400 <= admin.expires_at <= time.time() + 86_400
    first_start(tmp_path / "other", Keystore.open(tmp_path / "other", create=True, env=ENV), import_demo=False,
                token_ttl_s=60)
    assert Keystore.open(tmp_path / "other", env=ENV).list_tokens()[0].expires_at <= time.time() + 60
