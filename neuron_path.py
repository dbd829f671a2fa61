"""
Influential neuron paths in Vision Transformers: a small ViT, the joint attribution score, the
layer-progressive path search, four baselines and the paper's four evaluations, in one file.

Paper: "Discovering Influential Neuron Path in Vision Transformers", Wang et al., ICLR 2025,
arXiv 2503.09046 (https://arxiv.org/abs/2503.09046). Official code: foundation-model-research/
NeuronPath @ 5f93d0b. The arithmetic follows the official code (docs/neuron_path.md):
  neuron = one post-GELU MLP hidden unit of one block, at the CLS token (row 0);
  path   = one neuron per layer (an L-tuple), found greedily, layer by layer (Alg. 1);
  JAS    = integrated gradients of p(true class) along a joint scaling of the chosen neurons
           (Eq. 2/3), m left-Riemann steps, the other CLS neurons of visited layers clamped.
Sections: config -> utilities -> ViT -> ALGO (scaled run, JAS, greedy search, baselines) ->
evaluations (edit, class level, pruning) -> training and checkpoints -> plots -> bench -> main.
Dimension letters: B batch, T tokens (N patches + CLS), C n_embd, H MLP width (neurons per layer),
L layers, m Riemann steps, K neurons kept per layer, nh heads, hs head size.

Run:
  python neuron_path.py                                  # CIFAR-10 ViT: train (or reuse), analyse
  python neuron_path.py --preset=tiny --device=cpu       # about a minute on a CPU
  python neuron_path.py --dataset=mnist --preset=tiny --device=cpu     # the same on MNIST
  python neuron_path.py --preset=mnist_cpu --device=cpu  # MNIST results of docs/neuron_path.md
  python neuron_path.py --model=vit_b_16 --dataset=imagefolder:data/imagenette2-160.tgz
  python neuron_path.py --bench=True --model=vit_b_16 --weights=random  # path-search speed (GPU)
Expected (H100): the target is >= 80% CIFAR-10 test accuracy and the whole default run within
5 minutes; measured 78.3% after 50 epochs (docs/neuron_path.md, Results).
"""
import argparse
import hashlib
import inspect
import json
import math
import os
import random
import re
import sys
import time
import urllib.request
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from einops.layers.torch import Rearrange

import data

# -----------------------------------------------------------------------------
# Config

@dataclass
class Config:
    # model
    model: str = "vit_cifar"  # vit_cifar (trained here) | vit_b_16 (torchvision ImageNet weights)
    image_size: int = 0  # input side in pixels; 0 = the data's (cifar10 32, mnist 28, folders 32)
    patch_size: int = 4  # patch side; image_size must be divisible by it
    n_layer: int = 6  # blocks (= path length L)
    n_head: int = 8  # attention heads
    n_embd: int = 256  # width C
    mlp_ratio: int = 4  # MLP width H = mlp_ratio * n_embd: the candidate neurons per layer
    n_class: int = 10  # classes; must equal the data's (vit_b_16: 1000)
    dropout: float = 0.0  # dropout while training (attribution always runs in eval mode)
    weights: str = ""  # vit_b_16: .pth path, '' = download torchvision's, 'random' = random init
    # data
    dataset: str = "auto"  # auto (cifar10) | cifar10 | mnist | fashion_mnist | imagefolder:PATH
    n_train: int = 0  # training images used (0 = all)
    # train (vit_cifar only)
    epochs: int = 50  # training epochs; raising it over a finished model continues training
    batch_size: int = 512  # training batch
    lr: float = 1e-3  # AdamW peak lr (1e-3 .. 3e-3)
    weight_decay: float = 0.05  # AdamW weight decay
    warmup_epochs: int = 2  # linear warmup (times the cosine to 0 that spans the whole run)
    label_smoothing: float = 0.1  # cross-entropy label smoothing
    retrain: bool = False  # train from scratch, overwriting the checkpoint in out_dir (unread)
    # method
    m: int = 20  # Riemann steps of the integrated gradients (paper: 20)
    jas_form: str = "code"  # code = official 'product of sums' | ig = textbook sum of products
    no_clamp: bool = False  # ablation: let non-path CLS neurons of visited layers recompute
    n_images: int = 1000  # test images analysed (balanced over classes)
    path_batch: int = 50  # images per search batch; one pass holds m * path_batch rows
    topk: str = "1,5,10"  # K values for the pruning evaluation
    prune_fracs: str = "0.1,0.3,0.5,1.0"  # fractions of the other CLS neurons zeroed, all layers
    fit_frac: float = 0.8  # share of each class's images used to fit its mode path
    precision: str = "fp32"  # attribution numerics: fp32 | tf32 | bf16 (autocast)
    recheck: float = 0.005  # bf16: rescore rows whose top gap < recheck x |top| in tf32 (0 = off)
    # system
    preset: str = ""  # '' | tiny (CPU, about a minute) | mnist_cpu (CPU, about 20 min; docs)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: int = 0  # CPU threads for torch; 0 = 1 (fastest for the small presets, see docs)
    seed: int = 42
    compile: bool = False  # torch.compile the model for training; the bench compiles attention
    bench: bool = False  # only time the path search on random images and exit
    bench_images: int = 40  # images per precision in the bench
    out_dir: str = ""  # '' = out/neuron_path/<dataset>[_<preset>]
    plot: bool = True
    log_interval: int = 50  # training steps between progress lines

PRESETS = {
    "tiny": dict(n_layer=3, n_head=2, n_embd=32, mlp_ratio=2, epochs=3, n_train=2000,
                 batch_size=100, warmup_epochs=0, n_images=100, path_batch=25, m=10, topk="1,3",
                 prune_fracs="0.5,1.0", log_interval=10),
    # patch 7 on 28 px: 16 patches + CLS, cheap enough for a single CPU thread
    "mnist_cpu": dict(dataset="mnist", patch_size=7, n_layer=4, n_head=4, n_embd=64, mlp_ratio=4,
                      epochs=4, batch_size=128, lr=2e-3, warmup_epochs=1, n_images=500,
                      path_batch=50, topk="1,5,10", prune_fracs="0.5,1.0", log_interval=100)}
VIT_B_16 = dict(image_size=224, patch_size=16, n_layer=12, n_head=12, n_embd=768, mlp_ratio=4,
                n_class=1000)
DATA_SIZE = {"cifar10": 32, "mnist": 28, "fashion_mnist": 28}  # built-in datasets: fixed sides
# Imagenette's folders (ImageNet wnids) -> ImageNet-1k indices (fast.ai's 10-class subset)
IMAGENETTE = {"n01440764": 0, "n02102040": 217, "n02979186": 482, "n03000684": 491,
              "n03028079": 497, "n03394916": 566, "n03417042": 569, "n03425413": 571,
              "n03445777": 574, "n03888605": 701}
VIT_B_16_URL = "https://download.pytorch.org/models/vit_b_16-c867db91.pth"
METHODS = ["greedy", "ip", "activation", "kn_ig", "random"]
EDITS = {"zero": 0.0, "double": 2.0}  # evaluation 2: the path's neurons times this factor

class ArgError(argparse.ArgumentParser):
    def error(self, message):  # one `error:` line (main's handler), not argparse's usage block
        raise ValueError(message)

def parse_bool(s):
    if s.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"{s!r} is not a boolean: use true, false, 1 or 0")
    return s.lower() in ("true", "1")

def parse_config(argv=None):
    """--key=value flags from the dataclass fields; a preset fills fields not given explicitly."""
    p = ArgError(description="Influential neuron paths in ViTs (Wang et al., ICLR 2025)")
    src = inspect.getsource(Config)
    comments = dict(re.findall(r"^    (\w+): .*?  # (.*)$", src, re.M))  # the field comments
    for f in fields(Config):
        typ = parse_bool if f.type in (bool, "bool") else type(f.default)
        help_ = f"{comments.get(f.name, '')} (default {f.default!r})"
        p.add_argument(f"--{f.name}", type=typ, default=None, help=help_)
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    return make_config(**args)

def make_config(**kw):
    """Config with preset, model and data defaults applied under the explicit keyword overrides."""
    if kw.get("preset", "") not in ("", *PRESETS):
        raise ValueError(f"unknown preset {kw['preset']!r}: use one of {list(PRESETS)}")
    base = dict(PRESETS.get(kw.get("preset", ""), {}))
    base.update(kw)
    if base.get("model") == "vit_b_16":
        base.update(VIT_B_16)  # the architecture is fixed by the weights
        base.setdefault("path_batch", 10)
    name = base.get("dataset", "auto")
    name = "cifar10" if name == "auto" and base.get("model", "vit_cifar") == "vit_cifar" else name
    if not base.get("image_size"):
        base["image_size"] = DATA_SIZE.get(name, 32)
    if not base.get("out_dir"):
        stem = name.rstrip("/").split("/")[-1].split(".")[0]  # imagefolder:a/b.tgz -> b
        tag = "bench" if base.get("bench") else re.sub(r"\W+", "_", stem)
        preset = base.get("preset", "")
        tag = preset if preset.startswith(tag) else f"{tag}_{preset}" if preset else tag
        base["out_dir"] = os.path.join("out", "neuron_path", tag)
    return Config(**base)

def check_config(cfg):
    """Fail at start, with one clear message, on settings that cannot work."""
    if cfg.model not in ("vit_cifar", "vit_b_16"):
        raise ValueError(f"unknown model {cfg.model!r}: use vit_cifar or vit_b_16")
    ok = {"vit_cifar": ("auto", *DATA_SIZE), "vit_b_16": ("auto", "imagenette")}[cfg.model]
    if cfg.dataset not in ok and not cfg.dataset.startswith("imagefolder:"):
        raise ValueError(f"unknown dataset {cfg.dataset!r} for {cfg.model}: use "
                         f"{' | '.join(ok)} | imagefolder:PATH")
    name = "cifar10" if cfg.dataset == "auto" and cfg.model == "vit_cifar" else cfg.dataset
    if name in DATA_SIZE and cfg.image_size != DATA_SIZE[name]:
        raise ValueError(f"{name} images are {DATA_SIZE[name]} x {DATA_SIZE[name]}: image_size "
                         f"must be {DATA_SIZE[name]}, got {cfg.image_size}")
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"image_size {cfg.image_size} is not divisible by "
                         f"patch_size {cfg.patch_size}")
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"n_embd {cfg.n_embd} is not divisible by n_head {cfg.n_head}")
    positive = ("patch_size", "n_layer", "n_head", "n_embd", "mlp_ratio", "n_class", "epochs",
                "batch_size", "path_batch", "bench_images", "log_interval", "m")
    for k in positive:
        if getattr(cfg, k) < 1:
            raise ValueError(f"--{k} must be >= 1, got {getattr(cfg, k)}")
    for k in ("n_train", "n_images", "threads"):
        if getattr(cfg, k) < 0:
            raise ValueError(f"--{k} must be >= 0, got {getattr(cfg, k)}")
    H = cfg.mlp_ratio * cfg.n_embd
    for k in ks(cfg.topk):
        if not 1 <= k <= H:
            raise ValueError(f"--topk: K={k} must be between 1 and the MLP width {H}")
    if not all(0 < f <= 1 for f in fracs(cfg.prune_fracs)):
        raise ValueError(f"--prune_fracs must lie in (0, 1], got {cfg.prune_fracs!r}")
    if not 0 < cfg.fit_frac < 1:
        raise ValueError(f"--fit_frac must lie in (0, 1), got {cfg.fit_frac}")
    if cfg.jas_form not in ("code", "ig"):
        raise ValueError(f"--jas_form must be code or ig, got {cfg.jas_form!r}")
    if cfg.precision not in ("fp32", "tf32", "bf16"):
        raise ValueError(f"--precision must be fp32, tf32 or bf16, got {cfg.precision!r}")
    if not 0 <= cfg.recheck < 1:
        raise ValueError(f"--recheck must lie in [0, 1), got {cfg.recheck}")

def parse_list(s, typ, flag):  # "1,5,10" -> [1, 5, 10]; a bad entry names the flag
    try:
        out = [typ(v) for v in str(s).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{flag}={s!r} is not a comma-separated list of "
                         f"{typ.__name__}s") from None
    if not out:
        raise ValueError(f"--{flag} is empty")
    return out

def ks(s):
    return parse_list(s, int, "topk")

def fracs(s):
    return parse_list(s, float, "prune_fracs")

# -----------------------------------------------------------------------------
# Utilities

def get_device(pref="auto"):
    """auto = cuda -> mps -> cpu; an unknown or absent device is a clear error."""
    has_mps = getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    avail = "cpu" + (", cuda" if torch.cuda.is_available() else "") + (", mps" if has_mps else "")
    if pref == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", pref):
        raise ValueError(f"unknown --device={pref}: use auto, cpu, cuda, cuda:N or mps "
                         f"(available here: {avail})")
    if pref.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device={pref} but torch sees no CUDA GPU here: use --device=cpu "
                         f"or auto (available here: {avail})")
    if pref == "mps" and not has_mps:
        raise ValueError(f"--device=mps but MPS is not available here (available: {avail})")
    if pref.startswith("cuda:"):  # cuda:N -> "cuda" on that GPU: checks below compare == "cuda"
        if int(pref[5:]) >= torch.cuda.device_count():
            raise ValueError(f"--device={pref}: only {torch.cuda.device_count()} GPU(s) here")
        torch.cuda.set_device(torch.device(pref))
        return "cuda"
    return pref

def autocast_ctx(device, enabled=True):
    if enabled and device == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()

def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

def fmt_time(s):
    return f"{int(s // 60)}m{int(s % 60):02d}s"

# -----------------------------------------------------------------------------
# ViT (lucidrains' einops patchify, nanoGPT names, torchvision-compatible layout)

class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # q, k, v (torchvision's order)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.sdpa = False  # training and the bench switch to fused attention

    def forward(self, x):
        qkv = self.c_attn(x)
        q, k, v = rearrange(qkv, "b t (three nh hs) -> three b nh t hs", three=3, nh=self.n_head)
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            att = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, nh, T, T)
            y = att.softmax(dim=-1) @ v  # (B, nh, T, hs)
        return self.c_proj(rearrange(y, "b nh t hs -> b t (nh hs)"))

class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, edit=None):
        h = F.gelu(self.c_fc(x))  # (B, T, H) exact GELU; these hidden units are the "neurons"
        # EXERCISE: the MAE-style neuron (a global-pool ViT): edit the same unit over all patch
        # tokens instead of the CLS row (docs/neuron_path.md, Exercises).
        if edit is not None:
            # ALGO LOGIC: the method only replaces or edits the CLS row; patch rows are computed.
            # Concatenation (not an in-place write) keeps autograd clean.
            h = torch.cat([edit(h[:, 0])[:, None], h[:, 1:]], dim=1)  # (B, T, H)
        return self.drop(self.c_proj(h)), h

class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=1e-6)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=1e-6)
        self.mlp = MLP(cfg)

    def forward(self, x, edit=None):
        x = x + self.attn(self.ln_1(x))
        y, h = self.mlp(self.ln_2(x), edit)
        return x + y, h

class ViT(nn.Module):
    def __init__(self, cfg, channels=3):
        super().__init__()
        P, C = cfg.patch_size, cfg.n_embd
        n_patch = (cfg.image_size // P) ** 2
        # (c p1 p2) order = a Conv2d(kernel=stride=P) weight flattened: torchvision's conv_proj
        # maps 1:1. channels comes from the data (1 for MNIST, 3 for RGB).
        patchify = Rearrange("b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=P, p2=P)
        self.patch_embed = nn.Sequential(patchify, nn.Linear(channels * P * P, C))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.wpe = nn.Parameter(torch.randn(1, n_patch + 1, C) * 0.02)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(C, eps=1e-6)
        self.head = nn.Linear(C, cfg.n_class)
        self.apply(self._init)

    @staticmethod
    def _init(mod):
        if isinstance(mod, nn.Linear):
            nn.init.trunc_normal_(mod.weight, std=0.02)
            nn.init.zeros_(mod.bias)

    def forward(self, img, edits=None, record=False):
        """img (B, channels, S, S) normalised; edits {layer: f(cls_row (B, H)) -> (B, H)}.
        Returns logits (B, n_class), plus the L CLS rows (B, H) after any edit if record."""
        x = self.patch_embed(img)  # (B, N, C)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, C)
        x = torch.cat([cls, x], dim=1) + self.wpe  # (B, T, C)
        acts = []
        for l, block in enumerate(self.h):
            x, h = block(x, None if edits is None else edits.get(l))
            if record:
                acts.append(h[:, 0])
        logits = self.head(self.ln_f(x[:, 0]))  # (B, n_class) head on CLS after the final norm
        return (logits, acts) if record else logits

def load_torchvision_vit_b_16(model, sd):
    """Map a torchvision vit_b_16 state dict into ViT (same arithmetic, renamed and reshaped)."""
    new = {"patch_embed.1.weight": sd["conv_proj.weight"].flatten(1),
           "patch_embed.1.bias": sd["conv_proj.bias"],
           "cls_token": sd["class_token"], "wpe": sd["encoder.pos_embedding"],
           "ln_f.weight": sd["encoder.ln.weight"], "ln_f.bias": sd["encoder.ln.bias"],
           "head.weight": sd["heads.head.weight"], "head.bias": sd["heads.head.bias"]}
    for i in range(len(model.h)):
        s, d = f"encoder.layers.encoder_layer_{i}.", f"h.{i}."
        mlp = "mlp.0." if s + "mlp.0.weight" in sd else "mlp.linear_1."  # new and old names
        mlp2 = "mlp.3." if s + "mlp.3.weight" in sd else "mlp.linear_2."
        pairs = {"ln_1.": "ln_1.", "ln_2.": "ln_2.", "self_attention.out_proj.": "attn.c_proj.",
                 mlp: "mlp.c_fc.", mlp2: "mlp.c_proj."}
        for a, b in pairs.items():
            for t in ("weight", "bias"):
                new[d + b + t] = sd[s + a + t]
        new[d + "attn.c_attn.weight"] = sd[s + "self_attention.in_proj_weight"]
        new[d + "attn.c_attn.bias"] = sd[s + "self_attention.in_proj_bias"]
    model.load_state_dict(new)
    return model

def fetch_vit_b_16(cfg):
    """torchvision's ImageNet ViT-B/16 state dict (IMAGENET1K_V1, 81.1% top-1), cached in data/."""
    path = cfg.weights or os.path.join(data.DATA_DIR, "vit_b_16", "vit_b_16-c867db91.pth")
    if not os.path.exists(path):
        if cfg.weights:
            raise data.DataError(f"weights file {path} does not exist")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        print(f"downloading {VIT_B_16_URL} -> {path}")
        try:
            urllib.request.urlretrieve(VIT_B_16_URL, path + ".part")
        except Exception as e:
            if os.path.exists(path + ".part"):  # no partial file left behind (as data.fetch)
                os.remove(path + ".part")
            raise data.DataError(f"could not download the ViT-B/16 weights from {VIT_B_16_URL} "
                                 f"({e}); download it by hand to {path} or pass --weights=PATH"
                                 ) from None
        os.replace(path + ".part", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise data.DataError(f"cannot read the weights file {path} ({type(e).__name__}): "
                             "delete it and run again, or pass --weights=PATH") from None

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # torchvision's preprocessing
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))  # its training images

def channel_stats(X, chunk=5000):
    """Per-channel mean and std (C,) of uint8 images (N, C, S, S), in [0, 1] units."""
    s = torch.zeros(X.shape[1], dtype=torch.float64)
    s2 = torch.zeros_like(s)
    for i in range(0, len(X), chunk):
        x = X[i:i + chunk].double() / 255  # (b, C, S, S)
        s += x.sum((0, 2, 3))
        s2 += (x * x).sum((0, 2, 3))
    n = len(X) * X.shape[2] * X.shape[3]
    mean = s / n
    std = (s2 / n - mean ** 2).clamp_min(0).sqrt()
    return mean.float(), std.clamp_min(1 / 255).float()  # a constant channel: no division by 0

def normalise(x, stats):
    """uint8 (B, C, S, S) -> float, per channel: (x / 255 - mean) / std, stats = (mean, std)."""
    mean, std = (torch.as_tensor(v, device=x.device).view(1, -1, 1, 1) for v in stats)
    return (x.float() / 255 - mean) / std

# -----------------------------------------------------------------------------
# ALGO LOGIC: joint attribution score (Eq. 2/3) and the layer-progressive search (Alg. 1)

def precision_ctx(precision, device):
    """fp32 (strict), tf32 (tensor-core fp32 matmuls) or bf16 autocast, for the attribution passes.
    bf16 was asked for explicitly, so it autocasts on a CPU too (the bench shows its effect)."""
    if precision == "bf16" and device == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return autocast_ctx(device) if precision == "bf16" else nullcontext()

def set_matmul_precision(precision):
    """tf32 also under bf16: matmuls left outside autocast (clean forward, rechecks) use tf32."""
    tf32 = precision in ("tf32", "bf16")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32

@torch.no_grad()
def clean_acts(model, x):
    """One clean forward: logits (B, n_class) and the L clean CLS rows h̄_l (B, H)."""
    logits, acts = model(x, record=True)
    return logits.float(), [a.float() for a in acts]

def scaled_run(model, x, y, hbar, sel, m, clamp=True, precision="fp32"):
    """One batched forward+backward of m*B rows (step-major: row k*B + b is image b at step k).
    sel {layer: (B, H) bool}: neurons scaled by alpha_k = k/m (left Riemann sum, k = 0..m-1);
    the other CLS neurons of those layers stay at their clean values (clamp) or recompute.
    Returns {layer: (m, B, H)} gradients of sum_b p(y_b) w.r.t. those CLS rows."""
    B = x.shape[0]
    alpha = torch.arange(m, device=x.device, dtype=torch.float32) / m  # (m,)
    zs, edits = {}, {}
    for l, mask in sel.items():
        H = hbar[l].shape[1]
        z = (alpha[:, None, None] * hbar[l][None]).reshape(m * B, H)  # (m*B, H) scaled rows
        z.requires_grad_()
        mask_r, base = mask.repeat(m, 1), hbar[l].repeat(m, 1)  # (m*B, H)
        if clamp:  # official: the whole CLS row is overwritten, clean but for the scaled neurons
            edits[l] = lambda h, z=z, mk=mask_r, b=base: torch.where(mk, z, b).to(h.dtype)
        else:  # ablation: only the scaled neurons are overwritten
            edits[l] = lambda h, z=z, mk=mask_r: torch.where(mk, z.to(h.dtype), h)
        zs[l] = z
    with precision_ctx(precision, x.device.type):
        logits = model(x.repeat(m, 1, 1, 1), edits)  # (m*B, n_class)
    # the output attributed is the softmax probability of each image's own (true) label
    p = logits.float().softmax(-1).gather(1, y.repeat(m)[:, None]).sum()
    grads = torch.autograd.grad(p, list(zs.values()))
    return {l: g.view(m, B, -1) for l, g in zip(zs, grads)}

def combine(gsum, step, sel, form):
    """JAS (B,) from per-neuron gradient sums gsum[l] = sum_k dF/dh (B, H) and steps h̄/m (B, H).
    code: (sum of steps) x (sum of gradients) over the selected neurons ('product of sums');
    ig:   sum over the selected neurons of step x gradient sum (textbook integrated gradients).
    Both equal Eq. 3 for one neuron; the published numbers come from the code form, so it is the
    default (docs/neuron_path.md, "Code form and IG form")."""
    if form == "code":
        g = sum((gsum[l] * sel[l]).sum(1) for l in sel)
        a = sum((step[l] * sel[l]).sum(1) for l in sel)
        return g * a  # (B,)
    return sum((gsum[l] * step[l] * sel[l]).sum(1) for l in sel)  # (B,)

def jas(model, x, y, hbar, sel, cfg):
    """Joint attribution score (B,) of the neurons in sel {layer: (B, H) bool} (Eq. 2/3)."""
    G = scaled_run(model, x, y, hbar, sel, cfg.m, not cfg.no_clamp, cfg.precision)
    gsum = {l: g.sum(0) for l, g in G.items()}
    step = {l: hbar[l] / cfg.m for l in sel}
    return combine(gsum, step, sel, cfg.jas_form)

def layer_scores(model, x, y, hbar, prefix, cfg):
    """Scores (B, H) of every candidate j of layer l = len(prefix), given the chosen neurons
    prefix[l'] (B, H) bool of the layers l' < l, from ONE scaled run in which all of layer l and
    the chosen neurons are scaled together: the whole-layer trick (docs/neuron_path.md). All K
    chosen neurons of each earlier layer enter both sums (the official top-K code keeps only the
    last one, a bug not copied here)."""
    l = len(prefix)
    sel = {i: prefix[i] for i in range(l)}
    sel[l] = torch.ones_like(hbar[l], dtype=torch.bool)
    G = scaled_run(model, x, y, hbar, sel, cfg.m, not cfg.no_clamp, cfg.precision)
    gsum = {i: g.sum(0) for i, g in G.items()}  # (B, H) gradient sums over the m steps
    step = {i: hbar[i] / cfg.m for i in sel}  # (B, H) Riemann step of each neuron
    prev = {i: prefix[i] for i in range(l)}
    zero = torch.zeros(x.shape[0], device=x.device)
    if cfg.jas_form == "code":  # (G_j + G_prev) * (a_j + a_prev): each candidate joins the set
        g_prev = sum((gsum[i] * prev[i]).sum(1) for i in prev) if prev else zero  # (B,)
        a_prev = sum((step[i] * prev[i]).sum(1) for i in prev) if prev else zero  # (B,)
        return (gsum[l] + g_prev[:, None]) * (step[l] + a_prev[:, None])
    ig_prev = combine(gsum, step, prev, "ig") if prev else zero  # (B,)
    return gsum[l] * step[l] + ig_prev[:, None]

def greedy_path(model, x, y, cfg, k=1, hbar=None, stats=None):
    """Layer-progressive search (Alg. 1), batched over images with per-sample labels.
    Returns (B, L, k) neuron indices: the k best candidates per layer (signed max), never
    revisited. stats: optional dict counting the (image, layer) decisions ("rows") and those
    rescored in tf32 ("rechecked", bf16 only)."""
    if hbar is None:
        hbar = clean_acts(model, x)[1]  # clean values do not depend on the path: one forward
    prefix, chosen = [], []
    for l in range(len(hbar)):
        s = layer_scores(model, x, y, hbar, prefix, cfg)  # (B, H) every candidate of layer l
        if cfg.precision == "bf16" and cfg.recheck > 0:  # numerics only; not part of Alg. 1
            s = recheck_near_ties(model, x, y, hbar, prefix, s, k, cfg, stats)
        if stats is not None:
            stats["rows"] = stats.get("rows", 0) + s.shape[0]
        top = s.topk(k, dim=1).indices  # (B, k) signed max, as the official code
        # EXERCISE: pick by |score| instead; which neurons that lower p(true) join the path?
        prefix.append(torch.zeros_like(s, dtype=torch.bool).scatter_(1, top, True))
        chosen.append(top)
    return torch.stack(chosen, dim=1)  # (B, L, k)
    # EXERCISE: replace the greedy step with a beam search of width 4; does the final JAS go up?

def recheck_near_ties(model, x, y, hbar, prefix, s, k, cfg, stats=None):
    """bf16 perturbs every score a little, which matters only where the ranking nearly ties: rows
    whose gap among the top k+1 is below recheck x |top score| are scored again in tf32 (fp32 off
    CUDA). A heuristic, not a guarantee: an error larger than the margin still flips a pick (the
    bench reports the share of paths equal to fp32's). Returns s (B, H) with those rows replaced."""
    v = s.topk(min(k + 1, s.shape[1]), dim=1).values  # (B, k+1) descending
    near = (v[:, :-1] - v[:, 1:]).min(1).values < cfg.recheck * v[:, 0].abs()  # (B,)
    if near.any():
        sub = lambda t: [a[near] for a in t]
        exact = replace(cfg, precision="tf32")
        s = s.clone()
        s[near] = layer_scores(model, x[near], y[near], sub(hbar), sub(prefix), exact)
    if stats is not None:
        stats["rechecked"] = stats.get("rechecked", 0) + near.sum().item()
    return s

def trick_agreement(model, x, y, cfg, top=10):
    """Per layer: how often the whole-layer trick's pick is also the best EXACT JAS(prefix + {j})
    among the trick's `top` candidates (the trick's gradients have the whole layer scaled)."""
    hbar = clean_acts(model, x)[1]
    masks = to_masks(greedy_path(model, x, y, cfg, hbar=hbar), hbar[0].shape[1])
    top, out = min(top, hbar[0].shape[1]), []
    for l in range(len(hbar)):
        prefix = {i: masks[i] for i in range(l)}
        s = layer_scores(model, x, y, hbar, list(prefix.values()), cfg)  # (B, H)
        cand = s.topk(top, dim=1).indices  # (B, top)
        exact = []
        for r in range(top):
            one = torch.zeros_like(masks[l]).scatter_(1, cand[:, r:r + 1], True)  # (B, H)
            exact.append(jas(model, x, y, hbar, {**prefix, l: one}, cfg))
        out.append((torch.stack(exact, dim=1).argmax(1) == 0).float().mean().item())
    return out

def to_masks(path, H):
    """(B, L, k) indices -> {layer: (B, H) bool}."""
    B, L = path.shape[:2]
    return {l: torch.zeros(B, H, dtype=torch.bool, device=path.device).scatter_(1, path[:, l], True)
            for l in range(L)}

def activation_path(hbar, k=1):
    """Baseline 'Activation': largest clean CLS activation per layer, independently."""
    return torch.stack([h.topk(k, dim=1).indices for h in hbar], dim=1)  # (B, L, k)

def ip_path(model, x, y, cfg, k=1):
    """Baseline 'Influence Pattern' (the official variant): the image is scaled from 0 by alpha_k;
    for each layer pick the signed argmax of the mean gradient of p(y) w.r.t. its CLS row. No
    activation factor, no conditioning (clamping a layer to its own values changes nothing)."""
    m, B, H = cfg.m, x.shape[0], model.h[0].mlp.c_fc.out_features
    alpha = torch.arange(m, device=x.device, dtype=torch.float32) / m
    alpha = alpha.repeat_interleave(B)  # (m*B,) step-major
    # zero offsets added to each CLS row: d p / d offset = d p / d CLS row
    zs = [torch.zeros(m * B, H, device=x.device, requires_grad=True) for _ in model.h]
    edits = {l: (lambda h, z=z: h + z.to(h.dtype)) for l, z in enumerate(zs)}
    with precision_ctx(cfg.precision, x.device.type):
        logits = model(alpha[:, None, None, None] * x.repeat(m, 1, 1, 1), edits)
    p = logits.float().softmax(-1).gather(1, y.repeat(m)[:, None]).sum()
    grads = torch.autograd.grad(p, zs)
    return torch.stack([g.view(m, B, H).mean(0).topk(k, dim=1).indices for g in grads], dim=1)

def kn_ig_path(model, x, y, hbar, cfg, k=1):
    """Baseline 'per-layer IG' (knowledge-neuron style): scale each layer's whole CLS row alone,
    score h̄/m * sum_k dF/dh per neuron, pick the argmax; no conditioning on other layers."""
    out = []
    for l in range(len(hbar)):
        whole = {l: torch.ones_like(hbar[l], dtype=torch.bool)}
        G = scaled_run(model, x, y, hbar, whole, cfg.m, True, cfg.precision)[l]  # (m, B, H)
        out.append((G.sum(0) * hbar[l] / cfg.m).topk(k, dim=1).indices)
    return torch.stack(out, dim=1)  # (B, L, k)

def random_path(B, L, H, k=1, gen=None, device="cpu"):
    """Baseline 'Random': k distinct uniform neurons per layer."""
    return torch.rand(B, L, H, generator=gen).argsort(-1)[..., :k].to(device)  # (B, L, k)

def find_all_paths(model, x, y, cfg, gen):
    """Every method's path (B, L) for one batch, its JAS (B,), and the clean logits."""
    logits, hbar = clean_acts(model, x)
    H = hbar[0].shape[1]
    paths = {"greedy": greedy_path(model, x, y, cfg, hbar=hbar),
             "ip": ip_path(model, x, y, cfg),
             "activation": activation_path(hbar),
             "kn_ig": kn_ig_path(model, x, y, hbar, cfg),
             "random": random_path(x.shape[0], len(hbar), H, gen=gen, device=x.device)}
    scores = {k: jas(model, x, y, hbar, to_masks(p, H), cfg).detach() for k, p in paths.items()}
    return {k: p[..., 0] for k, p in paths.items()}, scores, logits

# -----------------------------------------------------------------------------
# Evaluations: intervention (paper Fig. 3), class level (Figs. 4-5), pruning (Sec. 4.4, Fig. 6)

@torch.no_grad()
def edited_probs(model, x, y, masks, factor=None, keep=None):
    """A free forward with CLS-row edits in every layer: masked neurons multiplied by `factor`
    (0 = zero-out, 2 = doubling), or, with keep, every neuron outside `keep` zeroed where masks
    is True (pruning). Returns p(y) (B,) and predictions (B,)."""
    if keep is None:
        edits = {l: (lambda h, mk=mk: torch.where(mk, h * factor, h)) for l, mk in masks.items()}
    else:
        edits = {l: (lambda h, mk=mk, kp=keep[l]: torch.where(mk & ~kp, torch.zeros_like(h), h))
                 for l, mk in masks.items()}
    logits = model(x, edits).float()
    return logits.softmax(-1).gather(1, y[:, None])[:, 0], logits.argmax(-1)

def per_class_mean(v, y, n_class):
    """Class means (n_present,) of a per-image vector v (N,); absent classes are dropped."""
    return np.array([v[y == c].mean() for c in range(n_class) if (y == c).any()])

def class_similarity(paths, y, n_class, H):
    """Per-class (L, H) frequency matrices of the paths (N, L), and the cosine similarity of the
    flattened matrices (n_class, n_class) (paper Fig. 5)."""
    L = paths.shape[1]
    freq = np.zeros((n_class, L, H))
    for p, c in zip(paths, y):
        freq[c, np.arange(L), p] += 1
    flat = freq.reshape(n_class, -1)
    flat = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)  # unit rows
    return freq, flat @ flat.T

def mode_path(fit, H, K):
    """The class's 'mode path' (L, K): in each layer, the K neurons that occur most often in the
    fit images' top-K paths fit (n, L, K). (The official code takes an element-wise mode per
    (layer, rank) slot, which can repeat a neuron.)"""
    L = fit.shape[1]
    cnt = torch.stack([torch.bincount(fit[:, l].flatten(), minlength=H) for l in range(L)])
    return cnt.topk(K, dim=1).indices  # (L, K) most frequent first

def fit_split(Y, fit_frac):
    """Per class with >= 2 images: (fit indices, held-out indices), at least one held out."""
    out = {}
    for c in sorted(set(Y.tolist())):
        idx = np.flatnonzero(Y.numpy() == c)
        if len(idx) >= 2:
            n_fit = min(len(idx) - 1, max(1, int(round(fit_frac * len(idx)))))
            out[c] = (idx[:n_fit], idx[n_fit:])
    return out

def pruning_eval(model, X, Y, cfg, stats, device, gen, log, paths1=None):
    """Per class: fit the mode path of the top-K greedy paths on fit_frac of the class's images;
    on the rest, zero a random fraction of the OTHER CLS neurons in every layer; compare with
    keeping K random neurons per layer (same pruning masks). paths1 (N, L): top-1 paths already
    found for X (reused for K = 1). Returns rows of dicts."""
    L, H = cfg.n_layer, cfg.mlp_ratio * cfg.n_embd
    split, rows, last = fit_split(Y, cfg.fit_frac), [], fracs(cfg.prune_fracs)[-1]
    if not split:
        print("pruning skipped: no class has the 2 analysed images it needs (raise --n_images)")
        return rows
    for K in ks(cfg.topk):
        t0 = time.time()
        if K > 1 or paths1 is None:
            n_fit = sum(len(f) for f, _ in split.values())
            print(f"prune K={K:3d} | top-{K} paths of {n_fit} fit images, then pruning")
        keep = {"path": {}, "control": {}}  # kind -> class -> (L, K) neurons kept
        for c, (idx, _) in split.items():
            if K == 1 and paths1 is not None:
                fit = torch.as_tensor(paths1[idx])[:, :, None]  # (n_fit, L, 1)
            else:
                parts = np.array_split(idx, max(1, math.ceil(len(idx) / cfg.path_batch)))
                fit = torch.cat([greedy_path(model, normalise(X[b].to(device), stats),
                                             Y[b].to(device), cfg, k=K).cpu() for b in parts])
            keep["path"][c] = mode_path(fit, H, K)
            keep["control"][c] = torch.rand(L, H, generator=gen).argsort(1)[:, :K]  # K random
        for frac in [0.0] + fracs(cfg.prune_fracs):
            res = {"path": ([], []), "control": ([], [])}
            for c, (_, idx) in split.items():
                x, yy = normalise(X[idx].to(device), stats), Y[idx].to(device)
                prune = {l: (torch.rand(len(idx), H, generator=gen) < frac).to(device)
                         for l in range(L)}
                for kind in res:  # the same random pruning masks for the path and the control
                    kp = {l: torch.zeros(len(idx), H, dtype=torch.bool)
                          .index_fill_(1, keep[kind][c][l], True).to(device) for l in range(L)}
                    p, pred = edited_probs(model, x, yy, prune, keep=kp)
                    res[kind][0].append(p.cpu())
                    res[kind][1].append((pred == yy).float().cpu())
            for kind, (ps, acc) in res.items():
                rows.append(dict(K=K, fraction=frac, kind=kind, prob=torch.cat(ps).mean().item(),
                                 acc=torch.cat(acc).mean().item()))
        row = {r["kind"]: r for r in rows if r["K"] == K and r["fraction"] == last}
        print(f"prune K={K:3d} | {time.time() - t0:5.1f} s | frac {last:.1f}: "
              f"p(path) {row['path']['prob']:.3f}  p(control) {row['control']['prob']:.3f}")
        log({"event": "prune", "K": K, "rows": [r for r in rows if r["K"] == K]})
    return rows
    # EXERCISE: prune the whole MLP (all tokens, real structural pruning), not the CLS row only.

# -----------------------------------------------------------------------------
# Training the small ViT, and its checkpoint (exact resume, atomic writes)

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # bf16 dense

def peak_flops(device):
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)

def fwd_flops_per_image(cfg, channels=3):
    """Forward FLOPs of one image: 2 per weight per token (matmuls) + attention scores, mixing."""
    C, L, T = cfg.n_embd, cfg.n_layer, (cfg.image_size // cfg.patch_size) ** 2 + 1
    n_w = L * (4 * C * C + 2 * cfg.mlp_ratio * C * C) + channels * cfg.patch_size ** 2 * C
    return 2 * n_w * T + L * 4 * T * T * C

def augment(x, flip=True):
    """Random crop (pad 4, reflect) and, if flip, a random horizontal flip: uint8 (B, C, S, S)."""
    B, Ch, S, _ = x.shape
    xp = F.pad(x.float(), (4, 4, 4, 4), mode="reflect")  # (B, C, S+8, S+8)
    i = torch.randint(0, 9, (B,), device=x.device)
    j = torch.randint(0, 9, (B,), device=x.device)
    r = torch.arange(S, device=x.device)
    rows = (i[:, None] + r)[:, None, :, None]  # (B, 1, S, 1)
    cols = (j[:, None] + r)[:, None, None, :]  # (B, 1, 1, S)
    b = torch.arange(B, device=x.device)[:, None, None, None]
    c = torch.arange(Ch, device=x.device)[None, :, None, None]
    x = xp[b, c, rows, cols]  # (B, C, S, S)
    if not flip:
        return x
    flipped = torch.rand(B, device=x.device) < 0.5
    return torch.where(flipped[:, None, None, None], x.flip(3), x)

@torch.no_grad()
def evaluate(model, X, Y, stats, device, bs=1000):
    """Top-1 accuracy of model on uint8 images X (N, C, S, S) with labels Y (N,)."""
    model.eval()
    correct = 0
    for i in range(0, len(X), bs):
        with autocast_ctx(device):
            pred = model(normalise(X[i:i + bs].to(device), stats)).argmax(-1).cpu()
        correct += (pred == Y[i:i + bs]).sum().item()
    return correct / len(X)

# the fields that make a trained model what it is; `data` (the images' hash) is checked as well
RECIPE = ("model", "image_size", "patch_size", "n_layer", "n_head", "n_embd", "mlp_ratio",
          "n_class", "dropout", "n_train", "epochs", "batch_size", "lr", "weight_decay",
          "warmup_epochs", "label_smoothing", "seed")

def data_key(ds):
    """A short hash of the images and labels: an old checkpoint is never reused for other data."""
    h = hashlib.sha1()
    for s in ("train", "test"):
        for t in ds[s]:
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]

def rng_state():
    """Every RNG training draws from (torch CPU and CUDA, numpy, Python), checkpoint-safe."""
    keys, pos, has_gauss, gauss = np.random.get_state()[1:]
    version, py, py_gauss = random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda,
            "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_rest": [pos, has_gauss, gauss],
            "python": [version, list(py), py_gauss]}

def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), *s["numpy_rest"]))
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))

def write_atomic(path, write):
    """write(tmp_path) then rename into place: a kill leaves the old file or the new, never half."""
    tmp = f"{path}.tmp"
    write(tmp)
    os.replace(tmp, path)

def write_json(path, obj):
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    write_atomic(path, w)

def read_ckpt(path):
    """The checkpoint in out_dir, or None; a damaged file is one clear error."""
    if not os.path.exists(path):
        return None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        ck["model"], ck["config"], ck["extras"]["epoch"], ck["extras"]["rng"]  # all present
        return ck
    except Exception as e:
        raise data.DataError(f"{path} is damaged or not a checkpoint of this version "
                             f"({type(e).__name__}): delete it, or pass --retrain=True to train "
                             "from scratch over it") from None

def plan_training(ck, cfg, key, path):
    """What to do with the checkpoint found in out_dir: 'new', 'reuse' (finished, same recipe),
    'resume' (unfinished, same recipe) or 'extend' (only --epochs raised). Any other change is
    an error: a finished or partial model is never silently overwritten."""
    if ck is None or cfg.retrain:
        return "new"
    old, done = ck["config"], ck["extras"]["epoch"]
    diff = [f"{k} {old.get(k)!r} -> {getattr(cfg, k)!r}" for k in RECIPE
            if old.get(k) != getattr(cfg, k)]
    if ck["extras"].get("data_key") != key:
        diff.append(f"other images ({old.get('dataset')} -> {cfg.dataset})")
    if not diff:
        return "reuse" if ck["extras"]["done"] else "resume"
    if diff == [f"epochs {old['epochs']!r} -> {cfg.epochs!r}"] and cfg.epochs > done:
        return "extend"
    raise ValueError(f"{path} holds a model of other settings ({'; '.join(diff)}; {done} epochs "
                     "trained): pass a new --out_dir, or --retrain=True to overwrite it")

def train_vit(model, ds, cfg, stats, device, log, ck=None, key="", flip=True):
    """AdamW + warmup/cosine, label smoothing, crop (+ flip), bf16 autocast on CUDA. Saves
    ckpt.pt after each epoch with every RNG state, so a resumed run equals an uninterrupted one.
    ck: a checkpoint to continue (plan 'resume' or 'extend'), else None."""
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    Xtr, Ytr = ds["train"]
    if cfg.n_train:
        Xtr, Ytr = Xtr[:cfg.n_train], Ytr[:cfg.n_train]
    Xtr, Ytr = Xtr.to(device), Ytr.to(device)  # the whole training set lives on the device
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(Xtr) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warm = min(cfg.warmup_epochs * steps_per_epoch, total // 4)  # short runs: <= 1/4 warms up
    start_epoch, history = 0, []
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start_epoch, history = ck["extras"]["epoch"], ck["extras"]["history"]
        set_rng_state(ck["extras"]["rng"])
        if ck["config"]["epochs"] != cfg.epochs:
            print(f"continuing {ckpt_path} from epoch {start_epoch} to {cfg.epochs} (it was "
                  f"{ck['config']['epochs']}): the cosine schedule is recomputed for "
                  f"{cfg.epochs} epochs, so this differs from a {cfg.epochs}-epoch run")
        else:
            print(f"resuming {ckpt_path} at epoch {start_epoch}")
    fwd_model = torch.compile(model) if cfg.compile else model
    for blk in model.h:  # fused attention for training on CUDA; attribution keeps the softmax
        blk.attn.sdpa = device == "cuda"
    flops_img, peak = 3 * fwd_flops_per_image(cfg, Xtr.shape[1]), peak_flops(device)
    T = (cfg.image_size // cfg.patch_size) ** 2 + 1
    step, dts = start_epoch * steps_per_epoch, []
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        perm = torch.randperm(len(Xtr), device=device)
        for it in range(steps_per_epoch):
            t0 = time.time()
            cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))
            lr = cfg.lr * min(1.0, (step + 1) / max(1, warm)) * cosine
            for g in opt.param_groups:
                g["lr"] = lr
            idx = perm[it * cfg.batch_size:(it + 1) * cfg.batch_size]
            x = normalise(augment(Xtr[idx], flip), stats)
            with autocast_ctx(device):
                logits = fwd_model(x).float()
            loss = F.cross_entropy(logits, Ytr[idx], label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if not math.isfinite(loss.item()):  # stop before the weights change
                raise FloatingPointError(f"the training loss is {loss.item()} at step {step + 1}: "
                                         f"the last good checkpoint is {ckpt_path}; lower --lr")
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if step % cfg.log_interval == 0 or step == total:
                if device == "cuda":
                    torch.cuda.synchronize()
                dts.append(time.time() - t0)
                dt = np.mean(dts[-20:])
                ips = len(idx) / dt
                mfu = f" | mfu {100 * ips * flops_img / peak:.1f}%" if peak else ""
                print(f"step {step:5d}/{total} | loss {loss.item():.4f} | lr {lr:.1e} | "
                      f"{1000 * dt:.1f} ms/step | {ips:.0f} img/s | {ips * T / 1e3:.1f}k tok/s"
                      f"{mfu} | eta {fmt_time(dt * (total - step))}")
                log({"event": "train", "step": step, "loss": loss.item(), "lr": lr})
        acc = evaluate(model, *ds["test"], stats, device)
        history.append({"epoch": epoch + 1, "step": step, "loss": loss.item(), "test_acc": acc})
        print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {loss.item():.4f}, test acc {acc:.4f}")
        log({"event": "eval", **history[-1]})
        extras = {"epoch": epoch + 1, "history": history, "done": epoch + 1 == cfg.epochs,
                  "rng": rng_state(), "data_key": key}
        ck_new = {"model": model.state_dict(), "optimizer": opt.state_dict(),
                  "config": asdict(cfg), "step": step, "best_val_loss": None, "extras": extras}
        write_atomic(ckpt_path, lambda tmp: torch.save(ck_new, tmp))
    for blk in model.h:
        blk.attn.sdpa = False
    return history

# -----------------------------------------------------------------------------
# Plots (matplotlib Agg, imported lazily)

def save_plots(res, summ, cfg, classes, X_show, history):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = cfg.out_dir
    tag = f"{cfg.model} on {data_name(cfg)}, {len(res['y'])} test images, m={cfg.m}, {cfg.jas_form}"
    paths, ticks = [], (range(1, len(METHODS) + 1), METHODS)

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=90)
        plt.close(fig)
        paths.append(os.path.join(out, name))

    if history:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([h["epoch"] for h in history], [h["test_acc"] for h in history], "o-")
        ax.set(xlabel="epoch", ylabel="test accuracy", title="ViT training")
        save(fig, "train_curve.png")
    fig, ax = plt.subplots(figsize=(6, 3.5))  # evaluation 1: JAS per method
    ax.boxplot([res["jas"][k] for k in METHODS], showfliers=False)
    ax.set_xticks(*ticks)
    ax.axhline(0, color="gray", lw=0.5)
    ax.set(ylabel="joint attribution score", title=f"Path JAS per method\n{tag}")
    save(fig, "jas_box.png")
    # evaluation 2: per-class mean probability ratios, all images and correctly classified only
    fig, axs = plt.subplots(2, 2, figsize=(9, 6.5), squeeze=False)
    for row, which in enumerate(("all", "correct")):
        for ax, op in zip(axs[row], EDITS):
            v = [summ["class_ratio"][which][op][k] for k in METHODS]
            ax.boxplot([r if len(r) else [np.nan] for r in v], showfliers=False)  # none correct
            ax.set_xticks(*ticks)
            ax.axhline(1, color="gray", lw=0.5)
            ax.set(ylabel="p_edit / p_orig (class means)", title=f"{op} the path ({which} images)")
    fig.suptitle(f"path neurons edited at CLS in every layer\n{tag}", fontsize=9)
    save(fig, "edit_box.png")
    fig, ax = plt.subplots(figsize=(5.5, 4.5))  # evaluation 3: class similarity
    im = ax.imshow(summ["sim"], cmap="viridis")
    names = [c[:8] for c in classes]
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    fig.colorbar(im, ax=ax)
    ax.set_title("cosine similarity of class path-frequency matrices", fontsize=9)
    save(fig, "class_similarity.png")
    show = sorted(set(res["y"].tolist()))[:4]
    fig, axs = plt.subplots(1, len(show), figsize=(3 * len(show), 3), sharey=True, squeeze=False)
    H = cfg.mlp_ratio * cfg.n_embd
    for ax, c in zip(axs[0], show):
        sel = res["paths"]["greedy"][res["y"] == c] / H  # (n_c, L) normalised neuron position
        ax.violinplot([sel[:, l] for l in range(sel.shape[1])], positions=range(sel.shape[1]),
                      showextrema=False)
        ax.set(title=classes[c], xlabel="layer")
    axs[0][0].set_ylabel("neuron index / H")
    save(fig, "class_violin.png")
    Ks = ks(cfg.topk)
    fig, axs = plt.subplots(1, len(Ks), figsize=(3.5 * len(Ks), 3), squeeze=False)
    for ax, K in zip(axs[0], Ks):  # evaluation 4: pruning
        for kind, st in (("path", "o-"), ("control", "s--")):
            rr = [r for r in summ["pruning"] if r["K"] == K and r["kind"] == kind]
            ax.plot([r["fraction"] for r in rr], [r["prob"] for r in rr], st, label=f"keep {kind}")
        ax.set(title=f"K={K}", xlabel="fraction of other CLS neurons zeroed",
               ylabel="mean p(true)")
        ax.legend(fontsize=7)
    save(fig, "pruning.png")
    n = min(4, len(X_show))  # example paths under their images: layer against neuron index
    fig, axs = plt.subplots(2, n, figsize=(3 * n, 5.5), squeeze=False)
    for i in range(n):
        img = X_show[i].permute(1, 2, 0).numpy()  # (S, S, C)
        axs[0][i].imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray")
        axs[0][i].axis("off")
        axs[0][i].set_title(f"{classes[res['y'][i]]}", fontsize=8)
        for k, st in (("greedy", "o-"), ("ip", "s--"), ("activation", "^:")):
            axs[1][i].plot(range(cfg.n_layer), res["paths"][k][i], st, label=k, ms=4)
        axs[1][i].set(xlabel="layer", ylim=(0, H))
    axs[1][0].set_ylabel("neuron index")
    axs[1][0].legend(fontsize=7)
    save(fig, "example_paths.png")
    return paths

# -----------------------------------------------------------------------------
# Bench: path-search speed (target: ViT-B/16, 224 px, m=20, <= 0.1 s/image on an H100)

def bench_settings(cfg, cuda):
    """(precision, fused attention, recheck): fp32; tf32 (CUDA only; it is fp32 elsewhere); bf16
    alone; then bf16 + SDPA with near ties rescored at 0.5, 1, 2 and 4 times --recheck."""
    out = [("fp32", False, 0.0)] + [("tf32", False, 0.0), ("tf32", True, 0.0)] * cuda
    out += [("bf16", False, 0.0), ("bf16", True, 0.0)]
    if cfg.recheck > 0:
        out += [("bf16", True, f * cfg.recheck) for f in (0.5, 1, 2, 4)]
    return out

def bench(model, cfg, device):
    """Time greedy_path on random images for each precision; compare every path with fp32's."""
    set_seed(cfg.seed)
    for p in model.parameters():  # only d p / d (CLS rows) is needed: no weight-gradient matmul
        p.requires_grad_(False)
    S, n = cfg.image_size, cfg.bench_images
    x = torch.randn(n, 3, S, S, device=device)
    y = torch.randint(0, cfg.n_class, (n,), device=device)
    # one pass = forward + input-gradient backward (~2x forward); L layers x m steps per image
    flops_img = 2 * fwd_flops_per_image(cfg) * cfg.n_layer * cfg.m
    results, ref, cuda = [], None, device == "cuda"
    if not cuda:
        print("note: off CUDA, tf32 is fp32 (skipped) and bf16 is CPU autocast "
              "(bf16 matmuls, not the GPU's kernels)")
    for prec, sdpa, recheck in bench_settings(cfg, cuda):
        if cfg.compile:  # a fresh compile per setting: a changed attribute may not recompile
            torch._dynamo.reset()
        for blk in model.h:
            blk.attn.sdpa = sdpa
            if cfg.compile:  # attention only: the MLP's edit closures would recompile each time
                blk.attn.compile()
        c, stats = replace(cfg, precision=prec, recheck=recheck), {}
        set_matmul_precision(prec)
        b = cfg.path_batch
        if cuda:  # warm-up (kernels, compile)
            greedy_path(model, x[:b], y[:b], c)
            torch.cuda.synchronize()
        t0 = time.time()
        paths = torch.cat([greedy_path(model, x[i:i + b], y[i:i + b], c, stats=stats)
                           for i in range(0, n, b)])
        if cuda:
            torch.cuda.synchronize()
        dt = time.time() - t0
        ref = paths if ref is None else ref
        r = dict(precision=prec, sdpa=sdpa, recheck=recheck, compile=cfg.compile,
                 s_per_image=dt / n, images_per_s=n / dt,
                 tflops=flops_img * n / dt / 1e12,  # rechecks not counted as work
                 rechecked=stats.get("rechecked", 0) / stats["rows"],
                 same_paths=(paths == ref).all(-1).all(-1).float().mean().item(),
                 same_neurons=(paths == ref).float().mean().item())
        results.append(r)
        print(f"bench {prec:4s} sdpa={int(sdpa)} recheck={recheck:g} | "
              f"{r['s_per_image']:.4f} s/image | {r['images_per_s']:.1f} img/s | "
              f"{r['tflops']:.3g} TFLOP/s | rechecked {100 * r['rechecked']:.1f}% | identical "
              f"paths {100 * r['same_paths']:.0f}% (neurons {100 * r['same_neurons']:.1f}%)")
    set_matmul_precision("fp32")
    write_json(os.path.join(cfg.out_dir, "bench.json"),
               {"device": torch.cuda.get_device_name() if cuda else device, "model": cfg.model,
                "weights": cfg.weights or "torchvision", "batch": cfg.path_batch, "m": cfg.m,
                "runs": results})
    return results

# -----------------------------------------------------------------------------
# Data: any image dataset data.py loads, checked before anything is written

def data_name(cfg):
    if cfg.dataset == "auto":
        return "cifar10" if cfg.model == "vit_cifar" else "imagenette"
    return cfg.dataset

def load_data(cfg):
    """Images as uint8 (N, C, S, S) and labels in the model's label space; checked against cfg."""
    name = data_name(cfg)
    if name == "imagenette":
        tgz = os.path.join(data.DATA_DIR, "imagenette2-160.tgz")
        if not os.path.exists(tgz):
            raise data.DataError(f"Imagenette not found at {tgz}: download https://s3.amazonaws"
                                 ".com/fast-ai-imageclas/imagenette2-160.tgz there")
        name = f"imagefolder:{tgz}"
    size = cfg.image_size if name.startswith("imagefolder:") else None  # folders: resized
    t0 = time.time()
    print(f"loading {name} (a first run decodes the images and caches them in data/)")
    ds = data.load_images(name, data_dir=data.DATA_DIR, size=size)  # damaged caches rebuilt
    print(f"loaded {len(ds['train'][1])} training and {len(ds['test'][1])} test images "
          f"in {time.time() - t0:.1f} s")
    cls = ds["classes"]
    if cfg.model == "vit_b_16":  # folder classes -> ImageNet indices
        if all(c in IMAGENETTE for c in cls):
            idx = torch.tensor([IMAGENETTE[c] for c in cls])
        elif len(cls) == 1000:
            idx = torch.arange(1000)  # a full ImageNet-style folder: sorted wnids = ImageNet order
        else:
            raise data.DataError(f"cannot map the {len(cls)} classes of {name} to ImageNet "
                                 "indices: use Imagenette's wnids or a 1000-class ImageNet folder")
        ds = {s: (ds[s][0], idx[ds[s][1]]) for s in ("train", "test")}
        ds |= {"classes": cls, "imagenet_idx": idx}
    elif len(cls) != cfg.n_class:
        raise ValueError(f"{name} has {len(cls)} classes but --n_class={cfg.n_class}: "
                         f"pass --n_class={len(cls)}")
    shape = tuple(ds["test"][0].shape[1:])
    want = 3 if cfg.model == "vit_b_16" else shape[0]
    if shape != (want, cfg.image_size, cfg.image_size):
        raise data.DataError(f"{name} images are {shape}, the model wants "
                             f"({want}, {cfg.image_size}, {cfg.image_size})")
    n_test, n_train = len(ds["test"][1]), len(ds["train"][1])
    if cfg.n_images > n_test:
        raise ValueError(f"--n_images={cfg.n_images} but {name} has {n_test} test images")
    if cfg.model == "vit_cifar" and (cfg.n_train > n_train or n_train == 0):
        raise ValueError(f"--n_train={cfg.n_train} but {name} has {n_train} training images")
    return ds

def balanced_subset(Y, n, n_class, seed):
    """n test indices taken round-robin over the classes (as balanced as possible), sorted."""
    g = np.random.default_rng(seed)
    per = [g.permutation(np.flatnonzero(Y == c)) for c in range(n_class)]
    order = [p[i] for i in range(max(map(len, per))) for p in per if i < len(p)]
    return np.sort(np.array(order[:n], dtype=np.int64))

# -----------------------------------------------------------------------------
# main: train or reuse the model, analyse the test images, summarise, plot

def analyse(model, X, Y, cfg, stats, device, gen):
    """Evaluations 1-2 on uint8 images X (N, C, S, S), labels Y (N,), in path_batch batches.
    Returns per-image arrays: paths[method] (N, L), jas[method] (N,), p_orig, pred_orig (N,),
    ratio[op][method] = p_edit / p_orig (N,), correct_after[op][method] (N,) 0/1."""
    H = cfg.mlp_ratio * cfg.n_embd
    paths, scores = {k: [] for k in METHODS}, {k: [] for k in METHODS}
    ratio = {op: {k: [] for k in METHODS} for op in EDITS}
    correct_after = {op: {k: [] for k in METHODS} for op in EDITS}
    p_orig, pred_orig = [], []
    t_start = time.time()
    batches = [np.arange(i, min(i + cfg.path_batch, len(X))) for i in range(0, len(X),
                                                                            cfg.path_batch)]
    for bi, b in enumerate(batches):
        t0 = time.time()
        x, y = normalise(X[b].to(device), stats), Y[b].to(device)
        path, score, logits = find_all_paths(model, x, y, cfg, gen)
        p0 = logits.softmax(-1).gather(1, y[:, None])[:, 0]  # (b,) clean p(true)
        p_orig.append(p0.cpu())
        pred_orig.append(logits.argmax(-1).cpu())
        for k in METHODS:
            paths[k].append(path[k].cpu())
            scores[k].append(score[k].cpu())
            masks = to_masks(path[k][..., None], H)
            for op, factor in EDITS.items():  # evaluation 2: edits at CLS in all layers at once
                p_edit, pred = edited_probs(model, x, y, masks, factor=factor)
                ratio[op][k].append((p_edit / p0).cpu())
                correct_after[op][k].append((pred == y).float().cpu())
        dt = (time.time() - t_start) / (bi + 1)
        jas_now = " ".join(f"{k} {scores[k][-1].mean():.2e}" for k in METHODS[:3])
        print(f"paths {b[-1] + 1:5d}/{len(X)} | {1000 * (time.time() - t0) / len(b):.1f} ms/image"
              f" | JAS {jas_now} | eta {fmt_time(dt * (len(batches) - bi - 1))}")
    cat = lambda v: torch.cat(v).numpy()
    return dict(paths={k: cat(v) for k, v in paths.items()},
                jas={k: cat(v) for k, v in scores.items()},
                ratio={op: {k: cat(v) for k, v in d.items()} for op, d in ratio.items()},
                correct_after={op: {k: cat(v) for k, v in d.items()}
                               for op, d in correct_after.items()},
                p_orig=cat(p_orig), pred_orig=cat(pred_orig))

def summarise(res, Y, ycls, n_class):
    """Evaluation 2 aggregated as in the paper: per class the mean p_edit / p_orig, then the
    median over classes (all images, and correctly classified images only); the accuracy change
    per class, averaged over classes. Returns (per-method dict, class_ratio for the plots)."""
    correct_before = (res["pred_orig"] == Y).astype(float)  # (N,)
    ok = correct_before == 1
    class_ratio = {"all": {}, "correct": {}}
    methods = {k: {"mean_jas": float(res["jas"][k].mean()),
                   "median_jas": float(np.median(res["jas"][k]))} for k in METHODS}
    for op in EDITS:
        class_ratio["all"][op], class_ratio["correct"][op] = {}, {}
        for k in METHODS:
            r = res["ratio"][op][k]
            class_ratio["all"][op][k] = per_class_mean(r, ycls, n_class)
            class_ratio["correct"][op][k] = per_class_mean(r[ok], ycls[ok], n_class)
            acc_change = res["correct_after"][op][k] - correct_before
            methods[k][f"{op}_ratio_median"] = float(np.median(class_ratio["all"][op][k]))
            corr = class_ratio["correct"][op][k]
            methods[k][f"{op}_ratio_median_correct"] = float(np.median(corr)) if ok.any() else None
            methods[k][f"acc_dev_{op}"] = float(np.mean(per_class_mean(acc_change, ycls, n_class)))
    return methods, class_ratio

def norm_stats(cfg, ds):
    """Per-channel (mean, std) for normalise: ImageNet's for ViT-B/16, CIFAR-10's published
    training-set values, else computed from the training images."""
    if cfg.model == "vit_b_16":
        stats = IMAGENET_STATS
    elif data_name(cfg) == "cifar10":
        stats = CIFAR10_STATS
    else:
        X_fit = ds["train"][0][:cfg.n_train] if cfg.n_train else ds["train"][0]
        stats = tuple(t.tolist() for t in channel_stats(X_fit))
    print("normalisation mean " + " ".join(f"{v:.4f}" for v in stats[0]) + " | std "
          + " ".join(f"{v:.4f}" for v in stats[1]))
    return stats

def write_paths(path, res, sub, Y, ycls, classes):
    """paths.jsonl: one record per analysed image, with every method's path and JAS."""
    def write(tmp):
        with open(tmp, "w") as f:
            for i in range(len(sub)):
                paths = {k: {"path": res["paths"][k][i].tolist(), "jas": float(res["jas"][k][i])}
                         for k in METHODS}
                rec = {"index": int(sub[i]), "label": int(Y[i]), "class": classes[ycls[i]],
                       "p_orig": float(res["p_orig"][i]), "pred": int(res["pred_orig"][i]),
                       "methods": paths}
                f.write(json.dumps(rec) + "\n")
    write_atomic(path, write)

def save_npy(path, arr):
    with open(path, "wb") as f:
        np.save(f, arr)  # a file object: given a name, np.save would add .npy to it

def print_table(methods, closest):
    cols = ("mean_jas", "zero_ratio_median", "double_ratio_median", "acc_dev_zero",
            "acc_dev_double")
    print(f"\n{'method':11s} | mean JAS  | zero ratio | double ratio | acc dev zero | acc dev x2")
    for k, v in methods.items():
        a, z, d, az, ad = (v[c] for c in cols)
        print(f"{k:11s} | {a:9.2e} | {z:10.3f} | {d:12.3f} | {az:+12.3f} | {ad:+10.3f}")
    print("closest classes: " + ", ".join(f"{c['a']}-{c['b']} {c['cos']:.2f}" for c in closest[:3]))

def main(cfg):
    """Check the config and the device, then run (on a CPU with cfg.threads threads)."""
    check_config(cfg)
    device = get_device(cfg.device)  # an absent GPU fails here, before any data is read
    threads = torch.get_num_threads()
    if device == "cpu":  # small models on a shared CPU: extra threads mostly wait for each other
        torch.set_num_threads(cfg.threads or 1)
    try:
        return run(cfg, device)
    finally:
        torch.set_num_threads(threads)

def run(cfg, device):
    print(f"device {device} | config {json.dumps(asdict(cfg))}")
    # weights, images and the old checkpoint come first: a bad input writes nothing
    sd = fetch_vit_b_16(cfg) if cfg.model == "vit_b_16" and cfg.weights != "random" else None
    ds = None if cfg.bench else load_data(cfg)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    ck, plan, key = None, "new", ""
    if cfg.model == "vit_cifar" and not cfg.bench:
        key = data_key(ds)
        ck = None if cfg.retrain else read_ckpt(ckpt_path)  # --retrain never reads it
        plan = plan_training(ck, cfg, key, ckpt_path)
    os.makedirs(cfg.out_dir, exist_ok=True)
    write_json(os.path.join(cfg.out_dir, "config.json"), asdict(cfg))
    logf = open(os.path.join(cfg.out_dir, "log.jsonl"), "a")
    log = lambda d: (logf.write(json.dumps(d) + "\n"), logf.flush())
    set_seed(cfg.seed)
    channels = 3 if ds is None else ds["train"][0].shape[1]
    model = ViT(cfg, channels)
    if sd is not None:
        load_torchvision_vit_b_16(model, sd)
    model.to(device)
    if cfg.bench:
        return bench(model, cfg, device)
    stats = norm_stats(cfg, ds)
    classes, n_class, history = ds["classes"], len(ds["classes"]), []
    if plan == "reuse":
        model.load_state_dict(ck["model"])
        history = ck["extras"]["history"]
        print(f"reusing the trained model in {ckpt_path}")
    elif cfg.model == "vit_cifar":
        flip = data_name(cfg) != "mnist"  # a mirrored digit is another glyph (or none)
        ck = ck if plan in ("resume", "extend") else None
        history = train_vit(model, ds, cfg, stats, device, log, ck, key, flip)
    set_seed(cfg.seed)  # the analysis starts from the same RNG state, trained or reused
    model.eval()
    for p in model.parameters():  # attribution needs gradients w.r.t. CLS rows only
        p.requires_grad_(False)
    if device == "cuda":
        set_matmul_precision(cfg.precision)
    Xte, Yte = ds["test"]
    print(f"evaluating the clean model on {len(Yte)} test images")
    clean_acc = evaluate(model, Xte, Yte, stats, device)
    print(f"clean test accuracy {clean_acc:.4f} on {len(Yte)} images")
    if cfg.n_images == 0:  # train (or check) the model only
        logf.close()
        return {"clean_acc": clean_acc}
    # the analysed subset, in the model's label space; ycls = folder class (per-class means)
    y_cls_all = Yte if cfg.model == "vit_cifar" else torch.searchsorted(ds["imagenet_idx"], Yte)
    sub = balanced_subset(y_cls_all.numpy(), cfg.n_images, n_class, cfg.seed)
    X, Y, ycls = Xte[sub], Yte[sub], y_cls_all[sub].numpy()
    gen = torch.Generator().manual_seed(cfg.seed)
    H, t_start = cfg.mlp_ratio * cfg.n_embd, time.time()
    res = analyse(model, X, Y, cfg, stats, device, gen)
    P, S = res["paths"], res["jas"]
    write_paths(os.path.join(cfg.out_dir, "paths.jsonl"), res, sub, Y, ycls, classes)
    methods, class_ratio = summarise(res, Y.numpy(), ycls, n_class)
    # evaluation 3: class-level frequency matrices and their cosine similarity
    freq, sim = class_similarity(P["greedy"], ycls, n_class, H)
    off = [(sim[i, j], classes[i], classes[j]) for i in range(n_class)
           for j in range(i + 1, n_class)]
    closest = [dict(a=a, b=b, cos=float(s)) for s, a, b in sorted(off, reverse=True)[:5]]
    write_atomic(os.path.join(cfg.out_dir, "class_freq.npy"), lambda tmp: save_npy(tmp, freq))
    b = np.arange(min(len(X), cfg.path_batch))  # the whole-layer trick against exact scores
    print(f"checking the whole-layer trick against exact scores on {len(b)} images")
    x_b = normalise(X[b].to(device), stats)
    trick = trick_agreement(model, x_b, Y[b].to(device), cfg)
    print("whole-layer trick = exact best of its top 10, per layer: "
          + " ".join(f"{a:.2f}" for a in trick))
    # evaluation 4: pruning
    pruning = pruning_eval(model, X, Y, cfg, stats, device, gen, log, paths1=P["greedy"])
    summary = dict(clean_acc=clean_acc, n_images=len(X),
                   subset_acc=float((res["pred_orig"] == Y.numpy()).mean()), methods=methods,
                   pruning=pruning, closest_classes=closest, trick_agreement=trick,
                   wall_s=time.time() - t_start)
    write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
    log({"event": "summary", **summary})
    print_table(methods, closest)
    if cfg.plot:
        summ = dict(class_ratio=class_ratio, sim=sim, pruning=pruning)
        for p in save_plots(dict(y=ycls, jas=S, paths=P), summ, cfg, classes, X[:4], history):
            print(f"wrote {p}")
    print(f"clean acc {clean_acc:.4f} | {len(X)} images analysed in "
          f"{fmt_time(time.time() - t_start)} | out {cfg.out_dir}")
    logf.close()
    return summary

def interrupted_line(cfg):
    """Ctrl-C: where the run stopped and how to continue it, in one line."""
    ck = os.path.join(cfg.out_dir, "ckpt.pt")
    try:
        e = torch.load(ck, map_location="cpu", weights_only=True)["extras"]
        where = (f"the model is trained ({ck})" if e["done"] else
                 f"after epoch {e['epoch']}/{cfg.epochs} (checkpoint {ck})")
    except Exception:
        where = "before the first checkpoint"
    return f"interrupted {where}: run the same command again to continue"

def cli(argv=None):
    """The command line: a user's mistake is one `error:` line on stderr and exit code 2."""
    cfg = None
    try:
        cfg = parse_config(argv)
        main(cfg)
        return 0
    except (ValueError, data.DataError, FloatingPointError) as e:  # one clear line
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted_line(cfg) if cfg else "interrupted", file=sys.stderr)
        return 130

if __name__ == "__main__":
    sys.exit(cli())
