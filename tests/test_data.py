"""Data sets: the fixed digits split, and tiny CIFAR / DVS layouts loaded through the real code paths."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from spkprune.data import dataset_info, get_dataset, make_loader
from spkprune.errors import SpkpruneError

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ digits
def test_digits_split_is_fixed_stratified_and_normalised():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    train, test = get_dataset("digits", "train"), get_dataset("digits", "test")
    assert (len(train), len(test)) == (1437, 360)
    bunch = load_digits()
    test_counts = np.bincount(test.targets.numpy(), minlength=10)
    # Stratified: every class is within one sample of its 20% share.
    assert np.all(np.abs(test_counts - 0.2 * np.bincount(bunch.target)) <= 1)
    assert test_counts.tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
    # Fixed: the seed-0 stratified 80/20 split, scaled to [0, 1] and normalised with the train statistics.
    raw = bunch.images.astype(np.float32) / 16.0
    idx_train, idx_test = train_test_split(
        np.arange(len(raw)), test_size=0.2, random_state=0, stratify=bunch.target
    )
    mean, std = raw[idx_train].mean(), raw[idx_train].std()
    torch.testing.assert_close(test.images, torch.from_numpy((raw[idx_test] - mean) / std)[:, None])
    assert test.targets.tolist() == bunch.target[idx_test].tolist()
    assert abs(float(train.images.mean())) < 1e-5 and float(train.images.std()) == pytest.approx(1.0, abs=1e-4)
    image, label = test[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32 and label == int(bunch.target[idx_test[0]])


def test_digits_augmentation_shifts_but_keeps_shape():
    torch.manual_seed(0)
    data = get_dataset("digits", "train", augment=True)
    plain = get_dataset("digits", "train")
    shifted = [data[i][0] for i in range(20)]
    assert all(s.shape == (1, 8, 8) for s in shifted)
    assert any(not torch.equal(s, plain[i][0]) for i, s in enumerate(shifted))


def test_unknown_dataset_and_split():
    with pytest.raises(SpkpruneError, match="unknown dataset 'mnist'"):
        get_dataset("mnist", "train")
    with pytest.raises(SpkpruneError, match="unknown split"):
        get_dataset("digits", "val")


def test_loader_is_seeded():
    data = get_dataset("digits", "test")
    first = [t.tolist() for _, t in make_loader(data, 50, train=True, seed=7)]
    second = [t.tolist() for _, t in make_loader(data, 50, train=True, seed=7)]
    other = [t.tolist() for _, t in make_loader(data, 50, train=True, seed=8)]
    assert first == second and first != other
    assert len(first) == 7  # 360 // 50, the partial batch dropped for training


# ------------------------------------------------------------------------------------------------- CIFAR
def _write_batch(path, images, labels, label_key):
    with open(path, "wb") as f:
        pickle.dump({b"data": images.reshape(len(images), -1), label_key: list(labels), b"batch_label": b"x"}, f)


def _fake_cifar10(root):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        _write_batch(folder / f"data_batch_{i}", rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8), [i, i + 1], b"labels")
    test_images = rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    _write_batch(folder / "test_batch", test_images, [7, 8, 9], b"labels")
    return test_images


def test_cifar10_python_layout_loads_and_normalises(tmp_path):
    test_images = _fake_cifar10(tmp_path)
    train = get_dataset("cifar10", "train", data_dir=tmp_path)
    test = get_dataset("cifar10", "test", data_dir=tmp_path / "cifar-10-batches-py")  # the folder itself works too
    assert len(train) == 10 and train.targets.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    image, label = test[1]
    mean = torch.tensor([0.4914, 0.4822, 0.4465])[:, None, None]
    std = torch.tensor([0.2470, 0.2435, 0.2616])[:, None, None]
    expected = (torch.from_numpy(test_images[1]).float() / 255.0 - mean) / std
    assert label == 8 and image.shape == (3, 32, 32)
    torch.testing.assert_close(image, expected)


def test_cifar_training_augmentation_runs(tmp_path):
    _fake_cifar10(tmp_path)
    torch.manual_seed(0)
    train = get_dataset("cifar10", "train", data_dir=tmp_path, augment=True)
    plain = get_dataset("cifar10", "train", data_dir=tmp_path)
    batch = [train[i % 10][0] for i in range(30)]
    assert all(x.shape == (3, 32, 32) and x.dtype == torch.float32 for x in batch)
    assert any(not torch.equal(x, plain[i % 10][0]) for i, x in enumerate(batch))


def test_cifar100_layout(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    images = np.arange(2 * 3 * 32 * 32, dtype=np.int64).astype(np.uint8).reshape(2, 3, 32, 32)
    _write_batch(folder / "train", images, [42, 99], b"fine_labels")
    _write_batch(folder / "test", images[:1], [5], b"fine_labels")
    train = get_dataset("cifar100", "train", data_dir=tmp_path)
    assert train.targets.tolist() == [42, 99] and len(get_dataset("cifar100", "test", data_dir=tmp_path)) == 1
    assert dataset_info("cifar100").num_classes == 100


def test_missing_cifar_says_what_to_put_where(tmp_path):
    with pytest.raises(SpkpruneError, match="cifar10 needs --data-dir DIR containing cifar-10-batches-py"):
        get_dataset("cifar10", "train")
    with pytest.raises(SpkpruneError, match=r"lacks data_batch_1, .*data_batch_5.*cifar-10-python.tar.gz") as err:
        get_dataset("cifar10", "train", data_dir=tmp_path)
    assert "\n" not in str(err.value)
    _fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(SpkpruneError, match="lacks test_batch"):
        get_dataset("cifar10", "test", data_dir=tmp_path)


# --------------------------------------------------------------------------------------------------- DVS
def _write_frames(folder, count, T, size, start=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        frames = np.full((T, 2, size, size), start + i, dtype=np.float32)
        np.savez_compressed(folder / f"sample_{i:03d}.npz", frames=frames)


def test_cifar10_dvs_frame_cache_loads_with_per_class_split(tmp_path):
    from spikingjelly.datasets.cifar10_dvs import CIFAR10DVS_CLASS_NAMES

    cache = tmp_path / "frames_number_4_split_by_number"
    for label, cls in enumerate(CIFAR10DVS_CLASS_NAMES):
        _write_frames(cache / cls, 10, 4, 16, start=100 * label)
    train = get_dataset("cifar10-dvs", "train", data_dir=tmp_path, timesteps=4)
    test = get_dataset("cifar10-dvs", "test", data_dir=tmp_path, timesteps=4)
    assert (len(train), len(test)) == (90, 10)
    assert torch.bincount(train.targets).tolist() == [9] * 10 and torch.bincount(test.targets).tolist() == [1] * 10
    frames, label = test[3]
    # The last (10th) sample of each class is held out; frames are resized from 16x16 to 128x128.
    assert frames.shape == (4, 2, 128, 128) and label == 3
    assert torch.all(frames == 309.0)
    assert torch.all(train[0][0] == 0.0)


def test_cifar10_dvs_builds_frames_from_events(tmp_path):
    """spikingjelly's own integration step runs on raw events under events_np/ (no download, no raw archives)."""
    rng = np.random.default_rng(0)
    for cls in ("airplane", "automobile"):
        folder = tmp_path / "events_np" / cls
        folder.mkdir(parents=True)
        for i in range(10):
            n = 200
            np.savez(folder / f"{cls}_{i}.npz", t=np.sort(rng.integers(0, 10_000, n)), x=rng.integers(0, 128, n),
                     y=rng.integers(0, 128, n), p=rng.integers(0, 2, n))
    train = get_dataset("cifar10-dvs", "train", data_dir=tmp_path, timesteps=2)
    frames, label = train[0]
    assert len(train) == 18 and frames.shape == (2, 2, 128, 128) and label == 0
    assert float(frames.sum()) == 200.0  # every event lands in exactly one frame
    assert (tmp_path / "frames_number_2_split_by_number").is_dir()


def test_dvs128_gesture_train_and_test_folders(tmp_path):
    cache = tmp_path / "frames_number_4_split_by_number"
    for label in range(11):
        _write_frames(cache / "train" / str(label), 2, 4, 128, start=label)
        _write_frames(cache / "test" / str(label), 1, 4, 128, start=label)
    torch.manual_seed(0)
    train = get_dataset("dvs128-gesture", "train", data_dir=tmp_path, timesteps=4, augment=True)
    test = get_dataset("dvs128-gesture", "test", data_dir=tmp_path, timesteps=4)
    assert (len(train), len(test)) == (22, 11)
    frames, label = test[0]
    assert frames.shape == (4, 2, 128, 128) and torch.all(frames == float(int(test.folder.classes[label])))
    assert train[5][0].shape == (4, 2, 128, 128)


@pytest.mark.parametrize("name", ["cifar10-dvs", "dvs128-gesture"])
def test_missing_dvs_data_never_downloads(tmp_path, name):
    with pytest.raises(SpkpruneError, match="events_np") as err:
        get_dataset(name, "train", data_dir=tmp_path, timesteps=4)
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing created, nothing downloaded
    with pytest.raises(SpkpruneError, match="does not exist"):
        get_dataset(name, "train", data_dir=tmp_path / "nope", timesteps=4)
    with pytest.raises(SpkpruneError, match="needs --data-dir"):
        get_dataset(name, "train", timesteps=4)


def test_imagenet_reads_a_local_image_folder(tmp_path):
    from PIL import Image

    from spkprune.data import dataset_info, get_dataset

    for split in ("train", "val"):
        for wnid, colour in (("n01440764", (255, 0, 0)), ("n01443537", (0, 0, 255))):
            folder = tmp_path / split / wnid
            folder.mkdir(parents=True)
            Image.new("RGB", (40, 30), colour).save(folder / "a.JPEG", format="JPEG")
    test = get_dataset("imagenet", "test", tmp_path)
    image, label = test[1]
    assert image.shape == (3, 224, 224) and label == 1 and dataset_info("imagenet").num_classes == 1000
    assert image[2].mean() > image[0].mean()  # the blue class: normalised blue above red
    train = get_dataset("imagenet", "train", tmp_path, augment=True)
    assert train[0][0].shape == (3, 224, 224) and len(train) == 2


def test_imagenet_without_its_folders_says_where_to_put_them(tmp_path):
    import pytest as _pytest

    from spkprune.data import get_dataset
    from spkprune.errors import SpkpruneError

    with _pytest.raises(SpkpruneError, match="ImageFolder layout"):
        get_dataset("imagenet", "train", tmp_path)
    with _pytest.raises(SpkpruneError, match="--data-dir"):
        get_dataset("imagenet", "train", None)
