"""The shard reader against Python's `tarfile` on the formats writers produce, and on damaged tars."""

from __future__ import annotations

import io
import tarfile

import pytest

from stages.shards import read_tar_samples, tar_files

LONG = "deep/" * 30 + "0123456789abcdef0123456789abcdef.jpg"  # beyond ustar's 100-byte name and 155-byte prefix


def _tar(fmt: int, members: list[tuple[str, bytes]]) -> bytes:
    """A tar in `fmt` with a directory member first (which readers must pass over), then `members`."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        folder = tarfile.TarInfo("a_folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000.25  # a float, as webdataset's writer sets it: pax adds a header
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _with_tarfile(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_every_format_reads_as_tarfile_reads_it(fmt):
    members = [("k1.jpg", b"\xff\xd8 jpeg"), ("k1.txt", "a café".encode()), ("k2.json", b"{}"), ("k2.txt", b"")]
    members.append(("p" * 120 + "/k3.jpg", b"x" * 1000))  # a ustar prefix, or a long name
    if fmt != tarfile.USTAR_FORMAT:
        members.append((LONG, b"y" * 513))
    data = _tar(fmt, members)
    assert list(tar_files(io.BytesIO(data))) == _with_tarfile(data) == members


def test_samples_group_by_key_and_a_cut_or_damaged_tar_ends_quietly(tmp_path):
    data = _tar(tarfile.PAX_FORMAT, [("a.jpg", b"1"), ("a.txt", b"one"), ("b.jpg", b"2" * 2000), ("b.txt", b"two")])
    whole = tmp_path / "whole.tar"
    whole.write_bytes(data)
    assert list(read_tar_samples(whole)) == [
        ("a", {"jpg": b"1", "txt": b"one"}),
        ("b", {"jpg": b"2" * 2000, "txt": b"two"}),
    ]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: data.index(b"2" * 2000) + 100])  # killed while writing b.jpg
    assert [key for key, _ in read_tar_samples(cut)] == ["a"]
    with pytest.raises(EOFError):
        list(tar_files(io.BytesIO(data[: data.index(b"2" * 2000) + 100])))
    damaged = bytearray(data)
    damaged[data.index(b"b.txt")] ^= 0xFF  # a flipped byte in b.txt's header: its checksum no longer matches
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(tar_files(io.BytesIO(bytes(damaged))))
    assert [key for key, _ in read_tar_samples(_write(tmp_path / "damaged.tar", damaged))] == ["a", "b"]
    assert list(read_tar_samples(_write(tmp_path / "empty.tar", b""))) == []


def _write(path, data):
    path.write_bytes(bytes(data))
    return path
