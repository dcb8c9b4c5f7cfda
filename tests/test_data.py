"""Data sets: the fixed digits split, and tiny CIFAR / DVS layouts loaded through the real code paths."""

from __future__ import annotations

import pickle
import pickletools
import struct

import numpy as np
import pytest
import torch

from spkprune.data import dataset_info, get_dataset, make_loader
from spkprune.data.safe_pickle import _reconstruct
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
class _Python2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the original CIFAR files (protocol 2): every string as a Python 2
    `str` opcode (read back as bytes with encoding="bytes") and numpy 1's `numpy.core.multiarray._reconstruct`."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        data = obj.encode("ascii") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str

    def save_global(self, obj, name=None):
        if obj is _reconstruct:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def _cifar_entry(images, labels, label_key) -> dict:
    """A batch dict with every key of the original files (CIFAR-100's also has coarse labels)."""
    entry = {
        b"batch_label": b"testing batch 1 of 1",
        b"data": images.reshape(len(images), -1),
        label_key: list(labels),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(images))],
    }
    if label_key == b"fine_labels":
        entry[b"coarse_labels"] = [label // 5 for label in labels]
    return entry


def _write_batch(path, images, labels, label_key, style="python2"):
    entry = _cifar_entry(images, labels, label_key)
    with open(path, "wb") as f:
        if style == "python2":
            _Python2Pickler(f, protocol=2).dump(entry)
        else:  # "python3": what pickle.dump(entry, f, protocol=2) writes today (bytes through _codecs.encode)
            pickle.dump(entry, f, protocol=2)


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


@pytest.mark.parametrize("style", ["python2", "python3"])
def test_cifar100_layout(tmp_path, style):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    images = np.arange(2 * 3 * 32 * 32, dtype=np.int64).astype(np.uint8).reshape(2, 3, 32, 32)
    _write_batch(folder / "train", images, [42, 99], b"fine_labels", style)
    _write_batch(folder / "test", images[:1], [5], b"fine_labels", style)
    train = get_dataset("cifar100", "train", data_dir=tmp_path)
    assert train.targets.tolist() == [42, 99] and len(get_dataset("cifar100", "test", data_dir=tmp_path)) == 1
    assert torch.equal(train.images, torch.from_numpy(images))
    assert dataset_info("cifar100").num_classes == 100


def _globals(path) -> set[str]:
    """The module.name pairs a pickle file names (GLOBAL and STACK_GLOBAL)."""
    ops = list(pickletools.genops(path.read_bytes()))
    named = {arg.replace(" ", ".") for op, arg, _ in ops if op.name == "GLOBAL"}
    strings = [arg for op, arg, _ in ops if "UNICODE" in op.name]
    return named | {f"{a}.{b}" for a, b in zip(strings, strings[1:]) if any(op.name == "STACK_GLOBAL" for op, _, _ in ops)}


@pytest.mark.parametrize("name,label_key", [("cifar10", b"labels"), ("cifar100", b"fine_labels")])
def test_real_format_batches_load_with_only_numpy_array_reconstruction(tmp_path, name, label_key):
    """Files as the official archives hold them: Python 2 protocol-2 pickles of str-keyed dicts with a uint8 array."""
    folder = tmp_path / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir()
    test_file = folder / ("test_batch" if name == "cifar10" else "test")
    images = np.random.default_rng(3).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8)
    _write_batch(test_file, images, [3, 1, 4, 1], label_key)
    assert test_file.read_bytes()[:2] == b"\x80\x02"  # protocol 2
    assert _globals(test_file) == {"numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype"}
    data = get_dataset(name, "test", data_dir=tmp_path)
    assert torch.equal(data.images, torch.from_numpy(images)) and data.targets.tolist() == [3, 1, 4, 1]


class _Payload:
    """Pickles as a call of `func(*args)`: what a crafted batch file runs under plain pickle.load."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker):
    import builtins
    import os
    import subprocess

    return {
        "os.system": _Payload(os.system, f"touch {marker}"),
        "builtins.eval": _Payload(builtins.eval, f"open({str(marker)!r}, 'w')"),
        "builtins.exec": _Payload(builtins.exec, f"open({str(marker)!r}, 'w')"),
        "subprocess.check_call": _Payload(subprocess.check_call, ["touch", str(marker)]),
        "builtins.getattr": _Payload(getattr, np.ndarray, "tofile"),  # a gadget chain through an allowed class
    }


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "builtins.exec", "subprocess.check_call",
                                     "builtins.getattr"])
@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_a_reduce_payload_in_a_batch_file_is_refused_without_running(tmp_path, payload, protocol):
    marker = tmp_path / "pwned"
    _fake_cifar10(tmp_path)
    test_batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    images = np.zeros((1, 3072), dtype=np.uint8)
    entry = {b"data": images, b"labels": [0], b"batch_label": _payloads(marker)[payload]}  # hidden among real keys
    test_batch.write_bytes(pickle.dumps(entry, protocol=protocol))
    with pytest.raises(SpkpruneError) as err:
        get_dataset("cifar10", "test", data_dir=tmp_path)
    message = str(err.value)
    assert not marker.exists()
    assert "\n" not in message and str(test_batch) in message
    assert "refused without running it" in message and "re-download" in message
    assert err.value.__cause__ is None and err.value.__suppress_context__
    if payload != "builtins.getattr":  # the control: plain pickle.load does run it
        pickle.loads(test_batch.read_bytes())
        assert marker.exists()


def test_a_codec_other_than_latin1_is_refused(tmp_path):
    _fake_cifar10(tmp_path)
    test_batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    # _codecs.encode is allowed only as protocol-2 pickles use it for bytes; any other codec is refused.
    test_batch.write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x06\x00\x00\x00base64\x86R.")
    with pytest.raises(SpkpruneError, match=r"test_batch is not a CIFAR python batch file .*codec 'base64'"):
        get_dataset("cifar10", "test", data_dir=tmp_path)


@pytest.mark.parametrize("content", [b"", b"\x00" * 10, bytes(range(256)) * 4, b"\x80\x02}q\x00(U\x04data"])
def test_random_or_truncated_batch_files_are_one_line_errors(tmp_path, content):
    _fake_cifar10(tmp_path)
    test_batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    test_batch.write_bytes(content)
    with pytest.raises(SpkpruneError, match=r"test_batch is not a CIFAR python batch file .*re-download "
                                            r"https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz") as err:
        get_dataset("cifar10", "test", data_dir=tmp_path)
    assert "\n" not in str(err.value)


def test_a_batch_that_is_not_a_dict_is_a_one_line_error(tmp_path):
    _fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(SpkpruneError, match=r"not a CIFAR python batch file \(it holds a list\)"):
        get_dataset("cifar10", "test", data_dir=tmp_path)


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


def test_event_frames_come_at_the_model_size_and_a_smaller_model_fits(tmp_path):
    """The Spike-driven Transformer's CIFAR10-DVS models take 64x64 frames: 128x128 frames are area-pooled."""
    from spikingjelly.datasets.cifar10_dvs import CIFAR10DVS_CLASS_NAMES

    from spkprune.models import create_model
    from spkprune.training.datasets import check_compatible

    cache = tmp_path / "frames_number_10_split_by_number"
    for label, cls in enumerate(CIFAR10DVS_CLASS_NAMES):
        folder = cache / cls
        folder.mkdir(parents=True)
        frames = np.zeros((10, 2, 128, 128), dtype=np.float32)
        frames[:, :, :2, :2] = [[1.0, 2.0], [3.0, 6.0]]  # one 2x2 patch: its mean (3) is the 64x64 frame's [0, 0]
        np.savez_compressed(folder / "sample_000.npz", frames=frames)
        np.savez_compressed(folder / "sample_001.npz", frames=frames)
    test = get_dataset("cifar10-dvs", "test", data_dir=tmp_path, timesteps=10, img_size=64)
    frames, _ = test[0]
    assert frames.shape == (10, 2, 64, 64) and frames[0, 0, 0, 0] == 3.0 and frames[0, 0, 0, 1] == 0.0
    with torch.device("meta"):
        check_compatible(create_model("sdt-2-256-cifar10dvs"), "cifar10-dvs")  # 64 < 128: fits
    assert get_dataset("digits", "test", img_size=4)[0][0].shape == (1, 8, 8)  # digits are not resized


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
