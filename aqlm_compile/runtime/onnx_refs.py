"""The external data files an ONNX model names, read from its protobuf bytes without the `onnx` package.

ONNX Runtime opens a tensor's external data file itself (its `location`, relative to the model's folder), so the ORT
runtime checks every location against the artifact's manifest before a session sees the model (`runtime/ort.py`,
docs/security.md). The runtime runs where only onnxruntime, numpy and tokenizers are installed — no `onnx`, whose
generated classes are what would parse the file — so this reads the protobuf wire format directly, descending only
into the messages that can hold a tensor (onnx.proto, IR version 10):

    ModelProto     graph=7 (GraphProto), training_info=20 (TrainingInfoProto), functions=25 (FunctionProto)
    TrainingInfoProto initialization=1, algorithm=2 (GraphProto)
    GraphProto     node=1 (NodeProto), initializer=5 (TensorProto), sparse_initializer=15 (SparseTensorProto)
    FunctionProto  node=7 (NodeProto), attribute_proto=11 (AttributeProto: default attribute values)
    NodeProto      attribute=5 (AttributeProto)
    AttributeProto t=5, tensors=10 (TensorProto); g=6, graphs=11 (GraphProto); sparse_tensor=22, sparse_tensors=23
    SparseTensorProto values=1, indices=2 (TensorProto)
    TensorProto    name=8, external_data=13 (StringStringEntryProto key=1, value=2), data_location=14

Every other field is skipped by its length, so a model with gigabytes of inline weights is read in one pass of
field headers. Anything malformed is a ValueError (the caller turns it into its one-line FormatError).
"""

from __future__ import annotations

from pathlib import Path

# message kind → {field number: the kind of message that field holds}
_CHILDREN = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node", 11: "attribute"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 10: "tensor", 6: "graph", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}
_MAX_DEPTH = 64  # subgraphs nest (If/Loop bodies); a deeper file is refused rather than recursed into


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int):
    """(field number, wire type, value or (start, end) of a length-delimited payload) of one message's fields."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise ValueError(f"field {number}: {length} bytes past the end of its message")
            yield number, wire, (pos, pos + length)
            pos += length
        else:
            raise ValueError(f"field {number}: wire type {wire} (groups are not used by ONNX)")
        if pos > end:
            raise ValueError(f"field {number}: past the end of its message")


def _text(buf: memoryview, span: tuple[int, int]) -> str:
    return bytes(buf[span[0]:span[1]]).decode("utf-8", errors="replace")


def _tensor(buf: memoryview, span: tuple[int, int]) -> tuple[str, bool, str | None]:
    """(name, data_location is EXTERNAL, the `location` entry of external_data or None)."""
    name, external, location = "", False, None
    for number, wire, value in _fields(buf, *span):
        if number == 8 and wire == 2:
            name = _text(buf, value)
        elif number == 14 and wire == 0:
            external = value == 1
        elif number == 13 and wire == 2:
            key = val = None
            for n, w, v in _fields(buf, *value):
                if w == 2 and n == 1:
                    key = _text(buf, v)
                elif w == 2 and n == 2:
                    val = _text(buf, v)
            if key == "location":
                location = val
    return name, external, location


def external_data_refs(data: bytes | memoryview) -> list[tuple[str, str | None]]:
    """[(tensor name, location)] for every tensor of a serialized ModelProto that is stored externally or names an
    external location (location None: external but without one). Raises ValueError for malformed bytes."""
    with memoryview(data) as buf:  # released even when the bytes are malformed (a mapped file can then close)
        return _refs(buf)


def _refs(buf: memoryview) -> list[tuple[str, str | None]]:
    found: list[tuple[str, str | None]] = []
    stack = [("model", (0, len(buf)), 0)]
    while stack:
        kind, span, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise ValueError(f"messages nested deeper than {_MAX_DEPTH}")
        if kind == "tensor":
            name, external, location = _tensor(buf, span)
            if external or location is not None:
                found.append((name, location))
            continue
        children = _CHILDREN[kind]
        for number, wire, value in _fields(buf, *span):
            if wire == 2 and number in children:
                stack.append((children[number], value, depth + 1))
    return found


def external_data_refs_of_file(path: str | Path) -> list[tuple[str, str | None]]:
    """`external_data_refs` of the ONNX file at `path` (memory-mapped: read once, not copied)."""
    import mmap

    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size == 0:
            raise ValueError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return external_data_refs(mapped)
