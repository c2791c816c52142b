"""Labelled data: in-memory arrays, ``.npz`` files, ``.npy`` memory maps and
directories of ``.npz`` shards, all read in batches and checked up front.

File formats (``--data PATH``):

- ``data.npz``: the model-ready input under the graph input's name or ``x``,
  integer class labels under ``y``;
- a directory with ``x.npy`` (or ``<input>.npy``) and ``y.npy``: memory-mapped,
  never loaded whole;
- a directory of ``*.npz`` shards (sorted by name), each like ``data.npz``:
  opened one at a time.

Retain data (``--retain-data PATH``) takes the same formats with the labels
optional (:func:`load_data` with ``labels_optional``): without ``y`` (or
``y.npy``) the data is unlabelled (``LabelledData.labelled`` is False) and its
stored labels are placeholders that the caller replaces (:class:`JoinedData`).
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError

__all__ = ["JoinedData", "LabelledData", "count_samples", "from_arrays", "load_data"]

# A damaged deflate stream, a malformed npy header (a huge declared shape: MemoryError)
_READ_ERRORS = (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError, zlib.error,
                MemoryError, OverflowError)

_CHECK_CHUNK = 4096


@dataclass
class _Part:
    x: np.ndarray
    y: np.ndarray


class LabelledData:
    """A sequence of (input, label) pairs stored in one or more parts."""

    def __init__(self, parts: list[_Part] | None = None, source: str = "arrays",
                 shard_paths: list[Path] | None = None, input_key: str | None = None,
                 shard_sizes: list[int] | None = None, labelled: bool = True) -> None:
        self.parts = parts or []
        self.labelled = labelled  # False: the labels are placeholders (zeros)
        self.source = source
        self._shard_paths = shard_paths
        self._input_key = input_key
        sizes = shard_sizes if shard_sizes is not None else [len(p.y) for p in self.parts]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._cached: tuple[int, _Part] | None = None
        self._validated: set[tuple[tuple[int | str, ...], int | None, str]] = set()

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _part(self, k: int) -> _Part:
        if self._shard_paths is None:
            return self.parts[k]
        if self._cached is None or self._cached[0] != k:
            path, key = self._shard_paths[k], self._input_key
            part = _read_npz(path, key) if self.labelled else _read_npz(path, key, True)
            self._cached = (k, part)
        return self._cached[1]

    def take(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``idx`` (sorted ascending) as (float32 inputs, int64 labels)."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size == 0:
            shape = tuple(self._part(0).x.shape[1:]) if len(self) else ()
            return (np.zeros((0, *shape), np.float32),
                    _label_array(np.zeros((0, *self._part(0).y.shape[1:]), self._part(0).y.dtype)))
        xs, ys = [], []
        which = np.searchsorted(self._offsets, idx, side="right") - 1
        for k in np.unique(which):
            part = self._part(int(k))
            local = idx[which == k] - self._offsets[k]
            xs.append(np.asarray(part.x[local], dtype=np.float32))
            ys.append(_label_array(part.y[local]))
        if len(xs) == 1:  # one part: no second copy
            return xs[0], ys[0]
        return np.concatenate(xs), np.concatenate(ys)

    def labels(self, idx: np.ndarray | None = None) -> np.ndarray:
        """Labels of rows ``idx`` (sorted ascending; all rows if None) as int64,
        without reading any input: use it instead of ``take`` when only labels count."""
        idx = np.arange(len(self)) if idx is None else np.asarray(idx, dtype=np.int64)
        if idx.size == 0:
            return np.zeros(0, np.int64)
        which = np.searchsorted(self._offsets, idx, side="right") - 1
        out = []
        for k in np.unique(which):
            local = idx[which == k] - self._offsets[k]
            out.append(_label_array(self._part_labels(int(k))[local]))
        return out[0] if len(out) == 1 else np.concatenate(out)

    def _part_labels(self, k: int) -> np.ndarray:
        if self._shard_paths is None:
            return self.parts[k].y
        if self._cached is not None and self._cached[0] == k:
            return self._cached[1].y
        if not self.labelled:
            return np.zeros(self._offsets[k + 1] - self._offsets[k], np.int64)
        try:
            with np.load(self._shard_paths[k], allow_pickle=False) as z:  # reads only 'y'
                return np.asarray(z["y"])
        except _READ_ERRORS as exc:
            raise DataError(f"shard {self._shard_paths[k]} is not a readable .npz file "
                            f"({_why(exc)}); {_NPZ_HINT}") from exc

    def batches(self, idx: np.ndarray, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(idx), size):
            yield self.take(idx[start : start + size])

    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self._part(0).x.shape[1:])

    def validate(self, input_shape: list[int | str], n_classes: int | None,
                 labels: str = "classes") -> None:
        """Check shapes, dtypes, finiteness and label range, streaming; raise DataError.

        ``labels``: ``classes`` (integer class indices, one per sample), ``dense``
        (integer classes per position, 255 = ignored) or ``values`` (finite floats).
        Inputs are read in chunks of a few thousand rows (a memory map or a shard
        directory is never loaded whole). A successful check is remembered, so
        validating the same data for the same model again costs nothing.
        """
        key = (tuple(input_shape), n_classes, labels)
        if key in self._validated:
            return
        if len(self) == 0:
            raise DataError(
                f"{self.source} holds no samples; give at least one labelled sample"
            )
        expected = [d if isinstance(d, int) and d > 0 else None for d in input_shape[1:]]
        first: tuple[int, ...] | None = None
        n_parts = len(self._offsets) - 1
        for k in range(n_parts):
            part = self._part(k)
            where = self._where(k)
            shape = tuple(part.x.shape[1:])
            if input_shape and (len(shape) != len(expected) or any(
                e is not None and e != s for e, s in zip(expected, shape, strict=False)
            )):
                want = ["N", *[e if e is not None else "?" for e in expected]]
                raise DataError(
                    f"{where}: inputs have shape {list(part.x.shape)} but the model "
                    f"expects {want}; preprocess the data to the model's input layout"
                )
            if first is not None and shape != first:
                raise DataError(
                    f"{where}: inputs have shape {list(part.x.shape)} but earlier shards have "
                    f"{['N', *first]}; give every shard the same sample shape"
                )
            first = shape
            if not (np.issubdtype(part.x.dtype, np.floating)
                    or np.issubdtype(part.x.dtype, np.integer)):
                raise DataError(
                    f"{where}: inputs have dtype {part.x.dtype}; store numbers (float32)"
                )
            if labels != "classes":
                _check_labels(part.y, labels, n_classes, where)
            elif not np.issubdtype(part.y.dtype, np.integer):
                raise DataError(
                    f"{where}: labels have dtype {part.y.dtype}; "
                    "store integer class indices under 'y'"
                )
            if np.issubdtype(part.x.dtype, np.floating):
                for start in range(0, len(part.y), _CHECK_CHUNK):
                    # checked as the model sees it (float32): 1e39 in float64 is Inf there
                    with np.errstate(over="ignore", invalid="ignore"):
                        chunk = np.asarray(part.x[start : start + _CHECK_CHUNK], np.float32)
                    finite = np.isfinite(chunk).reshape(len(chunk), -1).all(axis=1)
                    if not finite.all():
                        row = int(self._offsets[k]) + start + int(np.argmin(finite))
                        raise DataError(
                            f"{where}: inputs contain NaN or Inf as float32, the model's input "
                            f"type (first at sample {row}; float32 ends at about 3.4e38); "
                            "clean, rescale or drop those samples"
                        )
            y = np.asarray(part.y) if labels == "classes" else np.zeros(0, np.int64)
            if y.size and y.min() < 0:
                raise DataError(
                    f"{where}: labels must be class indices >= 0 (found {int(y.min())}); "
                    "map them to 0..classes-1"
                )
            if n_classes is not None and y.size and y.max() >= n_classes:
                raise DataError(
                    f"{where}: label {int(y.max())} is out of range for a model with "
                    f"{n_classes} classes; labels must be 0..{n_classes - 1}"
                )
        self._validated.add(key)

    def _where(self, k: int) -> str:
        """The file a part comes from, for messages."""
        if self._shard_paths is not None:
            return str(self._shard_paths[k])
        return self.source


def from_arrays(x: np.ndarray, y: np.ndarray, source: str = "arrays") -> LabelledData:
    """Wrap in-memory (or memory-mapped) arrays; a memory map stays a memory map."""
    x = x if isinstance(x, np.memmap) else np.asarray(x)
    y = y if isinstance(y, np.memmap) else np.asarray(y)
    if x.ndim == 0 or y.ndim < 1:
        raise DataError(
            f"{source}: labels must be an array with one row per sample and inputs at least 1-D "
            f"(got inputs of shape {list(x.shape)}, labels of shape {list(y.shape)})"
        )
    if len(x) != len(y):
        raise DataError(
            f"{source}: {len(x)} inputs but {len(y)} labels; they must pair one to one"
        )
    return LabelledData([_Part(x, y)], source)


_NPZ_HINT = "save inputs and labels with numpy.savez(PATH, x=inputs, y=labels)"


def _read_npz(path: Path, input_key: str | None, labels_optional: bool = False) -> _Part:
    if not zipfile.is_zipfile(path):
        if path.suffix == ".npy":
            raise DataError(
                f"{path} is a single .npy array; labelled data needs inputs and labels: "
                f"{_NPZ_HINT}, or put x.npy and y.npy in one folder"
            )
        raise DataError(f"{path} is not an .npz file; {_NPZ_HINT}")
    _check_members(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            xkey = input_key if input_key in keys else "x" if "x" in keys else None
            if xkey is None or ("y" not in keys and not labels_optional):
                want = f"'{input_key}' or 'x'" if input_key else "'x'"
                raise DataError(
                    f"{path} has keys {keys}; it needs the inputs under {want} "
                    + ("(labels under 'y' optional)" if labels_optional
                       else "and labels under 'y'")
                )
            x = z[xkey]
            y = z["y"] if "y" in keys else np.zeros(len(x) if x.ndim else 0, np.int64)
    except DataError:
        raise
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise DataError(
                f"{path} holds Python objects, not numeric arrays; {_NPZ_HINT} "
                "with numeric (float32 / int64) arrays"
            ) from exc
        raise DataError(f"{path} is not a readable .npz file ({_why(exc)}); {_NPZ_HINT}") \
            from exc
    except _READ_ERRORS as exc:
        raise DataError(f"{path} is not a readable .npz file ({_why(exc)}); {_NPZ_HINT}") \
            from exc
    if x.ndim == 0 or y.ndim < 1 or len(x) != len(y):
        raise DataError(
            f"{path}: inputs of shape {list(x.shape)} but labels of shape {list(y.shape)}; "
            "labels must have one row per sample and pair one to one with the inputs"
        )
    return _Part(x, y)


def _shard_size(shard: Path) -> int:
    """Number of labelled samples in a shard, reading only its labels."""
    if not zipfile.is_zipfile(shard):
        raise DataError(f"shard {shard} is not an .npz file; {_NPZ_HINT}")
    _check_members(shard)
    try:
        with np.load(shard, allow_pickle=False) as z:
            if "y" not in z:
                raise DataError(
                    f"shard {shard} has keys {list(z.keys())} but no labels under 'y'; "
                    "store them under 'y'"
                )
            y = z["y"]
    except DataError:
        raise
    except _READ_ERRORS as exc:
        raise DataError(f"shard {shard} is not a readable .npz file ({_why(exc)}); "
                        f"{_NPZ_HINT}") from exc
    if y.ndim < 1:
        raise DataError(
            f"shard {shard}: labels have shape {list(y.shape)}; store one label row per sample"
        )
    return int(y.shape[0])


def _has_labels(path: Path) -> bool:
    """Whether the ``.npz`` at ``path`` has a ``y`` member (reads the zip index only)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return "y.npy" in zf.namelist()
    except _READ_ERRORS:
        return True  # let the full read name the problem


def _rows(path: Path, input_key: str | None) -> int:
    """Number of inputs in an unlabelled shard, from its ``.npy`` header only."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            member = next((f"{k}.npy" for k in (input_key, "x") if k and f"{k}.npy" in names),
                          None)
            if member is None:
                raise DataError(f"shard {path} has members {names}; it needs the inputs "
                                f"under {input_key or 'x'!r} or 'x'")
            with zf.open(member) as f:
                shape, _ = _npy_header(f)
    except DataError:
        raise
    except _READ_ERRORS as exc:
        raise DataError(f"shard {path} is not a readable .npz file ({_why(exc)}); "
                        f"{_NPZ_HINT}") from exc
    if not shape:
        raise DataError(f"shard {path}: inputs are a scalar; store an array of samples")
    return int(shape[0])


def load_data(path: str | os.PathLike[str], input_name: str | None = None,
              labels_optional: bool = False, what: str = "data file") -> LabelledData:
    """Open a ``.npz`` file, an ``.npy`` pair directory or a shard directory.

    Only cheap checks happen here (the file format, keys, lengths); shapes, dtypes,
    finiteness and labels are checked against the model by :meth:`LabelledData.validate`.
    With ``labels_optional`` the labels may be absent everywhere (then
    ``labelled`` is False), but not in some shards only.
    """
    from .paths import check_input_file  # noqa: PLC0415

    path = check_input_file(path, what, DataError, folder_ok=True)
    if not path.is_dir():
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise DataError(
                f"cannot read {what} {path}: {exc.strerror or exc}; check its permissions"
            ) from exc
        labelled = not labels_optional or _has_labels(path)
        return LabelledData([_read_npz(path, input_name, not labelled)], str(path),
                            labelled=labelled)
    names = [f"{input_name}.npy"] if input_name else []
    xnpy = next((path / n for n in [*names, "x.npy"] if (path / n).is_file()), None)
    if xnpy is not None:
        ynpy = path / "y.npy"
        if not ynpy.is_file() and not labels_optional:
            raise DataError(
                f"{path} holds {xnpy.name} but no y.npy; save the labels next to it "
                "(numpy.save(y.npy, labels))"
            )
        try:
            x = np.load(xnpy, mmap_mode="r", allow_pickle=False)
            y = (np.load(ynpy, mmap_mode="r", allow_pickle=False) if ynpy.is_file()
                 else None)
        except _READ_ERRORS as exc:
            raise DataError(
                f"cannot memory-map {xnpy.name} and y.npy in {path} ({exc}); "
                "write them with numpy.save"
            ) from exc
        if y is None:
            data = from_arrays(x, np.zeros(len(x) if x.ndim else 0, np.int64), str(path))
            data.labelled = False
            return data
        return from_arrays(x, y, str(path))
    shards = sorted(p for p in path.glob("*.npz") if p.is_file())
    if not shards:
        raise DataError(
            f"{path} holds neither x.npy + y.npy nor .npz shards; "
            "see 'Data formats' in the README"
        )
    labelled = True
    if labels_optional:
        with_y = [_has_labels(shard) for shard in shards]
        if any(with_y) and not all(with_y):
            raise DataError(
                f"{path}: {sum(with_y)} of {len(shards)} shards have labels under 'y'; "
                "label every shard or none"
            )
        labelled = all(with_y)
    sizes = [_shard_size(shard) if labelled else _rows(shard, input_name) for shard in shards]
    return LabelledData(source=str(path), shard_paths=shards, input_key=input_name,
                        shard_sizes=sizes, labelled=labelled)


class JoinedData(LabelledData):
    """``first`` followed by ``second``, as one sequence; ``second``'s labels are
    ``second_labels`` (its true labels, or the input model's predictions when it
    has none). Indices below ``len(first)`` are ``first``'s."""

    def __init__(self, first: LabelledData, second: LabelledData,
                 second_labels: np.ndarray) -> None:
        super().__init__(source=f"{first.source} + {second.source}",
                         shard_sizes=[len(first), len(second)])
        self.first, self.second = first, second
        self.second_labels = _label_array(second_labels)

    def _halves(self, idx: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        idx = np.arange(len(self)) if idx is None else np.asarray(idx, dtype=np.int64)
        n1 = len(self.first)
        return idx[idx < n1], idx[idx >= n1] - n1

    def take(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a, b = self._halves(idx)
        if not len(b):
            return self.first.take(a)
        xb, _ = self.second.take(b)
        yb = self.second_labels[b]
        if not len(a):
            return xb, yb
        xa, ya = self.first.take(a)
        return np.concatenate([xa, xb]), np.concatenate([ya, yb])

    def labels(self, idx: np.ndarray | None = None) -> np.ndarray:
        a, b = self._halves(idx)
        return np.concatenate([self.first.labels(a), self.second_labels[b]])

    def sample_shape(self) -> tuple[int, ...]:
        return self.first.sample_shape()

    def validate(self, input_shape: list[int | str], n_classes: int | None,
                 labels: str = "classes") -> None:
        self.first.validate(input_shape, n_classes, labels)
        self.second.validate(input_shape, n_classes, labels)


def _label_array(y: np.ndarray) -> np.ndarray:
    """Labels as the pipeline reads them: integer labels as int64 (class indices),
    float labels (regression values, soft masks) as float32."""
    if np.issubdtype(np.asarray(y).dtype, np.floating):
        return np.asarray(y, dtype=np.float32)
    return np.asarray(y, dtype=np.int64)


def _check_labels(y: np.ndarray, kind: str, n_classes: int | None, where: str) -> None:
    """Dense class labels (integers in 0..n_classes-1 or 255) or float values
    (finite), streamed in chunks; :class:`DataError` naming the first problem."""
    if kind == "dense" and not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: dense labels have dtype {y.dtype}; store integer class "
                        "indices per position (255: ignored)")
    if kind == "values" and not (np.issubdtype(y.dtype, np.floating)
                                 or np.issubdtype(y.dtype, np.integer)):
        raise DataError(f"{where}: labels have dtype {y.dtype}; store float32 values")
    for start in range(0, len(y), _CHECK_CHUNK):
        chunk = np.asarray(y[start : start + _CHECK_CHUNK])
        if kind == "values":
            if not np.isfinite(chunk.astype(np.float32)).all():
                raise DataError(f"{where}: labels contain NaN or Inf; clean or drop those samples")
            continue
        bad = (chunk < 0) | ((chunk >= (n_classes or np.iinfo(np.int64).max)) & (chunk != 255))
        if bad.any():
            value = int(chunk[bad].flat[0])
            raise DataError(f"{where}: dense label {value} is not a class of the output "
                            f"(0..{(n_classes or 1) - 1}) nor 255 (ignored); map it to one")


def _why(exc: BaseException) -> str:
    if isinstance(exc, MemoryError):
        return "its header declares an array far larger than the file"
    if isinstance(exc, zlib.error):
        return f"a damaged compressed stream: {exc}"
    return " ".join(str(exc).split()) or type(exc).__name__


def _npy_header(f: Any) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """Shape and dtype from the header of the ``.npy`` stream ``f`` (left just after it)."""
    if np.lib.format.read_magic(f) == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return shape, dtype


def _check_members(path: Path) -> None:
    """Refuse an npz whose ``.npy`` members declare more bytes than they hold: reads
    stay bounded by the file (a forged header cannot ask for terabytes)."""
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as f:
                    shape, dtype = _npy_header(f)
                    header = f.tell()
                need = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if need > info.file_size - header:
                    raise DataError(
                        f"{path}: member {info.filename} declares shape {list(shape)} "
                        f"({need} bytes) but holds {info.file_size - header}; the file is "
                        f"truncated or forged: {_NPZ_HINT}"
                    )
    except DataError:
        raise
    except _READ_ERRORS as exc:
        raise DataError(f"{path} is not a readable .npz file ({_why(exc)}); {_NPZ_HINT}") \
            from exc


def count_samples(path: str | os.PathLike[str]) -> int:
    """Number of labelled samples at ``path`` (``.npz``, ``.npy`` folder or shard
    folder), reading labels only."""
    from .paths import check_input_file  # noqa: PLC0415

    path = check_input_file(path, "data file", DataError, folder_ok=True)
    if path.is_dir():
        ynpy = path / "y.npy"
        if ynpy.is_file():
            try:
                return int(np.load(ynpy, mmap_mode="r", allow_pickle=False).shape[0])
            except _READ_ERRORS + (IndexError,) as exc:
                raise DataError(f"cannot read {ynpy} ({_why(exc)}); write it with numpy.save") \
                    from exc
        return sum(_shard_size(s) for s in sorted(p for p in path.glob("*.npz") if p.is_file()))
    return _shard_size(path)

