"""Reader and writer for indexed MXNet/insightface RecordIO files (``.rec`` + ``.idx``), without mxnet.

Format (docs/method.md, section 2.3):

- ``.idx``: one line per record, ``key<TAB>byte offset``.
- record: uint32 magic 0xced7230a, uint32 ``lrec`` (low 29 bits: length of this part, upper 3 bits: cflag,
  0 = whole record, 1/2/3 = first/middle/last part), the part, zero padding to 4 bytes. The writer splits a payload
  where it holds the magic at a 4-byte aligned position; the reader joins the parts with the magic in between.
- payload: 24-byte header (uint32 flag, float32 label, uint64 id, uint64 id2), then ``flag`` float32 labels when
  flag > 0, then the image bytes (JPEG).
- record 0 is a meta record (flag > 0) whose label[0] is one past the last image key; images are keys 1..label[0]-1.

References: dmlc-core ``src/recordio.cc`` and MXNet ``python/mxnet/recordio.py`` (format only; no code taken).
"""

from __future__ import annotations

import io
import logging
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from data_loader.registry import DatasetError

logger = logging.getLogger(__name__)

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LREC = struct.Struct("<II")
_HEADER = struct.Struct("<IfQQ")
_LENGTH_MASK = (1 << 29) - 1
_MAX_LENGTH = 1 << 29


@dataclass(frozen=True)
class RecordHeader:
    """Decoded payload header.

    Args:
        flag: number of float32 labels that follow the header (0 = the single ``label`` field is used).
        labels: the labels, ``(label,)`` when flag == 0.
        id: first id field.
        id2: second id field.
    """

    flag: int
    labels: tuple[float, ...]
    id: int
    id2: int

    @property
    def label(self) -> float:
        """The first label (the identity for image records, one past the last image key for the meta record)."""
        return self.labels[0]


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def pack_payload(label: float | Sequence[float], data: bytes, *, id: int = 0, id2: int = 0) -> bytes:
    """Build a record payload: header, optional label array, data.

    Args:
        label: one float (stored in the header, flag 0) or a sequence (flag = its length, stored after the header).
        data: image bytes.
        id: first id field.
        id2: second id field.

    Returns:
        The payload bytes.
    """
    if isinstance(label, (int, float)):
        return _HEADER.pack(0, float(label), id, id2) + data
    labels = [float(v) for v in label]
    return _HEADER.pack(len(labels), 0.0, id, id2) + struct.pack(f"<{len(labels)}f", *labels) + data


def unpack_payload(payload: bytes, where: str = "record") -> tuple[RecordHeader, bytes]:
    """Split a payload into its header and data.

    Args:
        payload: the full record payload.
        where: description used in error messages (file and key).

    Returns:
        ``(header, data)``.
    """
    if len(payload) < _HEADER.size:
        raise DatasetError(f"{where}: payload of {len(payload)} bytes is shorter than the 24-byte record header")
    flag, label, id1, id2 = _HEADER.unpack_from(payload)
    start = _HEADER.size
    if flag > 0:
        end = start + 4 * flag
        if len(payload) < end:
            raise DatasetError(f"{where}: header announces {flag} labels but the payload has {len(payload)} bytes")
        labels = struct.unpack_from(f"<{flag}f", payload, start)
        start = end
    else:
        labels = (label,)
    return RecordHeader(flag=flag, labels=tuple(labels), id=id1, id2=id2), payload[start:]


def _write_record(f, payload: bytes) -> None:
    """Write one record, split at aligned occurrences of the magic as dmlc-core does."""
    if len(payload) >= _MAX_LENGTH:
        raise ValueError(f"record payload of {len(payload)} bytes exceeds the RecordIO limit of 2^29 bytes")
    start = 0
    for i in range(0, len(payload) - len(payload) % 4, 4):
        if payload[i : i + 4] == _MAGIC_BYTES:
            f.write(_LREC.pack(MAGIC, ((1 if start == 0 else 2) << 29) | (i - start)))
            f.write(payload[start:i])
            start = i + 4
    part = payload[start:]
    f.write(_LREC.pack(MAGIC, ((3 if start else 0) << 29) | len(part)))
    f.write(part)
    f.write(b"\0" * (_pad4(len(part)) - len(part)))


def write_recordio(
    rec_path: str | os.PathLike,
    idx_path: str | os.PathLike,
    items: Iterable[tuple[int, float | Sequence[float], bytes]],
) -> int:
    """Write an indexed RecordIO pair.

    Args:
        rec_path: output ``.rec`` file.
        idx_path: output ``.idx`` file (``key<TAB>offset`` lines).
        items: ``(key, label, data)`` triples; ``label`` is a float or a sequence of floats (see :func:`pack_payload`).
            The insightface layout puts a meta record ``(0, [one_past_last_key, ...], b"")`` first.

    Returns:
        The number of records written.
    """
    count = 0
    with open(rec_path, "wb") as rec, open(idx_path, "w") as idx:
        for key, label, data in items:
            offset = rec.tell()
            _write_record(rec, pack_payload(label, data, id=int(key)))
            idx.write(f"{int(key)}\t{offset}\n")
            count += 1
    return count


class RecordIOReader:
    """Random access to an indexed RecordIO pair; thread-safe and picklable (each process opens its own descriptor).

    Args:
        rec_path: the ``.rec`` file.
        idx_path: the ``.idx`` file.

    Raises:
        DatasetError: a file is missing, an index line is malformed, or an offset lies past the end of the ``.rec``.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike) -> None:
        self._fd: int | None = None
        self._pid: int | None = None
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path)
        for path in (self.rec_path, self.idx_path):
            if not path.is_file():
                raise DatasetError(f"RecordIO file {path} does not exist (expected the pair {rec_path} + {idx_path})")
        self.rec_size = self.rec_path.stat().st_size
        self.offsets = self._read_index()
        self._fd = os.open(self.rec_path, os.O_RDONLY)
        self._pid = os.getpid()

    def _read_index(self) -> dict[int, int]:
        offsets: dict[int, int] = {}
        with open(self.idx_path) as f:
            for line_no, line in enumerate(f, start=1):
                fields = line.split()
                if not fields:
                    continue
                try:
                    key, offset = int(fields[0]), int(fields[1])
                    if len(fields) != 2 or offset < 0:
                        raise ValueError
                except (ValueError, IndexError):
                    raise DatasetError(
                        f"{self.idx_path}: line {line_no} is {line.rstrip()!r}; expected 'key<TAB>byte offset' "
                        "(truncated or not a RecordIO index)"
                    ) from None
                if offset + _LREC.size > self.rec_size:
                    raise DatasetError(
                        f"{self.idx_path}: key {key} points at byte offset {offset}, past the end of {self.rec_path} "
                        f"({self.rec_size} bytes): the .rec file is truncated or belongs to another index"
                    )
                offsets[key] = offset
        if not offsets:
            raise DatasetError(f"{self.idx_path} is empty; expected 'key<TAB>byte offset' lines")
        return offsets

    @property
    def keys(self) -> list[int]:
        """All record keys, ascending."""
        return sorted(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets)

    def __contains__(self, key: int) -> bool:
        return key in self.offsets

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fd"] = None
        state["_pid"] = None
        return state

    def close(self) -> None:
        """Close this process's file descriptor (reopened on the next read)."""
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> RecordIOReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read_at(self, offset: int, size: int, key: int) -> bytes:
        # os.pread keeps no file position, so threads (image verification, the builder) share the descriptor;
        # another process (DataLoader worker, unpickled copy) opens its own.
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.rec_path, os.O_RDONLY)
            self._pid = os.getpid()
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise DatasetError(
                f"{self.rec_path}: record key {key} needs {size} bytes at offset {offset} but the file ends at "
                f"{self.rec_size}: the .rec file is truncated"
            )
        return data

    def _read_part(self, offset: int, key: int, length_limit: int | None = None) -> tuple[int, bytes, int]:
        """Read one record part at ``offset``; returns (cflag, data, offset of the next part)."""
        magic, lrec = _LREC.unpack(self._read_at(offset, _LREC.size, key))
        if magic != MAGIC:
            raise DatasetError(
                f"{self.rec_path}: no record magic 0xced7230a at offset {offset} (key {key}, found {magic:#010x}): "
                "the .idx does not match the .rec or the file is corrupt"
            )
        cflag, length = lrec >> 29, lrec & _LENGTH_MASK
        if offset + _LREC.size + length > self.rec_size:
            raise DatasetError(
                f"{self.rec_path}: record key {key} at offset {offset} declares {length} bytes but the file ends at "
                f"{self.rec_size}: the .rec file is truncated"
            )
        size = length if length_limit is None else min(length, length_limit)
        return cflag, self._read_at(offset + _LREC.size, size, key), offset + _LREC.size + _pad4(length)

    def _offset(self, key: int) -> int:
        if key not in self.offsets:
            raise DatasetError(f"{self.idx_path} has no record key {key}")
        return self.offsets[key]

    def read_payload(self, key: int) -> bytes:
        """The full payload of record ``key`` (multi-part records joined)."""
        cflag, data, offset = self._read_part(self._offset(key), key)
        if cflag == 0:
            return data
        if cflag != 1:
            raise DatasetError(f"{self.rec_path}: record key {key} starts with continuation flag {cflag}, expected 0/1")
        parts = [data]
        while cflag != 3:
            if offset >= self.rec_size:
                raise DatasetError(f"{self.rec_path}: multi-part record key {key} is cut off at offset {offset}")
            cflag, data, offset = self._read_part(offset, key)
            if cflag not in (2, 3):
                raise DatasetError(f"{self.rec_path}: record key {key} has continuation flag {cflag}, expected 2/3")
            parts.append(data)
        return _MAGIC_BYTES.join(parts)

    def read(self, key: int) -> tuple[RecordHeader, bytes]:
        """Header and image bytes of record ``key``."""
        return unpack_payload(self.read_payload(key), where=f"{self.rec_path} key {key}")

    def read_header(self, key: int) -> RecordHeader:
        """Header of record ``key``, reading only the header bytes of whole records."""
        offset = self._offset(key)
        cflag, head, _ = self._read_part(offset, key, length_limit=_HEADER.size)
        if cflag != 0:
            return self.read(key)[0]
        flag = _HEADER.unpack_from(head)[0] if len(head) == _HEADER.size else 0
        if flag > 0:
            _, head, _ = self._read_part(offset, key, length_limit=_HEADER.size + 4 * flag)
        return unpack_payload(head, where=f"{self.rec_path} key {key}")[0]

    def read_image(self, key: int) -> Image.Image:
        """Decode the image of record ``key`` to RGB.

        Raises:
            DatasetError: the record is truncated or its bytes are not a decodable image (names file and key).
        """
        _, data = self.read(key)
        try:
            with Image.open(io.BytesIO(data)) as img:
                return img.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise DatasetError(f"cannot decode the image of {self.rec_path} key {key}: {err}") from err

    def image_keys(self) -> list[int]:
        """Keys of the image records: 1..label[0]-1 when record 0 is a meta record, else every key.

        Raises:
            DatasetError: the meta record announces a key the index lacks (truncated ``.idx``).
        """
        if 0 in self.offsets:
            meta = self.read_header(0)
            if meta.flag > 0:
                end = int(meta.label)
                missing = [k for k in range(1, end) if k not in self.offsets]
                if missing:
                    raise DatasetError(
                        f"{self.idx_path} lacks {len(missing)} of the image keys 1..{end - 1} announced by the meta "
                        f"record of {self.rec_path} (first missing key {missing[0]}): the .idx is truncated"
                    )
                return list(range(1, end))
        logger.warning("%s has no meta record 0; treating every record as an image", self.rec_path)
        return self.keys

    def scan_identities(self, progress: bool = False) -> dict[int, list[int]]:
        """Group the image keys by identity label, reading headers only.

        Args:
            progress: show a tqdm bar.

        Returns:
            ``{label: [keys ascending]}``.
        """
        groups: dict[int, list[int]] = {}
        keys = self.image_keys()
        for key in tqdm(keys, desc=f"scanning {self.rec_path.name}", disable=not progress, mininterval=2.0):
            groups.setdefault(int(round(self.read_header(key).label)), []).append(key)
        logger.info("%s: %d image records, %d identities", self.rec_path, len(keys), len(groups))
        return groups
