"""RecordIO reader and writer: a file written byte by byte from the format, round trip, multi-part records, header
scan and truncated files."""

import io
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from data_loader.recordio import MAGIC, RecordIOReader, pack_payload, unpack_payload, write_recordio
from data_loader.registry import DatasetError


def _jpeg(seed: int, size: int = 16) -> bytes:
    pixels = np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_faces(tmp_path, labels):
    """insightface layout: meta record 0, then one image record per label (keys 1..)."""
    items = [(0, [len(labels) + 1, 0.0], b"")]
    items += [(key, float(label), _jpeg(key)) for key, label in enumerate(labels, start=1)]
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    assert write_recordio(rec, idx, items) == len(labels) + 1
    return rec, idx


def _golden_record(payload: bytes) -> bytes:
    """One record written from the format: uint32 magic 0xced7230a, uint32 length word (cflag 0 in the top 3 bits,
    the length in the low 29), the payload, zero padding to a multiple of 4 bytes."""
    return struct.pack("<II", 0xCED7230A, len(payload)) + payload + b"\0" * (-len(payload) % 4)


def _golden_multipart(payload: bytes, split_at: int) -> bytes:
    """A record whose payload holds the magic at the 4-aligned ``split_at``: part 1 (cflag 1) before it, part 3
    (cflag 3) after it; the magic itself is left out and stands between the parts."""
    head, tail = payload[:split_at], payload[split_at + 4 :]
    assert split_at % 4 == 0 and payload[split_at : split_at + 4] == struct.pack("<I", 0xCED7230A)
    first = struct.pack("<II", 0xCED7230A, (1 << 29) | len(head)) + head
    return first + struct.pack("<II", 0xCED7230A, (3 << 29) | len(tail)) + tail + b"\0" * (-len(tail) % 4)


def _golden_payload(flag: int, label: float, id1: int, id2: int, labels: tuple = (), data: bytes = b"") -> bytes:
    """Payload: the IfQQ header (uint32 flag, float32 label, uint64 id, uint64 id2), ``flag`` float32 labels, data."""
    assert len(labels) == flag
    return struct.pack("<IfQQ", flag, label, id1, id2) + struct.pack(f"<{flag}f", *labels) + data


MAGIC_DATA = b"abcd" + struct.pack("<I", 0xCED7230A) + b"xyz"  # after the 24-byte header the magic sits at 28


def _write_golden(tmp_path, id2: int = 99):
    """insightface layout by hand: meta record 0 (label[0] = 4, one past the last image key), image records 1 and 2
    (scalar label; label array of 2), record 3 split around the magic its payload holds."""
    records = [
        _golden_record(_golden_payload(2, 0.0, 0, 0, (4.0, 5.0))),
        _golden_record(_golden_payload(0, 7.0, 1, 0, data=_jpeg(1))),
        _golden_record(_golden_payload(2, 0.0, 2, id2, (11.0, 0.5), data=_jpeg(2))),
        _golden_multipart(_golden_payload(0, 9.0, 3, 0, data=MAGIC_DATA), split_at=28),
    ]
    offsets = np.cumsum([0] + [len(r) for r in records[:-1]]).tolist()
    rec, idx = tmp_path / "golden.rec", tmp_path / "golden.idx"
    rec.write_bytes(b"".join(records))
    idx.write_text("".join(f"{key}\t{offset}\n" for key, offset in enumerate(offsets)))
    return rec, idx, offsets


def test_reader_decodes_a_record_file_written_byte_by_byte(tmp_path):
    rec, idx, _ = _write_golden(tmp_path)
    reader = RecordIOReader(rec, idx)
    assert reader.image_keys() == [1, 2, 3]  # from the meta record's label[0]
    meta = reader.read_header(0)
    assert (meta.flag, meta.labels) == (2, (4.0, 5.0))
    header, data = reader.read(1)
    assert (header.flag, header.label, header.id, header.id2, data) == (0, 7.0, 1, 0, _jpeg(1))
    header, data = reader.read(2)
    assert (header.flag, header.labels, header.id, header.id2, data) == (2, (11.0, 0.5), 2, 99, _jpeg(2))
    assert reader.read_header(2) == header
    header, data = reader.read(3)
    assert (header.label, header.id, data) == (9.0, 3, MAGIC_DATA)
    assert reader.read_header(3) == header
    assert reader.scan_identities() == {7: [1], 11: [2], 9: [3]}
    expected = np.asarray(Image.open(io.BytesIO(_jpeg(2))).convert("RGB"))
    assert np.array_equal(np.asarray(reader.read_image(2)), expected)


def test_writer_produces_the_golden_bytes(tmp_path):
    rec, idx, _ = _write_golden(tmp_path, id2=0)  # our writer stores id = key and id2 = 0
    items = [(0, [4.0, 5.0], b""), (1, 7.0, _jpeg(1)), (2, [11.0, 0.5], _jpeg(2)), (3, 9.0, MAGIC_DATA)]
    write_recordio(tmp_path / "ours.rec", tmp_path / "ours.idx", items)
    assert (tmp_path / "ours.rec").read_bytes() == rec.read_bytes()
    assert (tmp_path / "ours.idx").read_text() == idx.read_text()


def test_bad_magic_and_truncated_length_name_the_file_and_offset(tmp_path):
    rec, idx, offsets = _write_golden(tmp_path)
    golden = rec.read_bytes()
    raw = bytearray(golden)
    raw[offsets[2] : offsets[2] + 4] = b"\0\0\0\0"
    rec.write_bytes(bytes(raw))
    with pytest.raises(DatasetError) as info:
        RecordIOReader(rec, idx).read(2)
    message = str(info.value)
    assert str(rec) in message and f"offset {offsets[2]}" in message and "magic" in message
    raw = bytearray(golden)
    struct.pack_into("<I", raw, offsets[2] + 4, 1 << 20)  # a length running past the end of the file
    rec.write_bytes(bytes(raw))
    with pytest.raises(DatasetError) as info:
        RecordIOReader(rec, idx).read(2)
    message = str(info.value)
    assert str(rec) in message and f"offset {offsets[2]}" in message and "truncated" in message
    rec.write_bytes(golden[: offsets[2] + 40])  # the file ends inside record 2's JPEG
    with pytest.raises(DatasetError, match="key 3 points at byte offset"):
        RecordIOReader(rec, idx)
    idx.write_text("".join(f"{key}\t{offset}\n" for key, offset in enumerate(offsets[:3])))
    with pytest.raises(DatasetError) as info:
        RecordIOReader(rec, idx).read(2)
    message = str(info.value)
    assert str(rec) in message and f"offset {offsets[2]}" in message and "truncated" in message


def test_round_trip_images_labels_and_identity_scan(tmp_path):
    labels = [3, 3, 7, 1, 7, 7]
    rec, idx = _write_faces(tmp_path, labels)
    lines = idx.read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(k) for k in range(7)]
    reader = RecordIOReader(rec, idx)
    assert len(reader) == 7 and reader.keys == list(range(7))
    assert reader.image_keys() == [1, 2, 3, 4, 5, 6]
    assert reader.scan_identities() == {3: [1, 2], 7: [3, 5, 6], 1: [4]}
    meta = reader.read_header(0)
    assert meta.flag == 2 and meta.labels == (7.0, 0.0)
    header, data = reader.read(5)
    assert (header.flag, header.label, header.id) == (0, 7.0, 5)
    assert data == _jpeg(5)
    img = reader.read_image(5)
    assert img.mode == "RGB" and img.size == (16, 16)
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(io.BytesIO(_jpeg(5))).convert("RGB")))


def test_label_arrays_and_reader_pickles(tmp_path):
    rec, idx = tmp_path / "a.rec", tmp_path / "a.idx"
    write_recordio(rec, idx, [(4, [1.5, 2.5, 3.5], b"xyz"), (9, 2.0, b"")])
    reader = RecordIOReader(rec, idx)
    header, data = reader.read(4)
    assert header.flag == 3 and header.labels == (1.5, 2.5, 3.5) and data == b"xyz"
    assert reader.read_header(4) == header
    clone = pickle.loads(pickle.dumps(reader))
    assert clone.read(9) == reader.read(9)
    assert clone.image_keys() == [4, 9]  # no meta record: every record is an image


def test_payload_holding_the_magic_is_split_and_joined(tmp_path):
    magic = struct.pack("<I", MAGIC)
    data = b"abcd" + magic + b"efgh" + magic + b"xy"  # the payload header is 24 bytes, so both are 4-aligned
    rec, idx = tmp_path / "m.rec", tmp_path / "m.idx"
    write_recordio(rec, idx, [(1, 5.0, data), (2, 6.0, b"tail")])
    raw = rec.read_bytes()
    first_lrec = struct.unpack_from("<I", raw, 4)[0]
    assert first_lrec >> 29 == 1  # first part of a multi-part record
    reader = RecordIOReader(rec, idx)
    assert reader.read(1)[1] == data
    assert reader.read_header(1).label == 5.0
    assert reader.read(2)[1] == b"tail"


def test_payload_helpers_are_inverse():
    payload = pack_payload([4.0, 2.0], b"img", id=11, id2=3)
    header, data = unpack_payload(payload)
    assert (header.flag, header.labels, header.id, header.id2, data) == (2, (4.0, 2.0), 11, 3, b"img")


def test_truncated_rec_names_file_key_and_offset(tmp_path):
    rec, idx = _write_faces(tmp_path, [0, 0, 1, 1])
    last_offset = int(idx.read_text().splitlines()[-1].split("\t")[1])
    rec.write_bytes(rec.read_bytes()[: last_offset + 20])
    reader = RecordIOReader(rec, idx)
    with pytest.raises(DatasetError) as info:
        reader.scan_identities()
    message = str(info.value)
    assert str(rec) in message and "key 4" in message and str(last_offset) in message and "truncated" in message


def test_offset_past_the_end_is_caught_when_opening(tmp_path):
    rec, idx = _write_faces(tmp_path, [0, 1])
    rec.write_bytes(rec.read_bytes()[:40])
    with pytest.raises(DatasetError, match="past the end"):
        RecordIOReader(rec, idx)


def test_truncated_idx_is_reported(tmp_path):
    rec, idx = _write_faces(tmp_path, [0, 0, 1, 1])
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join(lines[:-2]) + "\n" + lines[-2].split("\t")[0] + "\t")
    with pytest.raises(DatasetError) as info:
        RecordIOReader(rec, idx)
    assert str(idx) in str(info.value) and "line 4" in str(info.value)
    idx.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DatasetError) as info:
        RecordIOReader(rec, idx).image_keys()
    assert str(idx) in str(info.value) and "first missing key 4" in str(info.value)


def test_mismatched_index_and_missing_files(tmp_path):
    rec, idx = _write_faces(tmp_path, [0, 1])
    idx.write_text("0\t0\n1\t8\n")
    with pytest.raises(DatasetError, match="no record magic"):
        RecordIOReader(rec, idx).read(1)
    with pytest.raises(DatasetError, match="does not exist"):
        RecordIOReader(tmp_path / "none.rec", idx)
    with pytest.raises(DatasetError, match="no record key 5"):
        RecordIOReader(rec, idx).read(5)
