"""Atomic writes: the old file or the complete new one, never a partial one; results readable by all."""

import json
import os
import stat

import pytest

from earlyexit.util.files import atomic_write, write_json_atomically


def test_atomic_write_replaces_whole_and_is_readable_by_all(tmp_path):
    target = tmp_path / "sub" / "result.json"
    previous = os.umask(0o022)
    try:
        write_json_atomically(str(target), {"a": 1})
    finally:
        os.umask(previous)
    assert json.loads(target.read_text()) == {"a": 1}
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert os.listdir(target.parent) == ["result.json"]  # no temporary left beside it


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(str(target), "wb") as stream:
            stream.write(b"half of the new")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["data.bin"]
    with pytest.raises(ValueError, match="whole files"):
        with atomic_write(str(target), "a"):
            pass
