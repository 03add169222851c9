"""Tests of the CIFAR-10, CelebA and AwA2 loaders on tiny fixtures in each data set's own layout."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from collafuse.common.config import DataConfig, ImageConfig
from collafuse.common.data import (
    CelebAAttributes,
    DataError,
    celeba_labels,
    load_cifar10,
    load_local_data,
    read_celeba_attributes,
    read_numpy_pickle,
)

# ----- CIFAR-10 ----------------------------------------------------------------------------

PER_BATCH = 20


def _cifar_pixels(first: int, n: int) -> np.ndarray:
    """(n, 3, 32, 32) uint8 with a value that encodes image, channel, row and column."""
    k, c, y, x = np.meshgrid(
        np.arange(first, first + n), np.arange(3), np.arange(32), np.arange(32), indexing="ij"
    )
    return ((k * 11 + c * 80 + y * 5 + x * 3) % 256).astype(np.uint8)


def _write_cifar_batch(path: Path, first: int, n: int = PER_BATCH) -> None:
    # The layout of the official batches: rows of 3072 bytes, the R plane, then G, then B.
    batch = {
        b"batch_label": b"training batch",
        b"labels": [(first + i) % 10 for i in range(n)],
        b"data": _cifar_pixels(first, n).reshape(n, 3072),
        b"filenames": [f"img_{first + i}.png".encode() for i in range(n)],
    }
    with path.open("wb") as f:
        pickle.dump(batch, f, protocol=2)


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    _write_cifar_batch(folder / "data_batch_1", 0)
    _write_cifar_batch(folder / "data_batch_2", PER_BATCH)
    _write_cifar_batch(folder / "test_batch", 100)
    meta = {b"label_names": [b"airplane", b"automobile"], b"num_cases_per_batch": PER_BATCH}
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump(meta, f, protocol=2)
    return tmp_path


def test_cifar10_decodes_rgb_planes_pixel_for_pixel(cifar_root: Path) -> None:
    images, labels = load_cifar10(cifar_root)  # the parent of cifar-10-batches-py
    assert images.shape == (2 * PER_BATCH, 32, 32, 3)
    assert images.dtype == np.uint8
    expected = _cifar_pixels(0, 2 * PER_BATCH).transpose(0, 2, 3, 1)  # batch 1, then batch 2
    np.testing.assert_array_equal(images, expected)
    assert images[3, 2, 1].tolist() == [46, 126, 206]  # image 3, row 2, column 1: R, G, B
    assert labels.tolist() == [i % 10 for i in range(2 * PER_BATCH)]
    test_images, test_labels = load_cifar10(cifar_root / "cifar-10-batches-py", "test")
    np.testing.assert_array_equal(test_images, _cifar_pixels(100, PER_BATCH).transpose(0, 2, 3, 1))
    assert test_labels.tolist() == [(100 + i) % 10 for i in range(PER_BATCH)]


def test_cifar10_client_shares_in_model_range(cifar_root: Path) -> None:
    image = ImageConfig(channels=3, size=32)
    shares = [
        load_local_data(
            DataConfig(
                source="cifar10", path=cifar_root, partition="iid", num_clients=2, client_index=i
            ),
            image,
        )
        for i in range(2)
    ]
    assert [len(s) for s in shares] == [PER_BATCH, PER_BATCH]
    all_ids = [i for s in shares for i in s.ids]
    assert sorted(all_ids) == [f"cifar10-train-{i:05d}" for i in range(2 * PER_BATCH)]
    pixels = torch.from_numpy(_cifar_pixels(0, 2 * PER_BATCH)).float() / 127.5 - 1.0
    for s in shares:
        assert s.num_classes == 10
        index = [int(i.rsplit("-", 1)[1]) for i in s.ids]
        torch.testing.assert_close(s.images, pixels[index])  # no resize: exact values
        assert s.labels.tolist() == [k % 10 for k in index]
    test = load_local_data(
        DataConfig(source="cifar10", path=cifar_root, partition="iid"), image, "test"
    )
    assert len(test) == PER_BATCH
    assert test.ids[0] == "cifar10-test-00000"

    small = load_local_data(
        DataConfig(source="cifar10", path=cifar_root, partition="classes", classes=(3,), limit=2),
        ImageConfig(channels=1, size=16),
    )
    assert small.images.shape == (2, 1, 16, 16)
    assert small.images.min() >= -1.0 and small.images.max() <= 1.0
    assert small.labels.tolist() == [3, 3]


def _py2_style_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A pickle as Python 2 and numpy 1 wrote the official batches: str opcodes, numpy.core."""

    def text(s: bytes) -> bytes:  # SHORT_BINSTRING / BINSTRING, Python 2's str
        return b"U" + bytes([len(s)]) + s if len(s) < 256 else b"T" + struct.pack("<I", len(s)) + s

    n, width = data.shape
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85"
        + text(b"b")
        + b"\x87R("  # _reconstruct(ndarray, (0,), 'b'), then its state
        + b"K\x01M"
        + struct.pack("<H", n)
        + b"M"
        + struct.pack("<H", width)
        + b"\x86cnumpy\ndtype\n"
        + text(b"u1")
        + b"K\x00K\x01\x87R(K\x03"
        + text(b"|")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89"
        + text(data.tobytes())
        + b"tb"
    )
    label_list = b"](" + b"".join(b"K" + bytes([k]) for k in labels) + b"e"
    return b"\x80\x02}(" + text(b"data") + array + text(b"labels") + label_list + b"u."


def test_cifar10_reads_the_official_python2_pickle_form(tmp_path: Path) -> None:
    data = _cifar_pixels(0, 3).reshape(3, 3072)
    raw = _py2_style_batch(data, [7, 0, 9])
    (tmp_path / "test_batch").write_bytes(raw)
    images, labels = load_cifar10(tmp_path, "test")
    np.testing.assert_array_equal(images, _cifar_pixels(0, 3).transpose(0, 2, 3, 1))
    assert labels.tolist() == [7, 0, 9]


class _RunsCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    evil.parent.mkdir()
    evil.write_bytes(pickle.dumps({b"data": _RunsCommand(marker), b"labels": []}, protocol=2))
    with pytest.raises(DataError, match=r"refusing to load .*data_batch_1.*system"):
        load_cifar10(tmp_path)
    assert not marker.exists()
    with pytest.raises(DataError, match="refusing"):
        load_local_data(DataConfig(source="cifar10", path=tmp_path, partition="iid"), ImageConfig())
    assert not marker.exists()

    other = tmp_path / "other.pkl"
    other.write_bytes(b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.")
    with pytest.raises(DataError, match=r"builtins\.eval"):
        read_numpy_pickle(other)
    codec = tmp_path / "codec.pkl"  # _codecs.encode is allowed only as latin-1 bytes
    codec.write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(DataError, match="latin-1"):
        read_numpy_pickle(codec)
    assert read_numpy_pickle(_dump(tmp_path, {b"k": b"v", "n": [1, 2.5]})) == {
        b"k": b"v",
        "n": [1, 2.5],
    }


def _dump(tmp_path: Path, value: object) -> Path:
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps(value, protocol=2))
    return path


def test_cifar10_missing_and_damaged_files_are_clear_errors(
    tmp_path: Path, cifar_root: Path
) -> None:
    with pytest.raises(DataError, match=r"needs data\.path.*data_batch_1"):
        load_local_data(DataConfig(source="cifar10"), ImageConfig())
    with pytest.raises(DataError, match="does not exist"):
        load_local_data(DataConfig(source="cifar10", path=tmp_path / "nope"), ImageConfig())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"no CIFAR-10 batches.*cifar-10-python\.tar\.gz"):
        load_cifar10(empty)
    folder = cifar_root / "cifar-10-batches-py"
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match="has no test_batch"):
        load_cifar10(cifar_root, "test")
    with pytest.raises(DataError, match="splits 'train' and 'test'"):
        load_local_data(DataConfig(source="cifar10", path=cifar_root), ImageConfig(), "val")
    with (folder / "data_batch_2").open("wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(DataError, match="not 3072"):
        load_cifar10(cifar_root)
    (folder / "data_batch_2").write_bytes(b"\x80\x02}q\x00(U")  # truncated
    with pytest.raises(DataError, match="data_batch_2 is not a readable pickle"):
        load_cifar10(cifar_root)


# ----- CelebA ------------------------------------------------------------------------------

CELEBA_ATTRIBUTES = [
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
]
# Hair attributes of images 1..12; 3 has black and brown, 7 blond and grey, 4 and 9 have none.
HAIR = [
    {"Black_Hair"},
    {"Blond_Hair"},
    {"Black_Hair", "Brown_Hair"},
    set(),
    {"Brown_Hair"},
    {"Gray_Hair"},
    {"Blond_Hair", "Gray_Hair"},
    {"Black_Hair"},
    set(),
    {"Brown_Hair"},
    {"Gray_Hair"},
    {"Blond_Hair"},
]
PARTITION = [0] * 8 + [1, 1, 2, 2]  # images 1-8 train, 9-10 val, 11-12 test
HAIR_COLOURS = ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair")


def _colour(k: int) -> tuple[int, int, int]:
    return (20 * k, 250 - 20 * k, 60 + 10 * k)


def _celeba_name(k: int) -> str:
    return f"{k:06d}.jpg"


@pytest.fixture
def celeba_root(tmp_path: Path) -> Path:
    root = tmp_path / "celeba"
    images = root / "img_align_celeba"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for k in range(1, 13):
        # 178 x 218 like the aligned crops: the centre 178 x 178 square has the image's colour,
        # the 20 rows above and below it are black and must be cropped away.
        pixels = np.zeros((218, 178, 3), np.uint8)
        pixels[20:198] = _colour(k)
        Image.fromarray(pixels).save(images / _celeba_name(k), quality=95)
        values = rng.choice([-1, 1], size=len(CELEBA_ATTRIBUTES))
        for a, name in enumerate(CELEBA_ATTRIBUTES):
            if name in HAIR_COLOURS:
                values[a] = 1 if name in HAIR[k - 1] else -1
        rows.append(_celeba_name(k) + " " + " ".join(f"{v:2d}" for v in values))
    header = f"{len(rows)}\n" + " ".join(CELEBA_ATTRIBUTES) + " \n"
    (root / "list_attr_celeba.txt").write_text(header + "\n".join(rows) + "\n")
    (root / "list_eval_partition.txt").write_text(
        "".join(f"{_celeba_name(k)} {p}\n" for k, p in enumerate(PARTITION, start=1))
    )
    return root


def _which_images(images: torch.Tensor) -> list[int]:
    """Map each decoded image back to its file number by its colour."""
    found = []
    for x in images:
        mean = ((x.mean(dim=(1, 2)) + 1) * 127.5).tolist()  # (3,) in 0..255
        errors = {
            k: max(abs(m - c) for m, c in zip(mean, _colour(k), strict=True)) for k in range(1, 13)
        }
        k = min(errors, key=lambda j: errors[j])
        assert errors[k] < 4, f"image colour {mean} matches no file"
        found.append(k)
    return found


def _celeba(root: Path | None, client: int = 0, **fields: object) -> DataConfig:
    values: dict[str, object] = {
        "source": "celeba",
        "path": root,
        "split_attributes": HAIR_COLOURS,
        "num_clients": 4,
        "client_index": client,
    }
    values.update(fields)
    return DataConfig.model_validate(values)


def test_read_celeba_attributes_keeps_rows_and_names(celeba_root: Path) -> None:
    table = read_celeba_attributes(celeba_root / "list_attr_celeba.txt")
    assert isinstance(table, CelebAAttributes)
    assert table.names == tuple(CELEBA_ATTRIBUTES)
    assert table.files == [_celeba_name(k) for k in range(1, 13)]
    assert table.values.shape == (12, 40)
    assert set(np.unique(table.values).tolist()) == {-1, 1}
    blond = CELEBA_ATTRIBUTES.index("Blond_Hair")
    assert np.flatnonzero(table.values[:, blond] == 1).tolist() == [1, 6, 11]
    labels = celeba_labels(table, ["Gray_Hair", "Blond_Hair"])
    assert labels.tolist() == [-1, 1, -1, -1, -1, 0, 0, -1, -1, -1, 0, 1]


def test_celeba_attribute_split_is_disjoint_and_first_match(celeba_root: Path) -> None:
    image = ImageConfig(channels=3, size=8)
    shares = [load_local_data(_celeba(celeba_root, i), image) for i in range(4)]
    # Train images 1-8; 3 has black and brown hair and goes to black (listed first); 4 has none.
    assert [_which_images(s.images) for s in shares] == [[1, 3, 8], [2, 7], [5], [6]]
    for i, s in enumerate(shares):
        assert s.labels.tolist() == [i] * len(s)
        assert s.num_classes == 4
        assert s.images.shape == (len(s), 3, 8, 8)
        assert s.images.min() >= -1.0 and s.images.max() <= 1.0
    ids = [i for s in shares for i in s.ids]
    assert len(set(ids)) == len(ids) == 7
    assert all(i.startswith("celeba-") and "jpg" not in i and "0000" not in i for i in ids)
    assert load_local_data(_celeba(celeba_root, 0), image).ids == shares[0].ids  # stable

    # The first listed attribute wins: with brown before black, image 3 is brown.
    brown_first = _celeba(
        celeba_root, 0, split_attributes=("Brown_Hair", "Black_Hair"), num_clients=2
    )
    assert _which_images(load_local_data(brown_first, image).images) == [3, 5]
    black = load_local_data(brown_first.model_copy(update={"client_index": 1}), image)
    assert _which_images(black.images) == [1, 8]

    test = load_local_data(_celeba(celeba_root, 3), image, "test")
    assert _which_images(test.images) == [11]
    val = load_local_data(_celeba(celeba_root, 2), image, "val")
    assert _which_images(val.images) == [10]
    with pytest.raises(DataError, match="gets no images"):
        load_local_data(_celeba(celeba_root, 0), image, "test")


def test_celeba_crops_the_centre_square(celeba_root: Path) -> None:
    data = load_local_data(_celeba(celeba_root, 2), ImageConfig(channels=3, size=16))
    expected = torch.tensor(_colour(5), dtype=torch.float32).view(3, 1, 1) / 127.5 - 1.0
    # The black bands above and below the face square are gone: every pixel has the colour.
    torch.testing.assert_close(data.images[0], expected.expand(3, 16, 16), atol=0.04, rtol=0)
    grey = load_local_data(_celeba(celeba_root, 2), ImageConfig(channels=1, size=8))
    assert grey.images.shape == (1, 1, 8, 8)


def test_celeba_without_split_attributes_uses_generic_partitions(celeba_root: Path) -> None:
    config = DataConfig(source="celeba", path=celeba_root, partition="iid", num_clients=2)
    shares = [
        load_local_data(
            config.model_copy(update={"client_index": i}), ImageConfig(channels=3, size=8)
        )
        for i in range(2)
    ]
    found = [k for s in shares for k in _which_images(s.images)]
    assert sorted(found) == list(range(1, 9))  # every train image, none dropped
    by_image = {
        k: label
        for s in shares
        for k, label in zip(_which_images(s.images), s.labels.tolist(), strict=True)
    }
    assert by_image == {1: 0, 2: 1, 3: 0, 4: -1, 5: 2, 6: 3, 7: 1, 8: 0}
    assert shares[0].num_classes == 4
    with pytest.raises(DataError, match=r"needs data\.split_attributes"):
        load_local_data(DataConfig(source="celeba", path=celeba_root), ImageConfig())


def test_celeba_decodes_only_the_share(celeba_root: Path) -> None:
    image = ImageConfig(channels=3, size=8)
    images = celeba_root / "img_align_celeba"
    limited = load_local_data(_celeba(celeba_root, 0, limit=2), image)
    kept = _which_images(limited.images)
    assert len(kept) == 2 and set(kept) < {1, 3, 8}
    # Damage every file this client does not decode: outside the share, or dropped by the limit.
    for k in set(range(1, 13)) - set(kept):
        (images / _celeba_name(k)).write_bytes(b"\xff\xd8 not a jpeg")
    again = load_local_data(_celeba(celeba_root, 0, limit=2), image)
    assert again.ids == limited.ids
    torch.testing.assert_close(again.images, limited.images)
    with pytest.raises(DataError, match=r"cannot read image .*000002\.jpg"):
        load_local_data(_celeba(celeba_root, 1), image)


def test_celeba_without_partition_file_is_all_train(celeba_root: Path) -> None:
    (celeba_root / "list_eval_partition.txt").unlink()
    data = load_local_data(_celeba(celeba_root, 3), ImageConfig(channels=3, size=8))
    assert _which_images(data.images) == [6, 11]
    with pytest.raises(DataError, match=r"needs list_eval_partition\.txt"):
        load_local_data(_celeba(celeba_root, 3), ImageConfig(), "test")


def test_celeba_layout_nested_like_the_official_download(celeba_root: Path) -> None:
    (celeba_root / "Anno").mkdir()
    (celeba_root / "list_attr_celeba.txt").rename(celeba_root / "Anno" / "list_attr_celeba.txt")
    (celeba_root / "Img").mkdir()
    (celeba_root / "img_align_celeba").rename(celeba_root / "Img" / "img_align_celeba")
    data = load_local_data(_celeba(celeba_root, 1), ImageConfig(channels=3, size=8))
    assert _which_images(data.images) == [2, 7]


def test_celeba_errors_name_the_problem(celeba_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"Purple_Hair.*valid ones are 5_o_Clock_Shadow, .*Young"):
        load_local_data(
            _celeba(celeba_root, split_attributes=("Black_Hair", "Purple_Hair"), num_clients=2),
            ImageConfig(),
        )
    with pytest.raises(DataError, match=r"needs data\.path.*list_attr_celeba\.txt"):
        load_local_data(_celeba(None), ImageConfig())
    with pytest.raises(DataError, match="does not exist"):
        load_local_data(_celeba(tmp_path / "missing"), ImageConfig())
    bare = tmp_path / "bare"
    (bare / "img_align_celeba").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no list_attr_celeba\.txt in .*img_align_celeba/"):
        load_local_data(_celeba(bare), ImageConfig())
    with pytest.raises(DataError, match="splits train, val, test"):
        load_local_data(_celeba(celeba_root), ImageConfig(), "valid")

    attr = celeba_root / "list_attr_celeba.txt"
    lines = attr.read_text().splitlines()
    attr.write_text("\n".join([*lines[:4], " ".join(lines[4].split()[:-1]), *lines[5:]]))
    with pytest.raises(DataError, match="line 5 has 39 values for 40 attributes"):
        read_celeba_attributes(attr)
    attr.write_text("\n".join([*lines[:4], " ".join([*lines[4].split()[:-1], "0"]), *lines[5:]]))
    with pytest.raises(DataError, match="other than -1 and 1"):
        read_celeba_attributes(attr)
    attr.write_text("\n".join(["13", *lines[1:]]))
    with pytest.raises(DataError, match="announces 13 images but lists 12"):
        read_celeba_attributes(attr)


def test_split_attributes_config_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="applies to source celeba"):
        DataConfig(source="cifar10", split_attributes=("Black_Hair",))
    with pytest.raises(ValidationError, match="names 2 attributes for 3 clients"):
        DataConfig(source="celeba", split_attributes=("Black_Hair", "Blond_Hair"), num_clients=3)
    with pytest.raises(ValidationError, match="each once"):
        DataConfig(source="celeba", split_attributes=("Black_Hair", "Black_Hair"), num_clients=2)
    # Other partitions deal the attribute classes across any number of clients.
    DataConfig(source="celeba", split_attributes=("Black_Hair",), partition="iid", num_clients=3)


# ----- AwA2 --------------------------------------------------------------------------------

# classes.txt order, which is not the sorted order of the folders; grizzly+bear has no images.
AWA2_CLASSES = ["antelope", "grizzly+bear", "killer+whale", "beaver"]
AWA2_COLOURS = {"antelope": (200, 30, 30), "killer+whale": (30, 30, 200), "beaver": (30, 200, 30)}


@pytest.fixture
def awa2_root(tmp_path: Path) -> Path:
    root = tmp_path / "Animals_with_Attributes2"
    for name, colour in AWA2_COLOURS.items():
        folder = root / "JPEGImages" / name
        folder.mkdir(parents=True)
        for j, size in enumerate([(40, 30), (24, 36), (32, 32)]):
            Image.new("RGB", size, colour).save(folder / f"{name}_{10001 + j}.jpg")
    (root / "classes.txt").write_text(
        "".join(f"{k}\t{name}\n" for k, name in enumerate(AWA2_CLASSES, start=1))
    )
    return tmp_path


def _class_of(x: torch.Tensor) -> str:
    mean = ((x.mean(dim=(1, 2)) + 1) * 127.5).tolist()
    for name, colour in AWA2_COLOURS.items():
        if max(abs(m - c) for m, c in zip(mean, colour, strict=True)) < 4:
            return name
    raise AssertionError(f"colour {mean} matches no class")


def test_awa2_labels_follow_classes_txt(awa2_root: Path) -> None:
    for path in (awa2_root, awa2_root / "Animals_with_Attributes2"):
        data = load_local_data(
            DataConfig(source="awa2", path=path, partition="iid"), ImageConfig(channels=3, size=16)
        )
        assert len(data) == 9
        assert data.num_classes == 4
        assert data.images.shape == (9, 3, 16, 16)
        assert data.images.min() >= -1.0 and data.images.max() <= 1.0
        names = [_class_of(x) for x in data.images]
        assert [AWA2_CLASSES[k] for k in data.labels.tolist()] == names
        assert sorted(set(data.labels.tolist())) == [0, 2, 3]
        assert all(
            i.startswith("awa2-") and "antelope" not in i and "jpg" not in i for i in data.ids
        )
        assert len(set(data.ids)) == 9

    (awa2_root / "Animals_with_Attributes2" / "classes.txt").unlink()
    data = load_local_data(
        DataConfig(source="awa2", path=awa2_root, partition="iid"), ImageConfig(channels=3)
    )
    assert data.num_classes == 3  # the sorted folder names: antelope, beaver, killer+whale
    names = [_class_of(x) for x in data.images]
    assert [["antelope", "beaver", "killer+whale"][k] for k in data.labels.tolist()] == names


def test_awa2_decodes_only_the_share_and_limit(awa2_root: Path) -> None:
    broken = awa2_root / "Animals_with_Attributes2" / "JPEGImages" / "killer+whale" / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    config = DataConfig(source="awa2", path=awa2_root, num_clients=3, client_index=0, limit=4)
    data = load_local_data(config, ImageConfig(channels=3, size=8))  # classes 0 and 3
    assert len(data) == 4
    assert set(data.labels.tolist()) <= {0, 3}
    with pytest.raises(DataError, match=r"cannot read image .*broken\.jpg"):
        load_local_data(config.model_copy(update={"client_index": 2}), ImageConfig())


def test_awa2_errors_name_the_layout(awa2_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"needs data\.path.*JPEGImages"):
        load_local_data(DataConfig(source="awa2", partition="iid"), ImageConfig())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"no JPEGImages/ in .*classes\.txt"):
        load_local_data(DataConfig(source="awa2", path=empty, partition="iid"), ImageConfig())
    stray = awa2_root / "Animals_with_Attributes2" / "JPEGImages" / "unicorn"
    stray.mkdir()
    with pytest.raises(DataError, match="JPEGImages/unicorn is not a class"):
        load_local_data(DataConfig(source="awa2", path=awa2_root, partition="iid"), ImageConfig())
    with pytest.raises(DataError, match="only the split 'train'"):
        load_local_data(DataConfig(source="awa2", path=awa2_root), ImageConfig(), "test")
