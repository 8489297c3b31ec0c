"""Reading tar archives held in memory: the members' offsets, and WebDataset's grouping of members into samples.

Shared by the stream's decode tasks and the shard verifier, so both read a shard the same way.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator

__all__ = ["iter_tar_samples", "parse_samples", "sample_key", "tar_files", "tar_files_by_tarfile"]

_TAR_BLOCK = 512
_TAR_FILE_TYPES = (b"0", b"\0", b"7")  # regular file (POSIX, old V7), contiguous file
_TAR_OTHER_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, folders, FIFOs: no data of ours


def tar_files_by_tarfile(data: bytes) -> tuple[list[tuple[str, int, int]], bool]:
    """:func:`tar_files` through the standard library: every tar dialect (pax, GNU long names, base-256 sizes)
    and its verdict on damaged archives."""
    files: list[tuple[str, int, int]] = []
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
    except (tarfile.TarError, EOFError, OSError):
        return [], True
    with tar:
        while True:
            try:
                member = tar.next()
            except (tarfile.TarError, EOFError, OSError):
                return files, True
            if member is None:
                return files, False
            if not member.isfile():
                continue
            end = member.offset_data + member.size
            if end > len(data):
                return files, True
            files.append((member.name, member.offset_data, end))


def _pax_records(block: bytes) -> dict[bytes, bytes]:
    """The ``LENGTH key=value\\n`` records of a pax extended header."""
    records: dict[bytes, bytes] = {}
    while block and block[0] != 0:
        length = int(block[: block.index(b" ")])
        if length < 1:
            raise ValueError(f"pax record length {length}")
        key, _, value = block[block.index(b" ") + 1 : length - 1].partition(b"=")
        records[key] = value
        block = block[length:]
    return records


def tar_files(data: bytes) -> tuple[list[tuple[str, int, int]], bool]:
    """``(name, start, end)`` of every regular file of a tar held in memory, and whether the tar is damaged.

    Walks the 512-byte ustar headers itself, pax extended headers included (webdataset's writer puts one before
    every member): tarfile costs ~0.14 ms per sample, a twentieth of decoding and augmenting one. Anything else
    (GNU extension headers, global pax headers, base-256 numbers, a bad checksum or record, no end-of-archive
    marker) is left to tarfile, whose answer then stands.
    """
    files: list[tuple[str, int, int]] = []
    offset = 0
    pax: dict[bytes, bytes] = {}  # the extended header of the member that follows it
    while offset + _TAR_BLOCK <= len(data):
        header = data[offset : offset + _TAR_BLOCK]
        if header.count(0) == _TAR_BLOCK:  # end-of-archive marker
            return files, False
        kind = header[156:157]
        if kind not in _TAR_FILE_TYPES + _TAR_OTHER_TYPES + (b"x",) or header[124] & 0x80:
            return tar_files_by_tarfile(data)
        try:
            size, checksum = int(header[124:136].strip(b" \0") or b"0", 8), int(header[148:156].strip(b" \0"), 8)
            start = offset + _TAR_BLOCK
            if kind == b"x":
                pax = _pax_records(data[start : start + size])
                offset = start + -(-size // _TAR_BLOCK) * _TAR_BLOCK
                continue
            size = int(pax.get(b"size", size))
        except ValueError:
            return tar_files_by_tarfile(data)
        if checksum != sum(header) - sum(header[148:156]) + 8 * ord(" "):  # the checksum field counts as spaces
            return tar_files_by_tarfile(data)
        name = header[:100].split(b"\0", 1)[0]
        if header[257:263] == b"ustar\0" and header[345] != 0:  # POSIX ustar: a path prefix
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        name = pax.get(b"path", name)
        pax = {}
        if kind in _TAR_FILE_TYPES and not name.endswith(b"/"):  # old V7 tars mark folders by the slash
            if start + size > len(data):
                return tar_files_by_tarfile(data)
            files.append((name.decode("utf-8", "surrogateescape"), start, start + size))
        offset = start + -(-size // _TAR_BLOCK) * _TAR_BLOCK
    return tar_files_by_tarfile(data)


def sample_key(name: str) -> tuple[str, str]:
    """``(key, field)`` of a member name as WebDataset reads it: the key is the path up to the first dot of the file
    name, the field the rest, lower-cased (``a/0001.seg.png`` → ``("a/0001", "seg.png")``)."""
    folder, slash, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return folder + slash + stem, ext.lower() if dot else ""


def parse_samples(data: bytes) -> tuple[list[dict[str, bytes]], bool]:
    """Groups a tar's members into samples (consecutive members sharing a key, :func:`sample_key`).

    Returns:
        The samples in tar order (``{"__key__": ..., field: bytes}``) and whether the tar ended early (truncated
        or corrupt); a sample whose data is cut off is dropped.
    """
    samples: list[dict[str, bytes]] = []
    current: dict[str, bytes] | None = None
    files, broken = tar_files(data)
    for name, start, end in files:
        key, field = sample_key(name)
        if current is None or current["__key__"] != key:
            current = {"__key__": key}  # type: ignore[dict-item]
            samples.append(current)
        current[field] = data[start:end]
    return samples, broken


def iter_tar_samples(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, fields)`` of each sample of a tar opened for streaming (``mode="r|"``), grouped as
    :func:`parse_samples` groups them: for archives too large to hold in memory."""
    key: str | None = None
    fields: dict[str, bytes] = {}
    for member in tar:
        if not member.isfile():
            continue
        prefix, field = sample_key(member.name)
        handle = tar.extractfile(member)
        data = handle.read() if handle is not None else b""
        if prefix != key:
            if key is not None:
                yield key, fields
            key, fields = prefix, {}
        fields[field] = data
    if key is not None:
        yield key, fields
