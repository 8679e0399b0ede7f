"""The one crash-safe write: new content or old content, never half; the mode from creation; no temp left."""

import os
import stat

import pytest

from seglock.client import fsio


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _names(folder):
    return sorted(os.listdir(folder))


class Boom(Exception):
    pass


def test_write_atomic_writes_the_bytes_with_the_mode(tmp_path):
    path = fsio.write_atomic(tmp_path / "a.json", b"hello\n", mode=0o640)
    assert path.read_bytes() == b"hello\n"
    assert _mode(path) == 0o640
    assert _names(tmp_path) == ["a.json"]


def test_write_atomic_is_0600_by_default_and_replaces_the_old_file(tmp_path):
    path = tmp_path / "a"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    fsio.write_atomic(path, b"new")
    assert path.read_bytes() == b"new" and _mode(path) == 0o600
    assert _names(tmp_path) == ["a"]


def test_write_atomic_leaves_no_temp_file_and_the_original_when_the_write_fails(tmp_path):
    path = tmp_path / "a"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        fsio.write_atomic(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert _names(tmp_path) == ["a"]


def test_atomic_create_never_overwrites(tmp_path):
    path = tmp_path / "k"
    assert fsio.atomic_create(path, b"first", mode=0o600) is True
    assert fsio.atomic_create(path, b"second") is False
    assert path.read_bytes() == b"first" and _mode(path) == 0o600
    assert _names(tmp_path) == ["k"]


def test_atomic_writer_streams_to_a_path_then_renames(tmp_path):
    path = tmp_path / "ck.pt"
    with fsio.atomic_writer(path, mode=0o600) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".ck.pt.") and tmp.name.endswith(".tmp")
        assert _mode(tmp) == 0o600  # the secret is never readable by others, not even while written
        with open(tmp, "wb") as handle:  # a writer that takes a file object
            handle.write(b"part 1,")
            handle.write(b"part 2")
        assert not path.exists()
    assert path.read_bytes() == b"part 1,part 2" and _mode(path) == 0o600
    assert _names(tmp_path) == ["ck.pt"]


def test_atomic_writer_keeps_the_original_when_the_writer_raises(tmp_path):
    path = tmp_path / "ck.pt"
    path.write_bytes(b"previous checkpoint")
    with pytest.raises(Boom):
        with fsio.atomic_writer(path) as tmp:
            tmp.write_bytes(b"half a checkp")
            raise Boom()
    assert path.read_bytes() == b"previous checkpoint"
    assert _names(tmp_path) == ["ck.pt"]


def test_atomic_writer_of_a_new_file_leaves_nothing_when_the_writer_raises(tmp_path):
    with pytest.raises(Boom):
        with fsio.atomic_writer(tmp_path / "new"):
            raise Boom()
    assert _names(tmp_path) == []


def test_atomic_directory_swaps_a_whole_folder_in(tmp_path):
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "stale.txt").write_text("from the old version")
    with fsio.atomic_directory(out, mode=0o755) as tmp:
        (tmp / "manifest.json").write_text("{}")
        (tmp / "weights.bin").write_bytes(b"\x00\x01")
        assert (out / "stale.txt").exists()  # the old folder is whole until the swap
    assert _names(out) == ["manifest.json", "weights.bin"]
    assert _mode(out) == 0o755
    assert _names(tmp_path) == ["artifact"]


def test_atomic_directory_keeps_the_original_when_the_writer_raises(tmp_path):
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "manifest.json").write_text("old")
    with pytest.raises(Boom):
        with fsio.atomic_directory(out) as tmp:
            (tmp / "manifest.json").write_text("new")
            raise Boom()
    assert (out / "manifest.json").read_text() == "old"
    assert _names(tmp_path) == ["artifact"]


def test_remove_stale_temps_removes_only_this_files_temps(tmp_path):
    path = tmp_path / "keystore.json"
    path.write_text("{}")
    (tmp_path / ".keystore.json.abc.tmp").write_text("half")
    (tmp_path / ".other.json.abc.tmp").write_text("someone else's")
    fsio.remove_stale_temps(path)
    assert _names(tmp_path) == [".other.json.abc.tmp", "keystore.json"]
