"""Tests of data loading, client partitions and conversion to the model range."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from collafuse.common.config import DataConfig, ImageConfig
from collafuse.common.data import (
    FASHION_MNIST_DIR,
    DataError,
    LocalData,
    load_digits_arrays,
    load_fashion_mnist,
    load_folder,
    load_local_data,
    partition_indices,
    read_idx,
    to_model_range,
)


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


# ----- IDX -------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_plain_and_gzip(tmp_path: Path, compress: bool) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = _idx_bytes(images, 0x08)
    path = tmp_path / ("x.idx.gz" if compress else "x.idx")
    path.write_bytes(gzip.compress(raw) if compress else raw)
    out = read_idx(path)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, images)


def test_read_idx_big_endian_int32_becomes_native(tmp_path: Path) -> None:
    values = np.array([1, -2, 70000], dtype=np.int32)
    path = tmp_path / "v.idx"
    path.write_bytes(_idx_bytes(values, 0x0C))
    out = read_idx(path)
    assert out.dtype == np.dtype("=i4")
    assert out.tolist() == [1, -2, 70000]
    out[0] = 5  # a writable copy, not a view of the file's bytes


def test_read_idx_bad_magic_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.idx"
    path.write_bytes(b"\x12\x34\x08\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(DataError, match="bad magic number 12340801"):
        read_idx(path)


def test_read_idx_size_mismatch_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "short.idx"
    path.write_bytes(_idx_bytes(np.zeros((4, 2), np.uint8), 0x08)[:-3])
    with pytest.raises(DataError, match="damaged"):
        read_idx(path)
    with pytest.raises(DataError, match="does not exist"):
        read_idx(tmp_path / "missing.idx")


# ----- Fashion-MNIST -----------------------------------------------------------------------


@pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST is not installed in {FASHION_MNIST_DIR} "
    "(apt-get install dataset-fashion-mnist; `make test` does this)",
)
def test_load_fashion_mnist_from_debian_package() -> None:
    images, labels = load_fashion_mnist()
    assert images.shape == (60000, 28, 28)
    assert images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [6000] * 10
    test_images, test_labels = load_fashion_mnist(split="test")
    assert test_images.shape == (10000, 28, 28)
    assert test_labels.shape == (10000,)


def test_missing_fashion_mnist_names_the_debian_package(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset-fashion-mnist") as info:
        load_fashion_mnist(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert "data.path" in str(info.value)
    config = DataConfig(source="fashion-mnist", path=tmp_path)
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        load_local_data(config, ImageConfig())


def test_fashion_mnist_from_a_fixture_folder(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 1, 0], dtype=np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images, 8)))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(labels, 8))  # plain works too
    got_images, got_labels = load_fashion_mnist(tmp_path, split="test")
    np.testing.assert_array_equal(got_images, images)
    assert got_labels.tolist() == [0, 1, 2, 1, 0]
    data = load_local_data(DataConfig(path=tmp_path, partition="iid"), ImageConfig(), "test")
    assert data.ids == [f"fmnist-test-{i:05d}" for i in range(5)]
    expected = torch.from_numpy(images).float().div(127.5).sub(1).unsqueeze(1)
    torch.testing.assert_close(data.images, expected)


# ----- digits and conversion ---------------------------------------------------------------


def test_digits_arrays_and_model_range() -> None:
    images, labels = load_digits_arrays()
    assert images.shape == (1797, 8, 8)
    assert images.dtype == np.uint8
    assert images.min() == 0 and images.max() == 255
    assert sorted(np.unique(labels).tolist()) == list(range(10))
    x = to_model_range(images[:50], ImageConfig(channels=1, size=16))
    assert x.shape == (50, 1, 16, 16)
    assert x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.min() < -0.99 and x.max() > 0.9  # the full range is used


def test_to_model_range_endpoints_and_channels() -> None:
    grey = np.tile(np.array([[0, 255], [51, 102]], dtype=np.uint8), (1, 2, 2))  # (1, 4, 4)
    x = to_model_range(grey, ImageConfig(channels=1, size=4))  # no resize: exact values
    torch.testing.assert_close(x[0, 0, :2, :2], torch.tensor([[-1.0, 1.0], [-0.6, -0.2]]))
    rgb = to_model_range(grey, ImageConfig(channels=3, size=4))
    torch.testing.assert_close(rgb, x.expand(-1, 3, -1, -1))  # grey -> RGB repeats
    big = to_model_range(np.full((2, 4, 4), 255, np.uint8), ImageConfig(channels=1, size=9))
    assert big.shape == (2, 1, 9, 9)
    torch.testing.assert_close(big, torch.ones(2, 1, 9, 9))
    red = np.zeros((1, 4, 4, 3), np.uint8)
    red[..., 0] = 255
    luma = to_model_range(red, ImageConfig(channels=1, size=4))
    torch.testing.assert_close(luma, torch.full((1, 1, 4, 4), 0.299 * 255 / 127.5 - 1))
    rgba = to_model_range(red, ImageConfig(channels=4, size=4))  # opaque alpha is added
    torch.testing.assert_close(rgba[:, 3], torch.ones(1, 4, 4))


def test_to_model_range_crops_non_square_and_accepts_mixed_sizes() -> None:
    wide = np.zeros((6, 10), np.uint8)
    wide[:, 2:8] = 255  # the centre 6 x 6 square is white
    tall = np.full((8, 4, 1), 255, np.uint8)
    x = to_model_range([wide, tall], ImageConfig(channels=1, size=4))
    assert x.shape == (2, 1, 4, 4)
    torch.testing.assert_close(x, torch.ones(2, 1, 4, 4))  # the black borders were cropped
    with pytest.raises(DataError, match="uint8"):
        to_model_range(np.zeros((1, 4, 4), np.float32), ImageConfig(size=4))


# ----- folders ----------------------------------------------------------------------------


def _write(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (12, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_folder_with_class_subfolders(tmp_path: Path) -> None:
    _write(tmp_path / "cats" / "a.png", (255, 0, 0))
    _write(tmp_path / "cats" / "nested" / "b.PNG", (0, 255, 0))
    _write(tmp_path / "dogs" / "c.jpg", (255, 255, 255), size=(20, 16))
    _write(tmp_path / "dogs" / "d.jpeg", (0, 0, 0))
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    _write(tmp_path / ".hidden" / "e.png", (1, 2, 3))
    images, labels, ids = load_folder(tmp_path, channels=1)
    assert labels.tolist() == [0, 0, 1, 1]  # cats = 0, dogs = 1 (sorted names)
    assert all(a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 1 for a in images)
    assert images[2].shape == (16, 20, 1)
    assert images[0][0, 0, 0] == round(0.299 * 255)  # RGB red -> luma
    assert len(set(ids)) == 4
    assert all(i.startswith("folder-") and "cats" not in i and "png" not in i for i in ids)
    assert load_folder(tmp_path, channels=1)[2] == ids  # stable

    config = DataConfig(source="folder", path=tmp_path, partition="iid")
    data = load_local_data(config, ImageConfig(channels=1, size=8))
    assert data.images.shape == (4, 1, 8, 8)
    assert data.num_classes == 2
    assert data.labels.tolist() == [0, 0, 1, 1]
    assert torch.allclose(data.images[2], torch.ones(1, 8, 8), atol=0.02)  # white JPEG
    assert torch.allclose(data.images[3], -torch.ones(1, 8, 8), atol=0.02)  # black JPEG


def test_flat_folder_has_no_labels_and_keeps_colour(tmp_path: Path) -> None:
    _write(tmp_path / "x.png", (255, 0, 0))
    _write(tmp_path / "sub" / "y.jpg", (0, 0, 255))
    images, labels, _ = load_folder(tmp_path, channels=3)
    assert labels.tolist() == [-1, -1]
    assert images[0].shape == (12, 12, 3)
    data = load_local_data(
        DataConfig(source="folder", path=tmp_path, partition="iid"), ImageConfig(channels=3)
    )
    assert data.num_classes == 0
    assert data.images.shape == (2, 3, 28, 28)
    torch.testing.assert_close(data.images[1, 0], torch.ones(28, 28))  # red, channel 0
    with pytest.raises(DataError, match="labelled"):
        load_local_data(DataConfig(source="folder", path=tmp_path), ImageConfig(channels=3))


def test_empty_or_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="no PNG or JPEG images"):
        load_folder(tmp_path, channels=1)
    with pytest.raises(DataError, match="does not exist"):
        load_folder(tmp_path / "missing", channels=1)
    with pytest.raises(DataError, match=r"data\.path"):
        load_local_data(DataConfig(source="folder"), ImageConfig())


def test_broken_image_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"broken\.png"):
        load_folder(tmp_path, channels=1)


# ----- partitions -------------------------------------------------------------------------

LABELS = np.repeat(np.arange(10), 50)  # 500 images, 50 per class


def _assert_disjoint(parts: list[np.ndarray]) -> np.ndarray:
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)
    return joined


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_is_disjoint_covering_and_deterministic(scheme: str) -> None:
    parts = partition_indices(LABELS, 4, scheme, seed=3)
    assert len(parts) == 4
    joined = _assert_disjoint(parts)
    assert sorted(joined.tolist()) == list(range(len(LABELS)))
    assert all(p.dtype == np.int64 for p in parts)
    again = partition_indices(LABELS, 4, scheme, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition_indices(LABELS, 4, scheme, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_shares_are_equal_and_mixed() -> None:
    parts = partition_indices(LABELS, 3, "iid", seed=0)
    assert sorted(len(p) for p in parts) == [166, 167, 167]
    for p in parts:
        assert len(np.unique(LABELS[p])) == 10


def test_classes_round_robin_gives_each_client_only_its_classes() -> None:
    parts = partition_indices(LABELS, 3, "classes")
    _assert_disjoint(parts)
    assert [sorted(set(LABELS[p].tolist())) for p in parts] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    for p in parts:  # every image of its classes
        for k in set(LABELS[p].tolist()):
            assert np.sum(LABELS[p] == k) == 50


def test_classes_explicit_and_shared_classes_split() -> None:
    parts = partition_indices(LABELS, 2, "classes", classes_per_client=[(0, 1), (1, 2)], seed=1)
    _assert_disjoint(parts)
    assert set(LABELS[parts[0]].tolist()) == {0, 1}
    assert set(LABELS[parts[1]].tolist()) == {1, 2}
    assert np.sum(LABELS[parts[0]] == 1) == 25 and np.sum(LABELS[parts[1]] == 1) == 25
    with pytest.raises(DataError, match="names 1 clients"):
        partition_indices(LABELS, 2, "classes", classes_per_client=[(0,)])


def test_dirichlet_small_alpha_is_skewed_large_alpha_is_even() -> None:
    def mean_top_share(alpha: float) -> float:
        parts = partition_indices(LABELS, 5, "dirichlet", alpha=alpha, seed=0)
        counts = np.stack([np.bincount(LABELS[p], minlength=10) for p in parts])  # (clients, K)
        return float(np.mean(counts.max(axis=0) / counts.sum(axis=0)))

    assert mean_top_share(0.05) > 0.8  # most of each class sits with one client
    assert mean_top_share(1000.0) < 0.3  # close to the even 0.2


def test_partition_rejects_bad_arguments() -> None:
    with pytest.raises(DataError, match="unknown partition"):
        partition_indices(LABELS, 2, "random")
    with pytest.raises(DataError, match="at least 1"):
        partition_indices(LABELS, 0, "iid")
    with pytest.raises(DataError, match="alpha"):
        partition_indices(LABELS, 2, "dirichlet", alpha=0.0)


# ----- a client's share ------------------------------------------------------------------


def test_load_local_data_digits_three_clients_by_class() -> None:
    image = ImageConfig(channels=1, size=16)
    shares = [
        load_local_data(DataConfig(source="digits", num_clients=3, client_index=i), image)
        for i in range(3)
    ]
    assert all(isinstance(s, LocalData) for s in shares)
    assert sum(len(s) for s in shares) == 1797
    assert [sorted(s.labels.unique().tolist()) for s in shares] == [
        [0, 3, 6, 9],
        [1, 4, 7],
        [2, 5, 8],
    ]
    all_ids = [i for s in shares for i in s.ids]
    assert len(set(all_ids)) == 1797
    for s in shares:
        assert s.num_classes == 10
        assert s.images.shape == (len(s), 1, 16, 16)
        assert s.images.dtype == torch.float32 and s.labels.dtype == torch.int64
        assert s.images.min() >= -1.0 and s.images.max() <= 1.0
    # The ids name the source images: the pixels match digit number id in the data set.
    images, _ = load_digits_arrays()
    k = int(shares[1].ids[5].split("-")[1])
    torch.testing.assert_close(shares[1].images[5], to_model_range(images[k : k + 1], image)[0])


def test_load_local_data_limit_and_explicit_classes() -> None:
    config = DataConfig(source="digits", num_clients=3, client_index=1, classes=(2, 7), limit=40)
    data = load_local_data(config, ImageConfig(channels=3, size=8))
    assert len(data) == 40
    assert set(data.labels.tolist()) <= {2, 7}
    assert data.images.shape == (40, 3, 8, 8)
    assert load_local_data(config, ImageConfig(channels=3, size=8)).ids == data.ids
    other = load_local_data(config.model_copy(update={"seed": 1}), ImageConfig(size=8))
    assert other.ids != data.ids
    with pytest.raises(DataError, match=r"outside 0\.\.9"):
        load_local_data(config.model_copy(update={"classes": (12,)}), ImageConfig())
    with pytest.raises(DataError, match="only applies to partition 'classes'"):
        load_local_data(config.model_copy(update={"partition": "iid"}), ImageConfig())
    with pytest.raises(DataError, match="only the split 'train'"):
        load_local_data(config, ImageConfig(), split="test")


def test_load_local_data_empty_share_is_a_clear_error() -> None:
    config = DataConfig(source="digits", num_clients=12, client_index=11)
    with pytest.raises(DataError, match="gets no images"):
        load_local_data(config, ImageConfig())


def test_a_client_with_a_wrong_data_path_leaves_no_state_behind(tmp_path: Path) -> None:
    from collafuse.client.daemon import ClientDaemon
    from collafuse.common.config import ClientConfig

    state = tmp_path / "client"
    config = ClientConfig.model_validate(
        {
            "state_dir": str(state),
            "data": {"source": "folder", "path": str(tmp_path / "nope")},
        }
    )
    with pytest.raises(DataError, match="does not exist"):
        ClientDaemon(config)
    assert not state.exists()  # no secret, ledger or state dir for a client that cannot run
