"""Local data sets: loading, splitting across clients, conversion to the model's [-1, 1] range."""

from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import pickle
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from collafuse.common.config import ConfigError, DataConfig, ImageConfig


class DataError(ConfigError):
    """Data that cannot be loaded or split as configured; the message says what to do.

    A ConfigError: the data set and its path are the user's to fix, so the CLI exits 2.
    """


@dataclass(frozen=True)
class LocalData:
    """The images one client holds, ready for the model."""

    images: Tensor
    """(N, C, H, W) float32 in [-1, 1], shaped as the run's ImageConfig."""
    labels: Tensor
    """(N,) int64 class labels; -1 where the data set has no classes."""
    ids: list[str]
    """Stable ids, unique within the data set; they name images and never carry pixel data."""
    num_classes: int
    """Classes of the whole data set (0 when it has none), not only of this share."""

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.images.ndim != 4 or self.labels.shape != (n,) or len(self.ids) != n:
            raise DataError(
                f"inconsistent LocalData: images {tuple(self.images.shape)}, "
                f"labels {tuple(self.labels.shape)}, {len(self.ids)} ids"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_HINT = "install the Debian package dataset-fashion-mnist or set data.path"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
PARTITION_SCHEMES = ("iid", "classes", "dirichlet")

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR10_LAYOUT = (
    "the folder cifar-10-batches-py (or its parent) as unpacked from cifar-10-python.tar.gz, "
    "holding data_batch_1 ... data_batch_5, test_batch and batches.meta"
)
CELEBA_LAYOUT = (
    "a folder holding img_align_celeba/ (000001.jpg ...) and list_attr_celeba.txt, optionally "
    "list_eval_partition.txt (the Anno/, Img/ and Eval/ sub-folders of the official download "
    "work too)"
)
# The hair colours: the attributes the CollaFuse paper splits CelebA by, and the labels when
# data.split_attributes is unset.
CELEBA_DEFAULT_ATTRIBUTES = ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair")
CELEBA_SPLITS = {"train": 0, "val": 1, "test": 2}
AWA2_DIR = "Animals_with_Attributes2"
AWA2_LAYOUT = (
    "the folder Animals_with_Attributes2 (or its parent) holding JPEGImages/<class>/*.jpg "
    "and classes.txt"
)

# IDX type codes (third magic byte) and their big-endian numpy dtypes.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_PIL_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
# ITU-R 601 luma weights, the ones Pillow uses for RGB -> L.
_LUMA = (0.299, 0.587, 0.114)
# Images converted per interpolate call: bounds the float copies of a large data set.
_CHUNK = 4096
# Image files decoded before each conversion: bounds the full-resolution copies held at once.
_DECODE_CHUNK = 256


# ----- file formats ------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or plain, into a native-endian array.

    The header is two zero bytes, a type code, the number of dimensions, then one big-endian
    int32 per dimension; the data follow, big-endian, and must fill the dimensions exactly.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"IDX file {path} does not exist") from None
    except OSError as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from None
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"IDX file {path} is a damaged gzip file: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(
            f"{path} is not an IDX file: bad magic number {raw[:4].hex() or '(empty)'} "
            "(expected 0000 followed by a type code 08/09/0b/0c/0d/0e and the number of dimensions)"
        )
    dtype = _IDX_DTYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {path} is truncated inside its header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"IDX file {path} holds {len(raw) - header} data bytes but its header "
            f"{list(shape)} of {dtype.name} needs {expected}; the file is damaged"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))  # a writable native-endian copy


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        candidate = root / name
        if candidate.is_file():
            return candidate
    return None


def load_fashion_mnist(
    root: Path | None = None, split: Literal["train", "test"] = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST from its IDX files: images (N, 28, 28) uint8 and labels (N,) int64 in 0..9.

    `root` defaults to FASHION_MNIST_DIR, where Debian's dataset-fashion-mnist puts the files.
    """
    root = FASHION_MNIST_DIR if root is None else Path(root)
    if split not in ("train", "test"):
        raise DataError(f"Fashion-MNIST has the splits 'train' and 'test', not {split!r}")
    prefix = "train" if split == "train" else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    found = [_find_idx(root, stem) for stem in stems]
    if found[0] is None or found[1] is None:
        raise DataError(
            f"Fashion-MNIST files not found in {root} (need {stems[0]}.gz and {stems[1]}.gz); "
            f"{FASHION_MNIST_HINT}"
        )
    images = read_idx(found[0])
    labels = read_idx(found[1])
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{found[0]} holds {images.dtype} {list(images.shape)}, not N x 28 x 28")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{found[1]} holds labels of shape {list(labels.shape)} for {images.shape[0]} images"
        )
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{found[1]} holds labels outside 0..9")
    return images, labels


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten digits: images (N, 8, 8) uint8 in 0..255, labels (N,)."""
    # Imported here: scikit-learn comes with the `experiments` extra, not the client's install.
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError:
        raise DataError(
            "data source 'digits' needs scikit-learn: pip install 'collafuse[experiments]' "
            "(or scikit-learn alone)"
        ) from None

    bunch = load_digits()
    images = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0))
    return images.clip(0, 255).astype(np.uint8), np.asarray(bunch.target, dtype=np.int64)


def _hashed_id(prefix: str, relative: str) -> str:
    # A digest of the relative path: stable when the folder moves or grows, unique in practice
    # (checked), and it does not reveal file names, which may be personal, to the server.
    return f"{prefix}-" + hashlib.sha256(relative.encode("utf-8")).hexdigest()[:20]


def _folder_id(relative: str) -> str:
    return _hashed_id("folder", relative)


def _unique_ids(ids: list[str], where: Path) -> list[str]:
    if len(set(ids)) != len(ids):
        raise DataError(f"image ids collide under {where}; rename one of the files")
    return ids


def _read_image(path: Path, channels: int) -> np.ndarray:
    """One image file as an (H, W, channels) uint8 array, converted by Pillow."""
    try:
        with Image.open(path) as im:
            array = np.array(im.convert(_PIL_MODES[channels]), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None
    return array.reshape(array.shape[0], array.shape[1], channels)


def decode_images(paths: Sequence[Path], image: ImageConfig) -> Tensor:
    """Decode image files into (N, C, size, size) float32 in [-1, 1], as to_model_range does.

    Files are decoded a chunk at a time, so memory holds the converted images plus one chunk
    at full resolution, not the whole list at full resolution.
    """
    out = torch.empty((len(paths), *image.shape), dtype=torch.float32)  # (N, C, S, S)
    for start in range(0, len(paths), _DECODE_CHUNK):
        arrays = [_read_image(p, image.channels) for p in paths[start : start + _DECODE_CHUNK]]
        out[start : start + len(arrays)] = to_model_range(arrays, image)
    return out


def load_folder(path: Path, channels: int) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """PNG and JPEG files under `path`, searched recursively (hidden files and folders skipped).

    Returns one (H, W, channels) uint8 array per image (sizes may differ), int64 labels and ids,
    in sorted path order. When every image sits inside a sub-folder, the sorted names of the
    immediate sub-folders are the classes 0..K-1; otherwise every label is -1.
    """
    path = Path(path)
    if channels not in _PIL_MODES:
        raise DataError(f"channels must be 1 to 4, not {channels}")
    if not path.is_dir():
        raise DataError(f"image folder {path} does not exist or is not a directory; set data.path")
    files = sorted(
        (
            p.relative_to(path)
            for p in path.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        ),
        key=lambda p: p.as_posix(),
    )
    files = [p for p in files if not any(part.startswith(".") for part in p.parts)]
    if not files:
        raise DataError(f"no PNG or JPEG images found under {path}")
    images = [_read_image(path / rel, channels) for rel in files]
    if all(len(rel.parts) > 1 for rel in files):
        names = sorted({rel.parts[0] for rel in files})
        index = {name: k for k, name in enumerate(names)}
        labels = np.array([index[rel.parts[0]] for rel in files], dtype=np.int64)
    else:
        labels = np.full(len(files), -1, dtype=np.int64)
    ids = _unique_ids([_folder_id(rel.as_posix()) for rel in files], path)
    return images, labels, ids


# ----- CIFAR-10, CelebA, AwA2 in their own layouts -----------------------------------------


def _numpy_reconstruct() -> Callable[..., Any]:
    try:  # numpy >= 1.26 (and the name numpy 2 writes)
        module = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # pragma: no cover - older numpy
        module = importlib.import_module("numpy.core.multiarray")
    reconstruct: Callable[..., Any] = module._reconstruct
    return reconstruct


class _ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle names a callable outside the allowed numpy reconstruction."""


def _latin1_encode(text: object, encoding: object = "utf-8") -> bytes:
    # Python 3 writes bytes at pickle protocol 2 as _codecs.encode(text, "latin1"); nothing
    # else is let through, so the codec machinery stays out of reach of the file.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _ForbiddenGlobal("_codecs.encode is allowed only as latin-1 bytes")
    return text.encode("latin-1")


# The only globals a CIFAR-10 batch may name: numpy's array reconstruction (under its numpy 1
# name, which the official files use, and its numpy 2 name) and protocol-2 bytes. Any other
# global, os.system included, makes loading fail instead of running.
_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str, /) -> Any:
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise _ForbiddenGlobal(
                f"the pickle names the global {module}.{name}; only numpy arrays are allowed"
            ) from None


def read_numpy_pickle(path: Path) -> object:
    """Unpickle a file that may hold only plain containers, strings, numbers and numpy arrays.

    The CIFAR-10 "python version" ships as pickles. pickle.load would run any callable the
    file names; this unpickler refuses every global but numpy's array reconstruction, so a
    tampered file fails with a DataError instead of running code. Python 2 strings come back
    as bytes (encoding="bytes"), as the CIFAR-10 page prescribes.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"pickle file {path} does not exist") from None
    except OSError as exc:
        raise DataError(f"cannot read pickle file {path}: {exc}") from None
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except _ForbiddenGlobal as exc:
        raise DataError(f"refusing to load {path}: {exc}") from None
    except Exception as exc:  # a damaged pickle raises almost anything
        raise DataError(f"{path} is not a readable pickle: {type(exc).__name__}: {exc}") from None


def _cifar10_root(root: Path) -> Path:
    for candidate in (root / CIFAR10_DIR, root):
        if (candidate / "test_batch").is_file() or any(candidate.glob("data_batch_*")):
            return candidate
    raise DataError(f"no CIFAR-10 batches in {root}; data.path must be {CIFAR10_LAYOUT}")


def _cifar10_field(batch: dict[Any, Any], key: str) -> Any:
    for k in (key.encode(), key):  # bytes from Python 2 files, str from Python 3 rewrites
        if k in batch:
            return batch[k]
    return None


def _read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = read_numpy_pickle(path)
    if not isinstance(batch, dict):
        raise DataError(f"{path} holds a {type(batch).__name__}, not a CIFAR-10 batch dict")
    data = _cifar10_field(batch, "data")
    raw_labels = _cifar10_field(batch, "labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(f"{path} has no uint8 N x 3072 array under b'data'")
    if data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path} holds rows of {data.shape[1]} bytes, not 3072 (3 x 32 x 32)")
    try:
        labels = np.asarray(raw_labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{path} has no list of integer labels under b'labels'") from None
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path} holds {data.shape[0]} images but labels of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
        raise DataError(f"{path} holds labels outside 0..9")
    return data, labels


def load_cifar10(
    root: Path, split: Literal["train", "test"] = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 from its "python version" batches: images (N, 32, 32, 3) uint8 RGB, labels 0..9.

    `root` is cifar-10-batches-py or its parent. The train split concatenates every
    data_batch_<k> present, in order of k; test is test_batch. Each batch row holds the red,
    then green, then blue 32 x 32 plane, row-major.
    """
    if split not in ("train", "test"):
        raise DataError(f"CIFAR-10 has the splits 'train' and 'test', not {split!r}")
    folder = _cifar10_root(Path(root))
    if split == "train":
        numbered = [p for p in folder.glob("data_batch_*") if p.name[11:].isdigit()]
        files = sorted(numbered, key=lambda p: int(p.name[11:]))
    else:
        files = [folder / "test_batch"] if (folder / "test_batch").is_file() else []
    if not files:
        wanted = "data_batch_1 ... data_batch_5" if split == "train" else "test_batch"
        raise DataError(f"{folder} has no {wanted}; data.path must be {CIFAR10_LAYOUT}")
    batches = [_read_cifar10_batch(f) for f in files]
    data = np.concatenate([b[0] for b in batches])  # (N, 3072)
    labels = np.concatenate([b[1] for b in batches])
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels  # (N, 32, 32, 3)


@dataclass(frozen=True)
class CelebAAttributes:
    """The table of list_attr_celeba.txt."""

    names: tuple[str, ...]
    """The attribute names of the header line, in file order."""
    files: list[str]
    """Image file names, one per row."""
    values: np.ndarray
    """(N, A) int8 of -1 (absent) and 1 (present)."""


def _celeba_row_error(path: Path, lines: list[str], num_names: int) -> DataError:
    """The error for the first row of list_attr_celeba.txt that does not fit the header."""
    for number, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if parts and len(parts) != num_names + 1:
            return DataError(
                f"{path} line {number} has {len(parts) - 1} values for {num_names} attributes"
            )
    return DataError(f"{path} holds attribute values other than -1 and 1")


def read_celeba_attributes(path: Path) -> CelebAAttributes:
    """Parse list_attr_celeba.txt: a count line, the attribute names, then one row per image.

    Rows are a file name and one -1 or 1 per attribute, separated by any run of spaces.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; data.path must be {CELEBA_LAYOUT}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise DataError(f"{path} does not start with the number of images and the attribute names")
    count = int(lines[0])
    names = tuple(lines[1].split())
    pairs = [line.split(None, 1) for line in lines[2:] if line.strip()]
    files = [pair[0] for pair in pairs]
    if len(files) != count:
        raise DataError(f"{path} announces {count} images but lists {len(files)}")
    # One C-level parse of all values: splitting 200k rows into 8M Python strings takes seconds.
    text = " ".join(pair[1] if len(pair) > 1 else "" for pair in pairs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # some numpy versions only warn on unparsed text
            flat = np.fromstring(text, dtype=np.int64, sep=" ")
    except (ValueError, DeprecationWarning):
        flat = np.empty(0, dtype=np.int64)
    if flat.size != len(files) * len(names):
        raise _celeba_row_error(path, lines, len(names))
    if not np.isin(flat, (-1, 1)).all():
        raise DataError(f"{path} holds attribute values other than -1 and 1")
    # Every value is now "-1" or "1", each with one "1", so counting them checks each row's length.
    if any(len(pair) < 2 or pair[1].count("1") != len(names) for pair in pairs):
        raise _celeba_row_error(path, lines, len(names))
    values = flat.reshape(len(files), len(names)).astype(np.int8)
    if len(set(files)) != len(files):
        raise DataError(f"{path} lists an image twice")
    return CelebAAttributes(names=names, files=files, values=values)


def read_celeba_partition(path: Path) -> dict[str, int]:
    """Parse list_eval_partition.txt: file name -> 0 (train), 1 (val) or 2 (test)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    out: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise DataError(f"{path} line {number} is not '<file> 0|1|2': {line.strip()!r}")
        out[parts[0]] = int(parts[1])
    return out


def celeba_labels(attributes: CelebAAttributes, names: Sequence[str]) -> np.ndarray:
    """(N,) int64: the index in `names` of the first attribute each image has, or -1 for none."""
    index = {name: k for k, name in enumerate(attributes.names)}
    unknown = [name for name in names if name not in index]
    if unknown:
        raise DataError(
            f"unknown CelebA attribute(s) {', '.join(unknown)}; the valid ones are "
            f"{', '.join(attributes.names)}"
        )
    hits = attributes.values[:, [index[name] for name in names]] == 1  # (N, K)
    first = hits.argmax(axis=1).astype(np.int64)
    return np.where(hits.any(axis=1), first, -1)


def _first_existing(candidates: Sequence[Path], is_dir: bool) -> Path | None:
    for candidate in candidates:
        if candidate.is_dir() if is_dir else candidate.is_file():
            return candidate
    return None


@dataclass(frozen=True)
class _Source:
    """A whole data set as labels and ids; pixels are decoded only for the indices asked."""

    labels: np.ndarray
    """(N,) int64, -1 where there is no class."""
    ids: list[str]
    """One id per image."""
    num_classes: int
    """Classes of the data set, 0 when it has none."""
    pixels: Callable[[np.ndarray], Tensor]
    """Indices -> (n, C, S, S) float32 in [-1, 1]."""


def _celeba_source(
    root: Path, split: str, split_attributes: Sequence[str] | None, image: ImageConfig
) -> _Source:
    attr_path = _first_existing(
        [root / "list_attr_celeba.txt", root / "Anno" / "list_attr_celeba.txt"], is_dir=False
    )
    image_dir = _first_existing(
        [
            root / "img_align_celeba" / "img_align_celeba",  # the Kaggle archive nests it
            root / "img_align_celeba",
            root / "Img" / "img_align_celeba",
        ],
        is_dir=True,
    )
    if attr_path is None or image_dir is None:
        missing = "list_attr_celeba.txt" if attr_path is None else "img_align_celeba/"
        raise DataError(f"no {missing} in {root}; data.path must be {CELEBA_LAYOUT}")
    if split not in CELEBA_SPLITS:
        raise DataError(f"CelebA has the splits {', '.join(CELEBA_SPLITS)}, not {split!r}")
    attributes = read_celeba_attributes(attr_path)
    names = CELEBA_DEFAULT_ATTRIBUTES if split_attributes is None else tuple(split_attributes)
    labels = celeba_labels(attributes, names)
    keep = np.ones(len(attributes.files), dtype=bool)
    partition_path = _first_existing(
        [root / "list_eval_partition.txt", root / "Eval" / "list_eval_partition.txt"],
        is_dir=False,
    )
    if partition_path is not None:
        partition = read_celeba_partition(partition_path)
        absent = [f for f in attributes.files if f not in partition]
        if absent:
            raise DataError(f"{partition_path} has no entry for {absent[0]} ({len(absent)} in all)")
        wanted = CELEBA_SPLITS[split]
        keep &= np.array([partition[f] == wanted for f in attributes.files], dtype=bool)
    elif split != "train":
        raise DataError(
            f"the CelebA split {split!r} needs list_eval_partition.txt in {root}; without it "
            "every image belongs to 'train'"
        )
    if split_attributes is not None:
        keep &= labels >= 0  # images with none of the attributes belong to no client
    rows = np.flatnonzero(keep)
    files = [attributes.files[i] for i in rows]
    ids = _unique_ids([_hashed_id("celeba", f) for f in files], image_dir)

    def pixels(indices: np.ndarray) -> Tensor:
        return decode_images([image_dir / files[i] for i in indices], image)

    return _Source(labels[rows], ids, len(names), pixels)


def _awa2_source(root: Path, image: ImageConfig) -> _Source:
    folder = _first_existing([root / AWA2_DIR, root], is_dir=True)
    if folder is None or not (folder / "JPEGImages").is_dir():
        raise DataError(f"no JPEGImages/ in {root}; data.path must be {AWA2_LAYOUT}")
    images_dir = folder / "JPEGImages"
    present = sorted(
        p.name for p in images_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    classes_path = folder / "classes.txt"
    if classes_path.is_file():
        classes: list[str] = []
        for number, line in enumerate(classes_path.read_text(encoding="utf-8").splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[0].isdigit():
                raise DataError(f"{classes_path} line {number} is not '<number> <class>'")
            classes.append(parts[1])
        unlisted = [name for name in present if name not in classes]
        if unlisted:
            raise DataError(
                f"JPEGImages/{unlisted[0]} is not a class of {classes_path}; "
                "remove the folder or add the class"
            )
    else:  # without classes.txt the sorted folder names are the classes
        classes = present
    index = {name: k for k, name in enumerate(classes)}
    files: list[str] = []
    labels_list: list[int] = []
    for name in present:
        for p in sorted((images_dir / name).iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file():
                files.append(f"{name}/{p.name}")
                labels_list.append(index[name])
    if not files:
        raise DataError(f"no JPEG images under {images_dir}; data.path must be {AWA2_LAYOUT}")
    ids = _unique_ids([_hashed_id("awa2", f) for f in files], images_dir)

    def pixels(indices: np.ndarray) -> Tensor:
        return decode_images([images_dir / files[i] for i in indices], image)

    return _Source(np.array(labels_list, dtype=np.int64), ids, len(classes), pixels)


# ----- conversion ------------------------------------------------------------------------


def _convert_channels(x: Tensor, channels: int) -> Tensor:
    """(N, C_in, H, W) float in 0..255 -> (N, channels, H, W); grey <-> RGB, alpha kept or 255."""
    c_in = x.shape[1]
    has_alpha = c_in in (2, 4)
    colour = x[:, : c_in - 1] if has_alpha else x  # (N, 1 or 3, H, W)
    if colour.shape[1] == 3 and channels in (1, 2):
        w = torch.tensor(_LUMA, dtype=x.dtype).view(1, 3, 1, 1)
        colour = (colour * w).sum(dim=1, keepdim=True)
    elif colour.shape[1] == 1 and channels in (3, 4):
        colour = colour.expand(-1, 3, -1, -1)
    if channels in (1, 3):
        return colour
    alpha = x[:, c_in - 1 :] if has_alpha else torch.full_like(colour[:, :1], 255.0)
    return torch.cat([colour, alpha], dim=1)


def _to_model_range_array(images: np.ndarray, image: ImageConfig) -> Tensor:
    if images.dtype != np.uint8:
        raise DataError(f"images must be uint8 (0..255), not {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or not 1 <= images.shape[3] <= 4:
        raise DataError(f"images must be (N, H, W) or (N, H, W, C<=4), not {list(images.shape)}")
    n, h, w, _ = images.shape
    size = image.size
    out = torch.empty((n, image.channels, size, size), dtype=torch.float32)  # (N, C, S, S)
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2  # centre crop of non-square images
    for start in range(0, n, _CHUNK):
        part = np.ascontiguousarray(images[start : start + _CHUNK])
        if not part.flags.writeable:  # torch warns on read-only buffers (e.g. from Pillow)
            part = part.copy()
        chunk = torch.from_numpy(part)
        x = chunk.permute(0, 3, 1, 2).to(torch.float32)  # (B, C_in, H, W) in 0..255
        x = x[:, :, top : top + side, left : left + side]
        x = _convert_channels(x, image.channels)
        if side != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        out[start : start + _CHUNK] = x.clamp(0.0, 255.0) / 127.5 - 1.0
    return out


def to_model_range(images: np.ndarray | Sequence[np.ndarray], image: ImageConfig) -> Tensor:
    """uint8 images -> (N, C, size, size) float32 in [-1, 1] as `image` asks.

    Takes one (N, H, W) or (N, H, W, C) array, or a sequence of (H, W) or (H, W, C) arrays whose
    sizes may differ. Non-square images are centre-cropped to a square, then resized with
    antialiased bilinear interpolation; grey becomes RGB by repetition and RGB grey by ITU-R 601
    luma, as in Pillow.
    """
    if isinstance(images, np.ndarray):
        return _to_model_range_array(images, image)
    if len(images) == 0:
        return torch.empty((0, *image.shape), dtype=torch.float32)
    if len({a.shape for a in images}) == 1:
        return _to_model_range_array(np.stack(images), image)
    return torch.cat([_to_model_range_array(a[None], image) for a in images])


# ----- partitions ------------------------------------------------------------------------


def _rng(*keys: int) -> np.random.Generator:
    # SeedSequence takes non-negative integers; two's complement keeps negative seeds distinct.
    return np.random.default_rng([k & 0xFFFF_FFFF_FFFF_FFFF for k in keys])


def _check_partition_args(labels: np.ndarray, num_clients: int, scheme: str, alpha: float) -> None:
    if labels.ndim != 1:
        raise DataError(f"labels must be one-dimensional, not {list(labels.shape)}")
    if num_clients < 1:
        raise DataError(f"num_clients must be at least 1, not {num_clients}")
    if scheme not in PARTITION_SCHEMES:
        raise DataError(
            f"unknown partition {scheme!r}; choose one of {', '.join(PARTITION_SCHEMES)}"
        )
    if not alpha > 0:
        raise DataError(f"the Dirichlet alpha must be positive, not {alpha}")


def _partition_classes(
    labels: np.ndarray,
    num_clients: int,
    classes_per_client: list[tuple[int, ...]] | None,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    classes = np.unique(labels)
    if classes.size and classes[0] < 0:
        raise DataError(
            "partition 'classes' needs labelled images; put the images into one sub-folder per "
            "class or choose partition 'iid' or 'dirichlet'"
        )
    if classes_per_client is None:
        classes_per_client = [
            tuple(int(k) for k in classes if k % num_clients == i) for i in range(num_clients)
        ]
    if len(classes_per_client) != num_clients:
        raise DataError(
            f"classes_per_client names {len(classes_per_client)} clients, not {num_clients}"
        )
    owners: dict[int, list[int]] = {}
    for client, owned in enumerate(classes_per_client):
        for k in sorted(set(owned)):
            owners.setdefault(int(k), []).append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for k, clients in sorted(owners.items()):
        members = np.flatnonzero(labels == k)
        if len(clients) > 1:  # a class claimed by several clients is split evenly between them
            members = rng.permutation(members)
        for client, piece in zip(clients, np.array_split(members, len(clients)), strict=True):
            parts[client].append(piece)
    return [np.sort(np.concatenate(p)) if p else np.empty(0, np.int64) for p in parts]


def _partition_dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for k in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == k))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = np.floor(np.cumsum(shares)[:-1] * members.size).astype(np.int64)
        for client, piece in enumerate(np.split(members, cuts)):
            parts[client].append(piece)
    return [np.sort(np.concatenate(p)) if p else np.empty(0, np.int64) for p in parts]


def partition_indices(
    labels: np.ndarray,
    num_clients: int,
    scheme: str,
    *,
    classes_per_client: list[tuple[int, ...]] | None = None,
    alpha: float = 0.5,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split the indices of a data set across clients; one sorted int64 array per client.

    iid: a seeded shuffle cut into equal shares. classes: each client gets every image of its
    classes (default: class k goes to client k % num_clients; a class that several clients
    name is split evenly between them). dirichlet: the images of each class are dealt to the
    clients in proportions drawn from Dirichlet(alpha); small alpha gives skewed shares.
    The shares are disjoint, cover every index for iid and dirichlet, and depend only on the
    arguments, so every client of a federation computes the same split from the same seed.
    """
    labels = np.asarray(labels)
    _check_partition_args(labels, num_clients, scheme, alpha)
    rng = _rng(seed)
    if scheme == "iid":
        order = rng.permutation(labels.shape[0])
        return [np.sort(part).astype(np.int64) for part in np.array_split(order, num_clients)]
    if scheme == "classes":
        return _partition_classes(labels, num_clients, classes_per_client, rng)
    return _partition_dirichlet(labels, num_clients, alpha, rng)


# ----- the client's share --------------------------------------------------------------------

_PATH_HINTS = {
    "folder": "the folder of PNG/JPEG images",
    "cifar10": CIFAR10_LAYOUT,
    "celeba": CELEBA_LAYOUT,
    "awa2": AWA2_LAYOUT,
}


def _in_memory(
    images: np.ndarray | list[np.ndarray], image: ImageConfig
) -> Callable[[np.ndarray], Tensor]:
    def pixels(indices: np.ndarray) -> Tensor:
        if isinstance(images, np.ndarray):
            return to_model_range(images[indices], image)
        return to_model_range([images[i] for i in indices], image)

    return pixels


def _load_source(config: DataConfig, image: ImageConfig, split: str) -> _Source:
    """Labels and ids of the whole data set, with a way to decode any subset of it."""
    if config.source == "fashion-mnist":
        if split not in ("train", "test"):
            raise DataError(f"Fashion-MNIST has the splits 'train' and 'test', not {split!r}")
        images, labels = load_fashion_mnist(config.path, "train" if split == "train" else "test")
        ids = [f"fmnist-{split}-{i:05d}" for i in range(len(labels))]
        return _Source(labels, ids, 10, _in_memory(images, image))
    if config.source == "digits":
        if split != "train":
            raise DataError(f"data source 'digits' has only the split 'train', not {split!r}")
        images, labels = load_digits_arrays()
        ids = [f"digits-{i:04d}" for i in range(len(labels))]
        return _Source(labels, ids, 10, _in_memory(images, image))
    if config.path is None:
        raise DataError(
            f"data.source = {config.source!r} needs data.path, {_PATH_HINTS[config.source]}"
        )
    root = Path(config.path)
    if not root.is_dir():
        raise DataError(
            f"data.path {root} does not exist or is not a directory; for data.source = "
            f"{config.source!r} it must be {_PATH_HINTS[config.source]}"
        )
    if config.source == "cifar10":
        if split not in ("train", "test"):
            raise DataError(f"CIFAR-10 has the splits 'train' and 'test', not {split!r}")
        images, labels = load_cifar10(root, "train" if split == "train" else "test")
        ids = [f"cifar10-{split}-{i:05d}" for i in range(len(labels))]
        return _Source(labels, ids, len(CIFAR10_CLASSES), _in_memory(images, image))
    if config.source == "celeba":
        if config.split_attributes is None and config.partition == "classes":
            raise DataError(
                "partition 'classes' on CelebA needs data.split_attributes, the attribute each "
                f"client holds (e.g. {list(CELEBA_DEFAULT_ATTRIBUTES)}), or choose partition "
                "'iid' or 'dirichlet'"
            )
        return _celeba_source(root, split, config.split_attributes, image)
    if split != "train":
        raise DataError(f"data source {config.source!r} has only the split 'train', not {split!r}")
    if config.source == "awa2":
        return _awa2_source(root, image)
    pictures, labels, ids = load_folder(root, image.channels)
    num_classes = int(labels.max()) + 1 if labels.size and labels.min() >= 0 else 0
    return _Source(labels, ids, num_classes, _in_memory(pictures, image))


def load_local_data(config: DataConfig, image: ImageConfig, split: str = "train") -> LocalData:
    """Load the data set, keep this client's share of it and convert it for the model.

    The split uses config.partition, num_clients, seed and alpha; with partition = "classes"
    and config.classes set, this client keeps every image of those classes. For CelebA,
    config.split_attributes makes the classes (the first listed attribute an image has), so
    partition "classes" gives client i the images of split_attributes[i]. config.limit keeps
    the first `limit` images of the share after a shuffle seeded by (seed, client_index).
    Only the images of the final share are decoded, so large image folders load quickly.
    """
    source = _load_source(config, image, split)
    labels, num_classes = source.labels, source.num_classes
    classes_per_client: list[tuple[int, ...]] | None = None
    if config.classes is not None:
        if config.partition != "classes":
            raise DataError(
                f"data.classes only applies to partition 'classes', not {config.partition!r}"
            )
        outside = [k for k in config.classes if not 0 <= k < num_classes]
        if outside:
            raise DataError(
                f"data.classes {list(config.classes)} names classes {outside} outside "
                f"0..{num_classes - 1} of {config.source}"
            )
        classes_per_client = [() for _ in range(config.num_clients)]
        classes_per_client[config.client_index] = config.classes
    shares = partition_indices(
        labels,
        config.num_clients,
        config.partition,
        classes_per_client=classes_per_client,
        alpha=config.alpha,
        seed=config.seed,
    )
    share = shares[config.client_index]
    if share.size == 0:
        raise DataError(
            f"client {config.client_index} of {config.num_clients} gets no images from "
            f"partition {config.partition!r}; use fewer clients, another seed or a larger alpha"
        )
    if 0 < config.limit < share.size:
        rng = _rng(config.seed, config.client_index)
        share = np.sort(rng.permutation(share)[: config.limit])
    return LocalData(
        images=source.pixels(share),
        labels=torch.from_numpy(labels[share].astype(np.int64)),
        ids=[source.ids[i] for i in share],
        num_classes=num_classes,
    )
