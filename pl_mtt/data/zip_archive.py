"""Zip archives with millions of members: a streaming index reader and a streaming writer.

``zipfile.ZipFile`` keeps one Python object per member (hundreds of bytes each), so its
memory grows with the number of structures of a dataset zip. Here the central directory
is read in fixed-size chunks and each member is yielded once, for the caller to keep in
compact arrays (:func:`central_directory`), members are read with one ``pread`` each
(:func:`read_member`: no shared file position, so a file descriptor inherited by
``DataLoader`` workers is safe), and :class:`ZipWriter` writes stored (uncompressed)
members as they come, keeping a few integers per member for the central directory.
ZIP64 records are read and written where sizes, offsets or counts need them.
"""

from __future__ import annotations

import os
import struct
import zlib
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ZipEntry",
    "ZipWriter",
    "central_directory",
    "read_member",
]

_EOCD = struct.Struct("<IHHHHIIH")  # end of central directory record
_EOCD_SIGNATURE = 0x06054B50
_ZIP64_LOCATOR = struct.Struct("<IIQI")
_ZIP64_LOCATOR_SIGNATURE = 0x07064B50
_ZIP64_EOCD = struct.Struct("<IQHHIIQQQQ")
_ZIP64_EOCD_SIGNATURE = 0x06064B50
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # central directory file header
_CENTRAL_SIGNATURE = 0x02014B50
_LOCAL = struct.Struct("<IHHHHHIIIHH")  # local file header
_LOCAL_SIGNATURE = 0x04034B50
_ZIP64_EXTRA_ID = 0x0001
_MAX_32 = 0xFFFFFFFF
_MAX_16 = 0xFFFF
_CHUNK = 1 << 20  # bytes of central directory parsed at a time
_DOS_DATE_1980 = (1 << 5) | 1  # 1980-01-01, as zipfile writes for members without a date
_STORED, _DEFLATED = 0, 8

ReadAt = Callable[[int, int], bytes]  # (offset, size) -> at most size bytes


@dataclass(frozen=True)
class ZipEntry:
    """One member as the central directory describes it."""

    name: str
    header_offset: int  # of its local header
    compressed_size: int
    size: int
    crc: int
    method: int


def _find_end_record(read_at: ReadAt, file_size: int, what: str) -> tuple[int, int, int]:
    """``(number of members, central directory offset, its size)`` (ZIP64 aware)."""
    tail_size = min(file_size, _EOCD.size + _MAX_16)
    tail = read_at(file_size - tail_size, tail_size)
    signature = struct.pack("<I", _EOCD_SIGNATURE)
    position = tail.rfind(signature)
    # the record ends the file (after its comment); members that are zips themselves
    # hold records of their own, which a truncated file could expose at its end
    while position >= 0 and (
        position + _EOCD.size > len(tail)
        or position + _EOCD.size + _EOCD.unpack_from(tail, position)[7] != len(tail)
    ):
        position = tail.rfind(signature, 0, position)
    if position < 0:
        raise ValueError(
            f"{what}: not a zip file, or a truncated one (no end-of-central-directory "
            f"record at its end)"
        )
    _, _, _, _, count, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, position)
    end_offset = file_size - tail_size + position
    if end_offset >= _ZIP64_LOCATOR.size:  # a ZIP64 locator right before it, if any
        locator_offset = end_offset - _ZIP64_LOCATOR.size
        locator = read_at(locator_offset, _ZIP64_LOCATOR.size)
        if len(locator) == _ZIP64_LOCATOR.size:
            signature, _, zip64_offset, _ = _ZIP64_LOCATOR.unpack(locator)
            if signature == _ZIP64_LOCATOR_SIGNATURE:
                record = read_at(zip64_offset, _ZIP64_EOCD.size)
                if (
                    len(record) != _ZIP64_EOCD.size
                    or _ZIP64_EOCD.unpack(record)[0] != _ZIP64_EOCD_SIGNATURE
                ):
                    raise ValueError(f"{what}: corrupt ZIP64 end-of-central-directory record")
                *_, count, cd_size, cd_offset = _ZIP64_EOCD.unpack(record)
                end_offset = zip64_offset
    if cd_offset + cd_size != end_offset:
        raise ValueError(
            f"{what}: corrupt or truncated zip (its central directory would end at byte "
            f"{cd_offset + cd_size}, its end record is at byte {end_offset})"
        )
    return count, cd_offset, cd_size


def _zip64_values(extra: bytes, needed: list[bool]) -> list[int]:
    """The 64-bit values of a ZIP64 extra field, for the fields marked ``needed``."""
    position = 0
    while position + 4 <= len(extra):
        header_id, size = struct.unpack_from("<HH", extra, position)
        if header_id == _ZIP64_EXTRA_ID:
            values = list(struct.unpack_from(f"<{size // 8}Q", extra, position + 4))
            return [values.pop(0) if flag and values else -1 for flag in needed]
        position += 4 + size
    return [-1] * len(needed)


def central_directory(read_at: ReadAt, file_size: int, what: str) -> Iterator[ZipEntry]:
    """Every member of a zip, in archive order, reading the central directory in chunks
    (memory does not grow with the number of members).

    Args:
        read_at: ``(offset, size) -> bytes`` of the archive (e.g. ``os.pread``).
        file_size: the archive's size in bytes.
        what: how errors name the archive (e.g. its path).

    Raises:
        ValueError: not a zip, truncated, or a corrupt central directory.
    """
    count, cd_offset, cd_size = _find_end_record(read_at, file_size, what)
    buffer = b""
    read = 0
    seen = 0
    while seen < count:
        if read < cd_size:
            chunk = read_at(cd_offset + read, min(_CHUNK, cd_size - read))
            if not chunk:
                break
            read += len(chunk)
            buffer += chunk
        position = 0
        while seen < count and position + _CENTRAL.size <= len(buffer):
            fields = _CENTRAL.unpack_from(buffer, position)
            if fields[0] != _CENTRAL_SIGNATURE:
                raise ValueError(
                    f"{what}: corrupt central directory (bad signature at member {seen})"
                )
            flags, method, crc, compressed, size = fields[3], fields[4], *fields[7:10]
            name_length, extra_length, comment_length = fields[10:13]
            offset = fields[16]
            end = position + _CENTRAL.size + name_length + extra_length + comment_length
            if end > len(buffer):
                break  # the rest of this record is in the next chunk
            start = position + _CENTRAL.size
            raw_name = buffer[start : start + name_length]
            name = raw_name.decode("utf-8" if flags & 0x800 else "cp437")
            if _MAX_32 in (compressed, size, offset):
                extra = buffer[start + name_length : start + name_length + extra_length]
                big = _zip64_values(
                    extra, [size == _MAX_32, compressed == _MAX_32, offset == _MAX_32]
                )
                size = big[0] if size == _MAX_32 else size
                compressed = big[1] if compressed == _MAX_32 else compressed
                offset = big[2] if offset == _MAX_32 else offset
                if min(size, compressed, offset) < 0:
                    raise ValueError(f"{what}: member '{name}' lacks its ZIP64 sizes or offset")
            if flags & 0x1:
                raise ValueError(f"{what}: member '{name}' is encrypted")
            yield ZipEntry(name, offset, compressed, size, crc, method)
            seen += 1
            position = end
        buffer = buffer[position:]
        if read >= cd_size and seen < count and position == 0:
            break
    if seen < count:
        raise ValueError(
            f"{what}: corrupt or truncated central directory ({seen} of {count} members)"
        )


def read_member(
    read_at: ReadAt,
    name: str,
    header_offset: int,
    compressed_size: int,
    crc: int,
    method: int,
    what: str,
) -> bytes:
    """The content of one member (one read for its local header and data, CRC checked).

    Raises:
        ValueError: naming ``what`` and the member, for a bad local header, a short
            read (truncated file), a CRC mismatch or an unsupported compression.
    """
    encoded = name.encode()
    slack = 64  # room for a local extra field, read in the same call
    head = _LOCAL.size + len(encoded)
    raw = read_at(header_offset, head + slack + compressed_size)
    if len(raw) < _LOCAL.size or _LOCAL.unpack_from(raw)[0] != _LOCAL_SIGNATURE:
        raise ValueError(f"{what}: member '{name}': bad local header (corrupt or truncated zip)")
    fields = _LOCAL.unpack_from(raw)
    name_length, extra_length = fields[9], fields[10]
    if raw[_LOCAL.size : _LOCAL.size + name_length] != encoded:
        raise ValueError(f"{what}: member '{name}': its local header names another member")
    start = _LOCAL.size + name_length + extra_length
    if start + compressed_size > len(raw) and extra_length > slack:
        raw = read_at(header_offset, start + compressed_size)
    data = raw[start : start + compressed_size]
    if len(data) != compressed_size:
        raise ValueError(
            f"{what}: member '{name}' is cut short ({len(data)} of {compressed_size} bytes): "
            f"truncated zip"
        )
    if method == _DEFLATED:
        data = zlib.decompress(data, -15)
    elif method != _STORED:
        raise ValueError(
            f"{what}: member '{name}' uses compression method {method}; only stored (0) "
            f"and deflated (8) members can be read"
        )
    if zlib.crc32(data) != crc:
        raise ValueError(f"{what}: member '{name}' is corrupt (CRC-32 mismatch)")
    return data


class ZipWriter:
    """Writes a zip of stored members one at a time; memory per member is a few integers.

    The file is written as ``<path>.partial`` and renamed to ``path`` by :meth:`close`, so
    an interrupted write never leaves a complete-looking archive. Members larger than
    4 GiB are not supported; archives beyond 4 GiB or 65,535 members get ZIP64 records
    (``force_zip64`` writes them always, for tests).

    .. code-block:: python

        with ZipWriter("data.zip") as writer:
            writer.add("0/system.mta", payload)
    """

    def __init__(self, path: str | Path, force_zip64: bool = False) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self._file = open(self.partial, "wb")  # noqa: SIM115 (closed in close())
        self._offset = 0
        self._force_zip64 = force_zip64
        self._names = bytearray()
        self._name_ends = array("q")
        self._offsets = array("q")
        self._sizes = array("q")
        self._crcs = array("L")
        self._closed = False

    def __enter__(self) -> ZipWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __len__(self) -> int:
        return len(self._offsets)

    def add(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Append member ``name`` (stored, uncompressed) with content ``data``."""
        if self._closed:
            raise ValueError(f"{self.path}: the writer is closed")
        encoded = name.encode()
        size = len(data)
        if size >= _MAX_32:
            raise ValueError(f"{self.path}: member '{name}' is 4 GiB or larger")
        crc = zlib.crc32(data)
        flags = 0 if encoded.isascii() else 0x800
        header = _LOCAL.pack(
            _LOCAL_SIGNATURE,
            20,
            flags,
            _STORED,
            0,
            _DOS_DATE_1980,
            crc,
            size,
            size,
            len(encoded),
            0,
        )
        self._file.write(header)
        self._file.write(encoded)
        self._file.write(data)
        self._names += encoded
        self._name_ends.append(len(self._names))
        self._offsets.append(self._offset)
        self._sizes.append(size)
        self._crcs.append(crc)
        self._offset += len(header) + len(encoded) + size

    def close(self) -> None:
        """Write the central directory and end records, and move the file into place."""
        if self._closed:
            return
        cd_offset = self._offset
        start = 0
        made_by = (3 << 8) | 45  # unix, ZIP 4.5
        for index, end in enumerate(self._name_ends):
            encoded = bytes(self._names[start:end])
            start = end
            offset = self._offsets[index]
            big = offset >= _MAX_32 or self._force_zip64
            extra = struct.pack("<HHQ", _ZIP64_EXTRA_ID, 8, offset) if big else b""
            size = self._sizes[index]
            flags = 0 if encoded.isascii() else 0x800
            self._file.write(
                _CENTRAL.pack(
                    _CENTRAL_SIGNATURE,
                    made_by,
                    45 if big else 20,
                    flags,
                    _STORED,
                    0,
                    _DOS_DATE_1980,
                    self._crcs[index],
                    size,
                    size,
                    len(encoded),
                    len(extra),
                    0,
                    0,
                    0,
                    0o100644 << 16,
                    _MAX_32 if big else offset,
                )
            )
            self._file.write(encoded)
            self._file.write(extra)
            self._offset += _CENTRAL.size + len(encoded) + len(extra)
        cd_size = self._offset - cd_offset
        count = len(self._offsets)
        if self._force_zip64 or count >= _MAX_16 or cd_offset >= _MAX_32 or cd_size >= _MAX_32:
            zip64_offset = self._offset
            self._file.write(
                _ZIP64_EOCD.pack(
                    _ZIP64_EOCD_SIGNATURE,
                    _ZIP64_EOCD.size - 12,
                    made_by,
                    45,
                    0,
                    0,
                    count,
                    count,
                    cd_size,
                    cd_offset,
                )
            )
            self._file.write(_ZIP64_LOCATOR.pack(_ZIP64_LOCATOR_SIGNATURE, 0, zip64_offset, 1))
        self._file.write(
            _EOCD.pack(
                _EOCD_SIGNATURE,
                0,
                0,
                min(count, _MAX_16),
                min(count, _MAX_16),
                min(cd_size, _MAX_32),
                min(cd_offset, _MAX_32),
                0,
            )
        )
        self._file.close()
        os.replace(self.partial, self.path)
        self._closed = True

    def abort(self) -> None:
        """Stop writing and remove the partial file."""
        if not self._closed:
            self._file.close()
            self.partial.unlink(missing_ok=True)
            self._closed = True
