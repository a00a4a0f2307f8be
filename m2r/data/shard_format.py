"""The on-disk sample format of m2r shards (WebDataset layout; see shards/README.md).

A shard is a plain tar whose members `<key>.<field>` are grouped by key, as WebDataset expects.
Fields: `clean.rgb.zst` / `clean.png` (the target), optional `lq.rgb.zst` / `lq.png` (a pre-degraded
input), and `json` (metadata). `rgb.zst` is our raw format: zstd of a 9-byte header (b"M2RI",
uint16 height, uint16 width, uint8 channels) followed by the uint8 pixels, row-major HWC. Its zstd
frame carries zstd's content checksum, so damaged bytes fail to decode rather than give wrong pixels
(frames written before the checksum was added still decode, unverified beyond the header and size).
Only these fields are ever decoded: no pickle, no decoder chosen by the file.
"""
from __future__ import annotations

import io
import json
import socket
import struct
import tarfile
from typing import Dict, Iterator, Tuple

import numpy as np
import zstandard
from PIL import Image

RAW_MAGIC = b"M2RI"
RAW_HEADER = struct.Struct("<4sHHB")
IMAGE_EXTENSIONS = {"zstd": "rgb.zst", "png": "png"}
ROLES = ("clean", "lq")
MAX_SIDE = 16384   # px per side, both encodings (the decoder's bound against decompression bombs)


class CorruptSample(ValueError):
    """A sample that cannot be decoded; the stream counts and skips it."""


def encode_image(img: np.ndarray, encoding: str = "zstd", level: int = 3) -> Tuple[str, bytes]:
    """uint8 (H, W, 3) -> (field extension, bytes)."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected uint8 (H, W, 3), got {img.dtype} {img.shape}")
    if max(img.shape[:2]) > MAX_SIDE:   # what decode_image would refuse is never written
        raise ValueError(f"an image of {img.shape[1]}x{img.shape[0]} exceeds the shard format's {MAX_SIDE} px per side")
    if encoding == "zstd":
        header = RAW_HEADER.pack(RAW_MAGIC, img.shape[0], img.shape[1], 3)
        compressor = zstandard.ZstdCompressor(level=level, write_checksum=True)
        payload = compressor.compress(header + np.ascontiguousarray(img).tobytes())
        return IMAGE_EXTENSIONS["zstd"], payload
    if encoding == "png":
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG", compress_level=1)
        return IMAGE_EXTENSIONS["png"], buf.getvalue()
    raise ValueError(f"unknown image encoding '{encoding}'; choose one of {sorted(IMAGE_EXTENSIONS)}")


def decode_image(ext: str, data: bytes) -> np.ndarray:
    """Inverse of `encode_image`; anything malformed raises CorruptSample."""
    try:
        if ext == IMAGE_EXTENSIONS["zstd"]:
            raw = zstandard.ZstdDecompressor().decompress(data)
            magic, h, w, c = RAW_HEADER.unpack_from(raw)
            if magic != RAW_MAGIC or c != 3 or not h or not w or len(raw) != RAW_HEADER.size + h * w * c:
                raise CorruptSample(f"bad raw image header or size ({magic!r}, {h}x{w}x{c}, {len(raw)} bytes)")
            return np.frombuffer(raw, np.uint8, offset=RAW_HEADER.size).reshape(h, w, c)
        if ext == IMAGE_EXTENSIONS["png"]:
            with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
                if max(im.size) > MAX_SIDE:
                    raise CorruptSample(f"png of {im.size} exceeds {MAX_SIDE} px")
                return np.asarray(im.convert("RGB"))
    except CorruptSample:
        raise
    except Exception as exc:  # zstd, struct and PIL raise many types for damaged bytes
        raise CorruptSample(f"cannot decode .{ext}: {exc}") from None
    raise CorruptSample(f"unsupported image field .{ext}")


def image_field(record: Dict[str, bytes], role: str):
    """(ext, bytes) of the `role` image in a record, or None."""
    for ext in IMAGE_EXTENSIONS.values():
        data = record.get(f"{role}.{ext}")
        if data is not None:
            return ext, data
    return None


def decode_record(record: Dict[str, bytes]):
    """-> (clean uint8, lq uint8 or None, metadata dict); a damaged sample raises CorruptSample
    naming its key."""
    try:
        return _decode_fields(record)
    except CorruptSample as exc:
        raise CorruptSample(f"sample {record.get('__key__')}: {exc}") from None


def _decode_fields(record: Dict[str, bytes]):
    clean = image_field(record, "clean")
    if clean is None:
        raise CorruptSample("no clean image")
    try:
        meta = json.loads(record["json"]) if "json" in record else {}
    except ValueError as exc:
        raise CorruptSample(f"bad json: {exc}") from None
    lq = image_field(record, "lq")
    clean_img = decode_image(*clean)
    lq_img = decode_image(*lq) if lq is not None else None
    if lq_img is not None and lq_img.shape != clean_img.shape:
        raise CorruptSample(f"lq {lq_img.shape} != clean {clean_img.shape}")
    return clean_img, lq_img, meta


def _known_field(field: str) -> bool:
    if field == "json":
        return True
    role, _, ext = field.partition(".")
    return role in ROLES and ext in IMAGE_EXTENSIONS.values()


def read_shard(path: str) -> Iterator[Dict[str, bytes]]:
    """Records of a shard in file order: dicts field -> bytes plus `__key__`. Unknown fields are
    not read. A truncated or damaged tar ends the shard early with CorruptSample; a missing file is a
    FileNotFoundError naming it and this host (not a damaged sample to skip: a node whose copy of the
    shards is incomplete would otherwise train on part of the corpus, silently)."""
    record: Dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, field = member.name.rsplit("/", 1)[-1].partition(".")
                if record and key != record["__key__"]:
                    yield record
                    record = {}
                record["__key__"] = key
                if _known_field(field):
                    record[field] = tar.extractfile(member).read()
    except FileNotFoundError:
        raise FileNotFoundError(f"shard {path} is missing on host {socket.gethostname()} (the shards were listed "
                                "at start, by rank 0: does every node see the same files?)") from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise CorruptSample(f"{path}: damaged tar: {exc}") from None
    if record:
        yield record


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))
