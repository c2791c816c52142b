"""Labelled data: in-memory arrays, ``.npz`` files, ``.npy`` memory maps and
directories of ``.npz`` shards, all read in batches and checked up front.

File formats (``--data PATH``):

- ``data.npz``: the model-ready input under the graph input's name or ``x``,
  integer class labels under ``y``;
- a directory with ``x.npy`` (or ``<input>.npy``) and ``y.npy``: memory-mapped,
  never loaded whole;
- a directory of ``*.npz`` shards (sorted by name), each like ``data.npz``:
  opened one at a time.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

__all__ = ["LabelledData", "load_data", "from_arrays"]

_CHECK_CHUNK = 4096


@dataclass
class _Part:
    x: np.ndarray
    y: np.ndarray


class LabelledData:
    """A sequence of (input, label) pairs stored in one or more parts."""

    def __init__(self, parts: list[_Part] | None = None, source: str = "arrays",
                 shard_paths: list[Path] | None = None, input_key: str | None = None,
                 shard_sizes: list[int] | None = None) -> None:
        self.parts = parts or []
        self.source = source
        self._shard_paths = shard_paths
        self._input_key = input_key
        sizes = shard_sizes if shard_sizes is not None else [len(p.y) for p in self.parts]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._cached: tuple[int, _Part] | None = None

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _part(self, k: int) -> _Part:
        if self._shard_paths is None:
            return self.parts[k]
        if self._cached is None or self._cached[0] != k:
            self._cached = (k, _read_npz(self._shard_paths[k], self._input_key))
        return self._cached[1]

    def take(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``idx`` (sorted ascending) as (float32 inputs, int64 labels)."""
        idx = np.asarray(idx, dtype=np.int64)
        xs, ys = [], []
        which = np.searchsorted(self._offsets, idx, side="right") - 1
        for k in np.unique(which):
            part = self._part(int(k))
            local = idx[which == k] - self._offsets[k]
            xs.append(np.asarray(part.x[local], dtype=np.float32))
            ys.append(np.asarray(part.y[local], dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    def batches(self, idx: np.ndarray, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(idx), size):
            yield self.take(idx[start : start + size])

    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self._part(0).x.shape[1:])

    def validate(self, input_shape: list[int | str], n_classes: int | None) -> None:
        """Check shapes, dtypes, finiteness and label range, streaming; raise DataError."""
        if len(self) == 0:
            raise DataError(f"{self.source} holds no samples; give at least one labelled sample")
        expected = [d if isinstance(d, int) and d > 0 else None for d in input_shape[1:]]
        n_parts = len(self._offsets) - 1
        for k in range(n_parts):
            part = self._part(k)
            shape = tuple(part.x.shape[1:])
            if len(shape) != len(expected) or any(
                e is not None and e != s for e, s in zip(expected, shape, strict=False)
            ):
                want = ["N", *[e if e is not None else "?" for e in expected]]
                raise DataError(
                    f"{self.source}: inputs have shape {list(part.x.shape)} but the model "
                    f"expects {want}; preprocess the data to the model's input layout"
                )
            if not (np.issubdtype(part.x.dtype, np.floating) or np.issubdtype(part.x.dtype, np.integer)):
                raise DataError(f"{self.source}: inputs have dtype {part.x.dtype}; store numbers (float32)")
            if not np.issubdtype(part.y.dtype, np.integer):
                raise DataError(
                    f"{self.source}: labels have dtype {part.y.dtype}; store integer class indices under 'y'"
                )
            for start in range(0, len(part.y), _CHECK_CHUNK):
                chunk = np.asarray(part.x[start : start + _CHECK_CHUNK])
                if np.issubdtype(chunk.dtype, np.floating) and not np.isfinite(chunk).all():
                    raise DataError(f"{self.source}: inputs contain NaN or Inf; clean or drop those samples")
            y = np.asarray(part.y)
            if y.size and y.min() < 0:
                raise DataError(f"{self.source}: labels must be >= 0 (found {int(y.min())})")
            if n_classes is not None and y.size and y.max() >= n_classes:
                raise DataError(
                    f"{self.source}: label {int(y.max())} is out of range for a model with "
                    f"{n_classes} classes; labels must be 0..{n_classes - 1}"
                )


def from_arrays(x: np.ndarray, y: np.ndarray, source: str = "arrays") -> LabelledData:
    """Wrap in-memory (or memory-mapped) arrays."""
    x, y = np.asarray(x) if not isinstance(x, np.memmap) else x, np.asarray(y)
    if x.ndim == 0 or y.ndim != 1:
        raise DataError(f"{source}: labels must be a 1-D array of class indices and inputs at least 1-D")
    if len(x) != len(y):
        raise DataError(f"{source}: {len(x)} inputs but {len(y)} labels; they must pair one to one")
    return LabelledData([_Part(x, y)], source)


def _read_npz(path: Path, input_key: str | None) -> _Part:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            xkey = input_key if input_key in keys else "x" if "x" in keys else None
            if xkey is None or "y" not in keys:
                want = f"'{input_key}' or 'x'" if input_key else "'x'"
                raise DataError(
                    f"{path} has keys {keys}; it needs the inputs under {want} and labels under 'y'"
                )
            x, y = z[xkey], z["y"]
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path} is not a readable .npz file ({exc}); save it with numpy.savez") from exc
    if y.ndim != 1 or len(x) != len(y):
        raise DataError(f"{path}: {len(x)} inputs but labels of shape {list(y.shape)}; they must pair one to one")
    return _Part(x, y)


def load_data(path: str | Path, input_name: str | None = None) -> LabelledData:
    """Open a ``.npz`` file, an ``.npy`` pair directory or a shard directory."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist; check the path")
    if path.is_dir():
        xnpy = next((path / n for n in (f"{input_name}.npy", "x.npy") if input_name and (path / n).is_file()
                     or n == "x.npy" and (path / n).is_file()), None)
        if xnpy is not None and (path / "y.npy").is_file():
            try:
                x = np.load(xnpy, mmap_mode="r")
                y = np.load(path / "y.npy", mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise DataError(f"cannot memory-map {xnpy}: {exc}") from exc
            return from_arrays(x, y, str(path))  # type: ignore[arg-type]
        shards = sorted(path.glob("*.npz"))
        if not shards:
            raise DataError(f"{path} holds neither x.npy + y.npy nor .npz shards")
        sizes = []
        for shard in shards:
            try:
                with np.load(shard, allow_pickle=False) as z:
                    if "y" not in z:
                        raise DataError(f"shard {shard} has no labels under 'y'")
                    sizes.append(int(z["y"].shape[0]))
            except DataError:
                raise
            except Exception as exc:
                raise DataError(f"shard {shard} is not a readable .npz file ({exc})") from exc
        return LabelledData(source=str(path), shard_paths=shards, input_key=input_name, shard_sizes=sizes)
    part = _read_npz(path, input_name)
    return LabelledData([part], str(path))
