"""Local data sets: loading, splitting across clients, conversion to the model's [-1, 1] range."""

from __future__ import annotations

import gzip
import hashlib
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from collafuse.common.config import DataConfig, ImageConfig


class DataError(ValueError):
    """Data that cannot be loaded or split as configured; the message says what to do."""


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
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0))
    return images.clip(0, 255).astype(np.uint8), np.asarray(bunch.target, dtype=np.int64)


def _folder_id(relative: str) -> str:
    # A digest of the relative path: stable when the folder moves or grows, unique in practice
    # (checked), and it does not reveal file names, which may be personal, to the server.
    return "folder-" + hashlib.sha256(relative.encode("utf-8")).hexdigest()[:20]


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
    images: list[np.ndarray] = []
    for rel in files:
        try:
            with Image.open(path / rel) as im:
                array = np.array(im.convert(_PIL_MODES[channels]), dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(f"cannot read image {path / rel}: {exc}") from None
        images.append(array.reshape(array.shape[0], array.shape[1], channels))
    if all(len(rel.parts) > 1 for rel in files):
        names = sorted({rel.parts[0] for rel in files})
        index = {name: k for k, name in enumerate(names)}
        labels = np.array([index[rel.parts[0]] for rel in files], dtype=np.int64)
    else:
        labels = np.full(len(files), -1, dtype=np.int64)
    ids = [_folder_id(rel.as_posix()) for rel in files]
    if len(set(ids)) != len(ids):
        raise DataError(f"image ids collide under {path}; rename one of the files")
    return images, labels, ids


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


def _load_source(
    config: DataConfig, image: ImageConfig, split: str
) -> tuple[np.ndarray | list[np.ndarray], np.ndarray, list[str], int]:
    """(images, labels, ids, num_classes) of the whole data set."""
    if config.source == "fashion-mnist":
        if split not in ("train", "test"):
            raise DataError(f"Fashion-MNIST has the splits 'train' and 'test', not {split!r}")
        images, labels = load_fashion_mnist(config.path, "train" if split == "train" else "test")
        return images, labels, [f"fmnist-{split}-{i:05d}" for i in range(len(labels))], 10
    if split != "train":
        raise DataError(f"data source {config.source!r} has only the split 'train', not {split!r}")
    if config.source == "digits":
        images, labels = load_digits_arrays()
        return images, labels, [f"digits-{i:04d}" for i in range(len(labels))], 10
    if config.path is None:
        raise DataError("data.source = 'folder' needs data.path, the folder of PNG/JPEG images")
    pictures, labels, ids = load_folder(config.path, image.channels)
    num_classes = int(labels.max()) + 1 if labels.size and labels.min() >= 0 else 0
    return pictures, labels, ids, num_classes


def load_local_data(config: DataConfig, image: ImageConfig, split: str = "train") -> LocalData:
    """Load the data set, keep this client's share of it and convert it for the model.

    The split uses config.partition, num_clients, seed and alpha; with partition = "classes"
    and config.classes set, this client keeps every image of those classes. config.limit keeps
    the first `limit` images of the share after a shuffle seeded by (seed, client_index).
    """
    images, labels, ids, num_classes = _load_source(config, image, split)
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
    if isinstance(images, np.ndarray):
        pixels = to_model_range(images[share], image)
    else:
        pixels = to_model_range([images[i] for i in share], image)
    return LocalData(
        images=pixels,
        labels=torch.from_numpy(labels[share].astype(np.int64)),
        ids=[ids[i] for i in share],
        num_classes=num_classes,
    )
