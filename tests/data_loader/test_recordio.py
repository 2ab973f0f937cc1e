"""RecordIO reader and writer: round trip, multi-part records, header scan and truncated files."""

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
