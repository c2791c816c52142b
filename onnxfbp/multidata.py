"""Data of models with several inputs or labels under other keys than ``y``.

- :class:`MultiInputData`: one array per graph input, keyed by the input's name
  (``.npz`` members, ``<input>.npy`` in a folder, or shards holding every input);
  batches are :class:`Inputs` (a dict of arrays whose ``len`` is the sample count);
  each input is checked on its own (shape, dtype, NaN, length), errors name it;
- :class:`KeyedLabelData`: labels read from the keys that ``--target OUTPUT=KEY``
  names (several keys: batches of labels are :class:`Inputs` too).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .data import (
    _NPZ_HINT,
    _READ_ERRORS,
    LabelledData,
    _check_labels,
    _label_array,
    _why,
    load_data,
)
from .errors import DataError

__all__ = ["Inputs", "KeyedLabelData", "MultiInputData", "load_inputs", "read_label_keys"]


class Inputs(dict[str, Any]):
    """One batch of a model with several inputs: an array per input name.
    ``len`` is the number of samples (as for an array), not of inputs."""

    def __len__(self) -> int:
        return len(next(iter(self.values()))) if dict.__len__(self) else 0

    def __bool__(self) -> bool:
        return dict.__len__(self) > 0


class MultiInputData(LabelledData):
    """Labelled data of a model with several graph inputs: one
    :class:`LabelledData` per input (same labels, same samples), batches as
    :class:`Inputs`. ``shapes``: each input's shape in the model, for :meth:`validate`."""

    def __init__(self, inputs: dict[str, LabelledData],
                 shapes: dict[str, list[int | str]]) -> None:
        first = next(iter(inputs.values()))
        super().__init__(source=first.source, shard_sizes=[len(first)], labelled=first.labelled)
        for name, data in inputs.items():
            if len(data) != len(first):
                raise DataError(
                    f"{data.source}: input {name!r} has {len(data)} samples but "
                    f"{next(iter(inputs))!r} has {len(first)}; give every input the same samples")
        self.inputs, self.shapes, self.first = inputs, shapes, first

    def take(self, idx: np.ndarray) -> tuple[Any, np.ndarray]:
        x = Inputs({name: data.take(idx)[0] for name, data in self.inputs.items()})
        return x, self.first.labels(idx)

    def labels(self, idx: np.ndarray | None = None) -> np.ndarray:
        return self.first.labels(idx)

    def sample_shape(self) -> tuple[int, ...]:
        return self.first.sample_shape()

    def validate(self, input_shape: list[int | str], n_classes: int | None,
                 labels: str = "classes") -> None:
        for name, data in self.inputs.items():
            try:
                data.validate(self.shapes.get(name, []), n_classes, labels)
            except DataError as err:
                raise DataError(f"input {name!r}: {err}") from err


def load_inputs(path: str | os.PathLike[str], names: list[str],
                shapes: dict[str, list[int | str]], labels_optional: bool = False,
                what: str = "data file") -> MultiInputData:
    """Data of a model with the inputs ``names`` at ``path`` (``.npz``: a member per
    input name; ``.npy`` folder: ``<name>.npy`` each; shards: each shard holds every
    input); :class:`DataError` naming the first input missing."""
    from .paths import check_input_file  # noqa: PLC0415

    checked = check_input_file(path, what, DataError, folder_ok=True)
    for name in names:
        if not _holds_input(checked, name):
            raise DataError(f"{checked} has no inputs for the model input {name!r}; store them "
                            f"under {name!r} ({name}.npy in a folder)")
    return MultiInputData({n: load_data(checked, n, labels_optional, what) for n in names},
                          shapes)


def _holds_input(path: Path, name: str) -> bool:
    """Whether ``path`` (npz, npy folder or shard folder) stores input ``name``."""
    if path.is_dir() and (path / f"{name}.npy").is_file():
        return True
    files = sorted(p for p in path.glob("*.npz") if p.is_file()) if path.is_dir() else [path]
    if not files or (path.is_dir() and (path / "y.npy").is_file()):
        return False
    try:
        for file in files:
            with zipfile.ZipFile(file) as zf:
                if f"{name}.npy" not in zf.namelist():
                    return False
    except _READ_ERRORS:
        return True  # the full read names the problem
    return True


class KeyedLabelData(LabelledData):
    """``base``'s inputs with labels read from other keys than ``y`` (``--target
    OUTPUT=KEY``), held in memory: one key gives an array per batch, several an
    :class:`Inputs` mapping of arrays by key."""

    def __init__(self, base: LabelledData, labels: dict[str, np.ndarray]) -> None:
        super().__init__(source=base.source, shard_sizes=[len(base)])
        for key, value in labels.items():
            if value.ndim < 1 or len(value) != len(base):
                raise DataError(f"{base.source}: labels {key!r} have shape {list(value.shape)} "
                                f"but there are {len(base)} inputs; give one label row per sample")
        self.base, self.keyed = base, labels

    def _rows(self, idx: np.ndarray) -> Any:
        rows = {k: _label_array(v[idx]) for k, v in self.keyed.items()}
        return next(iter(rows.values())) if len(rows) == 1 else Inputs(rows)

    def take(self, idx: np.ndarray) -> tuple[Any, Any]:
        idx = np.asarray(idx, dtype=np.int64)
        return self.base.take(idx)[0], self._rows(idx)

    def labels(self, idx: np.ndarray | None = None) -> Any:
        idx = np.arange(len(self)) if idx is None else np.asarray(idx, dtype=np.int64)
        return self._rows(idx)

    def sample_shape(self) -> tuple[int, ...]:
        return self.base.sample_shape()

    def validate(self, input_shape: list[int | str], n_classes: int | None,
                 labels: str = "classes") -> None:
        self.base.validate(input_shape, None, "values" if not self.base.labelled else "classes"
                           if np.issubdtype(self.base.labels(np.zeros(1, np.int64)).dtype,
                                            np.integer) else "values")
        for key, value in self.keyed.items():
            kind = "values" if np.issubdtype(value.dtype, np.floating) else "dense"
            try:
                _check_labels(value, kind, None, self.source)
            except DataError as err:
                raise DataError(f"labels {key!r}: {err}") from err


def read_label_keys(path: str | os.PathLike[str], keys: list[str]) -> dict[str, np.ndarray]:
    """The arrays under ``keys`` at ``path`` (``.npz``, ``<key>.npy`` in a folder, or
    a folder of shards, concatenated in name order); :class:`DataError` naming a
    missing key and the keys there are."""
    from .paths import check_input_file  # noqa: PLC0415

    where = check_input_file(path, "data file", DataError, folder_ok=True)
    out: dict[str, np.ndarray] = {}
    files = ([where] if not where.is_dir()
             else sorted(p for p in where.glob("*.npz") if p.is_file()))
    for key in keys:
        if where.is_dir() and (where / f"{key}.npy").is_file():
            out[key] = np.load(where / f"{key}.npy", allow_pickle=False)
            continue
        parts = []
        for file in files:
            try:
                with np.load(file, allow_pickle=False) as z:
                    if key not in z:
                        raise DataError(f"{file} has keys {list(z.keys())} but no labels under "
                                        f"{key!r}; store them there or name the key in --target")
                    parts.append(np.asarray(z[key]))
            except DataError:
                raise
            except _READ_ERRORS as exc:
                raise DataError(f"{file} is not a readable .npz file ({_why(exc)}); "
                                f"{_NPZ_HINT}") from exc
        if not parts:
            raise DataError(f"{where} has no labels under {key!r} ({key}.npy); store them there")
        out[key] = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return out
