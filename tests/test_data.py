"""Tests for ddpm_lightning.data on small data that each test writes itself (no downloads)."""
import pickle
import re
import urllib.error
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from sklearn.datasets import load_digits

from ddpm_lightning.data import CIFAR10DataModule, DigitsDataModule, ImageFolderDataModule, ImageNet64DataModule
from ddpm_lightning.data.cifar10 import CIFAR10_CLASSES
from ddpm_lightning.data.in_memory import InMemoryLoader
from ddpm_lightning.data.tensor_dataset import TensorImageDataset


# ----------------------------------------------------------------------------- helpers


def make_image(seed: int, size: int = 32) -> np.ndarray:
    """A random HWC uint8 image that is not left-right symmetric."""
    return np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def write_image(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_cifar_folder(root: Path, classes=("airplane", "cat", "truck"), per_class: int = 4, ext: str = "png") -> dict:
    """Writes root/<class>/<n>.<ext>; returns {relative path: (pixels, label)}."""
    written = {}
    for class_name in classes:
        for n in range(per_class):
            pixels = make_image(len(written))
            path = root / class_name / f"{n:04d}.{ext}"
            write_image(path, pixels)
            written[str(path)] = (pixels, CIFAR10_CLASSES.index(class_name))
    return written


def as_float(pixels: np.ndarray) -> torch.Tensor:
    """HWC uint8 → the CHW [-1, 1] float the DataModules must produce."""
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1


def converted(dm, batch, training: bool = False):
    """Runs the DataModule's batch hook as Lightning would, with a stand-in trainer."""
    dm.trainer = SimpleNamespace(training=training)
    try:
        return dm.on_after_batch_transfer(batch, 0)
    finally:
        dm.trainer = None


def all_batches(dm, loader, training: bool = False):
    xs, ys = zip(*(converted(dm, batch, training) for batch in loader))
    return torch.cat(xs), torch.cat(ys)


def write_npz(path: Path, **arrays) -> None:
    """np.savez to an open file, so a name without .npz keeps it (as in the official release)."""
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def planar_rows(images_hwc: np.ndarray) -> np.ndarray:
    """Packs HWC images the Chrabaszcz et al. way: all red values, then all green, then all blue."""
    return np.concatenate([images_hwc[..., c].reshape(len(images_hwc), -1) for c in range(3)], axis=1)


# ----------------------------------------------------------------------------- digits


def test_digits_shape_range_total_and_deterministic_split():
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    assert len(dm.train_dataset) + len(dm.val_dataset) == 1797
    assert len(dm.val_dataset) == 197
    x, y = converted(dm, next(iter(dm.train_dataloader())), training=True)
    assert x.shape == (64, 1, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() == -1 and x.max() == 1
    assert y.dtype == torch.int64 and 0 <= y.min() and y.max() <= 9
    # The split ignores the global seeds.
    torch.manual_seed(123)
    np.random.seed(123)
    again = DigitsDataModule()
    again.setup("fit")
    assert again.val_dataset.indices == dm.val_dataset.indices
    assert set(again.val_dataset.indices).isdisjoint(again.train_dataset.indices)


def test_digits_values_scaled_from_0_16_to_uint8():
    dm = DigitsDataModule(image_size=8, num_val_samples=0)
    dm.setup("fit")
    digits = load_digits()
    image, label = dm.train_dataset.dataset[5]
    assert image.dtype == torch.uint8 and image.shape == (1, 8, 8)
    assert torch.equal(image[0], torch.from_numpy(np.round(digits.images[5] * 255 / 16)).to(torch.uint8))
    assert label == digits.target[5]


def test_digits_normal_and_in_memory_modes_agree():
    held = DigitsDataModule(in_memory=True)
    streamed = DigitsDataModule(in_memory=False)
    for dm in (held, streamed):
        dm.setup("fit")
    assert isinstance(held.val_dataloader(), InMemoryLoader)
    assert isinstance(streamed.val_dataloader(), torch.utils.data.DataLoader)
    for a, b in zip(all_batches(held, held.val_dataloader()), all_batches(streamed, streamed.val_dataloader())):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- attributes and options


def test_attributes_are_known_right_after_init(tmp_path):
    (tmp_path / "dogs").mkdir()
    (tmp_path / "cats").mkdir()
    expected = {
        DigitsDataModule(): (16, 1, 10),
        CIFAR10DataModule(data_dir=str(tmp_path / "absent")): (32, 3, 10),
        ImageNet64DataModule(data_dir=str(tmp_path / "absent")): (64, 3, 1000),
        ImageFolderDataModule(data_dir=str(tmp_path), image_size=8): (8, 3, None),
        ImageFolderDataModule(data_dir=str(tmp_path), class_cond=True): (64, 3, 2),
    }
    for dm, (image_size, channels, num_classes) in expected.items():
        assert (dm.image_size, dm.channels, dm.num_classes) == (image_size, channels, num_classes)
        assert dm.hparams["batch_size"] == 128  # save_hyperparameters() ran


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: CIFAR10DataModule(data_dir=d, source="lmdb"), r"source must be one of \('torchvision', 'folder'\)"),
        (lambda d: ImageNet64DataModule(data_dir=d, source="tfrecord"), r"source must be one of \('npz', 'folder'\)"),
        (lambda d: CIFAR10DataModule(data_dir=d, on_corrupt="ignore"), r"on_corrupt must be one of"),
        (lambda d: DigitsDataModule(batch_size=0), r"batch_size must be >= 1"),
        (lambda d: DigitsDataModule(num_workers=-1), r"num_workers must be >= 0"),
    ],
)
def test_bad_options_raise_at_construction(tmp_path, make, message):
    with pytest.raises(ValueError, match=message):
        make(str(tmp_path))


def test_too_many_validation_samples_is_a_clear_error():
    dm = DigitsDataModule(num_val_samples=1797)
    with pytest.raises(ValueError, match="num_val_samples=1797 leaves no training images out of 1797"):
        dm.setup("fit")


def test_flips_only_in_training_and_only_when_enabled():
    image = torch.from_numpy(make_image(0)).permute(2, 0, 1)
    batch = (image.expand(64, -1, -1, -1).clone(), torch.zeros(64, dtype=torch.int64))
    original, mirrored = as_float(make_image(0)), as_float(make_image(0)).flip(-1)
    flipping, plain = DigitsDataModule(random_flip=True), DigitsDataModule(random_flip=False)

    x, _ = converted(flipping, batch, training=True)
    is_mirrored = [torch.equal(sample, mirrored) for sample in x]
    assert all(torch.equal(sample, original) or flipped for sample, flipped in zip(x, is_mirrored))
    assert 0 < sum(is_mirrored) < 64  # per-sample, not per-batch
    for dm, training in ((flipping, False), (plain, True)):
        x, _ = converted(dm, batch, training=training)
        assert all(torch.equal(sample, original) for sample in x)


# ----------------------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize("layout", ["train_subfolder", "class_folders_in_root", "improved_diffusion_flat"])
def test_cifar_folder_layouts_decode_pixels_and_canonical_labels(tmp_path, layout):
    if layout == "improved_diffusion_flat":
        written = {}
        for n, class_name in enumerate(["cat", "ship", "cat", "airplane"]):
            path = tmp_path / "cifar_train" / f"{class_name}_{n:05d}.png"
            write_image(path, make_image(n))
            written[str(path)] = (make_image(n), CIFAR10_CLASSES.index(class_name))
    else:
        written = write_cifar_folder(tmp_path / "train" if layout == "train_subfolder" else tmp_path)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), source="folder", num_val_samples=1, num_workers=0)
    dm.setup("fit")
    full = dm.train_dataset.dataset
    assert len(full) == len(written)
    for index, path in enumerate(full.files):
        pixels, label = written[path]
        image, got_label = full[index]
        assert image.dtype == torch.uint8 and torch.equal(image, torch.from_numpy(pixels).permute(2, 0, 1))
        assert got_label.dtype == torch.int64 and got_label == label


def test_cifar_folder_test_split_and_batches(tmp_path):
    write_cifar_folder(tmp_path / "train")
    written = write_cifar_folder(tmp_path / "test", classes=("dog",), per_class=3)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), source="folder", num_val_samples=2, batch_size=4, num_workers=0)
    dm.setup("test")
    x, y = all_batches(dm, dm.test_dataloader())
    assert x.shape == (3, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert y.tolist() == [CIFAR10_CLASSES.index("dog")] * 3
    assert torch.equal(x[0], as_float(written[dm.test_dataset.dataset.files[0]][0]))


def test_cifar_folder_with_unknown_class_names_the_file(tmp_path):
    write_image(tmp_path / "train" / "unicorn" / "0.png", make_image(0))
    dm = CIFAR10DataModule(data_dir=str(tmp_path), source="folder")
    with pytest.raises(ValueError, match=r"cannot tell the class of '.*unicorn/0\.png'"):
        dm.setup("fit")


@pytest.mark.parametrize("in_memory", [False, True])
def test_missing_and_empty_directories_name_the_path(tmp_path, in_memory):
    missing = tmp_path / "nowhere"
    for dm in (
        CIFAR10DataModule(data_dir=str(missing), source="folder", in_memory=in_memory),
        ImageNet64DataModule(data_dir=str(missing), in_memory=in_memory),
        ImageFolderDataModule(data_dir=str(tmp_path), in_memory=in_memory),
    ):
        if isinstance(dm, ImageFolderDataModule):
            missing = tmp_path  # exists but holds no image
        with pytest.raises(FileNotFoundError, match=re.escape(f"'{missing}'")):
            dm.setup("fit")
    with pytest.raises(FileNotFoundError, match=re.escape(f"data_dir '{missing / 'x'}' does not exist")):
        ImageFolderDataModule(data_dir=str(missing / "x"), class_cond=True)


def test_cifar_torchvision_source_without_data_or_network(tmp_path, monkeypatch):
    dm = CIFAR10DataModule(data_dir=str(tmp_path), source="torchvision", download=False)
    dm.prepare_data()  # download=False: nothing to fetch
    with pytest.raises(FileNotFoundError, match="no verified CIFAR-10 batches in .*download=True"):
        dm.setup("fit")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    with pytest.raises(RuntimeError, match=r"could not download CIFAR-10 into .*use source='folder'"):
        CIFAR10DataModule(data_dir=str(tmp_path), download=True).prepare_data()


def test_cifar_torchvision_source_reads_the_python_batches(tmp_path, monkeypatch):
    # Fake batches in torchvision's pickle layout; the md5 check is what would fail on them.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    images = {name: np.stack([make_image(10 * k + i) for i in range(4)]) for k, name in enumerate(
        ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"])}
    for k, (name, batch) in enumerate(images.items()):
        with open(folder / name, "wb") as handle:
            pickle.dump({"data": planar_rows(batch), "labels": [k, k, 9, 0]}, handle)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": list(CIFAR10_CLASSES)}, handle)

    for in_memory in (False, True):
        dm = CIFAR10DataModule(data_dir=str(tmp_path), download=False, num_val_samples=0, in_memory=in_memory,
                               num_workers=0)
        dm.setup("test")
        x, y = all_batches(dm, dm.test_dataloader())
        assert torch.equal(x[1], as_float(images["test_batch"][1])) and y.tolist() == [5, 5, 9, 0]
    dm.setup("fit")
    assert len(dm.train_dataset) == 20


def test_cifar_in_memory_equals_normal_mode(tmp_path):
    write_cifar_folder(tmp_path / "train", per_class=5)
    write_cifar_folder(tmp_path / "test", classes=("bird",), per_class=2)
    modules = [
        CIFAR10DataModule(data_dir=str(tmp_path), source="folder", num_val_samples=4, batch_size=3,
                          in_memory=in_memory, num_workers=0)
        for in_memory in (False, True)
    ]
    for dm in modules:
        dm.setup("fit")
        dm.setup("test")
    normal, held = modules
    assert isinstance(held.train_dataloader(), InMemoryLoader)
    assert held.train_dataset.indices == normal.train_dataset.indices
    for index in range(len(normal.train_dataset)):
        for a, b in zip(normal.train_dataset[index], held.train_dataset[index]):
            assert torch.equal(a, b)
    for name in ("val_dataloader", "test_dataloader"):
        for a, b in zip(all_batches(normal, getattr(normal, name)()), all_batches(held, getattr(held, name)())):
            assert torch.equal(a, b)
    # A training epoch holds the same images, in another order.
    epoch_normal = all_batches(normal, normal.train_dataloader())[0].flatten(1).sum(1)
    epoch_held = all_batches(held, held.train_dataloader())[0].flatten(1).sum(1)
    assert torch.equal(epoch_normal.sort()[0], epoch_held.sort()[0])


def test_worker_processes_give_the_same_batches(tmp_path):
    write_cifar_folder(tmp_path, per_class=3)
    batches = []
    for num_workers in (0, 2):
        dm = CIFAR10DataModule(data_dir=str(tmp_path), source="folder", num_val_samples=5, batch_size=2,
                               num_workers=num_workers)
        dm.setup("fit")
        batches.append(all_batches(dm, dm.val_dataloader()))
    assert all(torch.equal(a, b) for a, b in zip(*batches))


# ----------------------------------------------------------------------------- corrupt files


def test_unreadable_file_errors_at_setup_naming_it_or_is_skipped_with_a_count(tmp_path):
    write_cifar_folder(tmp_path / "train")
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"not an image at all")
    good_png = (tmp_path / "train" / "cat" / "0000.png").read_bytes()
    (tmp_path / "train" / "cat" / "cut.png").write_bytes(good_png[: len(good_png) // 2])
    with pytest.raises(ValueError, match=r"cannot read image '.*broken\.png'.*\(and 1 more\).*on_corrupt='skip'"):
        CIFAR10DataModule(data_dir=str(tmp_path), source="folder", num_val_samples=1).setup("fit")

    dm = CIFAR10DataModule(data_dir=str(tmp_path), source="folder", num_val_samples=1, on_corrupt="skip")
    with pytest.warns(UserWarning, match=r"skipped 2 of 14 unreadable image files \(first: '.*broken\.png'"):
        dm.setup("fit")
    assert len(dm.train_dataset.dataset) == 12
    assert not any(name.endswith(("broken.png", "cut.png")) for name in dm.train_dataset.dataset.files)


def write_truncated_jpeg(path: Path) -> None:
    """A JPEG whose header is intact but whose pixel data stops half way (passes the header check)."""
    write_image(path, make_image(99))
    data = path.read_bytes()
    start_of_scan = data.index(b"\xff\xda")
    path.write_bytes(data[: (start_of_scan + len(data)) // 2])


def test_damaged_pixel_data_is_named_when_decoded(tmp_path):
    write_cifar_folder(tmp_path / "train", classes=("cat",), per_class=3)
    write_truncated_jpeg(tmp_path / "train" / "cat" / "9999.jpg")
    dm = CIFAR10DataModule(data_dir=str(tmp_path), source="folder", num_val_samples=0, num_workers=0)
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"cannot decode image '.*9999\.jpg'"):
        all_batches(dm, dm.train_dataloader())
    # In in_memory mode every image is decoded in setup(), so the error comes there.
    with pytest.raises(ValueError, match=r"cannot read image '.*9999\.jpg'"):
        CIFAR10DataModule(data_dir=str(tmp_path), source="folder", in_memory=True, num_val_samples=0).setup("fit")
    held = CIFAR10DataModule(data_dir=str(tmp_path), source="folder", in_memory=True, num_val_samples=0,
                             on_corrupt="skip")
    with pytest.warns(UserWarning, match=r"skipped 1 of 4 unreadable image files"):
        held.setup("fit")
    assert len(held.train_dataset) == 3
    streamed = CIFAR10DataModule(data_dir=str(tmp_path), source="folder", num_val_samples=0, on_corrupt="skip",
                                 num_workers=0)
    streamed.setup("fit")
    with pytest.warns(UserWarning, match=r"9999\.jpg.*serving the next image"):
        x, _ = all_batches(streamed, streamed.train_dataloader())
    assert len(x) == 4


# ----------------------------------------------------------------------------- ImageNet 64x64 npz


@pytest.fixture
def imagenet_npz(tmp_path):
    """Two 10-row train archives (one without .npz), a val archive, with a known pixel pattern."""
    rows, h, w = 10, 64, 64
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    pictures = {}
    for number, name in ((2, "train_data_batch_2.npz"), (10, "train_data_batch_10"), (0, "val_data")):
        images = np.empty((rows, h, w, 3), dtype=np.uint8)
        for r in range(rows):
            images[r, ..., 0] = hh  # red: the row number
            images[r, ..., 1] = ww  # green: the column number
            images[r, ..., 2] = 10 * number + r  # blue: which image
        labels = np.arange(1, rows + 1) + (990 if number == 10 else 0)  # 1-based, up to 1000
        write_npz(tmp_path / name, data=planar_rows(images), labels=labels, mean=np.zeros(12288))
        pictures[number] = (images, labels)
    return tmp_path, pictures


def test_imagenet64_npz_decodes_channel_planar_rows_and_0_based_labels(imagenet_npz):
    data_dir, pictures = imagenet_npz
    dm = ImageNet64DataModule(data_dir=str(data_dir), num_val_samples=4, batch_size=6, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    full = dm.train_dataset.dataset
    assert len(full) == 20 and len(dm.train_dataset) == 16
    # Archives in numeric order: batch 2 before batch 10.
    for index, (number, row) in enumerate([(2, r) for r in range(10)] + [(10, r) for r in range(10)]):
        image, label = full[index]
        assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
        assert torch.equal(image, torch.from_numpy(pictures[number][0][row]).permute(2, 0, 1))
        assert label == pictures[number][1][row] - 1
    assert full[19][1] == 999
    x, y = all_batches(dm, dm.test_dataloader())
    assert x.shape == (10, 3, 64, 64) and y.tolist() == list(range(10))
    assert x[3, 0, 5, 0] == 5 / 127.5 - 1 and x[3, 1, 0, 7] == 7 / 127.5 - 1 and x[3, 2, 0, 0] == 3 / 127.5 - 1


def test_imagenet64_npz_is_converted_once_and_memory_mapped(imagenet_npz, tmp_path_factory):
    data_dir, _ = imagenet_npz
    cache = tmp_path_factory.mktemp("cache")
    dm = ImageNet64DataModule(data_dir=str(data_dir), cache_dir=str(cache), num_val_samples=2)
    dm.prepare_data()
    cached = sorted(path.name for path in cache.iterdir())
    assert cached == sorted(f"{stem}.{kind}.npy" for stem in ("train_data_batch_2", "train_data_batch_10", "val_data")
                            for kind in ("data", "labels"))
    stamps = {path: path.stat().st_mtime_ns for path in cache.iterdir()}
    dm.setup("fit")
    assert {path: path.stat().st_mtime_ns for path in cache.iterdir()} == stamps  # not converted again
    full = dm.train_dataset.dataset
    full[0]
    assert all(isinstance(array, np.memmap) for array in full._arrays)
    assert pickle.loads(pickle.dumps(full))._arrays is None  # workers reopen the maps, no copy
    in_memory = ImageNet64DataModule(data_dir=str(data_dir), cache_dir=str(cache), num_val_samples=2, in_memory=True)
    in_memory.setup("fit")
    assert torch.equal(in_memory.train_dataset.dataset.images[13], full[13][0])


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"data": np.zeros((3, 12288), np.uint8)}, r"missing 'data' or 'labels'"),
        ({"images": np.zeros((3, 12288), np.uint8), "labels": np.ones(3, int)}, r"missing 'data' or 'labels'"),
        ({"data": np.zeros((3, 3072), np.uint8), "labels": np.ones(3, int)}, r"'data' uint8 \(3, 3072\)"),
        ({"data": np.zeros((3, 12288), np.float32), "labels": np.ones(3, int)}, r"'data' float32"),
        ({"data": np.zeros((3, 12288), np.uint8), "labels": np.ones(4, int)}, r"3 'data' rows but 4 'labels'"),
        ({"data": np.zeros((3, 12288), np.uint8), "labels": np.array([1, 0, 2])}, r"label 0 outside 1\.\.1000"),
        ({"data": np.zeros((3, 12288), np.uint8), "labels": np.array([1, 1001, 2])}, r"label 1001 outside 1\.\.1000"),
    ],
)
def test_imagenet64_wrong_npz_layout_names_the_file_and_the_layout(tmp_path, arrays, message):
    write_npz(tmp_path / "train_data_batch_1", **arrays)
    dm = ImageNet64DataModule(data_dir=str(tmp_path), num_val_samples=1)
    with pytest.raises(ValueError, match=re.escape(f"'{tmp_path / 'train_data_batch_1'}'") + ".*" + message):
        dm.setup("fit")


def test_imagenet64_layout_error_states_the_expected_layout(tmp_path):
    (tmp_path / "train_data_batch_1.npz").write_bytes(pickle.dumps({"data": 1}))
    with pytest.raises(ValueError, match=r"not an npz \(zip\) archive; expected an npz archive with 'data' "
                                         r"\[N, 12288\] uint8 rows \(channel-planar 3x64x64\)"):
        ImageNet64DataModule(data_dir=str(tmp_path)).prepare_data()


def test_imagenet64_folder_source(tmp_path):
    for split, count in (("train", 3), ("val", 1)):
        for wnid in ("n01440764", "n01443537"):
            for n in range(count):
                write_image(tmp_path / split / wnid / f"{n}.png", make_image(n, size=80))
    dm = ImageNet64DataModule(data_dir=str(tmp_path), source="folder", num_val_samples=2, num_workers=0)
    dm.setup("fit")
    dm.setup("test")
    assert sorted(dm.train_dataset.dataset.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    x, y = all_batches(dm, dm.test_dataloader())
    assert x.shape == (2, 3, 64, 64) and y.tolist() == [0, 1]


# ----------------------------------------------------------------------------- image folder


def test_image_folder_resizes_shorter_side_and_centre_crops(tmp_path):
    # 48x24 with dark outer sixths: the centre crop (columns 12..36 before resizing) is white, a left one is not.
    wide = np.zeros((24, 48, 3), dtype=np.uint8)
    wide[:, 8:40] = 255
    write_image(tmp_path / "nested" / "deeper" / "wide.webp", wide)
    write_image(tmp_path / "tall.jpg", np.full((40, 20, 3), 128, dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("not an image, not scanned")
    dm = ImageFolderDataModule(data_dir=str(tmp_path), image_size=16, num_val_samples=0, random_flip=False)
    dm.setup("fit")
    assert [Path(name).name for name in dm.train_dataset.dataset.files] == ["tall.jpg", "wide.webp"]
    wide_image, label = dm.train_dataset.dataset[1]
    assert wide_image.shape == (3, 16, 16) and label == 0
    assert wide_image.min() >= 245  # lossy webp: near white
    tall_image, _ = dm.train_dataset.dataset[0]
    assert tall_image.shape == (3, 16, 16) and (tall_image.int() - 128).abs().max() <= 2


def test_image_folder_class_cond_labels_from_first_level_folders(tmp_path):
    write_image(tmp_path / "zebra" / "a.png", make_image(0, 8))
    write_image(tmp_path / "apple" / "sub" / "b.png", make_image(1, 8))
    write_image(tmp_path / "apple" / "c.jpeg", make_image(2, 8))
    dm = ImageFolderDataModule(data_dir=str(tmp_path), image_size=8, class_cond=True, num_val_samples=1)
    assert dm.num_classes == 2
    dm.setup("fit")
    labels = dict(zip((Path(f).name for f in dm.train_dataset.dataset.files), dm.train_dataset.dataset.labels))
    assert labels == {"c.jpeg": 0, "b.png": 0, "a.png": 1}
    write_image(tmp_path / "stray.png", make_image(3, 8))
    with pytest.raises(ValueError, match=r"'.*stray\.png' is not inside one of the 2 class subfolders"):
        ImageFolderDataModule(data_dir=str(tmp_path), image_size=8, class_cond=True, num_val_samples=1).setup("fit")


# ----------------------------------------------------------------------------- in-memory loader: sharding, epochs


def indexed_dataset(count: int) -> TensorImageDataset:
    """Images whose single pixel value is their own index, so batches reveal which samples they hold."""
    images = torch.arange(count, dtype=torch.uint8).reshape(count, 1, 1, 1)
    return TensorImageDataset(images, torch.arange(count))


def yielded(loader) -> list[int]:
    return [int(v) for images, labels in loader for v in images.flatten()]


@pytest.mark.parametrize("count", [20, 21])
def test_in_memory_sharding_gives_disjoint_covering_sets(count):
    dataset = indexed_dataset(count)
    indices = list(range(count))
    shards = [yielded(InMemoryLoader(dataset, indices, 4, shuffle=True, rank=rank, world_size=2, seed=7))
              for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == (count + 1) // 2  # equal, or DDP ranks would hang
    assert set(shards[0]) | set(shards[1]) == set(indices)
    if count % 2 == 0:
        assert set(shards[0]).isdisjoint(shards[1])
    else:  # one sample repeats to even out the ranks, as DistributedSampler does
        assert len(set(shards[0]) & set(shards[1])) <= 1


def test_datamodule_in_memory_loader_uses_trainer_rank_and_world_size():
    shards = []
    for rank in (0, 1):
        dm = DigitsDataModule(in_memory=True, batch_size=100)
        dm.setup("fit")
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        loader = dm.train_dataloader()
        shards.append([dm.train_dataset.indices[position] for position in loader.sampler])
        assert sum(len(labels) for _, labels in loader) == 800
    assert set(shards[0]).isdisjoint(shards[1]) and set(shards[0]) | set(shards[1]) == set(dm.train_dataset.indices)


@pytest.mark.parametrize("in_memory", [True, False])
def test_training_drops_the_short_last_batch_and_validation_keeps_it(in_memory):
    dm = DigitsDataModule(in_memory=in_memory, batch_size=64, num_val_samples=100)
    dm.setup("fit")
    train = [len(labels) for _, labels in dm.train_dataloader()]
    assert len(dm.train_dataset) % 64 and train == [64] * (len(dm.train_dataset) // 64) == [64] * len(dm.train_dataloader())
    assert sum(len(labels) for _, labels in dm.val_dataloader()) == 100


def test_in_memory_data_moves_to_the_trainers_accelerator():
    # "meta" stands in for a CUDA device: setup() must move the tensor to the strategy's root device.
    dm = DigitsDataModule(in_memory=True, batch_size=32)
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("meta")), global_rank=0,
                                 world_size=1)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert dm.train_dataset.dataset.images.device.type == "meta"
    assert images.device.type == labels.device.type == "meta" and images.shape == (32, 1, 16, 16)


def test_loaders_need_setup_and_digits_has_no_test_split():
    dm = DigitsDataModule()
    with pytest.raises(RuntimeError, match=r"call setup\('fit'\) before"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match="DigitsDataModule: this dataset has no test split"):
        dm.setup("test")


def test_in_memory_reshuffles_each_epoch_deterministically():
    dataset = indexed_dataset(50)
    loader = InMemoryLoader(dataset, range(50), 8, shuffle=True, seed=3)
    first = yielded(loader)
    assert yielded(loader) == first and sorted(first) == list(range(50)) and first != sorted(first)
    loader.sampler.set_epoch(1)
    second = yielded(loader)
    assert second != first and sorted(second) == list(range(50))
    other = InMemoryLoader(dataset, range(50), 8, shuffle=True, seed=3)
    other.sampler.set_epoch(1)
    assert yielded(other) == second
    assert yielded(InMemoryLoader(dataset, range(50), 8, shuffle=False)) == list(range(50))


# ----------------------------------------------------------------------------- with a real Lightning Trainer


class Recorder(L.LightningModule):
    """A do-nothing module that records the batches Lightning hands it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.train_batches: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.val_batches: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        images, labels = batch
        self.train_batches.append((self.current_epoch, images, labels))
        return (self.weight * images.mean()) ** 2

    def validation_step(self, batch, batch_idx):
        self.val_batches.append(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("in_memory", [False, True])
def test_trainer_sees_float_batches_flipped_in_training_only(tmp_path, in_memory):
    write_cifar_folder(tmp_path, classes=("cat", "dog"), per_class=6)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), source="folder", num_val_samples=4, batch_size=4,
                           in_memory=in_memory, random_flip=True, num_workers=0)
    model = Recorder()
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer.fit(model, datamodule=dm)

    originals = {}
    for index in dm.train_dataset.indices:
        image, _ = dm.train_dataset.dataset[index]
        originals[index] = image.float() / 127.5 - 1
    train_images = [image for _, images, labels in model.train_batches for image in images]
    assert all(image.dtype == torch.float32 and -1 <= image.min() and image.max() <= 1 for image in train_images)
    assert all(labels.dtype == torch.int64 for _, _, labels in model.train_batches)
    assert len(train_images) == 2 * 8
    matches = [[(i, torch.equal(image, o)) for i, o in originals.items() if torch.equal(image, o)
                or torch.equal(image, o.flip(-1))] for image in train_images]
    assert all(len(match) == 1 for match in matches)
    assert any(not match[0][1] for match in matches)  # some were flipped
    # Each epoch covers the training split once, in a new order.
    order = [match[0][0] for match in matches]
    assert sorted(order[:8]) == sorted(order[8:]) == sorted(originals) and order[:8] != order[8:]
    # Validation images are never flipped.
    val_expected = torch.stack([dm.val_dataset.dataset[i][0].float() / 127.5 - 1 for i in dm.val_dataset.indices])
    assert torch.equal(torch.cat(model.val_batches[:1]), val_expected)


@pytest.mark.filterwarnings("ignore:Total length of `list` across ranks is zero")
def test_trainer_runs_without_validation_split():
    dm = DigitsDataModule(num_val_samples=0, batch_size=512)
    model = Recorder()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert len(model.train_batches) == 1797 // 512 and model.val_batches == []  # the short last batch is dropped


def test_global_batch_size_is_split_over_processes_and_accumulation():
    from types import SimpleNamespace

    dm = DigitsDataModule(image_size=8, global_batch_size=128)
    dm.trainer = SimpleNamespace(world_size=4, accumulate_grad_batches=2, global_rank=0)
    assert dm.device_batch_size() == 16
    dm.trainer = SimpleNamespace(world_size=3, accumulate_grad_batches=1, global_rank=0)
    with pytest.raises(ValueError, match="global_batch_size=128 is not divisible by 3 processes x 1 accumulation"):
        dm.device_batch_size()
    plain = DigitsDataModule(image_size=8, batch_size=24, global_batch_size=None)
    assert plain.device_batch_size() == 24
    dm.trainer = None
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))[0].shape[0] == 128
