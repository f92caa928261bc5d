"""A small reader of the vertex coordinates of PLY files (ASCII and binary, either byte order).

Only what a point cloud needs: the ``x``, ``y`` and ``z`` properties of the ``vertex`` element.
Other vertex properties (normals, colours, ...) are skipped; elements before ``vertex`` are
skipped too (in binary files only when they have no list properties, which is the usual case:
the vertices come first).  Anything else is refused with a message saying what was found.
"""

from __future__ import annotations

import numpy as np

__all__ = ["read_ply_points"]

_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}
_FORMATS = {"ascii": None, "binary_little_endian": "<", "binary_big_endian": ">"}


class _Element:
    def __init__(self, name: str, count: int):
        self.name, self.count = name, count
        self.props: list = []  # (name, numpy type code) or (name, None) for a list property


def _parse_header(raw: bytes, path: str):
    end = raw.find(b"end_header")
    if not raw.startswith(b"ply") or end < 0:
        raise ValueError(f"{path}: not a PLY file (it must start with 'ply' and have an "
                         "'end_header' line)")
    newline = raw.find(b"\n", end)
    body_start = len(raw) if newline < 0 else newline + 1
    lines = raw[:end].decode("ascii", errors="replace").splitlines()[1:]
    fmt, elements = None, []
    for number, line in enumerate(lines, start=2):
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format":
            if len(words) < 2 or words[1] not in _FORMATS:
                raise ValueError(f"{path}: line {number}: unsupported format {line.strip()!r}; "
                                 f"supported: {sorted(_FORMATS)}")
            fmt = words[1]
        elif words[0] == "element":
            if len(words) != 3 or not words[2].isdigit():
                raise ValueError(f"{path}: line {number}: malformed element line {line!r}")
            elements.append(_Element(words[1], int(words[2])))
        elif words[0] == "property":
            if not elements:
                raise ValueError(f"{path}: line {number}: property before any element")
            if len(words) == 5 and words[1] == "list":
                elements[-1].props.append((words[4], None))
            elif len(words) == 3 and words[1] in _TYPES:
                elements[-1].props.append((words[2], _TYPES[words[1]]))
            else:
                raise ValueError(f"{path}: line {number}: unsupported property {line.strip()!r}"
                                 f"; scalar types: {sorted(_TYPES)}")
        else:
            raise ValueError(f"{path}: line {number}: unknown header keyword {words[0]!r}")
    if fmt is None:
        raise ValueError(f"{path}: the header has no 'format' line")
    return fmt, elements, body_start


def _vertex_element(elements, path: str):
    names = [e.name for e in elements]
    if "vertex" not in names:
        raise ValueError(f"{path}: no 'vertex' element (found elements {names})")
    position = names.index("vertex")
    vertex = elements[position]
    props = [p for p, _ in vertex.props]
    missing = [a for a in "xyz" if a not in props]
    if missing:
        raise ValueError(f"{path}: the vertex element has no {', '.join(missing)} propert"
                         f"{'y' if len(missing) == 1 else 'ies'} (found {props}); required: "
                         "x, y, z")
    if any(t is None for _, t in vertex.props):
        raise ValueError(f"{path}: the vertex element has list properties; only scalar vertex "
                         "properties are supported")
    return position, vertex


def read_ply_points(path) -> np.ndarray:
    """The vertex coordinates of a PLY file.

    Parameters
    ----------
    path : str or os.PathLike
        An ASCII, binary little-endian or binary big-endian PLY file with a ``vertex`` element
        that has ``x``, ``y`` and ``z`` properties (any scalar type).

    Returns
    -------
    (n, 3) float64
        The coordinates in the file's units.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Not a PLY file, an unsupported header, no vertex x/y/z, or a truncated or malformed body.
    """
    path = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    fmt, elements, start = _parse_header(raw, path)
    position, vertex = _vertex_element(elements, path)
    columns = [p for p, _ in vertex.props]
    if vertex.count == 0:
        return np.zeros((0, 3))
    if fmt == "ascii":
        lines = raw[start:].decode("ascii", errors="replace").splitlines()
        lines = [ln for ln in lines if ln.strip()]
        first = sum(e.count for e in elements[:position])
        rows = lines[first:first + vertex.count]
        if len(rows) < vertex.count:
            raise ValueError(f"{path}: truncated: {vertex.count} vertices declared, found "
                             f"{len(rows)} vertex lines")
        try:
            table = np.array([r.split()[:len(columns)] for r in rows], dtype=np.float64)
        except ValueError as exc:
            raise ValueError(f"{path}: malformed vertex line ({exc}); each needs "
                             f"{len(columns)} numbers ({columns})") from None
        if table.shape != (vertex.count, len(columns)):
            raise ValueError(f"{path}: malformed vertex lines: each needs {len(columns)} numbers "
                             f"({columns})")
        return table[:, [columns.index(a) for a in "xyz"]]
    order = _FORMATS[fmt]
    offset = start
    for e in elements[:position]:
        if any(t is None for _, t in e.props):
            raise ValueError(f"{path}: element {e.name!r} with list properties comes before "
                             "'vertex'; only scalar elements may precede it in binary files")
        offset += e.count * np.dtype([(p, order + t) for p, t in e.props]).itemsize
    dtype = np.dtype([(p, order + t) for p, t in vertex.props])
    needed = vertex.count * dtype.itemsize
    if len(raw) - offset < needed:
        raise ValueError(f"{path}: truncated: {vertex.count} vertices need {needed} bytes, the "
                         f"file has {max(0, len(raw) - offset)} after the header")
    table = np.frombuffer(raw, dtype=dtype, count=vertex.count, offset=offset)
    return np.stack([table[a].astype(np.float64) for a in "xyz"], axis=1)
