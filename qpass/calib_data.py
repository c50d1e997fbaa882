"""Calibration data sources, checked against the model's inputs before any work is done.

:func:`load_calibration` turns ``source`` into a :class:`CalibrationSet`: an iterable of
feed dicts ``{input name: np.ndarray}`` in the model's input order. Accepted sources:

- a ``.npz`` file, one array per model input keyed by input name (or a ``.npy`` file for a
  one-input model), or the same thing in memory: a dict ``{name: array}`` or one array.
  Samples are stacked on axis 0, which is the model's batch axis: every array has the
  input's rank. **Batching rule:** each feed is one sample, ``array[i:i+1]`` (batch 1); when
  the model's batch axis is static ``B``, each feed is ``B`` consecutive rows and the
  sample count must be a multiple of ``B``.
- a directory of ``.npz`` files (each one feed dict) and ``.npy`` files (each one feed of
  a one-input model), read one file at a time in file-name order. Each array has the
  input's rank (batch axis included); sequence lengths may differ between files.
- an iterable of samples: a list or generator of dicts ``{name: array}``, or a torch
  ``DataLoader`` yielding dicts, tuples/lists of tensors in model-input order, or one
  tensor for a one-input model. numpy arrays and torch tensors are both accepted; each
  yielded item is one feed, whatever its batch size. Iterables are read lazily; a
  one-shot iterator (a generator) can be read once.
- ``None`` with ``random_samples > 0``: random data shaped like the inputs
  (:func:`qpass.verify.probe_feeds` with seeds ``seed, seed + 1, ...``); ``is_random``
  is set so the caller can warn loudly.

Checks (each a one-line :class:`CalibrationError` naming the input and the sample):
missing or unreadable files, files that are not ``.npz``/``.npy``, pickled data (loaded
with ``allow_pickle=False``), unknown or missing input names, wrong rank, a static
dimension that differs (symbolic dimensions take any size >= 1, the same size wherever
one name recurs), zero-size arrays, integer data for a float input or float data for an
integer input, NaN/Inf, and an empty set. The first sample is checked up front, every
later one as it is read; in-memory and single-file sources are checked whole up front.
Lossless or numpy-default conversions are made silently: any float to the input's float
type (float64 -> float32), integers to the input's integer type when the values fit
(int32 -> int64), bool to integer, and 0/1 integers to bool.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qpass.errors import CalibrationError, first_line
from qpass.graph_utils import indexed_table_rows

__all__ = ["CalibrationSet", "load_calibration"]

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_NPY_MAGIC = b"\x93NUMPY"
_PICKLE_MAGIC = b"\x80"  # pickle protocol >= 2
_CHUNK = 64  # samples per NaN/Inf scan of a stacked array


@dataclass(frozen=True)
class _Input:
    """What the model expects of one input."""

    name: str
    dtype: np.dtype
    kind: str  # "float", "int" or "bool"
    dims: tuple[int | str | None, ...] | None  # None: unknown shape; str/None entries: symbolic
    required: bool
    index_rows: int | None = None  # rows of the constant table an integer input indexes (Gather)

    def shape_text(self) -> str:
        if self.dims is None:
            return "unknown shape"
        return "[" + ", ".join("?" if d is None else str(d) for d in self.dims) + "]"


Sample = tuple[str, Any]  # (where, e.g. " ('dir/0001.npz')", raw item)


class CalibrationSet:
    """Feed dicts ``{input name: np.ndarray}`` for calibration, validated as they are read.

    Iterate it (again, unless it wraps a one-shot iterator) to get the feeds. ``len()``
    works when the number of samples is known (``num_samples`` is then not None);
    ``is_random`` marks generated data; ``input_names`` lists the inputs each feed holds.
    """

    def __init__(
        self,
        samples: Callable[[], Iterator[Sample]],
        inputs: Mapping[str, _Input],
        *,
        origin: str,
        num_samples: int | None,
        limit: int | None = None,
        is_random: bool = False,
        one_shot: bool = False,
        checked: bool = False,
    ) -> None:
        self._samples = samples
        self._inputs = dict(inputs)
        self._one_shot = one_shot
        self._checked = checked
        self._limit = limit if limit is not None else num_samples
        self._started = False
        self.origin = origin
        self.num_samples = num_samples
        self.is_random = is_random
        self.input_names: tuple[str, ...] = tuple(n for n, spec in self._inputs.items() if spec.required)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        if self._one_shot and self._started:
            raise CalibrationError(
                f"calibration data from {self.origin} can be read only once: pass a list, a directory, "
                "a .npz file or a DataLoader when calibration needs several passes"
            )
        self._started = True
        return self._feeds()

    def _feeds(self) -> Iterator[dict[str, np.ndarray]]:
        items = self._samples()
        if self._limit is not None:
            items = itertools.islice(items, self._limit)
        for index, (where, raw) in enumerate(items):
            yield raw if self._checked else _to_feed(raw, self._inputs, index, where)

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError(f"the number of calibration samples from {self.origin} is not known in advance")
        return self.num_samples

    def __bool__(self) -> bool:
        return True  # never empty: load_calibration refuses empty sets

    def __repr__(self) -> str:
        count = "?" if self.num_samples is None else self.num_samples
        return f"CalibrationSet({self.origin}, samples={count}, random={self.is_random})"


def load_calibration(
    source: Any,
    model: ir.Model,
    *,
    limit: int | None = None,
    random_samples: int = 0,
    seed: int = 0,
) -> CalibrationSet:
    """Calibration data from ``source`` for ``model``, at most ``limit`` samples (feeds).

    See the module docstring for the accepted sources and the batching rule. Raises
    :class:`CalibrationError` for anything that does not fit the model; the first sample
    (or, for files and in-memory arrays, all of them) is checked before this returns.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
        raise CalibrationError(f"calibration limit must be a whole number >= 1, got {limit!r}")
    limit = None if limit is None else int(limit)
    if random_samples < 0:
        raise CalibrationError(f"random_samples must be >= 0, got {random_samples}")
    inputs = _model_inputs(model)
    if source is None:
        if random_samples == 0:
            raise CalibrationError(
                "no calibration data given: pass a .npz file, a directory of .npz/.npy files, a list of "
                "feed dicts or a DataLoader (or ask for random calibration data)"
            )
        return _random_set(model, inputs, random_samples, seed, limit)
    if random_samples:
        raise CalibrationError("pass either calibration data or random_samples, not both")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise CalibrationError(f"calibration data '{path}' does not exist: check the path")
        if path.is_dir():
            return _directory_set(path, inputs, limit)
        return _stacked_set(_read_file(path, inputs), inputs, f"'{path}'", limit)
    if isinstance(source, Mapping):
        arrays = {_key(k, "the calibration dict"): _as_array(v, k, "the calibration dict") for k, v in source.items()}
        return _stacked_set(arrays, inputs, "the calibration dict", limit)
    if _is_array(source):
        where = "the calibration array"
        return _stacked_set(_single_input(_as_array(source, None, where), inputs, where), inputs, where, limit)
    if isinstance(source, (bytes, bytearray)) or not isinstance(source, Iterable):
        raise CalibrationError(
            f"cannot read calibration data from {type(source).__name__}: pass a .npz file or directory path, "
            "a list or generator of feed dicts, or a torch DataLoader"
        )
    return _iterable_set(source, inputs, limit)


# --- sources ----------------------------------------------------------------------------


def _random_set(
    model: ir.Model, inputs: Mapping[str, _Input], count: int, seed: int, limit: int | None
) -> CalibrationSet:
    from qpass.verify import probe_feeds

    for spec in inputs.values():
        if spec.required and spec.dims is None:
            raise CalibrationError(
                f"model input '{spec.name}' has no shape, so random calibration data cannot be made: "
                "pass real calibration data"
            )

    def samples() -> Iterator[Sample]:
        for i in range(count):
            yield "", probe_feeds(model, seed + i)

    # Generated from the model's own shapes and types: not re-checked (probe_feeds sizes
    # symbolic dims by position, which the shared-dimension check need not agree with).
    return CalibrationSet(
        samples, inputs, origin="random data", num_samples=_capped(count, limit), is_random=True, checked=True
    )


def _directory_set(path: Path, inputs: Mapping[str, _Input], limit: int | None) -> CalibrationSet:
    try:
        entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    except OSError as e:
        raise CalibrationError(f"cannot read calibration directory '{path}': {e.strerror or e}") from e
    for entry in entries:
        if not entry.is_file() or entry.suffix.lower() not in (".npz", ".npy"):
            raise CalibrationError(
                f"'{entry}' is not a .npz or .npy file: a calibration directory holds only .npz files "
                "(one feed each) or .npy files (one-input models)"
            )
    if not entries:
        raise CalibrationError(f"calibration set is empty: directory '{path}' holds no .npz or .npy files")

    def samples() -> Iterator[Sample]:
        for index, entry in enumerate(entries):
            where = f" ('{entry}')"
            arrays = _read_file(entry, inputs, f"calibration sample {index}{where}")
            yield where, arrays

    calib = CalibrationSet(samples, inputs, origin=f"directory '{path}'", num_samples=_capped(len(entries), limit))
    next(iter(calib))  # check the first file now
    return calib


def _iterable_set(source: Iterable, inputs: Mapping[str, _Input], limit: int | None) -> CalibrationSet:
    origin = "a DataLoader" if _is_dataloader(source) else f"a {type(source).__name__}"
    try:
        iterator = iter(source)
    except Exception as e:
        raise CalibrationError(f"cannot iterate the calibration data ({origin}): {first_line(e)}") from e
    one_shot = iterator is source
    try:
        first = next(iterator)
    except StopIteration:
        raise CalibrationError(f"calibration set is empty: {origin} yielded no samples") from None
    except CalibrationError:
        raise
    except Exception as e:
        raise CalibrationError(f"reading calibration sample 0 from {origin} failed: {first_line(e)}") from e
    _to_feed(first, inputs, 0, "")
    length = None
    if not one_shot:
        try:
            length = len(source)  # type: ignore[arg-type]
        except Exception:  # an IterableDataset's DataLoader, a generic iterable
            length = None

    if one_shot:
        pending = itertools.chain([first], iterator)

        def samples() -> Iterator[Sample]:
            return _guarded(pending, origin)
    else:

        def samples() -> Iterator[Sample]:
            return _guarded(iter(source), origin)

    return CalibrationSet(
        samples, inputs, origin=origin, num_samples=None if length is None else _capped(length, limit),
        limit=limit, one_shot=one_shot,
    )


def _guarded(items: Iterator[Any], origin: str) -> Iterator[Sample]:
    """(where, item) pairs; an exception inside the user's iterable becomes a CalibrationError."""
    index = 0
    while True:
        try:
            item = next(items)
        except StopIteration:
            return
        except CalibrationError:
            raise
        except Exception as e:
            raise CalibrationError(f"reading calibration sample {index} from {origin} failed: {first_line(e)}") from e
        yield "", item
        index += 1


def _stacked_set(
    arrays: dict[str, np.ndarray], inputs: Mapping[str, _Input], where: str, limit: int | None
) -> CalibrationSet:
    """Samples stacked on axis 0 (a .npz/.npy file, a dict of arrays): checked whole, now."""
    _check_names(arrays, inputs, f"{where}:")
    count = None
    for name, array in arrays.items():
        spec = inputs[name]
        if array.ndim == 0:
            raise CalibrationError(
                f"{where}: input '{name}' is a scalar; stack samples on axis 0 (the batch axis) "
                f"to match the model's input {spec.shape_text()}"
            )
        n = array.shape[0]
        if count is not None and n != count[1]:
            raise CalibrationError(
                f"{where}: input '{count[0]}' holds {count[1]} samples but input '{name}' holds {n}: "
                "stack the same number of samples on axis 0 for every input"
            )
        count = (name, n)
    total = count[1] if count else 0
    if total == 0:
        raise CalibrationError(f"calibration set is empty: {where} holds 0 samples")
    batch = 1
    for name, array in arrays.items():
        spec = inputs[name]
        if spec.dims is not None and spec.dims and isinstance(spec.dims[0], int):
            batch = spec.dims[0]
            if total % batch:
                raise CalibrationError(
                    f"{where}: {total} samples do not split into the model's fixed batch size {batch} "
                    f"(input '{name}' {spec.shape_text()}): stack a multiple of {batch} samples"
                )
    converted = {}
    for name in inputs:
        if name not in arrays:
            continue
        spec = inputs[name]
        loose = dataclasses.replace(spec, dims=_loose_batch(spec.dims))
        array = _check_array(arrays[name], loose, f"{where}: input '{name}'", check_finite=False)
        if spec.kind == "float":  # after the cast, so values that overflow it count too
            bad = _first_nonfinite(array, batch)
            if bad is not None:
                raise CalibrationError(
                    f"calibration sample {bad} ({where}): input '{name}' contains NaN or Inf "
                    f"(as {spec.dtype}): clean the calibration data"
                )
        converted[name] = array
    steps = total // batch

    def samples() -> Iterator[Sample]:
        for i in range(steps):
            yield "", {n: np.asarray(a[i * batch : (i + 1) * batch]) for n, a in converted.items()}

    return CalibrationSet(samples, inputs, origin=where, num_samples=_capped(steps, limit), checked=True)


def _loose_batch(dims: tuple | None) -> tuple | None:
    if not dims:
        return dims
    return (None, *dims[1:])


def _first_nonfinite(array: np.ndarray, batch: int) -> int | None:
    """Index of the first sample (group of ``batch`` rows) holding NaN/Inf, or None."""
    step = _CHUNK * batch
    for start in range(0, array.shape[0], step):
        chunk = np.asarray(array[start : start + step])
        finite = np.isfinite(chunk).reshape(chunk.shape[0], -1).all(axis=1)
        if not finite.all():
            return (start + int(np.argmin(finite))) // batch
    return None


# --- files ------------------------------------------------------------------------------


def _read_file(path: Path, inputs: Mapping[str, _Input], where: str | None = None) -> dict[str, np.ndarray]:
    """The arrays of a .npz file (or a .npy file for a one-input model), never unpickling."""
    where = where or f"'{path}'"
    if path.suffix.lower() not in (".npz", ".npy"):
        raise CalibrationError(
            f"{where} is not a .npz or .npy file: save calibration data with numpy.savez "
            "(one array per model input, keyed by input name)"
        )
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise CalibrationError(f"cannot read calibration file {where}: {e.strerror or e}") from e
    if magic.startswith(_PICKLE_MAGIC):
        raise CalibrationError(_pickled(where))
    if not (magic.startswith(_ZIP_MAGIC) or magic == _NPY_MAGIC):
        raise CalibrationError(
            f"{where} is not a .npz or .npy file (wrong content for its name): save it with numpy.savez or numpy.save"
        )
    try:
        if magic == _NPY_MAGIC:
            array = np.load(path, allow_pickle=False, mmap_mode="r")
            return _single_input(array, inputs, where)
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except CalibrationError:
        raise
    except ValueError as e:
        text = str(e)
        if "pickle" in text or "Object arrays" in text or "Python objects" in text:
            raise CalibrationError(_pickled(where)) from e
        raise CalibrationError(f"{where} is corrupt or truncated ({first_line(e)}): re-save it") from e
    except (zipfile.BadZipFile, EOFError, OSError, KeyError) as e:
        raise CalibrationError(f"{where} is corrupt or truncated ({first_line(e)}): re-save it") from e


def _pickled(where: str) -> str:
    return (
        f"{where} holds pickled data, which qpass refuses to load (it can run code): "
        "save plain numeric arrays with numpy.savez"
    )


def _single_input(array: np.ndarray, inputs: Mapping[str, _Input], where: str) -> dict[str, np.ndarray]:
    required = [n for n, s in inputs.items() if s.required]
    if len(required) != 1:
        raise CalibrationError(
            f"{where} holds one unnamed array but the model has {len(required)} inputs ({_names(required)}): "
            "use .npz files keyed by input name"
        )
    return {required[0]: array}


# --- one sample -------------------------------------------------------------------------


def _to_feed(raw: Any, inputs: Mapping[str, _Input], index: int, where: str) -> dict[str, np.ndarray]:
    """One validated feed dict from a dict, a tuple/list in input order, or one array."""
    at = f"calibration sample {index}{where}"
    required = [n for n, s in inputs.items() if s.required]
    if isinstance(raw, Mapping):
        arrays = {_key(k, at): v for k, v in raw.items()}
    elif isinstance(raw, (tuple, list)):
        if len(raw) != len(required):
            raise CalibrationError(
                f"{at} holds {len(raw)} arrays but the model has {len(required)} inputs ({_names(required)}): "
                "yield one array per input in that order (no labels), or dicts keyed by input name"
            )
        arrays = dict(zip(required, raw))
    elif _is_array(raw):
        arrays = _single_input(raw, inputs, at)
    else:
        raise CalibrationError(
            f"{at} is a {type(raw).__name__}: yield dicts {{input name: array}}, tuples of arrays in input "
            "order, or one array for a one-input model"
        )
    _check_names(arrays, inputs, f"{at}:")
    feed: dict[str, np.ndarray] = {}
    sizes: dict[str, tuple[str, int]] = {}
    for name, spec in inputs.items():
        if name not in arrays:
            continue
        label = f"{at}: input '{name}'"
        array = _check_array(_as_array(arrays[name], name, at), spec, label)
        feed[name] = array
        for axis, dim in enumerate(spec.dims or ()):
            if isinstance(dim, str):
                seen = sizes.setdefault(dim, (name, array.shape[axis]))
                if seen[1] != array.shape[axis]:
                    raise CalibrationError(
                        f"{label} has size {array.shape[axis]} on axis {axis} ('{dim}') but input '{seen[0]}' "
                        f"has {seen[1]}: inputs sharing dimension '{dim}' need the same size"
                    )
    return feed


def _check_names(arrays: Mapping[str, Any], inputs: Mapping[str, _Input], at: str) -> None:
    required = [n for n, s in inputs.items() if s.required]
    for name in arrays:
        if name not in inputs:
            raise CalibrationError(
                f"{at} input '{name}' is not a model input; the model's inputs are {_names(required)}: "
                "rename the array"
            )
    for name in required:
        if name not in arrays:
            raise CalibrationError(f"{at} model input '{name}' is missing; the model's inputs are {_names(required)}")


def _check_array(array: np.ndarray, spec: _Input, label: str, *, check_finite: bool = True) -> np.ndarray:
    """``array`` checked against ``spec`` and converted to the input's dtype."""
    if array.size == 0:
        raise CalibrationError(f"{label} is empty (shape {list(array.shape)}): every dimension needs size >= 1")
    if spec.dims is not None:
        if array.ndim != len(spec.dims):
            hint = " (add the batch axis: np.expand_dims(a, 0))" if array.ndim == len(spec.dims) - 1 else ""
            raise CalibrationError(
                f"{label} has rank {array.ndim} (shape {list(array.shape)}) but the model expects rank "
                f"{len(spec.dims)} {spec.shape_text()}{hint}"
            )
        for axis, (size, dim) in enumerate(zip(array.shape, spec.dims)):
            if isinstance(dim, int) and size != dim:
                raise CalibrationError(
                    f"{label} has shape {list(array.shape)} but the model expects {spec.shape_text()} "
                    f"(axis {axis} must be {dim})"
                )
    return _convert(array, spec, label, check_finite=check_finite)


def _convert(array: np.ndarray, spec: _Input, label: str, *, check_finite: bool = True) -> np.ndarray:
    """``array`` as the input's dtype when the conversion is allowed (see module docstring)."""
    kind = _kind(array.dtype)
    if kind is None:
        raise CalibrationError(f"{label} has dtype {array.dtype}, which is not numeric: pass numeric arrays")
    target = spec.dtype
    if spec.kind == "float":
        if kind != "float":
            raise CalibrationError(
                f"{label} holds {array.dtype} data but the model input is {target}: convert it to float "
                "(and normalize it as the model expects)"
            )
        if check_finite and not np.isfinite(array).all():
            raise CalibrationError(f"{label} contains NaN or Inf: clean the calibration data")
        if array.dtype != target:
            converted = np.asarray(array, dtype=target)
            if check_finite and not np.isfinite(converted).all():
                raise CalibrationError(f"{label} has values too large for {target}: rescale the calibration data")
            return converted
        return np.asarray(array)
    if spec.kind == "int":
        if kind == "float":
            raise CalibrationError(
                f"{label} holds {array.dtype} data but the model input is {target}: pass integer data "
                "(token ids, indices, masks)"
            )
        if array.dtype != target and kind == "int":
            info = np.iinfo(target)
            low, high = array.min(), array.max()
            if low < info.min or high > info.max:
                raise CalibrationError(
                    f"{label} holds values in [{low}, {high}], outside the range of the model's {target} input"
                )
        rows = spec.index_rows
        if rows and (array.max() >= rows or array.min() < -rows):
            bad = array.max() if array.max() >= rows else array.min()
            raise CalibrationError(
                f"{label} holds {bad}, but it indexes a table of {rows} rows (values must lie in [{-rows}, {rows - 1}]): "
                "check that the token ids come from this model's tokenizer"
            )
        return np.asarray(array, dtype=target)
    # bool input
    if kind == "float":
        raise CalibrationError(f"{label} holds {array.dtype} data but the model input is bool: pass a bool mask")
    if kind == "int" and not np.isin(array, (0, 1)).all():
        raise CalibrationError(f"{label} holds integers other than 0 and 1 but the model input is bool")
    return np.asarray(array, dtype=np.bool_)


# --- helpers ----------------------------------------------------------------------------


def _model_inputs(model: ir.Model) -> dict[str, _Input]:
    """Graph inputs in order; inputs with an initializer (a default) are optional."""
    inputs = {}
    for value in model.graph.inputs:
        dtype = value.dtype if value.dtype is not None else ir.DataType.FLOAT
        try:
            np_dtype = np.dtype(dtype.numpy())
        except Exception as e:
            raise CalibrationError(f"model input '{value.name}' has type {dtype}, which qpass cannot calibrate") from e
        kind = "bool" if dtype == ir.DataType.BOOL else "float" if dtype.is_floating_point() else "int"
        if kind == "int" and not dtype.is_integer():
            raise CalibrationError(f"model input '{value.name}' has type {dtype}, which qpass cannot calibrate")
        dims = None
        if value.shape is not None:
            dims = tuple(d if isinstance(d, int) else getattr(d, "value", None) for d in value.shape.dims)
        rows = indexed_table_rows(value) if kind == "int" else None
        inputs[value.name] = _Input(value.name, np_dtype, kind, dims, not value.is_initializer(), rows)
    if not any(s.required for s in inputs.values()):
        raise CalibrationError("the model has no inputs to calibrate")
    return inputs


def _kind(dtype: np.dtype) -> str | None:
    if dtype == np.bool_:
        return "bool"
    if dtype.kind in "iu":
        return "int"
    if dtype.kind == "f":
        return "float"
    try:  # ml_dtypes (bfloat16, float8) report kind "V"
        return "float" if ir.DataType.from_numpy(dtype).is_floating_point() else None
    except Exception:
        return None


def _is_array(obj: Any) -> bool:
    return isinstance(obj, np.ndarray) or _is_tensor(obj)


def _is_tensor(obj: Any) -> bool:
    return all(hasattr(obj, a) for a in ("detach", "cpu", "numpy"))


def _as_array(value: Any, name: Any, at: str) -> np.ndarray:
    """``value`` as a numpy array: torch tensors via ``.detach().cpu().numpy()``."""
    label = f"{at}: input '{name}'" if name is not None else at
    if isinstance(value, np.ndarray):
        return value
    if _is_tensor(value):
        tensor = value.detach().cpu()
        try:
            return tensor.numpy()
        except TypeError:  # bfloat16 and other dtypes numpy lacks
            return tensor.float().numpy()
    try:
        array = np.asarray(value)
    except Exception as e:
        raise CalibrationError(f"{label} is a {type(value).__name__}, not an array: pass numpy arrays") from e
    if _kind(array.dtype) is None:
        raise CalibrationError(f"{label} is a {type(value).__name__}, not a numeric array: pass numpy arrays")
    return array


def _key(key: Any, at: str) -> str:
    if not isinstance(key, str):
        raise CalibrationError(f"{at}: key {key!r} is not an input name (a string)")
    return key


def _is_dataloader(obj: Any) -> bool:
    return any(c.__name__ == "DataLoader" and c.__module__.startswith("torch.utils.data") for c in type(obj).__mro__)


def _capped(count: int, limit: int | None) -> int:
    return count if limit is None else min(count, limit)


def _names(names: Iterable[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)
