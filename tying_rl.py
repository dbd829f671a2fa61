"""
Dynamic Layer Tying: a GPT whose blocks an RL agent ties to earlier blocks during training.

Paper: "Dynamic Layer Tying for Parameter-Efficient Transformers", Tamir David-Hay & Lior Wolf,
ICLR 2024, arXiv 2401.12819 (official code: tamirdh/Dynamic-Layer-Tying, code/dqn_trainer.py).
The idea: every block position i has a source src[i] <= i (i itself = trainable). A small
Q-network looks at the vector src and, sweeping over layers 1..L-1, picks for layer l either
"train independently" or "copy layer k < l" (epsilon-greedy). After each action the LM trains a
few steps; the reward is minus the perplexity of one fresh training batch, clipped to [-10, 10].
A tied position holds no weights, gradients or AdamW state, so memory and trainable parameters
fall while the depth stays L. Exact algorithm: the official code; the decisions D1-D18 where the
paper is silent or the code differs: docs/tying_rl.md, "Implementation details".

Sections: config -> utilities -> GPT with tie map -> agents -> eval / reward -> train ->
speed (compiled forward, bench) -> plots -> main.  Dimension letters: B batch, T time,
C channels (n_embd), nh heads, hs head
size, L layers.

Run (PTB, GPT-2 tokenizer; copy data first: mkdir -p data/ptb && cp <ptb files> data/ptb/):
    python tying_rl.py                          # 24 x 512 GPT, Q-agent, 60 episodes (one H100)
    python tying_rl.py --agent=none             # the conventional baseline, same budget
    python tying_rl.py --preset=tiny --device=cpu   # CPU smoke run, under a minute
    python tying_rl.py --preset=overfit --device=cpu --agent=none   # small corpus, many epochs
    python tying_rl.py --preset=paper --episodes=2  # paper scale (48 x 1600), memory check
    python tying_rl.py --mode=bench --compile=True  # speed: GPT-2-small shape, tokens/s, MFU
Expected output, measured numbers and what is not yet measured: docs/tying_rl.md.
"""
import argparse
import inspect
import json
import math
import os
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.func import functional_call

import data

# -----------------------------------------------------------------------------
# config

@dataclass
class Config:
    # data
    dataset: str = "ptb"           # ptb | wikitext2 | wikitext103 | shakespeare | text:PATH
    tokenizer: str = "gpt2"        # gpt2 (tiktoken, vocab 50257) | char
    data_dir: str = ""             # '' = data.DATA_DIR (<repo>/data)
    preset: str = "default"        # default (24x512) | paper (48x1600) | tiny | overfit (CPU)
    train_tokens: int = 0          # use only the first N training tokens (0 = all): a small corpus
    # model (nanoGPT names)
    n_layer: int = 24              # depth L; the paper uses 48
    n_head: int = 8                # attention heads; n_embd % n_head == 0
    n_embd: int = 512              # width C; the paper uses 1600
    block_size: int = 256          # context T; the paper uses 256
    dropout: float = 0.2           # the paper hard-codes 0.2
    bias: bool = True              # biases in Linear and LayerNorm (GPT-2 style)
    # optimizer (official: AdamW, constant lr, wd 0.01 on every parameter, clip 1.0)
    lr: float = 3e-4               # constant lr; the paper uses 1e-4 at width 1600
    weight_decay: float = 0.01     # applied to every parameter, as in the official code
    grad_clip: float = 1.0         # clip the global grad norm; 0 = off
    warmup_iters: int = 0          # >0 turns on linear warmup + cosine decay to lr/10 (optional)
    pure_bf16: bool = False        # official: weights cast to bf16, no fp32 master (CUDA only)
    # training (one episode = one sweep over layers 1..L-1 = (L-1)*steps_per_action LM steps)
    episodes: int = 60             # number of sweeps (the official --epochs); paper 300
    batch_size: int = 16           # sequences per LM step; paper 16
    eval_interval: int = 5         # evaluate val (and test, official style) every N episodes
    eval_batch_size: int = 16      # sequences per eval batch
    eval_max_batches: int = 0      # cap for the periodic evals (0 = whole split)
    final_max_batches: int = 0     # cap for the final eval of the selected checkpoint (0 = whole)
    log_interval: int = 50         # LM steps between progress lines
    # agent (D-numbers: docs/tying_rl.md, "Implementation details")
    agent: str = "q"              # q, reinforce, random, sequence, rev, roundrobin, universal, none
    steps_per_action: int = 4      # D5: LM steps after each action (4 latest, 10 submission)
    gamma: float = 0.99            # TD discount
    eps_start: float = 1.0         # D9: epsilon at the start
    eps_decay: float = 0.95        # D9: epsilon *= eps_decay after each sweep
    eps_min: float = 0.01          # D9: epsilon floor (official 0.01)
    agent_lr: float = 1e-3         # AdamW lr of the Q / policy network (wd 0.01)
    reward: str = "negppl_clip10"  # D6: negppl_clip10 (official) | negloss | delta
    reward_clip: float = 10.0      # clip for negppl_clip10
    param_penalty: float = 0.0     # D6: reward -= param_penalty * trainable_blocks / L
    td_next_layer: bool = False    # D7: bootstrap from layer l+1's block (official: same layer)
    entropy_coef: float = 0.01     # reinforce: entropy bonus
    baseline_beta: float = 0.9     # reinforce: moving-average reward baseline per layer
    tie_grad: str = "detached"     # D1: detached (official, copy sends no grad) | shared (ALBERT)
    untie: str = "clone"           # D2: clone (own copy, fresh AdamW state) | alias (official)
    init_state: str = "tied"       # D4: tied (all -> layer 0 for real) | untied | official
    fair_start: bool = True        # D19: sequence/rev/universal start as their map on fresh weights
    # system
    device: str = "auto"           # auto (cuda -> mps -> cpu) | cuda | mps | cpu
    seed: int = 1337               # seeds the model, dropout, LM batches, reward batches, agent
    threads: int = 0               # CPU threads for torch (0 = torch's default)
    compile: bool = False          # torch.compile the LM forward (one graph for every tie map)
    out_dir: str = "out/tying_rl"  # config.json, log.jsonl, ckpt.pt, best.pt, summary.json, PNGs
    plot: bool = True              # write PNGs
    resume: bool = False           # continue from out_dir/ckpt.pt
    mode: str = "train"            # train | bench
    bench_steps: int = 2           # bench: timed episodes ((L-1)*steps_per_action LM steps each)
    peak_tflops: float = 0.0       # MFU peak override; 0 = look up the GPU name

PRESETS = {
    "default": {},
    "paper": dict(n_layer=48, n_embd=1600, n_head=16, dropout=0.2, block_size=256, batch_size=16,
                  lr=1e-4, episodes=300, eval_interval=10, pure_bf16=True),
    "tiny": dict(tokenizer="char", n_layer=4, n_embd=32, n_head=2, block_size=32, batch_size=4,
                 episodes=3, eval_interval=1, eval_batch_size=32, eval_max_batches=4,
                 final_max_batches=64, log_interval=4, steps_per_action=2, lr=1e-3, dropout=0.0,
                 threads=1),
    # the regime of the paper's long runs at CPU size: 4k characters of PTB seen ~150 times
    "overfit": dict(tokenizer="char", train_tokens=4_000, n_layer=6, n_embd=64, n_head=4,
                    block_size=64, batch_size=8, episodes=60, eval_interval=2, eval_batch_size=16,
                    eval_max_batches=4, final_max_batches=4, log_interval=200, lr=2e-3,
                    dropout=0.0, threads=1),
}
BENCH = dict(n_layer=12, n_embd=768, n_head=12, block_size=1024, batch_size=12, dropout=0.0)
STATIC_PATTERNS = ("sequence", "rev", "universal")  # fixed maps: fair_start applies (D19)
AGENTS = ("q", "reinforce", "random", "sequence", "rev", "roundrobin", "universal", "none")
CHOICES = dict(preset=tuple(PRESETS), agent=AGENTS, reward=("negppl_clip10", "negloss", "delta"),
               tie_grad=("detached", "shared"), untie=("clone", "alias"), mode=("train", "bench"),
               init_state=("tied", "untied", "official"),
               tokenizer=("gpt2", "char"))
DATASETS = ("ptb", "wikitext2", "wikitext103", "shakespeare")
RESUME_MAY_DIFFER = {"resume", "episodes", "plot", "device", "out_dir", "compile", "log_interval",
                     "eval_interval", "data_dir", "mode", "bench_steps", "peak_tflops", "threads",
                     "final_max_batches"}

def validate(cfg):
    """Fail at start with one clear message (ValueError) for impossible configs."""
    for k, allowed in CHOICES.items():
        if getattr(cfg, k) not in allowed:
            raise ValueError(f"unknown {k} {getattr(cfg, k)!r}: choose one of {', '.join(allowed)}")
    if cfg.dataset not in DATASETS and not cfg.dataset.startswith("text:"):
        raise ValueError(f"unknown dataset {cfg.dataset!r}: choose one of {', '.join(DATASETS)} "
                         f"or text:PATH")
    if cfg.n_head < 1 or cfg.n_embd % cfg.n_head:
        raise ValueError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}")
    if cfg.steps_per_action < 1:
        raise ValueError(f"steps_per_action={cfg.steps_per_action} must be >= 1")
    if min(cfg.n_layer - 1, cfg.episodes, cfg.batch_size, cfg.eval_interval, cfg.eval_batch_size,
           cfg.log_interval, cfg.bench_steps) < 1:
        raise ValueError("need n_layer >= 2 and episodes, batch_size, eval_interval, "
                         "eval_batch_size, log_interval, bench_steps >= 1")
    if min(cfg.eval_max_batches, cfg.final_max_batches, cfg.train_tokens, cfg.threads) < 0:
        raise ValueError("need eval_max_batches, final_max_batches, train_tokens, threads >= 0 "
                         "(0 = no cap)")
    get_device(cfg.device)  # --device=cuda without a GPU fails here, before any data is read

class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line through main's error path, not usage + message
        raise ValueError(message.removeprefix("argument "))

def to_bool(s):
    b = {"true": True, "1": True, "false": False, "0": False}.get(s.lower())
    if b is None:
        raise argparse.ArgumentTypeError(f"{s!r} is not a boolean: use true/false/1/0")
    return b

def parse_config(argv=None):
    """--key=value flags from the Config fields; a --preset's values sit under explicit flags."""
    p = ArgumentParser(description=__doc__.split("\n")[1])
    src = inspect.getsource(Config)
    helps = dict(re.findall(r"^    (\w+): .*?# (.*)$", src, re.M))  # the field comments
    for f in fields(Config):
        p.add_argument(f"--{f.name}", type=to_bool if f.type in (bool, "bool") else type(f.default),
                       default=None,
                       help=f"{helps.get(f.name, '')} (default {f.default!r})".replace("%", "%%"))
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    preset = given.get("preset", "default")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    bench = given.get("mode") == "bench" and preset == "default"  # bench: GPT-2-small shape
    cfg = Config(**{**(BENCH if bench else PRESETS[preset]), **given})
    validate(cfg)
    return cfg

# -----------------------------------------------------------------------------
# utilities

def get_device(pref="auto"):
    """auto = cuda -> mps -> cpu; an explicit device that is not there is a ValueError."""
    have = (["cuda"] * torch.cuda.is_available() + ["mps"] * torch.backends.mps.is_available()
            + ["cpu"])
    if pref == "auto":
        return have[0]
    if pref.split(":")[0] not in have:
        raise ValueError(f"--device={pref} is not available on this machine: use one of auto, "
                         f"{', '.join(have)}")
    return pref

def autocast_ctx(device, cfg):
    # bf16 autocast only on CUDA with bf16; fp32 elsewhere; pure_bf16 weights need no autocast
    if device.startswith("cuda") and torch.cuda.is_bf16_supported() and not cfg.pure_bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()

def set_seed(seed):
    import random
    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

def get_lr(it, total, cfg):
    """Constant lr (official); with warmup_iters > 0, linear warmup then cosine to lr/10."""
    if cfg.warmup_iters <= 0:
        return cfg.lr
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / cfg.warmup_iters
    ratio = min(1.0, (it - cfg.warmup_iters) / max(1, total - cfg.warmup_iters))
    return cfg.lr / 10 + 0.5 * (1 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.lr / 10)

def peak_flops(cfg):
    if cfg.peak_tflops > 0 or not torch.cuda.is_available():
        return cfg.peak_tflops * 1e12 or None
    table = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # bf16 dense
    return next((v for k, v in table.items() if k in torch.cuda.get_device_name()), None)

# -----------------------------------------------------------------------------
# GPT (nanoGPT module names and state-dict keys) with a tie map

@dataclass
class GPTConfig:
    block_size: int = 256
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True

class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout = config.n_head, config.dropout

    def forward(self, x):
        q, k, v = self.c_attn(x).chunk(3, dim=2)  # 3 x (B, T, C)
        q, k, v = (rearrange(t, "b t (nh hs) -> b nh t hs", nh=self.n_head) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        y = rearrange(y, "b nh t hs -> b t (nh hs)")
        return self.resid_dropout(self.c_proj(y))  # (B, T, C)

class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's gelu_new
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, 4C) -> (B, T, C)

class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

class Tied(nn.Module):
    """Placeholder at a tied position: no parameters, no buffers, no state-dict keys.
    Design: transformer.h stays a ModuleList of length L (so the untied model has exactly
    nanoGPT's keys); a tied position's Block is *replaced* by this empty module, so its tensors
    are freed for real, and GPT.forward runs the root's Block there. The tie itself is data:
    the list GPT.src, printed and logged, never hidden in module surgery. It has no forward."""

def empty_block(config, like):
    """An uninitialised Block on like's device and dtype (built on 'meta': no RNG, no init cost)."""
    with torch.device("meta"):
        blk = Block(config)
    return blk.to_empty(device=like.device).to(like.dtype)

class GPT(nn.Module):
    def __init__(self, config, tie_grad="detached"):
        super().__init__()
        self.config, self.tie_grad = config, tie_grad
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying (nanoGPT)
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):  # scaled residual init (GPT-2)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.src = list(range(config.n_layer))  # src[i] = i: trainable; src[i] = j < i: copies j

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    # ALGO LOGIC: tie map. D3: chains resolve at forward time: follow src until a position that
    # owns a Block. Cycles are impossible because src[i] < i for every tied position.
    def root(self, i):
        while not isinstance(self.transformer.h[i], Block):
            i = self.src[i]
        return i

    def tie_map(self):
        return [self.root(i) for i in range(self.config.n_layer)]

    def tie(self, i, j):
        """Layer i copies layer j < i: its Block (weights, grads) is dropped. Returns True if
        changed."""
        assert 0 <= j < i, f"layer {i} can only copy an earlier layer, got {j}"
        changed = self.src[i] != j or isinstance(self.transformer.h[i], Block)
        self.src[i] = j
        if isinstance(self.transformer.h[i], Block):
            self.transformer.h[i] = Tied()  # the old Block is garbage once the optimizer forgets it
        return changed

    def untie(self, i, mode="clone"):
        """Layer i trains independently. D2: clone = own copy of its root's current weights;
        alias = the official behaviour: new Parameters that share the root's storage, so two
        positions (with two AdamW states) update the same tensor. Returns True if changed."""
        blk = self.transformer.h[i]
        if isinstance(blk, Block):  # already owns weights (maybe frozen by init_state=official)
            changed = self.src[i] != i or not blk.ln_1.weight.requires_grad
            blk.requires_grad_(True)
            self.src[i] = i
            return changed
        root_blk = self.transformer.h[self.root(i)]
        new = empty_block(self.config, next(root_blk.parameters()))
        with torch.no_grad():
            for p, q in zip(new.parameters(), root_blk.parameters()):
                if mode == "alias":
                    p.data = q.data  # official: the new Parameter shares the root's storage
                else:
                    p.copy_(q)  # clone: separate storage, equal values
        new.requires_grad_(True)
        self.transformer.h[i], self.src[i] = new, i
        return True

    def apply_action(self, l, a, untie="clone"):
        """Action a for layer l: a < l copies layer a, a == l trains layer l (paper: action
        space)."""
        return self.untie(l, untie) if a == l else self.tie(l, a)

    def forward(self, idx, targets=None):
        """idx (B, T) -> (logits (B, T, V), mean CE or None). Unlike nanoGPT, logits are returned
        for every position also when targets is None.
        EXERCISE: add nanoGPT's generate() and sample from the selected checkpoint."""
        T = idx.size(1)
        assert T <= self.config.block_size, f"sequence {T} > block_size {self.config.block_size}"
        x = self.embed(idx)  # (B, T, C)
        for i, blk in enumerate(self.transformer.h):
            if isinstance(blk, Block):
                x = blk(x)  # own weights (trainable, or frozen with init_state=official)
                continue
            # ALGO LOGIC: a tied position runs its root's Block. D1 detached (default, official):
            # the weights enter as constants, so no gradient reaches the root from this position
            # (gradient still flows through x to earlier layers). shared: ALBERT-style sum.
            rb = self.transformer.h[self.root(i)]
            if self.tie_grad == "shared":
                x = rb(x)
            else:
                x = functional_call(rb, {k: v.detach() for k, v in rb.named_parameters()}, (x,))
        return self.head(x, targets)

    def embed(self, idx):  # (B, T) -> (B, T, C): token + learned position embeddings
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))

    def head(self, x, targets=None):  # (B, T, C) -> logits (B, T, V), mean CE or None
        logits = self.lm_head(self.transformer.ln_f(x))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    # -- counting (D18): unique storages, so aliased tensors count once --------------------
    def num_params(self, trainable_only=False, blocks_only=False):
        mods = [b for b in self.transformer.h if isinstance(b, Block)] if blocks_only else [self]
        seen, n = set(), 0
        for m in mods:
            for p in m.parameters():
                if (p.requires_grad or not trainable_only) and p.data_ptr() not in seen:
                    seen.add(p.data_ptr())
                    n += p.numel()
        return n

    def flops_per_token(self, T):
        """PaLM-style count: 6 FLOPs/weight for weights that get a gradient, 4 for tied detached
        positions and frozen blocks (no weight-gradient matmul), every position counted (effective
        depth) + attention 12*L*C*T; position embeddings excluded."""
        # layer 0 always owns
        per_block = sum(p.numel() for p in self.transformer.h[0].parameters())
        # shared: a tied position's weight gradient goes to its (trainable) root
        st = structure(self)
        grads = [t or (self.tie_grad == "shared" and not o and st["trains"][self.root(i)])
                 for i, (o, t) in enumerate(zip(st["own"], st["trains"]))]
        n = sum(per_block * (6 if g else 4) for g in grads) + 6 * self.lm_head.weight.numel()
        return n + 12 * self.config.n_layer * self.config.n_embd * T

def set_initial_state(model, init_state):
    """D4: 'tied' = every layer really tied to layer 0 (matches the agent's all-zero state);
    'untied' = all trainable; 'official' = state says 'copy 0' but blocks keep their own random
    weights, frozen (requires_grad False) until the agent acts on them."""
    for i in range(1, model.config.n_layer):
        if init_state == "tied":
            model.tie(i, 0)
        elif init_state == "official":
            model.transformer.h[i].requires_grad_(False)
            model.src[i] = 0

def structure(model):
    """Plain-type description of which positions own a Block (and if it trains, and which earlier
    Block's storage it shares under --untie=alias, else -1): for ckpts."""
    h = model.transformer.h
    ptr = [b.ln_1.weight.data_ptr() if isinstance(b, Block) else -1 for b in h]
    return dict(src=list(model.src), own=[isinstance(b, Block) for b in h],
                trains=[isinstance(b, Block) and b.ln_1.weight.requires_grad for b in h],
                alias=[next((j for j in range(i) if ptr[j] == ptr[i] != -1), -1)
                       for i in range(len(h))])

def restore_structure(model, st):
    """Rebuild Tied placeholders / fresh empty Blocks (on the model's device) so that a saved state
    dict loads into them, then re-share the storages of --untie=alias pairs: a resumed alias run
    trains the same algorithm. Never reuse a Block: it may share storage with another."""
    # older ckpts: no alias
    h, alias = model.transformer.h, st.get("alias", [-1] * model.config.n_layer)
    for i in range(model.config.n_layer):
        h[i] = empty_block(model.config, model.lm_head.weight) if st["own"][i] else Tied()
        h[i].requires_grad_(st["trains"][i])
        if alias[i] >= 0:
            for p, q in zip(h[i].parameters(), h[alias[i]].parameters()):
                p.data = q.data  # as in GPT.untie(mode="alias")
    model.src = list(st["src"])

# -----------------------------------------------------------------------------
# optimizer bookkeeping: AdamW over exactly the parameters that currently train (D12)

def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]  # module order: deterministic

def make_optimizer(model, cfg, device):
    # --untie=alias puts two Parameters on one storage: fused / foreach kernels would update both at
    # once and lose one update on CUDA; the plain per-tensor loop applies both, as the official code
    kw = dict(fused=device.startswith("cuda"))
    if cfg.untie == "alias":
        kw = dict(fused=False, foreach=False)
    return torch.optim.AdamW(trainable(model), lr=cfg.lr, weight_decay=cfg.weight_decay, **kw)

def sync_optimizer(model, opt):
    """After a tie/untie: the one param group holds the trainable params in module order; the
    AdamW state (exp_avg, exp_avg_sq) of params that left is deleted, so a tied block's tensors
    are freed for real; params that joined start with fresh, lazily created state (D2, D12).
    (The official code never frees this state; that variant is not reproduced.)"""
    params = trainable(model)
    keep = {id(p) for p in params}
    for p in list(opt.state.keys()):
        if id(p) not in keep:
            del opt.state[p]
    opt.param_groups[0]["params"] = params

def state_bytes(model, opt):
    """Steady-state bytes counted tensor by tensor: unique parameter storages + gradients +
    optimizer state (activations excluded). Exists on every device (the CPU memory figure)."""
    seen, n = set(), 0
    for p in model.parameters():
        for t in [p, p.grad] + [v for v in opt.state.get(p, {}).values() if torch.is_tensor(v)]:
            if t is not None and t.data_ptr() not in seen and t.numel() > 1:
                seen.add(t.data_ptr())
                n += t.numel() * t.element_size()
    return n

# -----------------------------------------------------------------------------
# agents (cleanrl dqn.py names). Actions for layer l: 0..l-1 = copy that layer, l = train.

def block_slice(l):
    """Layer l's outputs in the concatenated head: offset l(l+1)/2, length l+1 (official
    get_dqn_net)."""
    off = l * (l + 1) // 2
    return slice(off, off + l + 1)

def QNetwork(n_layer):
    """MLP L -> 128 -> L(L+1)/2: one block of l+1 Q-values per layer (block 0 never used)."""
    n_out = n_layer * (n_layer + 1) // 2
    return nn.Sequential(nn.Linear(n_layer, 128), nn.ReLU(), nn.Linear(128, n_out))

def td_target(reward, q_next_block, gamma):
    """Official TD target: r + gamma * max_a' Q(s', a') over one layer's block, no terminal."""
    return reward + gamma * q_next_block.max()

class QAgent:
    """Online deep Q-learning exactly as the official code: one MSE step per transition, no
    replay buffer, no target network (D8), AdamW lr 1e-3 wd 0.01, epsilon-greedy per layer.
    EXERCISE: add cleanrl's replay buffer and target network (D8); does the Q-loss settle?"""
    learns = True

    def __init__(self, n_layer, cfg, seed):
        self.L, self.cfg = n_layer, cfg
        self.gen = torch.Generator().manual_seed(seed + 1)  # the agent's own: actions only
        with torch.random.fork_rng():  # the init leaves the global RNG (dropout) untouched
            torch.manual_seed(seed + 2)
            self.q_network = QNetwork(n_layer)
        params = self.q_network.parameters()
        self.optimizer = torch.optim.AdamW(params, lr=cfg.agent_lr, weight_decay=0.01)
        self.baseline = [None] * n_layer  # reinforce only: moving-average reward per layer

    def encode(self, src):
        return torch.tensor(src, dtype=torch.float32)  # D10: raw layer indices, as official

    @torch.no_grad()
    def head(self, src, l):
        """Layer l's l+1 outputs at state src: Q-values (q) or policy logits (reinforce)."""
        return self.q_network(self.encode(src))[block_slice(l)]

    def act(self, src, l, eps, sweep):
        # ALGO LOGIC: epsilon-greedy on layer l's block. Uniform exploration picks "train" with
        # probability 1/(l+1) only, so exploration is biased towards tying (docs, D9).
        if torch.rand(1, generator=self.gen).item() < eps:
            return int(torch.randint(l + 1, (1,), generator=self.gen))
        return int(self.head(src, l).argmax())

    def update(self, src, l, a, r, src2):
        # ALGO LOGIC: TD step. D7: the official target maxes over the SAME layer's block at s'.
        nl = (l % (self.L - 1)) + 1 if self.cfg.td_next_layer else l
        with torch.no_grad():
            target = td_target(r, self.q_network(self.encode(src2))[block_slice(nl)],
                               self.cfg.gamma)
        q = self.q_network(self.encode(src))[block_slice(l)][a]
        loss = F.mse_loss(q, target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return dict(q=q.item(), td_target=target.item(), td_loss=loss.item())

    def state_dict(self):
        return dict(net=self.q_network.state_dict(), opt=self.optimizer.state_dict(),
                    gen=self.gen.get_state(), baseline=self.baseline)

    def load_state_dict(self, d):
        self.q_network.load_state_dict(d["net"])
        self.optimizer.load_state_dict(d["opt"])
        self.gen.set_state(d["gen"])
        self.baseline = d["baseline"]

class ReinforceAgent(QAgent):
    """Policy gradient over the same actions: the same MLP gives per-layer logits (a categorical
    head per layer), a moving-average baseline per layer, and an entropy bonus. No epsilon."""

    def act(self, src, l, eps, sweep):
        probs = F.softmax(self.head(src, l), dim=-1)  # (l+1,)
        return int(torch.multinomial(probs, 1, generator=self.gen))

    def update(self, src, l, a, r, src2):
        # ALGO LOGIC: REINFORCE with baseline: loss = -(r - b_l) log pi(a|s) - beta * H(pi)
        b = r if self.baseline[l] is None else self.baseline[l]
        logp = F.log_softmax(self.q_network(self.encode(src))[block_slice(l)], dim=-1)
        entropy = -(logp.exp() * logp).sum()
        loss = -(r - b) * logp[a] - self.cfg.entropy_coef * entropy
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.baseline[l] = self.cfg.baseline_beta * b + (1 - self.cfg.baseline_beta) * r
        return dict(logp=logp[a].item(), baseline=b, entropy=entropy.item())

class FixedAgent:
    """No learning: random (uniform over l+1), or the official ablation patterns."""
    learns = False

    def __init__(self, n_layer, kind, seed):
        self.L, self.kind = n_layer, kind
        self.gen = torch.Generator().manual_seed(seed + 1)

    def act(self, src, l, eps, sweep):
        L = self.L
        if self.kind == "random":
            return int(torch.randint(l + 1, (1,), generator=self.gen))
        if self.kind == "sequence":  # odd layers copy the previous (even) layer: L/2 unique
            return l - 1 if l % 2 else l
        if self.kind == "rev":  # l < L/2 trainable, l >= L/2 copies L-1-l (mirror, Cycle(rev))
            return l if l < L // 2 else L - 1 - l
        # official (commented out): the previous target + 1, wrapping to 0
        if self.kind == "roundrobin":
            return src[l] + 1 if src[l] < l else 0
        return 0  # universal: every layer copies layer 0
        # EXERCISE: add a 'cycle' pattern (layer l copies l mod k, Takase & Kiyono's Cycle).

    def update(self, *args):
        return {}

    def state_dict(self):
        return dict(gen=self.gen.get_state())

    def load_state_dict(self, d):
        self.gen.set_state(d["gen"])

def make_agent(cfg, seed):
    if cfg.agent == "q":
        return QAgent(cfg.n_layer, cfg, seed)
    if cfg.agent == "reinforce":
        return ReinforceAgent(cfg.n_layer, cfg, seed)
    return None if cfg.agent == "none" else FixedAgent(cfg.n_layer, cfg.agent, seed)

# -----------------------------------------------------------------------------
# eval, reward, one LM step

@torch.no_grad()
def evaluate(model, arr, cfg, device, ctx, max_batches=0, name="eval"):
    """Perplexity over the split (every target once, data.iter_eval_batches): exp(sum CE / n).
    max_batches > 0 keeps the first max_batches batches. Prints progress every ~5 s."""
    model.eval()
    n_full = (len(arr) - 1) // cfg.block_size  # full windows, then one shorter remainder
    n_batches = math.ceil(n_full / cfg.eval_batch_size) + bool((len(arr) - 1) % cfg.block_size)
    n_batches = min(n_batches, max_batches) if max_batches else n_batches
    tot, n, t0, t_print = 0.0, 0, time.time(), time.time()
    for b, (x, y) in enumerate(
            data.iter_eval_batches(arr, cfg.eval_batch_size, cfg.block_size, device)):
        if b >= n_batches:
            break
        with ctx:
            logits, _ = model(x)
        ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        tot += ce.item()
        n += y.numel()
        if time.time() - t_print > 5:
            t_print, rate = time.time(), (b + 1) / (time.time() - t0)
            print(f"  {name}: batch {b + 1}/{n_batches} | eta {(n_batches - b - 1) / rate:.0f}s")
    model.train()
    return math.exp(tot / n), n

@torch.no_grad()
def batch_ce(model, x, y, ctx, fwd):
    """CE of one batch in eval mode (dropout off), as official evaluate_on_samples."""
    model.eval()
    with ctx:
        _, loss = fwd(x, y)
    model.train()
    return loss.item()

def reward_from_ce(ce, cfg, ce_before=None, trainable_blocks=0):
    """ALGO LOGIC (D6). Returns (reward, saturated). negppl_clip10 = clip(-exp(CE), -10, 10):
    perplexity >= 1, so it saturates at -10 whenever the batch perplexity exceeds 10."""
    if not math.isfinite(ce) or (ce_before is not None and not math.isfinite(ce_before)):
        raise NonFiniteLoss(f"reward-batch CE is {ce}")  # NaN would pay the top: min(10, nan) = 10
    if cfg.reward == "negppl_clip10":
        raw = -math.exp(min(ce, 50.0))
        r, sat = max(-cfg.reward_clip, min(cfg.reward_clip, raw)), abs(raw) > cfg.reward_clip
    elif cfg.reward == "negloss":
        r, sat = -ce, False
    else:  # delta: CE on the same batch before minus after the action's steps
        r, sat = ce_before - ce, False
    # EXERCISE: add a memory term (bytes of trainable state) and see if the agent ties more.
    return r - cfg.param_penalty * trainable_blocks / cfg.n_layer, sat

class NonFiniteLoss(RuntimeError):
    pass

def lm_step(model, opt, x, y, ctx, cfg, lr):
    """Forward, backward, clip, AdamW step. Returns (loss, grad norm); raises on NaN/inf loss
    before any weight changes, so the last checkpoint stays good. The loss is read (the one host
    sync of a step) after the backward is queued, so the next batch is prepared while AdamW runs."""
    for g in opt.param_groups:
        g["lr"] = lr
    with ctx:
        _, loss = model(x, y)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"],
                                          cfg.grad_clip or float("inf"))
    if not math.isfinite(loss := loss.item()):
        raise NonFiniteLoss(f"loss is {loss}")
    opt.step()
    return loss, norm

# -----------------------------------------------------------------------------
# training

def build(cfg, vocab_size, device):
    torch.manual_seed(cfg.seed)
    gcfg = GPTConfig(block_size=cfg.block_size, vocab_size=vocab_size, n_layer=cfg.n_layer,
                     n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias)
    model = GPT(gcfg, tie_grad=cfg.tie_grad)
    if cfg.agent in STATIC_PATTERNS and cfg.fair_start:  # D19: the pattern on fresh weights
        pattern = FixedAgent(cfg.n_layer, cfg.agent, cfg.seed)
        for l in range(1, cfg.n_layer):
            model.apply_action(l, pattern.act(list(model.src), l, 0.0, 0))
    elif cfg.agent != "none":  # the baseline ('none') trains every layer (D15)
        set_initial_state(model, cfg.init_state)
    model.to(device)
    if cfg.pure_bf16:
        model.to(torch.bfloat16)  # official: no fp32 master weights (D11)
    return model, gcfg

def write_atomic(path, write):
    """write(tmp) then rename: a kill at any moment leaves the old file or the new, never half."""
    tmp = Path(str(path) + ".tmp")
    write(tmp)
    os.replace(tmp, path)

def save_ckpt(path, **kw):
    write_atomic(path, lambda tmp: torch.save(kw, tmp))

def load_ckpt(path):
    try:  # map_location cpu: RNG states must stay CPU tensors
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a checkpoint, unreadable
        raise ValueError(f"cannot read {path} ({type(e).__name__}: {str(e)[:80]}): the file is "
                         f"damaged or truncated; start again with a new --out_dir") from None

def check_resume_config(saved, cfg):
    diff = sorted(k for k, v in asdict(cfg).items()
                  if k not in RESUME_MAY_DIFFER and saved.get(k) != v)
    if diff:
        raise ValueError("refusing to resume: config differs from the checkpoint in " +
                         ", ".join(f"{k} (ckpt {saved.get(k)!r}, now {getattr(cfg, k)!r})"
                                   for k in diff))

RUN_FILES = ("config.json", "log.jsonl", "ckpt.pt", "best.pt", "summary.json")

def open_out_dir(cfg):
    """Before any work: a used out_dir is continued (--resume=True) or refused, never overwritten.
    Returns the checkpoint to resume from, or None."""
    out = Path(cfg.out_dir)
    used = [f for f in RUN_FILES if (out / f).exists()]
    if not cfg.resume:
        if used:
            hint = "continue it with --resume=True" if "ckpt.pt" in used else "delete it"
            raise ValueError(f"{out} already holds a run ({', '.join(used)}): {hint}, or choose a "
                             f"new --out_dir")
        return None
    if "ckpt.pt" not in used:
        raise ValueError(f"--resume=True but there is no checkpoint at {out / 'ckpt.pt'}")
    ck = load_ckpt(out / "ckpt.pt")
    check_resume_config(ck["config"], cfg)
    return ck

class Interrupted(Exception):
    pass

def sweep(model, opt, agent, cfg, ep, eps, get, ctx, lr_fn, on_step, on_change=None, fwd=None,
          get_reward=None):
    """One episode. ALGO LOGIC (official q_learn_loop): for l = 1..L-1: the agent acts on layer l
    (tie or train), the LM takes steps_per_action steps on batches from get, the reward comes
    from one fresh batch from get_reward in eval mode, the agent takes one TD / policy-gradient
    step.
    agent=None (baseline): the same LM steps, no actions, no reward batches."""
    recs, fwd = [], model if fwd is None else fwd  # fwd: a compiled forward (never `fwd or model`)
    get_reward = get if get_reward is None else get_reward
    learns = agent is not None and agent.learns
    for l in range(1, cfg.n_layer):
        src = list(model.src)  # EXERCISE: let the agent pick all L-1 actions at once instead
        diag = agent_readout(agent, src, l) if learns else {}  # before acting: what it believes
        rb = ce_before = None
        if learns and cfg.reward == "delta":  # delta: CE on one batch before the action, and after
            rb = get_reward()  # its LM steps
            ce_before = batch_ce(model, *rb, ctx, fwd)
        a = l if agent is None else agent.act(src, l, eps, ep)
        if agent is not None and model.apply_action(l, a, cfg.untie):
            sync_optimizer(model, opt)
            if on_change:
                on_change()
        for _ in range(cfg.steps_per_action):
            loss, norm = lm_step(fwd, opt, *get(), ctx, cfg, lr_fn())
            on_step(loss, norm)  # logging and memory, while the gradients still exist
            opt.zero_grad(set_to_none=True)
        if learns:
            ce = batch_ce(model, *(get_reward() if rb is None else rb), ctx, fwd)
            r, sat = reward_from_ce(ce, cfg, ce_before, sum(structure(model)["trains"]))
            info = agent.update(src, l, a, r, list(model.src))
            recs.append(dict(kind="agent", episode=ep, layer=l, action=a, reward=r, saturated=sat,
                             eps=eps, **diag, **info))
    return recs

# -- learning diagnostics: did the agent learn anything? (docs/tying_rl.md, "Outputs") --------

def agent_readout(agent, src, l):
    """The agent's greedy action for layer l at state src, and (q) the range of its Q-values."""
    h = agent.head(src, l)
    d = dict(greedy=int(h.argmax()))
    if isinstance(agent, ReinforceAgent):
        return d
    return dict(d, q_min=h.min().item(), q_max=h.max().item())

def agent_diagnostics(recs, gamma, prev=()):
    """Learning signals from agent records (several episodes allowed; prev: the records of the
    episode before, for the repeat rate). A student reads off: is the reward saturated? does it
    separate 'train' from 'tie' by more than its noise? does the greedy policy settle (repeat
    rate above a uniform policy's)? are the Q-values near the TD fixed point r / (1 - gamma)?"""
    if not recs:
        return {}
    mean = lambda v: sum(v) / len(v) if v else None
    r = [x["reward"] for x in recs]
    tr = [x["reward"] for x in recs if x["action"] == x["layer"]]
    ti = [x["reward"] for x in recs if x["action"] != x["layer"]]
    dr = [(b - a) / math.sqrt(2) for a, b in zip(r, r[1:])]  # consecutive rewards: noise + drift
    noise = math.sqrt(mean([d * d for d in dr])) if dr else None
    d = dict(reward_mean=mean(r), reward_saturated_frac=mean([float(x["saturated"]) for x in recs]),
             reward_train_mean=mean(tr), reward_tie_mean=mean(ti), n_train=len(tr), n_tie=len(ti),
             reward_noise=noise)
    if tr and ti and noise is not None:
        d.update(reward_train_minus_tie=d["reward_train_mean"] - d["reward_tie_mean"],
                 reward_diff_se=noise * math.sqrt(1 / len(tr) + 1 / len(ti)))
    greedy = {(x["episode"], x["layer"]): x["greedy"] for x in [*prev, *recs] if "greedy" in x}
    pairs = [(g, greedy[(e - 1, l)], l) for (e, l), g in greedy.items() if (e - 1, l) in greedy
             and any(x["episode"] == e for x in recs)]
    if pairs:
        d.update(greedy_repeat_frac=mean([float(g == h) for g, h, _ in pairs]),
                 greedy_repeat_uniform=mean([1 / (l + 1) for _, _, l in pairs]))
    if "q_min" in recs[0]:
        d.update(q_min=min(x["q_min"] for x in recs), q_max=max(x["q_max"] for x in recs),
                 td_fixed_point=d["reward_mean"] / (1 - gamma))
    return d

def selected_state_bytes(model):
    """Bytes that one training step on this structure holds (weights, gradients, AdamW moments),
    without running one: unique storages + 3 x every trainable Parameter (as state_bytes)."""
    seen, n = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            n += p.numel() * p.element_size()
        if p.requires_grad:
            n += 3 * p.numel() * p.element_size()  # grad, exp_avg, exp_avg_sq
    return n

# -- the training run as named steps --------------------------------------------------------------

@dataclass
class RunState:
    """Counters of a run besides tensors, agent and RNGs (plain types: saved in ckpt.pt)."""
    episode: int = 0
    step: int = 0
    eps: float = 1.0
    best_val: float = math.inf
    best_episode: int = 0
    best_test_official: float = math.inf
    train_time: float = 0.0
    train_tokens: int = 0
    flops: float = 0.0

class Run:
    """One training run: __init__ (out_dir, data, model, agent, generators, resume), episode (one
    sweep and its log record), evaluate_and_select, save, finish (the selected checkpoint)."""

    def __init__(self, cfg, argv=None):
        self.cfg, self.argv, self.device = cfg, argv, get_device(cfg.device)
        self.cuda = self.device.startswith("cuda")
        if self.cuda:
            torch.set_float32_matmul_precision("high")
        ck = open_out_dir(cfg)  # before any work: refuse a used out_dir, read the checkpoint
        self.out, self.ckpt_path = Path(cfg.out_dir), Path(cfg.out_dir) / "ckpt.pt"
        set_seed(cfg.seed)
        meta = data.prepare_text(cfg.dataset, cfg.tokenizer, cfg.data_dir or data.DATA_DIR)
        self.arr = {s: data.load_split(meta, s) for s in ("train", "val", "test")}
        if cfg.train_tokens:
            self.arr["train"] = self.arr["train"][:cfg.train_tokens]
        self.ctx = autocast_ctx(self.device, cfg)
        self.model, self.gcfg = build(cfg, meta["vocab_size"], self.device)
        self.agent = make_agent(cfg, cfg.seed)
        # three generators: the same seed gives the same LM batches (and dropout, from the global
        # torch RNG) whatever the agent; reward batches and the agent's actions draw on their own
        self.gen = torch.Generator().manual_seed(cfg.seed)  # LM batches
        self.gen_reward = torch.Generator().manual_seed(cfg.seed + 3)  # reward batches
        self.S, self.prev_recs = RunState(eps=cfg.eps_start), []  # prev_recs: last episode's agent
        if ck is not None:
            restore_structure(self.model, ck["extras"]["structure"])
            self.model.load_state_dict(ck["model"])
            self.model.to(self.device)
        self.opt = make_optimizer(self.model, cfg, self.device)
        self.fwd = compile_model(self.model, cfg)  # LM steps and reward batches
        if ck is not None:
            self.restore(ck)
        self.out.mkdir(parents=True, exist_ok=True)
        config_json = json.dumps(asdict(cfg), indent=1)
        write_atomic(self.out / "config.json", lambda t: t.write_text(config_json))
        self.log_f = open(self.out / "log.jsonl", "a")
        L, self.tok = cfg.n_layer, cfg.batch_size * cfg.block_size
        self.total = cfg.episodes * (L - 1) * cfg.steps_per_action
        self.fl = peak_flops(cfg) if self.cuda else None
        # FLOPs/token of the current structure
        self.fpt = self.model.flops_per_token(cfg.block_size)
        self.last_map, self.times, self.t_start = self.model.tie_map(), [], time.time()
        self.mem = dict(steady=None, counted=None, peak=None, peak_run=None, loss=None)
        m = self.model
        print(f"device {self.device} | {L} layers x {cfg.n_embd} | agent {cfg.agent} | "
              f"{m.num_params() / 1e6:.2f}M params stored, "
              f"{m.num_params(True) / 1e6:.2f}M trainable | "
              f"{self.total} LM steps")

    def restore(self, ck):
        ex = ck["extras"]
        self.opt.load_state_dict(ck["optimizer"])
        if self.agent is not None:
            self.agent.load_state_dict(ex["agent"])
        self.S = RunState(**ex["S"])
        self.gen.set_state(ex["gen"])
        self.gen_reward.set_state(ex["gen_reward"])
        torch.set_rng_state(ex["torch_rng"])
        if self.cuda and ex["cuda_rng"] is not None:
            torch.cuda.set_rng_state(ex["cuda_rng"])
        log = self.out / "log.jsonl"  # drop log lines written after the checkpoint
        lines = [l for l in open(log) if json.loads(l)["step"] <= self.S.step]
        write_atomic(log, lambda t: t.write_text("".join(lines)))
        recs = [json.loads(l) for l in lines]
        last = self.S.episode - 1
        self.prev_recs = [r for r in recs if r["kind"] == "agent" and r["episode"] == last]
        print(f"resumed from {self.ckpt_path} at episode {self.S.episode}, step {self.S.step}")

    def log(self, rec):
        self.log_f.write(json.dumps({"step": self.S.step, **rec}) + "\n")
        self.log_f.flush()

    def on_step(self, loss, norm):
        # D13: steady state right after a step (weights + grads + AdamW state), counted tensor by
        # tensor on every device, and torch.cuda.memory_allocated on CUDA
        cfg, S = self.cfg, self.S
        self.mem.update(counted=state_bytes(self.model, self.opt), loss=loss,
                        steady=torch.cuda.memory_allocated() if self.cuda else None)
        S.step += 1
        S.flops += self.fpt * self.tok  # this step's structure
        self.times.append(time.time())
        if S.step % cfg.log_interval == 0 or S.step == self.total:
            w = self.times[-21:]
            ms = 1000 * (w[-1] - w[0]) / max(1, len(w) - 1)  # wall time per step, agent included
            tps = self.tok / max(ms, 1e-6) * 1000
            mfu = f" | mfu {100 * self.fpt * tps / self.fl:.1f}%" if self.fl else ""
            lr, eta = get_lr(S.step, self.total, cfg), ms * (self.total - S.step) / 6e4
            print(f"step {S.step:6d}/{self.total} | loss {loss:.4f} | lr {lr:.1e} | "
                  f"{ms:.1f} ms/step | {tps / 1e3:.1f}k tok/s{mfu} | eta {eta:.1f}m")
            self.log(dict(kind="train", loss=loss, grad_norm=float(norm), ms_per_step=ms))

    def on_change(self):  # after every structural change: FLOPs/token, one line if the map changed
        m = self.model
        self.fpt, tm = m.flops_per_token(self.cfg.block_size), m.tie_map()
        if tm != self.last_map:
            self.last_map = tm
            print(f"ties: {tm} | unique layers {len(set(tm))}/{len(tm)} | "
                  f"trainable {m.num_params(True) / 1e6:.2f}M")

    def episode(self, ep):
        cfg, S, m = self.cfg, self.S, self.model
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        t_ep = time.time()
        get = lambda g: lambda: data.get_batch(self.arr["train"], cfg.batch_size, cfg.block_size,
                                               self.device, generator=g)
        try:
            recs = sweep(m, self.opt, self.agent, cfg, ep, S.eps, get(self.gen), self.ctx,
                         lambda: get_lr(S.step, self.total, cfg), self.on_step, self.on_change,
                         self.fwd, get_reward=get(self.gen_reward))
        except NonFiniteLoss as e:
            raise NonFiniteLoss(
                f"{e} at step {S.step}: stopping; the last good checkpoint is "
                f"{self.ckpt_path if self.ckpt_path.exists() else '(none yet)'}") from None
        for r in recs:
            self.log(r)
        S.eps = max(cfg.eps_min, S.eps * cfg.eps_decay)  # D9: decay once per sweep
        S.train_time += time.time() - t_ep
        S.train_tokens += (cfg.n_layer - 1) * cfg.steps_per_action * self.tok
        if self.cuda:  # peak of this episode (activations included), and of the whole run
            self.mem["peak"] = torch.cuda.max_memory_allocated()
            self.mem["peak_run"] = max(self.mem["peak_run"] or 0, self.mem["peak"])
        tm, diag = m.tie_map(), agent_diagnostics(recs, cfg.gamma, self.prev_recs)
        self.prev_recs = recs
        rec = dict(kind="episode", episode=ep + 1, eps=S.eps, tie_map=tm, src=list(m.src),
                   unique_layers=len(set(tm)), trainable_blocks=sum(structure(m)["trains"]),
                   trainable_params=m.num_params(True), steady_mem_bytes=self.mem["steady"],
                   counted_mem_bytes=self.mem["counted"], peak_mem_bytes=self.mem["peak"],
                   train_loss=self.mem["loss"], **diag)
        print(f"episode {ep + 1}/{cfg.episodes} | eps {S.eps:.3f} | unique layers "
              f"{rec['unique_layers']}/{len(tm)}" + format_diagnostics(diag))
        if (ep + 1) % cfg.eval_interval == 0 or ep + 1 == cfg.episodes:
            rec.update(self.evaluate_and_select(ep + 1))
        self.log(rec)
        S.episode = ep + 1
        self.save()

    def evaluate_and_select(self, episode):
        cfg, S, m = self.cfg, self.S, self.model
        cap = cfg.eval_max_batches
        val_ppl, n = evaluate(m, self.arr["val"], cfg, self.device, self.ctx, cap, "val")
        test_ppl, _ = evaluate(m, self.arr["test"], cfg, self.device, self.ctx, cap, "test")
        S.best_test_official = min(S.best_test_official, test_ppl)  # official: selects on test
        part = "whole split" if n == len(self.arr["val"]) - 1 else f"first {cap} batches"
        print(f"episode {episode}: val ppl {val_ppl:.2f} | test ppl {test_ppl:.2f} ({part}; "
              f"official best-test-so-far {S.best_test_official:.2f})")
        if val_ppl < S.best_val:  # D14: model selection on validation
            S.best_val, S.best_episode = val_ppl, episode
            save_ckpt(self.out / "best.pt", model=m.state_dict(),
                      extras=dict(structure=structure(m)), episode=episode)
        return dict(val_ppl=val_ppl, test_ppl=test_ppl, best_test_official=S.best_test_official)

    def save(self):
        S, cuda = self.S, self.cuda
        extras = dict(structure=structure(self.model), S=asdict(S), gen=self.gen.get_state(),
                      agent=self.agent.state_dict() if self.agent else None,
                      gen_reward=self.gen_reward.get_state(), torch_rng=torch.get_rng_state(),
                      cuda_rng=torch.cuda.get_rng_state() if cuda else None)
        save_ckpt(self.ckpt_path, model=self.model.state_dict(), optimizer=self.opt.state_dict(),
                  model_args=asdict(self.gcfg), step=S.step, best_val_loss=S.best_val,
                  config=asdict(self.cfg), extras=extras)

    def interrupted(self):
        """Ctrl-C: one line that says where the run stopped and how to continue it."""
        self.log_f.close()
        S, where = self.S, f"in episode {self.S.episode + 1}"
        if not self.ckpt_path.exists():  # nothing to continue: leave no half-used out_dir behind
            for f in ("config.json", "log.jsonl", "best.pt"):
                (self.out / f).unlink(missing_ok=True)
            return Interrupted(f"interrupted {where} before the first checkpoint; nothing was kept "
                               f"in {self.out}")
        if S.episode == self.cfg.episodes:
            where = "in the final evaluation"
        argv = sys.argv[1:] if self.argv is None else self.argv
        args = [a for a in argv if not a.startswith("--resume")] + ["--resume=True"]
        return Interrupted(f"interrupted {where} (step {S.step}); {self.ckpt_path} holds episode "
                           f"{S.episode}; continue with: python tying_rl.py {' '.join(args)}")

    def finish(self):
        """The selected (best-val) checkpoint, evaluated once on val and test; summary.json."""
        cfg, S, m = self.cfg, self.S, self.model
        self.log_f.close()
        last_map = m.tie_map()
        del self.opt, self.fwd  # the training blocks' AdamW state goes before the selected load
        sel = load_ckpt(self.out / "best.pt")
        restore_structure(m, sel["extras"]["structure"])
        m.load_state_dict(sel["model"])
        m.to(self.device)
        cap = cfg.final_max_batches
        print(f"final: the best-val checkpoint (episode {sel['episode']}) on val and test "
              f"({f'at most {cap} batches each' if cap else 'whole splits'})")
        val_ppl, n_val = evaluate(m, self.arr["val"], cfg, self.device, self.ctx, cap, "final val")
        test_ppl, n_test = evaluate(m, self.arr["test"], cfg, self.device, self.ctx, cap,
                                    "final test")
        tm, tps = m.tie_map(), S.train_tokens / max(S.train_time, 1e-9)
        per_block = sum(p.numel() for p in m.transformer.h[0].parameters())
        agent_recs = [json.loads(l) for l in open(self.out / "log.jsonl")]
        agent_recs = [r for r in agent_recs if r["kind"] == "agent"]
        late = [r for r in agent_recs if r["episode"] >= cfg.episodes // 2]  # the second half
        prev = [r for r in agent_recs if r["episode"] == cfg.episodes // 2 - 1]
        summary = dict(
            # the selected checkpoint (best val): perplexities, structure, parameters, memory
            agent=cfg.agent, selected_episode=sel["episode"], val_ppl=val_ppl, test_ppl=test_ppl,
            eval_tokens=dict(val=n_val, test=n_test),
            eval_whole_split=(n_val == len(self.arr["val"]) - 1
                              and n_test == len(self.arr["test"]) - 1),
            best_test_ppl_official=S.best_test_official, n_layer=cfg.n_layer,
            unique_layers=len(set(tm)),
            unique_storages=len({m.transformer.h[r].ln_1.weight.data_ptr() for r in set(tm)}),
            tie_map=tm, src=list(m.src), total_params=m.num_params(),
            effective_params=(m.num_params() - m.num_params(blocks_only=True)
                              + cfg.n_layer * per_block),
            trainable_params=m.num_params(True), trainable_block_params=m.num_params(True, True),
            counted_mem_bytes=selected_state_bytes(m),
            # the last training step (its structure is last_step_tie_map)
            last_step_tie_map=last_map, last_step_counted_mem_bytes=self.mem["counted"],
            last_step_cuda_mem_bytes=self.mem["steady"], peak_mem_bytes=self.mem["peak"],
            peak_mem_bytes_run=self.mem["peak_run"],
            # the run
            tokens_per_s=tps, mfu=S.flops / max(S.train_time, 1e-9) / self.fl if self.fl else None,
            agent_diagnostics_late=agent_diagnostics(late, cfg.gamma, prev),
            agent_diagnostics_all=agent_diagnostics(agent_recs, cfg.gamma),
            steps=S.step, train_time_s=S.train_time, wall_s=time.time() - self.t_start,
            device=self.device)
        write_atomic(self.out / "summary.json",
                     lambda t: t.write_text(json.dumps(summary, indent=1)))
        if cfg.plot:
            print(f"writing tie_map.png, ppl.png, params_mem.png{', agent.png' * bool(agent_recs)}")
            save_plots(self.out, cfg)
        return summary

def format_diagnostics(d):
    """The episode line's agent part: reward, saturation, train - tie (+- se), repeat, Q range."""
    if not d:
        return ""
    s = f" | reward {d['reward_mean']:.3f} | saturated {100 * d['reward_saturated_frac']:.0f}%"
    if "reward_train_minus_tie" in d:
        s += f" | train-tie {d['reward_train_minus_tie']:+.3f} +- {d['reward_diff_se']:.3f}"
    if "greedy_repeat_frac" in d:
        rep, uni = 100 * d["greedy_repeat_frac"], 100 * d["greedy_repeat_uniform"]
        s += f" | repeat {rep:.0f}% (uniform {uni:.0f}%)"
    if "q_min" in d:
        s += f" | Q [{d['q_min']:.1f}, {d['q_max']:.1f}] vs r/(1-g) {d['td_fixed_point']:.1f}"
    return s

def train(cfg, argv=None):
    """Train with the agent (or the baseline), select on val, test once. Returns the summary."""
    validate(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = Run(cfg, argv)
    try:
        for ep in range(run.S.episode, cfg.episodes):
            run.episode(ep)
        return run.finish()
    except KeyboardInterrupt:
        raise run.interrupted() from None

# -----------------------------------------------------------------------------
# speed: the compiled forward. GPT.forward above is the reference; gated_forward computes the same
# logits and gradients (test_tying_compiled_forward_is_one_graph_for_every_tie_map_and_exact)

def gated_forward(model, idx, targets, params, gates):
    """GPT.forward with the tie map as data: position i runs Block code on params[i] (its root's
    tensors). D1 as arithmetic: w.detach() + g (w - w.detach()) equals w with g times its
    gradient."""
    x = model.embed(idx)  # (B, T, C)
    for p, g in zip(params, gates):
        gated = {k: w.detach() + g * (w - w.detach()) for k, w in p.items()}
        x = functional_call(model.transformer.h[0], gated, (x,))
    return model.head(x, targets)

class CompiledTying:
    """torch.compile for a changing tie map. Compiling GPT.forward bakes the map into the graph
    (a recompile per map). Here each position gets its root's tensors as fresh views (dynamo
    specialises on inputs that are the same object, not on shared storage) and a gate (1 trains,
    0 tied): ONE graph for every map. Price: the weight-gradient matmuls of tied positions run, x 0.
    Frozen blocks (init_state=official) enter as fresh leaves: gradients computed, then dropped."""
    def __init__(self, model, **compile_kw):
        self.model, self.roots = model, None
        self.fn = torch.compile(gated_forward, dynamic=False, **compile_kw)

    def __call__(self, idx, targets=None):
        m, roots = self.model, self.model.tie_map()
        # gates live on the device: no host->device copy (and sync) per step
        if roots != self.roots:
            g = [float(r == i or m.tie_grad == "shared") for i, r in enumerate(roots)]
            self.roots, self.g = roots, torch.tensor(g, device=idx.device,
                                                     dtype=m.lm_head.weight.dtype)
        leaf = lambda w: (w.view_as(w) if w.requires_grad or not torch.is_grad_enabled()
                          else w.detach().requires_grad_())
        params = [{k: leaf(w) for k, w in m.transformer.h[r].named_parameters()} for r in roots]
        return self.fn(m, idx, targets, params, self.g)

def compile_model(model, cfg):
    """--compile: the whole model if its tie map never changes (agent none), else CompiledTying."""
    if not cfg.compile:
        return model
    return torch.compile(model) if cfg.agent == "none" else CompiledTying(model)

# benchmark: tokens/s and MFU of the baseline vs a dynamic-tying step (agent + reward included)

def bench(cfg):
    """Baseline vs dynamic tying at the --n_layer/--n_embd/--block_size/--batch_size shape
    (main sets GPT-2 small: 12 x 768, T 1024, B 12, vocab 50304 as nanoGPT's bench.py).
    Synthetic tokens, no data. Each figure is one whole episode of the training loop (sweep):
    for tying that includes the actions, reward batches and TD updates; per LM step."""
    device = get_device(cfg.device)
    if (Path(cfg.out_dir) / "bench.json").exists():  # never overwrite a measurement
        raise ValueError(f"{Path(cfg.out_dir) / 'bench.json'} exists: choose a new --out_dir")
    cuda = device.startswith("cuda")
    if cuda:
        torch.set_float32_matmul_precision("high")
    ctx, fl = autocast_ctx(device, cfg), peak_flops(cfg) if cuda else None
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gen, V = (torch.Generator().manual_seed(cfg.seed),
              512 if cfg.preset == "tiny" else 50304)  # tiny: CPU

    def get():  # pinned + non_blocking as data.py: a pageable copy makes the host wait for the GPU
        t = torch.randint(V, (2, cfg.batch_size, cfg.block_size), generator=gen)
        return t.pin_memory().to(device, non_blocking=True) if cuda else t.to(device)
    res = {}
    for name in ("baseline", "tying"):
        c = Config(**{**asdict(cfg), "agent": "none" if name == "baseline" else "q",
                      "dropout": 0.0})
        model, _ = build(c, V, device)
        opt, agent, fwd = (make_optimizer(model, c, device), make_agent(c, c.seed),
                           compile_model(model, c))
        run = lambda eps: sweep(model, opt, agent, c, 0, eps, get, ctx, lambda: c.lr,
                                lambda *a: None, fwd=fwd)
        run(1.0)  # warm-up (and compilation); for tying a random sweep, as early in training
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.time()
        for _ in range(cfg.bench_steps):
            run(0.5)
        sync()
        dt = (time.time() - t0) / (cfg.bench_steps * (c.n_layer - 1) * c.steps_per_action)
        tps = cfg.batch_size * cfg.block_size / dt
        mfu = model.flops_per_token(cfg.block_size) * tps / fl if fl else None
        # compiled and eager forward must agree (train mode, targets: the graph just timed)
        with ctx:
            x = get()
            diff = (fwd(*x)[0].float() - model(*x)[0].float()).abs().max().item()
        res[name] = dict(ms_per_step=1000 * dt, tokens_per_s=tps, mfu=mfu, tie_map=model.tie_map(),
                         trainable_params=model.num_params(True), compile_max_abs_diff=diff,
                         counted_mem_bytes=state_bytes(model, opt),
                         peak_mem_bytes=torch.cuda.max_memory_allocated() if cuda else None)
        print(f"{name:8s} | compile {cfg.compile} | {1000 * dt:.1f} ms/step | "
              f"{tps / 1e3:.1f}k tok/s | mfu "
              f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | "
              f"unique layers {len(set(model.tie_map()))} "
              f"| compiled-vs-eager max|diff| {diff:.2e}")
        del model, opt, fwd
    res["cost_ratio"] = res["tying"]["ms_per_step"] / res["baseline"]["ms_per_step"]
    print(f"dynamic-tying step costs {res['cost_ratio']:.2f}x a baseline step (target <= 1.15)")
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    bench_json = json.dumps(dict(config=asdict(cfg), **res), indent=1)
    write_atomic(Path(cfg.out_dir) / "bench.json", lambda t: t.write_text(bench_json))
    return res

# -----------------------------------------------------------------------------
# plots

def save_plots(out, cfg):
    """Four PNGs from log.jsonl: tie map heat map, perplexity, params + memory, the agent's
    learning."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = [json.loads(l) for l in open(out / "log.jsonl")]
    E, tr = ([r for r in recs if r["kind"] == k] for k in ("episode", "train"))
    title = f"{cfg.agent} | {cfg.n_layer}x{cfg.n_embd} | {cfg.dataset}"

    def new(xlabel, ylabel, w=6):
        fig, ax = plt.subplots(figsize=(w, 3.5))
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        return fig, ax

    def done(fig, name):
        fig.savefig(out / name, dpi=120, bbox_inches="tight")
        plt.close(fig)
    # 1. tie map: layer x episode, colour = the root layer whose weights run there
    fig, ax = new("episode (sweep)", "layer", 7)
    im = ax.imshow(torch.tensor([r["tie_map"] for r in E]).T.numpy(), aspect="auto", origin="lower",
                   cmap="viridis", interpolation="nearest", vmin=0, vmax=cfg.n_layer - 1,
                   extent=(0.5, len(E) + 0.5, -0.5, cfg.n_layer - 0.5))
    fig.colorbar(im, ax=ax, label="root layer (weights used)")
    done(fig, "tie_map.png")
    # 2. perplexity: train batches, val and test
    fig, ax = new("LM step", "perplexity")
    train_ppl = [math.exp(min(r["loss"], 20)) for r in tr]
    ax.plot([r["step"] for r in tr], train_ppl, label="train batch", alpha=0.6)
    ev = [r for r in E if "val_ppl" in r]
    ax.plot([r["step"] for r in ev], [r["val_ppl"] for r in ev], "o-", label="val")
    ax.plot([r["step"] for r in ev], [r["test_ppl"] for r in ev], "s--", label="test")
    ax.set_yscale("log")
    ax.legend()
    done(fig, "ppl.png")
    # 3. trainable parameters and steady-state memory per episode
    fig, ax = new("episode", "trainable params (M)")
    ax.plot([r["episode"] for r in E], [r["trainable_params"] / 1e6 for r in E], "b-")
    key = "steady_mem_bytes" if E and E[0]["steady_mem_bytes"] else "counted_mem_bytes"
    ax2 = ax.twinx()
    ax2.plot([r["episode"] for r in E], [(r[key] or 0) / 2 ** 20 for r in E], "r--")
    ax2.set_ylabel(f"{key} (MiB, dashed)")
    done(fig, "params_mem.png")
    # 4. the agent's learning, per episode (agent_diagnostics): one panel per question
    D = [r for r in E if "reward_mean" in r]
    if D:
        ep = [r["episode"] for r in D]
        col = lambda k: [r.get(k, math.nan) if r.get(k) is not None else math.nan for r in D]
        fig, axs = plt.subplots(2, 2, figsize=(11, 6.5), sharex=True)
        fig.suptitle(title + " | did the agent learn?")
        a = axs[0, 0]  # does the reward tell "train" from "tie" by more than its noise?
        diff, se = col("reward_train_minus_tie"), col("reward_diff_se")
        a.errorbar(ep, diff, yerr=se, fmt="o", ms=3, label="train - tie (+- se)")
        a.plot(ep, col("reward_noise"), "k:", label="reward noise (batch to batch)")
        a.axhline(0, color="grey", lw=0.5)
        a.set(ylabel="reward", title="reward after train minus after tie")
        a.legend(fontsize=7)
        a = axs[0, 1]  # is the reward saturated (no signal)?
        a.plot(ep, [100 * v for v in col("reward_saturated_frac")], "r-")
        a.set(ylabel="%", ylim=(-5, 105), title="saturated rewards")
        a = axs[1, 0]  # does the greedy policy settle?
        rep = [100 * v for v in col("greedy_repeat_frac")]
        a.plot(ep, rep, "b.-", label="greedy repeats last sweep's")
        a.plot(ep, [100 * v for v in col("greedy_repeat_uniform")], "k--", label="a uniform policy")
        a.set(xlabel="episode", ylabel="%", ylim=(-5, 105), title="greedy action repeats")
        a.legend(fontsize=7)
        a = axs[1, 1]  # are the Q-values near their TD fixed point r / (1 - gamma)?
        if "q_min" in D[0]:
            a.fill_between(ep, col("q_min"), col("q_max"), alpha=0.4, label="Q-value range")
            a.plot(ep, col("td_fixed_point"), "k--", label="r / (1 - gamma)")
            a.legend(fontsize=7)
        a.set(xlabel="episode", ylabel="Q", title="Q-values vs TD fixed point")
        fig.tight_layout()
        done(fig, "agent.png")

# -----------------------------------------------------------------------------

def final_table(res, cfg):
    """The last lines of a run: each figure with the checkpoint and split it comes from, rounded."""
    part = "whole split" if res["eval_whole_split"] else f"first {cfg.final_max_batches} batches"
    sel = f"best-val checkpoint (episode {res['selected_episode']} of {cfg.episodes})"
    last = res["last_step_cuda_mem_bytes"] or res["last_step_counted_mem_bytes"]
    rows = [(f"val ppl, {sel}, {part} ({res['eval_tokens']['val']:,} tokens)",
             f"{res['val_ppl']:.2f}"),
            (f"test ppl, {sel}, {part} ({res['eval_tokens']['test']:,} tokens)",
             f"{res['test_ppl']:.2f}"),
            (f"unique layers of {res['n_layer']}, {sel}", str(res["unique_layers"])),
            (f"trainable params, {sel}", f"{res['trainable_params'] / 1e6:.3f}M"),
            (f"training-state memory (weights, grads, AdamW), {sel}",
             f"{res['counted_mem_bytes'] / 2 ** 20:.1f} MiB"),
            ("training-state memory at the last step", f"{last / 2 ** 20:.1f} MiB"),
            ("tokens/s (training, agent included)", f"{res['tokens_per_s'] / 1e3:.1f}k")]
    if res["mfu"] is not None:
        rows.append(("MFU", f"{100 * res['mfu']:.1f}%"))
    return "| figure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)

def main(argv=None):
    try:
        cfg = parse_config(argv)
        print("config:", json.dumps(asdict(cfg)))
        res = bench(cfg) if cfg.mode == "bench" else train(cfg, argv)
    except (ValueError, NonFiniteLoss, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        print(e, file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:  # before training started (data, model): nothing to continue
        print("interrupted before training started; nothing to resume", file=sys.stderr)
        sys.exit(130)
    if cfg.mode == "train":
        print(final_table(res, cfg))
        files = "summary.json, log.jsonl, ckpt.pt, best.pt" + ", *.png" * cfg.plot
        print(f"outputs in {cfg.out_dir}: {files}")
    return res

if __name__ == "__main__":
    main()
