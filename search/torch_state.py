"""Read PyTorch ``.pth`` state dicts into NumPy arrays without importing torch.

The offline ImageNet weights this service uses ship as PyTorch checkpoints, but torch is not a
dependency (``search/`` stays backend-agnostic) and ``torch.load`` would unpickle arbitrary code.
This reader understands both on-disk formats torch has written since 1.0:

* the zip format (torch >= 1.6): ``<prefix>/data.pkl`` plus one ``<prefix>/data/<key>`` entry per
  storage;
* the legacy format (the four checkpoints we ship all use it): five pickles in a row, then each
  storage as an int64 element count followed by its raw bytes.

Unpickling goes through :class:`_RestrictedUnpickler`, which resolves only the handful of globals
a plain state dict needs; anything else raises :class:`~search.errors.WeightsError` before a single
foreign callable can run.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from search.errors import WeightsError

__all__ = ["load_state_dict"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# Storage class name -> NumPy dtype, little-endian (byte order is fixed up per file).
_STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "<f8",
    "FloatStorage": "<f4",
    "HalfStorage": "<f2",
    "BFloat16Storage": "<u2",  # widened to float32 after reading: NumPy has no bfloat16
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}
_MAX_DIMS = 8


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for ``torch.FloatStorage`` & co.: only the element type matters here."""

    name: str
    dtype: np.dtype


@dataclass(frozen=True)
class _StorageRef:
    """A storage (or, in pre-1.0 files, a slice of one) named by the pickle."""

    kind: _StorageType
    key: str
    offset: int
    numel: int


@dataclass(frozen=True)
class _PendingTensor:
    """A tensor as the pickle describes it. Legacy files store the bytes *after* the pickle, so
    arrays are only cut out once every storage has been read."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32, so widening is a shift."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild tensors and ordered dicts, and nothing else.

    The allowed callables are bound methods and markers made for this one load, so a crafted
    pickle that BUILDs attributes onto them cannot leak state into later loads.
    """

    def __init__(self, file: BinaryIO, source: str, byteorder: str = "<") -> None:
        super().__init__(file)
        self.source = source
        self.storages: dict[str, tuple[_StorageType, int]] = {}  # key -> (type, numel)
        self._allowed: dict[tuple[str, str], Any] = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_tensor"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
        }
        for name, dtype in _STORAGE_DTYPES.items():
            np_dtype = np.dtype(dtype)
            if np_dtype.itemsize > 1:
                np_dtype = np_dtype.newbyteorder(byteorder)
            self._allowed[("torch", name)] = _StorageType(name, np_dtype)

    def find_class(self, module: str, name: str) -> Any:
        """Resolve only allow-listed globals; refuse the rest before anything runs."""
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise WeightsError(
                f"refusing to unpickle {module}.{name} from {self.source}: "
                "only tensors and ordered dicts are allowed"
            ) from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        """Turn a ``('storage', type, key, location, numel[, view])`` reference into a ref."""
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise WeightsError(f"unsupported persistent reference {pid!r} in {self.source}")
        kind, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(kind, _StorageType) or not isinstance(numel, int) or numel < 0:
            raise WeightsError(f"malformed storage reference {pid!r} in {self.source}")
        known = self.storages.setdefault(key, (kind, numel))
        if known != (kind, numel):
            raise WeightsError(f"storage {key} is declared twice, differently, in {self.source}")
        view = pid[5] if len(pid) > 5 else None
        if view is None:
            return _StorageRef(kind, key, 0, numel)
        # Pre-1.0 legacy files may reference a slice of a storage: (view_key, offset, size).
        try:
            _view_key, offset, size = view
            offset, size = int(offset), int(size)
        except (TypeError, ValueError):
            raise WeightsError(f"malformed storage view {view!r} in {self.source}") from None
        if offset < 0 or size < 0 or offset + size > numel:
            raise WeightsError(f"storage view {view!r} out of range in {self.source}")
        return _StorageRef(kind, key, offset, size)

    def _rebuild_tensor_v2(
        self,
        storage: _StorageRef,
        storage_offset: int,
        size: tuple[int, ...],
        stride: tuple[int, ...],
        requires_grad: bool = False,
        backward_hooks: Any = None,
        metadata: Any = None,
    ) -> _PendingTensor:
        """torch's tensor constructor for pickles: storage, offset, shape, strides."""
        return self._rebuild_tensor(storage, storage_offset, size, stride)

    def _rebuild_tensor(
        self,
        storage: _StorageRef,
        storage_offset: int,
        size: tuple[int, ...],
        stride: tuple[int, ...],
    ) -> _PendingTensor:
        """Validate the layout now; cut the array out once the bytes are known."""
        try:
            if not isinstance(storage, _StorageRef):
                raise TypeError("no storage")
            offset = int(storage_offset)
            size_t, stride_t = tuple(int(s) for s in size), tuple(int(s) for s in stride)
        except (TypeError, ValueError):
            raise WeightsError(f"malformed tensor in {self.source}") from None
        if (
            len(size_t) != len(stride_t)
            or len(size_t) > _MAX_DIMS
            or offset < 0
            or any(s < 0 for s in size_t + stride_t)
        ):
            raise WeightsError(f"bad tensor shape {size_t} / strides {stride_t} in {self.source}")
        if all(size_t):
            last = offset + sum((d - 1) * s for d, s in zip(size_t, stride_t, strict=True))
            if last >= storage.numel:
                raise WeightsError(
                    f"tensor of shape {size_t} reaches past its storage "
                    f"({storage.numel} elements) in {self.source}"
                )
        return _PendingTensor(storage, offset, size_t, stride_t)

    def _rebuild_parameter(
        self, data: _PendingTensor, requires_grad: bool = False, backward_hooks: Any = None
    ) -> _PendingTensor:
        """``nn.Parameter`` wraps a tensor; the tensor is all we keep."""
        return data


def _materialize(tensor: _PendingTensor, data: dict[str, np.ndarray]) -> np.ndarray:
    """Apply offset, shape and strides to the storage bytes; return a C-ordered native array."""
    ref = tensor.storage
    flat = data[ref.key][ref.offset : ref.offset + ref.numel]
    if not all(tensor.size):
        out = np.zeros(tensor.size, dtype=flat.dtype)
    else:
        base = flat[tensor.offset :]
        view = np.lib.stride_tricks.as_strided(
            base,
            shape=tensor.size,
            strides=tuple(s * base.itemsize for s in tensor.stride),
            writeable=False,
        )
        out = np.array(view, order="C")  # owns its memory; no aliasing between tensors
    out = out.astype(out.dtype.newbyteorder("="), copy=False)
    if ref.kind.name == "BFloat16Storage":
        out = _bfloat16_to_float32(out)
    return out


def _to_state_dict(obj: Any, data: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """A state dict is a flat mapping of names to tensors; accept nothing else."""
    if not isinstance(obj, dict):
        raise WeightsError(f"{source} holds a {type(obj).__name__}, not a state dict")
    out: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, _PendingTensor):
            raise WeightsError(
                f"{source} is not a plain state dict: entry {key!r} is {type(value).__name__}"
            )
        out[key] = _materialize(value, data)
    return out


def _load_zip(path: Path) -> dict[str, np.ndarray]:
    """torch >= 1.6 format: a zip with ``<prefix>/data.pkl`` and ``<prefix>/data/<key>``."""
    source = str(path)
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise WeightsError(f"{source} is a zip but not a torch checkpoint (no data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "<"
        if f"{prefix}byteorder" in names:
            order = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
            byteorder = ">" if order == "big" else "<"
        unpickler = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), source, byteorder)
        obj = unpickler.load()
        data: dict[str, np.ndarray] = {}
        for key, (kind, numel) in unpickler.storages.items():
            entry = f"{prefix}data/{key}"
            if entry not in names:
                raise WeightsError(f"{source} lacks storage entry {entry}")
            raw = archive.read(entry)
            if len(raw) < numel * kind.dtype.itemsize:
                raise WeightsError(f"{source}: storage {key} is truncated")
            data[key] = np.frombuffer(raw, dtype=kind.dtype, count=numel)
    return _to_state_dict(obj, data, source)


def _load_legacy(path: Path) -> dict[str, np.ndarray]:
    """torch < 1.6 format: magic, protocol, sys info, the object, storage keys, raw storages."""
    source = str(path)
    with open(path, "rb") as f:

        def plain_pickle() -> Any:
            unpickler = _RestrictedUnpickler(f, source)
            value = unpickler.load()
            if unpickler.storages:
                raise WeightsError(f"unexpected storage reference outside the object in {source}")
            return value

        if plain_pickle() != _LEGACY_MAGIC:
            raise WeightsError(f"{source} is not a PyTorch checkpoint (bad magic number)")
        if plain_pickle() != _LEGACY_PROTOCOL:
            raise WeightsError(f"{source} uses an unsupported legacy torch protocol")
        sys_info = plain_pickle()
        little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
        byteorder = "<" if little else ">"
        unpickler = _RestrictedUnpickler(f, source, byteorder)
        obj = unpickler.load()
        keys = plain_pickle()
        if not isinstance(keys, list):
            raise WeightsError(f"{source}: malformed storage key list")
        data: dict[str, np.ndarray] = {}
        for key in map(str, keys):
            if key not in unpickler.storages or key in data:
                raise WeightsError(f"{source}: unexpected storage {key}")
            kind, numel = unpickler.storages[key]
            (count,) = struct.unpack(f"{byteorder}q", _read_exact(f, 8, source))
            if count != numel:
                raise WeightsError(f"{source}: storage {key} holds {count}, expected {numel}")
            raw = _read_exact(f, count * kind.dtype.itemsize, source)
            data[key] = np.frombuffer(raw, dtype=kind.dtype)
    missing = set(unpickler.storages) - set(data)
    if missing:
        raise WeightsError(f"{source}: storages {sorted(missing)} have no data")
    return _to_state_dict(obj, data, source)


def _read_exact(f: BinaryIO, n: int, source: str) -> bytes:
    """Read n bytes or report the file as truncated."""
    data = f.read(n)
    if len(data) != n:
        raise WeightsError(f"{source} is truncated")
    return data


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a ``.pth`` state dict into ``{name: ndarray}`` (C-ordered, native byte order).

    Raises WeightsError for a missing or malformed file and for any pickle that asks for more
    than tensors and ordered dicts.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path)
        return _load_legacy(path)
    except WeightsError:
        raise
    except Exception as exc:  # any parse failure means a bad weights file
        raise WeightsError(f"cannot read {path} as a PyTorch state dict: {exc}") from exc
