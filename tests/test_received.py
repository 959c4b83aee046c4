"""Tests for normbench.received: a file of a received folder is read only when it is a
regular file within its cap, without ever blocking on a pipe or reading a device."""

from __future__ import annotations

import json
import os

import pytest
from hostile import deadline

from normbench import received
from normbench.received import Refused, load_json, read_bytes


def test_a_regular_file_and_a_link_to_one_are_read(tmp_path):
    path = tmp_path / "summary.json"
    path.write_bytes(b'{"a": 1}')
    (tmp_path / "link").symlink_to(path)
    assert read_bytes(path, 100) == read_bytes(tmp_path / "link", 8) == b'{"a": 1}'
    assert read_bytes(path, None) == b'{"a": 1}'
    with pytest.raises(FileNotFoundError):
        read_bytes(tmp_path / "missing", 100)


@pytest.mark.parametrize(
    "kind, why",
    [
        ("pipe", "a named pipe, not a file"),
        ("zero", "a device, not a file"),
        ("folder", "a folder, not a file"),
        ("large", "2 MiB, more than the 1 MiB such a file may be"),
    ],
)
def test_anything_else_is_refused_without_blocking(tmp_path, kind, why):
    """A pipe (opening it would wait for a writer), a link to /dev/zero (endless), a
    folder, a file over the cap (sparse here: its size is refused before any read)."""
    path = tmp_path / "summary.json"
    if kind == "pipe":
        os.mkfifo(path)
    elif kind == "zero":
        path.symlink_to("/dev/zero")
    elif kind == "folder":
        path.mkdir()
    else:
        with open(path, "wb") as handle:
            handle.truncate(2 << 20)
    with deadline(), pytest.raises(Refused) as refused:
        read_bytes(path, received.SUMMARY_MAX)
    assert refused.value.strerror == why and refused.value.filename == str(path)
    assert isinstance(refused.value, OSError)  # what every reader treats as damage


def test_json_nested_too_deep_is_a_value_error_not_a_recursion_error():
    with pytest.raises(ValueError, match="nested too deep"):
        load_json("[" * 100_000)
    assert load_json(json.dumps([[[1]]]).encode()) == [[[1]]]
