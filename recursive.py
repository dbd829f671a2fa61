"""
recursive.py: turn a pretrained GPT into a (Relaxed) Recursive Transformer, uptrain it with
distillation, train early exits, and serve it with a real Continuous Depth-wise Batching engine.

Paper: "Relaxed Recursive Transformers: Effective Parameter Sharing with Layer-wise LoRA",
Sangmin Bae et al., ICLR 2025, https://arxiv.org/abs/2410.20672

Idea: an N-layer model becomes K = N / R shared blocks run R times (CYCLE: depth d uses block
d mod K in loop d // K, Eq. 2). Each depth gets its own LoRA on every linear matrix (Eq. 3),
initialised from the truncated SVD of "original weight - shared weight" (Eq. 4-5), so at full
rank the relaxed model is the original one again. Because every loop runs the same block,
one batched pass can mix tokens at different loops: Continuous Depth-wise Batching (Sec. 2.4).

Sections: config | utilities | GPT + LoRALinear | GPT-2 weights | conversion + SVD-LoRA |
losses + training | evaluation and exits | CDB engine + simulator | study driver | plots | main.

Run:
  python recursive.py                       # whole study on PTB, 12 -> 6 x 2, one GPU (<= 5 min target)
  python recursive.py --preset=tiny --device=cpu    # CPU smoke run, under a minute
  python recursive.py --init_from=gpt2 --n_loops=2  # start from GPT-2 124M (downloads 500 MB)
  python recursive.py --stage=study --runs=rec_stepwise,relaxed_average_r64
Outputs in out/recursive/: config.json, log.jsonl, ckpt/*.pt (stage caches), summary.json, *.png.
Expected: the H100 study table and early exits are in the README (CDB throughput: not yet measured).
Dimension letters: B batch, T time, C n_embd, nh heads, hs head size, R loops, r LoRA rank.
"""
import argparse, hashlib, json, math, os, random, sys, time, urllib.request
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, asdict, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
import data  # the shared loader: prepare_text, load_split, get_batch, iter_eval_batches

# -----------------------------------------------------------------------------
# config

@dataclass
class Config:
    # data
    dataset: str = "ptb"          # data.py name: ptb | wikitext2 | shakespeare | text:PATH
    tokenizer: str = "gpt2"       # gpt2 (tiktoken) | char
    data_dir: str = ""            # '' = data.DATA_DIR (<repo>/data)
    # full model (init_from=gpt2 or a checkpoint path brings its own shape)
    init_from: str = "pretrain"   # pretrain (train the N-layer model here, cached) | gpt2 | path/to/ckpt.pt
    n_layer: int = 12             # N, depth of the full model
    n_head: int = 6
    n_embd: int = 384             # C; 384 keeps the default study inside ~5 H100 minutes
    block_size: int = 256         # context length T
    dropout: float = 0.1          # PTB is small (~1.2M GPT-2 tokens): some dropout against overfitting
    bias: bool = True
    # recursion / relaxation of the main model (early-exit trained, served by the CDB engine)
    n_loops: int = 2              # R (the paper's B); K = n_layer // n_loops shared blocks
    init: str = "stepwise"        # stepwise | average | lower | random
    lora_rank: int = 0            # 0 = plain recursive; each matrix's rank is capped at min(in, out)
    lora_init: str = "svd"        # svd (truncated SVD of the residual, Eq. 4-5) | zero (B = 0 ablation)
    # the study: comma list of run names (grammar in parse_run)
    runs: str = ("full,reduced_random,stepwise_noloop,rec_stepwise,rec_average,rec_lower,"
                 "relaxed_average_r16,relaxed_average_r64,relaxed_average_r128,relaxed_stepwise_r64")
    # training
    batch_size: int = 16          # sequences per step (16 x 256 = 4096 tokens)
    pretrain_iters: int = 1200    # steps for init_from=pretrain (~4.9M tokens, ~4 PTB epochs)
    pretrain_lr: float = 1e-3
    uptrain_iters: int = 300      # steps per study row: every row sees the same ~1.2M tokens
    lr: float = 3e-4              # uptraining peak lr (paper 2e-4 at a 2M-token batch)
    warmup_frac: float = 0.03     # warmup as a fraction of steps (paper ~2.8%)
    min_lr_frac: float = 0.1      # cosine floor as a fraction of the peak
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    kd_weight: float = 0.5        # lambda in (1 - lambda) CE + lambda FKL(teacher || student)
    kd_temp: float = 1.0          # distillation temperature
    # early exit (post-training after uptraining, Sec. 3.7)
    ee_iters: int = 100           # ~1/3 of the uptraining tokens
    ee_weight: float = 0.1        # weight of each earlier loop's CE + self-distillation ("Agg 0.1 + KD")
    conf_agree: float = 0.95      # confidence exits: tau calibrated on val for this agreement with the last loop
    # serving (CDB engine vs static / continuous sequence batching)
    n_requests: int = 128
    max_batch: int = 32           # slots
    prompt_len: int = 32
    gen_min: int = 16             # new tokens per request ~ uniform[gen_min, gen_max]
    gen_max: int = 192
    kv_fill: str = "propagate"    # exited tokens' KV at skipped depths: propagate (copy state up) | full (run the loops)
    # eval / system
    eval_tokens: int = 0          # cap per split for perplexity (0 = whole split)
    eval_batch_size: int = 8
    log_interval: int = 50
    stage: str = "all"            # last stage to run: pretrain | study | early_exit | all (+ throughput)
    preset: str = ""              # '' | tiny (CPU, under a minute)
    device: str = "auto"          # auto | cpu | cuda | mps
    seed: int = 1337
    compile: bool = False         # torch.compile the training forward
    peak_tflops: float = 0.0      # for MFU; 0 = look up the GPU name
    out_dir: str = "out/recursive"
    plot: bool = True

TINY = dict(tokenizer="char", n_layer=4, n_head=2, n_embd=64, block_size=64, dropout=0.0, batch_size=8,
            pretrain_iters=60, uptrain_iters=12, ee_iters=8, eval_tokens=4096, eval_batch_size=8,
            runs="full,reduced_random,stepwise_noloop,rec_stepwise,rec_average,rec_lower,"
                 "relaxed_average_r8,relaxed_average_r32,relaxed_average_r64,relaxed_stepwise_r32",
            n_requests=8, max_batch=4, prompt_len=8, gen_min=4, gen_max=24, log_interval=20)
INITS, STAGES = ("stepwise", "average", "lower", "random"), ("pretrain", "study", "early_exit", "all")
GPT2_URL = "https://huggingface.co/openai-community/gpt2/resolve/main/model.safetensors"

# -----------------------------------------------------------------------------
# utilities

def parse_config(argv=None):
    """--key=value flags built from Config's fields; --preset=tiny applies before other flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    for f in fields(Config):
        kind = {bool: lambda s: s.lower() in ("1", "true", "yes")}.get(type(f.default), type(f.default))
        p.add_argument(f"--{f.name}", type=kind, default=None, help=f"default {f.default!r}")
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    if args.get("preset", "") not in ("", "tiny"):
        raise ValueError(f"unknown preset {args['preset']!r}: use tiny")
    return Config(**{**asdict(Config()), **(TINY if args.get("preset") == "tiny" else {}), **args})

def get_device(pref="auto"):  # cuda -> mps -> cpu unless given; cuda:N -> "cuda" on that GPU
    if pref.startswith("cuda:"):  # every check below compares device == "cuda"
        torch.cuda.set_device(torch.device(pref)); return "cuda"
    return pref if pref != "auto" else "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"

def amp_dtype(device):  # bf16 on CUDA with bf16 support, else fp32 (no fp16, no GradScaler)
    return torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32

def autocast_ctx(device):  # the KV caches of the engine use the same dtype (amp_dtype)
    return torch.autocast("cuda", dtype=torch.bfloat16) if amp_dtype(device) == torch.bfloat16 else nullcontext()

def set_seed(seed):
    random.seed(seed); np.random.seed(seed); torch.manual_seed(seed)

sync = lambda device: torch.cuda.synchronize() if device == "cuda" else None  # queued GPU work done, then read a clock
fmt_eta = lambda s: f"{int(s // 60)}m{int(s % 60):02d}s"

# -----------------------------------------------------------------------------
# GPT: nanoGPT's module names; a Recursive Transformer is a GPT whose n_layer blocks run n_loops times

@dataclass
class GPTConfig:
    block_size: int = 256
    vocab_size: int = 50257
    n_layer: int = 12      # blocks stored (K for a recursive model, N for the full one)
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True

class LoRALinear(nn.Linear):
    """nn.Linear plus one low-rank update per loop: y = W x + b + B_l A_l x (scaling 1, Eq. 3).
    Identical to the base layer when B = 0 or rank = 0 (then it holds only weight and bias)."""
    def __init__(self, fan_in, fan_out, bias, n_loops=1, rank=0):
        super().__init__(fan_in, fan_out, bias=bias)
        self.rank = min(rank, fan_in, fan_out)  # cap at min(in, out): recursive.md Sec. 2.1
        if self.rank > 0:
            self.lora_A = nn.Parameter(torch.empty(n_loops, self.rank, fan_in))   # (R, r, in)
            self.lora_B = nn.Parameter(torch.zeros(n_loops, fan_out, self.rank))  # (R, out, r)
            for a in self.lora_A:  # standard LoRA init: Kaiming-uniform A, zero B
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def forward(self, x, loop=None):
        y = super().forward(x)
        if self.rank == 0 or loop is None:
            return y
        if isinstance(loop, int):
            return y + (x @ self.lora_A[loop].t()) @ self.lora_B[loop].t()
        # ALGO LOGIC: per-row loop (B,) (CDB engine): not a gather of one adapter per row, but ALL loops' A in one
        # matmul (R r is small), the other loops' columns zeroed, then all B. EXERCISE: group rows by loop instead
        R, r = self.lora_A.shape[:2]
        z = x @ self.lora_A.flatten(0, 1).t()                                       # (B, T, R r)
        keep = (loop[:, None] == torch.arange(R, device=x.device)).repeat_interleave(r, 1)  # (B, R r)
        return y + (z * keep[:, None]) @ rearrange(self.lora_B, "R o r -> (R r) o")

class CausalSelfAttention(nn.Module):
    def __init__(self, config, n_loops=1, rank=0):
        super().__init__()
        C = config.n_embd
        self.c_attn = LoRALinear(C, 3 * C, config.bias, n_loops, rank)  # fused qkv gets one LoRA
        self.c_proj = LoRALinear(C, C, config.bias, n_loops, rank)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, C, config.dropout

    def forward(self, x, loop=None, cache=None):
        q, k, v = self.c_attn(x, loop).split(self.n_embd, dim=2)
        B, T, C = x.shape  # view/transpose, not einops: einops costs ~3 us per call in the decode loop
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        # KV-cache hook from the engine: store this step's k, v; read all past ones (and their mask)
        k, v, mask = (k, v, None) if cache is None else cache(k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y, loop))

class MLP(nn.Module):
    def __init__(self, config, n_loops=1, rank=0):
        super().__init__()
        self.c_fc = LoRALinear(config.n_embd, 4 * config.n_embd, config.bias, n_loops, rank)
        self.gelu = nn.GELU()  # nanoGPT's exact GELU (GPT-2 itself used the tanh approximation)
        self.c_proj = LoRALinear(4 * config.n_embd, config.n_embd, config.bias, n_loops, rank)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, loop=None):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x, loop)), loop))

class Block(nn.Module):
    """Pre-norm block; norms and biases are tied across loops (paper Sec. 2.2), LoRA is per loop."""
    def __init__(self, config, n_loops=1, rank=0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, n_loops, rank)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config, n_loops, rank)

    def forward(self, x, loop=None, cache=None):
        x = x + self.attn(self.ln_1(x), loop, cache)
        return x + self.mlp(self.ln_2(x), loop)

class GPT(nn.Module):
    """nanoGPT. With n_loops = R > 1 the n_layer = K blocks are applied R times (CYCLE), and with
    lora_rank > 0 every linear matrix gets one LoRA per depth. n_loops=1, lora_rank=0 is nanoGPT."""
    def __init__(self, config, n_loops=1, lora_rank=0):
        super().__init__()
        self.config, self.n_loops, self.lora_rank = config, n_loops, lora_rank
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, n_loops, lora_rank) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying (nanoGPT / GPT-2)
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if pn.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer * n_loops))

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_params(self, non_embedding=True):
        """Stored parameters; non-embedding excludes wte (= lm_head) and wpe, as the paper's 'Emb'."""
        emb = self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return sum(p.numel() for p in self.parameters()) - emb * non_embedding

    def embed(self, idx, pos=None):
        pos = torch.arange(idx.size(1), device=idx.device) if pos is None else pos
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)

    def head(self, x):
        return self.lm_head(self.transformer.ln_f(x))  # every exit shares ln_f + lm_head (Sec. 3.7)

    def forward(self, idx, targets=None, all_exits=False):
        """idx (B, T) -> (logits (B, T, V), loss); all_exits=True returns a list with one
        logits tensor per loop (the exit after each loop); the loss is the last loop's CE."""
        x = self.embed(idx)
        outs = []
        for loop in range(self.n_loops):  # ALGO LOGIC: CYCLE, depth d = loop * K + k uses block k
            for blk in self.transformer.h:
                x = blk(x, loop)
            if all_exits or loop == self.n_loops - 1:
                outs.append(self.head(x))
        loss = None if targets is None else F.cross_entropy(outs[-1].flatten(0, 1).float(), targets.flatten())
        return (outs if all_exits else outs[-1]), loss

@torch.no_grad()
def generate(model, idx, max_new_tokens):
    """Plain greedy decoding without a KV cache (the reference the CDB engine must match)."""
    for _ in range(max_new_tokens):  # logits (B, T, V): append the last position's argmax
        idx = torch.cat([idx, model(idx[:, -model.config.block_size:])[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx

# -----------------------------------------------------------------------------
# GPT-2 weights: safetensors parsed by hand, HF keys mapped to nanoGPT's

def parse_safetensors(raw):
    """bytes -> {name: fp32 tensor}: 8-byte little-endian header size, JSON header, raw tensors."""
    n = int.from_bytes(raw[:8], "little")
    header, base = json.loads(raw[8:8 + n]), 8 + n
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    def tensor(info):
        a, b = info["data_offsets"]
        return torch.frombuffer(bytearray(raw[base + a:base + b]), dtype=dtypes[info["dtype"]]).reshape(info["shape"])
    return {name: tensor(info).float() for name, info in header.items() if name != "__metadata__"}

def gpt2_to_nanogpt(sd):
    """HF GPT-2 state dict (with or without 'transformer.') -> our keys; Conv1D (in, out) -> (out, in)."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("transformer.")
        if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
            continue  # causal-mask buffers; lm_head is tied to wte
        if k.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")):
            v = v.t()
        out["transformer." + k] = v.contiguous()
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out

def download_gpt2(data_dir):
    path = Path(data_dir) / "gpt2" / "model.safetensors"
    if not path.exists():
        print(f"downloading GPT-2 124M weights from {GPT2_URL}")
        try:
            with urllib.request.urlopen(GPT2_URL, timeout=60) as r:
                raw = r.read()
        except Exception as e:
            raise ValueError(f"could not download GPT-2 weights from {GPT2_URL} ({e}); "
                             f"put model.safetensors at {path} by hand, or use --init_from=pretrain")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".part").write_bytes(raw), path.with_suffix(".part").replace(path)
    return gpt2_to_nanogpt(parse_safetensors(path.read_bytes()))

def load_full_checkpoint(path, vocab_size):
    """A nanoGPT-style ckpt.pt {model, model_args} of a plain GPT -> (GPTConfig, state dict)."""
    if not Path(path).is_file():
        raise ValueError(f"init_from: no checkpoint at {path} (use pretrain, gpt2 or a ckpt.pt path)")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ck, dict) or "model" not in ck or "model_args" not in ck:
        raise ValueError(f"init_from: {path} is not a ckpt.pt with 'model' and 'model_args'")
    a = ck["model_args"]
    gcfg = GPTConfig(**{f.name: a[f.name] for f in fields(GPTConfig) if f.name in a})
    if a.get("n_loops", 1) != 1 or a.get("lora_rank", 0) != 0 or gcfg.vocab_size != vocab_size:
        raise ValueError(f"init_from: {path} must hold a plain GPT with vocab_size {vocab_size} (the "
                         f"tokenizer's); it has vocab_size {gcfg.vocab_size}, n_loops {a.get('n_loops', 1)}")
    sd = {k.removeprefix("_orig_mod."): v for k, v in ck["model"].items()}
    ref = {k: v.shape for k, v in GPT(gcfg).state_dict().items()}
    bad = sorted(set(ref) ^ set(sd)) + [k for k in ref if k in sd and sd[k].shape != ref[k]]
    if bad:  # missing, unexpected or misshapen tensors
        raise ValueError(f"init_from: {path} does not match a nanoGPT GPT of its model_args (e.g. {bad[:3]})")
    return gcfg, sd

# -----------------------------------------------------------------------------
# conversion: full N-layer GPT -> K shared blocks x R loops (+ per-depth SVD-LoRA)

def source_layers(init, N, K):
    """For each shared block k, the original layers it is made from (paper Sec. 2.2, Fig. 2)."""
    if init == "stepwise":  # first and last kept, fixed intervals between: round(linspace) as in [MoR]
        return [[round(float(x))] for x in np.linspace(0, N - 1, K)]
    if init == "average":   # all layers tied to block k under CYCLE: k, k+K, ...
        return [list(range(k, N, K)) for k in range(K)]
    if init == "lower":
        return [[k] for k in range(K)]
    return [[] for _ in range(K)]  # random: fresh init. EXERCISE: add 'upper' (last K) and SEQUENCE (d // R)

@torch.no_grad()
def convert(full, n_blocks, n_loops, init="stepwise", lora_rank=0, lora_init="svd"):
    """Full GPT -> GPT with n_blocks shared blocks x n_loops loops. Embeddings, ln_f and head are copied
    (not for init=random: the reduced-size baseline is trained from scratch, notes §3); block k is
    copied/averaged from source_layers; with LoRA, depth d's adapters are the truncated SVD of
    (W_d - W_shared) in fp32: B = U S, A = V^T (Eq. 4-5, no alpha/r factor)."""
    N, K, R = full.config.n_layer, n_blocks, n_loops
    model = GPT(GPTConfig(**{**asdict(full.config), "n_layer": K}), R, lora_rank)
    src = dict(full.named_parameters())
    for name in ("transformer.wte.weight", "transformer.wpe.weight") + \
            tuple(n for n in src if n.startswith("transformer.ln_f")) if init != "random" else ():
        model.get_parameter(name).copy_(src[name])
    # ALGO LOGIC: shared block k <- mean of its source layers (weights, biases and norms alike)
    for k, layers in enumerate(source_layers(init, N, K)):
        for name, p in model.transformer.h[k].named_parameters():
            if layers and "lora_" not in name:
                p.copy_(torch.stack([src[f"transformer.h.{i}.{name}"] for i in layers]).mean(0))
    if lora_rank > 0 and lora_init == "svd":
        assert K * R == N, "SVD init needs one original layer per depth"
        for k, blk in enumerate(model.transformer.h):
            for mname, m in blk.named_modules():
                if not isinstance(m, LoRALinear) or m.rank == 0:
                    continue
                for loop in range(R):  # ALGO LOGIC: residual of depth d = loop * K + k
                    W = src[f"transformer.h.{loop * K + k}.{mname}.weight"].float().cpu()  # (out, in)
                    U, S, Vh = torch.linalg.svd(W - m.weight.float(), full_matrices=False)
                    m.lora_B[loop] = U[:, :m.rank] * S[:m.rank]  # (out, r): singular values into B
                    m.lora_A[loop] = Vh[:m.rank]                 # (r, in); zero residual -> B = 0
    # biases and norms stay tied (paper): full-rank SVD recovers every linear weight exactly, and
    # the whole model exactly when tied layers share their biases/norms (e.g. bias=False models).
    return model

def parse_run(name, N, R):
    """Run name -> (n_blocks, n_loops, init, rank, lora_init); K = N // R.
    full | full_pretrained | reduced_random | <init>_noloop | rec_<init> | relaxed_<init>_r<rank> |
    relaxedzero_<init>_r<rank> (zero-init LoRA ablation)."""
    K = N // R
    if name in ("full", "full_pretrained"):
        return N, 1, "lower", 0, "svd"
    if name == "reduced_random":
        return K, 1, "random", 0, "svd"
    parts = name.split("_")
    if len(parts) == 2 and parts[1] == "noloop" and parts[0] in INITS:
        return K, 1, parts[0], 0, "svd"
    if len(parts) == 2 and parts[0] == "rec" and parts[1] in INITS:
        return K, R, parts[1], 0, "svd"
    if len(parts) == 3 and parts[0] in ("relaxed", "relaxedzero") and parts[1] in INITS \
            and parts[2].startswith("r") and parts[2][1:].lstrip("-").isdigit():
        rank = int(parts[2][1:])
        if rank < 0:
            raise ValueError(f"run {name!r}: LoRA rank must be >= 0, got {rank}")
        return K, R, parts[1], rank, "zero" if parts[0] == "relaxedzero" else "svd"
    raise ValueError(f"unknown run {name!r}: use full, reduced_random, <init>_noloop, rec_<init>, "
                     f"relaxed_<init>_r<rank> or relaxedzero_<init>_r<rank> with init in {INITS}")

# -----------------------------------------------------------------------------
# losses and training

def kd_loss(s_logits, t_logits, temp=1.0):
    """Forward KL(p_teacher || p_student) at temperature temp (x temp^2), mean over tokens.
    [MoR] uses -sum p_T log p_S, which differs by the teacher's entropy (a constant); KL is 0 at equality."""
    s, t = (F.log_softmax(z.float() / temp, -1) for z in (s_logits, t_logits))
    return (t.exp() * (t - s)).sum(-1).mean() * temp ** 2

def uptrain_loss(logits, targets, t_logits, kd_weight, temp):
    """(1 - lambda) CE + lambda FKL from the full model (Sec. 3.6; lambda, T are not given by the paper).
    At T = 1 that is ONE cross-entropy against the mixed target q = (1 - lambda) onehot(y) + lambda p_T,
    minus lambda H(p_T), a constant: one (N, V) student log-softmax instead of two (1.8x faster on CPU)."""
    s, y = logits.flatten(0, 1).float(), targets.flatten()  # (N, V), (N,) token ids (no ignore_index)
    if t_logits is None or kd_weight == 0 or temp != 1:
        ce = F.cross_entropy(s, y)
        return ce if t_logits is None or kd_weight == 0 else (1 - kd_weight) * ce + kd_weight * kd_loss(logits, t_logits, temp)
    with torch.no_grad():
        t = F.log_softmax(t_logits.flatten(0, 1).float(), -1)
        q = t.exp(); h = -(q * t).sum(-1).mean(); del t  # p_T (N, V) and H(p_T): the logged value stays CE + KL
        q.mul_(kd_weight)[torch.arange(len(y), device=y.device), y] += 1 - kd_weight
    return F.cross_entropy(s, q) - kd_weight * h

def early_exit_loss(loop_logits, targets, t_logits, cfg):
    """ALGO LOGIC (Sec. 3.7, "Agg 0.1 + KD"): the last loop keeps the uptraining loss at weight 1;
    every earlier loop adds ee_weight * (CE + KL from the detached last loop). Returns (loss, per-loop CE).
    EXERCISE: compare the paper's "weighted CE" (loop i weighted i / sum j) on loop-1 vs final perplexity."""
    final = loop_logits[-1]
    loss = uptrain_loss(final, targets, t_logits, cfg.kd_weight, cfg.kd_temp)
    ces = [F.cross_entropy(lg.flatten(0, 1).float(), targets.flatten()) for lg in loop_logits]
    for lg, ce in zip(loop_logits[:-1], ces[:-1]):
        loss = loss + cfg.ee_weight * (ce + kd_loss(lg, final.detach(), 1.0))
    return loss, [c.item() for c in ces]

def get_lr(it, iters, lr, cfg):
    warmup = max(1, int(cfg.warmup_frac * iters))
    if it < warmup:
        return lr * (it + 1) / warmup
    ratio = (it - warmup) / max(1, iters - warmup)
    return lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * ratio)))

def peak_flops(cfg, device):  # bf16 dense peak FLOP/s for MFU; 0 = unknown (prints no MFU)
    if device != "cuda" or cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    name = torch.cuda.get_device_name()
    return next((v * 1e12 for k, v in (("H100", 989), ("H200", 989), ("A100", 312)) if k in name), 0.0)

def train(model, train_arr, cfg, device, iters, lr, teacher=None, ee=False, name="", log=lambda rec: None):
    """AdamW + warmup/cosine on random windows; KD from `teacher` when given; early-exit loss if ee."""
    model.train()
    groups = [{"params": [p for p in model.parameters() if (p.dim() >= 2) == d],
               "weight_decay": cfg.weight_decay if d else 0.0} for d in (True, False)]  # no decay on norms/biases
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    fwd = torch.compile(model) if cfg.compile else model  # save `model` (the raw module), never fwd
    gen = torch.Generator().manual_seed(cfg.seed)  # every run sees the same token windows
    T, C, depth = model.config.block_size, model.config.n_embd, model.config.n_layer * model.n_loops
    # FLOPs/token (PaLM / nanoGPT): 6 x weights that run (looped blocks count R times; wpe excluded)
    # + attention, + 2 x the teacher's weights for its forward pass
    shared = model.num_params() - sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)  # LoRA: once
    n_flop = 6 * (model.num_params(False) - model.transformer.wpe.weight.numel() + shared * (model.n_loops - 1)) \
        + 12 * depth * C * T + 2 * (teacher.num_params(False) if teacher else 0)
    peak, hist, t_log, it_log = peak_flops(cfg, device), [], time.perf_counter(), -1
    for it in range(iters):
        for g in opt.param_groups:
            g["lr"] = get_lr(it, iters, lr, cfg)
        x, y = data.get_batch(train_arr, cfg.batch_size, T, device, generator=gen)
        with autocast_ctx(device):
            t_logits = None
            if teacher is not None and cfg.kd_weight > 0:
                with torch.no_grad():
                    t_logits = teacher(x)[0]
            if ee:
                loss, ces = early_exit_loss(fwd(x, all_exits=True)[0], y, t_logits, cfg)
            else:
                loss, ces = uptrain_loss(fwd(x)[0], y, t_logits, cfg.kd_weight, cfg.kd_temp), None
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if it % cfg.log_interval == 0 or it == iters - 1:  # mean time since the last progress line
            sync(device)
            dt, t_log, it_log = (time.perf_counter() - t_log) / (it - it_log), time.perf_counter(), it
            tps = cfg.batch_size * T / dt
            mfu = f" | mfu {100 * n_flop * tps / peak:.1f}%" if peak else ""
            exits = " | loop CE " + " ".join(f"{c:.3f}" for c in ces) if ces else ""
            print(f"{name} step {it:4d}/{iters} | loss {loss.item():.4f}{exits} | lr {get_lr(it, iters, lr, cfg):.1e} | "
                  f"{1000 * dt:.0f} ms/step | {tps / 1e3:.1f}k tok/s{mfu} | eta {fmt_eta(dt * (iters - it - 1))}")
            hist.append({"run": name, "step": it, "loss": loss.item(), "loop_ce": ces})
            log(hist[-1])
    model.eval()
    return hist

# -----------------------------------------------------------------------------
# evaluation: perplexity per loop (static exits), oracle and confidence exits

@torch.no_grad()
def evaluate(model, arr, cfg, device, collect=False):
    """Exact perplexity over the split (capped at eval_tokens) after each loop. With collect=True,
    also per-token (R, n) tensors: nll, max prob and 'argmax equals the last loop's argmax'."""
    model.eval()
    R, nll_sum, n, per = model.n_loops, torch.zeros(model.n_loops), 0, {"nll": [], "maxp": [], "agree": []}
    for x, y in data.iter_eval_batches(arr, cfg.eval_batch_size, model.config.block_size, device):
        with autocast_ctx(device):
            outs, _ = model(x, all_exits=True)
        lp = torch.stack([o.float().log_softmax(-1) for o in outs]).flatten(1, 2)  # (R, B*T, V)
        nll = -lp.gather(-1, y.flatten()[None, :, None].expand(R, -1, 1))[..., 0]   # (R, B*T)
        nll_sum += nll.sum(1).cpu()
        n += y.numel()
        if collect:
            maxp, am = lp.max(-1)
            for k, v in (("nll", nll), ("maxp", maxp.exp()), ("agree", am == am[-1:])):
                per[k].append(v.cpu())
        if cfg.eval_tokens and n >= cfg.eval_tokens:
            break
    res = {"loop_ppl": [math.exp(v) for v in (nll_sum / n).tolist()], "n_tokens": n}
    res["ppl"] = res["loop_ppl"][-1]
    if collect:
        res.update({k: torch.cat(v, 1) for k, v in per.items()})
    return res

def oracle_exits(agree):
    """agree (R, n) bool -> exit loop per token (1-based): the earliest loop whose argmax equals the last."""
    return agree.float().argmax(0) + 1  # the last row is all True, so argmax finds the first True

def confidence_exits(maxp, tau):
    """Exit after the first loop whose max probability >= tau (CALM-style softmax response)."""
    return oracle_exits(torch.cat([maxp[:-1] >= tau, maxp[-1:] >= 0]))  # the last loop always exits

def calibrate_tau(maxp, agree, target):
    """Smallest tau (most exits) whose exits agree with the last loop on >= target of ALL tokens (notes §10;
    §4.2's "of the exits" is stricter). EXERCISE: calibrate the top-1 - top-2 margin, or CALM's saturation."""
    n = agree.shape[1]
    sub = maxp[:-1, ::max(1, n * (maxp.shape[0] - 1) // 100_000)]  # <= ~100k values from every early loop
    cands = torch.quantile(sub.flatten(), torch.linspace(0, 1, 101)).tolist() + [1.01]
    for tau in sorted(set(cands)):
        if agree[confidence_exits(maxp, tau) - 1, torch.arange(n)].float().mean() >= target:
            return tau  # tau = 1.01 (no early exit) always qualifies

def exit_stats(res, exits):
    """Exit rate, mean exit loop, histogram, agreement and perplexity of a per-token exit choice."""
    R, agree = res["agree"].shape[0], res["agree"].gather(0, exits[None] - 1)[0].float()  # (n,) at each exit loop
    return {"exit_rate": (exits < R).float().mean().item(), "mean_exit_loop": exits.float().mean().item(),
            "hist": torch.bincount(exits - 1, minlength=R).tolist(),
            "agreement": agree.mean().item(),  # of all tokens (those at loop R agree)
            "agreement_of_exits": agree[exits < R].mean().nan_to_num(1.0).item(),
            "ppl": math.exp(res["nll"].gather(0, exits[None] - 1).mean().item())}

# -----------------------------------------------------------------------------
# serving: a real batched greedy-decoding engine (static / continuous / depth-wise) + the paper's simulator

@torch.no_grad()
def serve(model, requests, max_batch, device, refill="continuous", exit_mode="none",
          schedule=None, tau=1.0, kv_fill="propagate"):
    """Greedy decoding of requests [(prompt (P,) LongTensor, n_new)] with max_batch slots, each holding
    (request, position, loop). One engine step = ONE pass of the K blocks over all active slots, each at its
    own loop and depth's LoRA, with a KV cache per effective depth d = loop * K + k (full model: K = N, R = 1).
    refill: static (a batch runs until its longest request ends, finished rows computing on: notes §4.5 C.1)
    | continuous (a freed slot takes the next queued request: CSB for R = 1, CDB for R > 1). exit_mode: none
    | oracle (schedule[req][pos] = exit loop from teacher-forced trajectories, as in the paper) | confidence
    (max prob >= tau). kv_fill, the skipped depths' KV of exited tokens: propagate | full (run them, charged)."""
    K, R, C = model.config.n_layer, model.n_loops, model.config.n_embd
    nh, hs, dt = model.config.n_head, C // model.config.n_head, amp_dtype(device)
    Tmax = max(len(p) + n for p, n in requests)
    assert Tmax <= model.config.block_size and len({len(p) for p, _ in requests}) == 1
    kc, vc = (torch.zeros(K * R, max_batch, nh, Tmax, hs, device=device, dtype=dt) for _ in "kv")  # one per depth
    # flat view: row d * max_batch + slot is depth d of a slot, so the mixed depths of one step are
    # ONE index_select (a memcpy per row; 2-D fancy indexing is ~3x slower on CPU)
    kf, vf = kc.view(-1, nh, Tmax, hs), vc.view(-1, nh, Tmax, hs)
    h = torch.zeros(max_batch, C, device=device)              # hidden state per slot
    req, pos, loop, tok = [-1] * max_batch, [0] * max_batch, [0] * max_batch, [0] * max_batch
    out, queue, hist, steps, t_pre = [[] for _ in requests], deque(range(len(requests))), [0] * R, 0, 0.0
    blocks, ar = model.transformer.h, torch.arange(Tmax, device=device)
    left = lambda s: requests[req[s]][1] - len(out[req[s]])  # tokens slot s's request still owes

    def hook_at(rows, p, mask):  # attention hook: write this token's k, v at flat cache rows, read the past
        def hook(kk, vv):        # kk, vv (b, nh, 1, hs) -> past k, v (b, nh, L, hs): only L = mask.size(-1) are live
            kf[rows, :, p], vf[rows, :, p] = kk[:, :, 0].to(dt), vv[:, :, 0].to(dt)
            return kf[:, :, :mask.size(-1)].index_select(0, rows), vf[:, :, :mask.size(-1)].index_select(0, rows), mask
        return hook

    def start_token(s, t):  # slot s moves on to its request's next token t (embedded next step), or frees
        if left(s) > 0:  # (a finished row of a static batch computes on; its tokens are dropped)
            out[req[s]].append(t)
        done = left(s) == 0 and refill != "static"  # static: the whole batch frees at once (below)
        req[s], pos[s], loop[s], tok[s] = -1 if done else req[s], pos[s] + 1, 0, t

    def admit(slots):  # prefill new requests into free slots: all loops, dense causal attention
        ids = [queue.popleft() for _ in slots]
        idx = torch.stack([requests[i][0] for i in ids]).to(device)   # (b, P)
        st = torch.tensor(slots, device=device)
        P, x = idx.size(1), model.embed(idx)
        for lp in range(R):
            for k, blk in enumerate(blocks):
                def hook(kk, vv, d=lp * K + k):
                    kc[d, st, :, :P], vc[d, st, :, :P] = kk.to(dt), vv.to(dt)
                    return kk, vv, None
                x = blk(x, lp, hook)
        for s, i, t in zip(slots, ids, model.head(x[:, -1]).argmax(-1).tolist()):
            req[s], pos[s] = i, P - 1
            start_token(s, t)

    sync(device)
    t0 = time.perf_counter()
    with autocast_ctx(device):
        while queue or any(r >= 0 for r in req):
            free = [s for s in range(max_batch) if req[s] < 0]
            if queue and free and (refill == "continuous" or len(free) == max_batch):
                sync(device); t1 = time.perf_counter(); admit(free[:len(queue)])  # admit ends in a host read (.tolist)
                t_pre += time.perf_counter() - t1
                continue  # admitted requests may already be done (n_new = 1)
            act = [s for s in range(max_batch) if req[s] >= 0]
            # ONE host->device copy per step: slot, loop, position, token and each block's cache row
            st = torch.tensor([act, [loop[s] for s in act], [pos[s] for s in act], [tok[s] for s in act]]
                              + [[(loop[s] * K + k) * max_batch + s for s in act] for k in range(K)], device=device)
            idx, lp, p, rows = st[0], st[1], st[2], st[4:]             # rows (K, b): depth loop * K + k
            L = max(pos[s] for s in act) + 1                           # live context: skip the empty tail
            mask = (ar[None, :L] <= p[:, None])[:, None, None, :]      # (b, 1, 1, L)
            # a slot at loop 0 starts a new token (its embedding); later loops carry on from h
            x = torch.where((lp == 0)[:, None, None], model.embed(st[3, :, None], p[:, None]), h.index_select(0, idx)[:, None])
            for k, blk in enumerate(blocks):  # ALGO LOGIC: one shared-block pass, mixed loops
                x = blk(x, lp, hook_at(rows[k], p, mask))              # (b, 1, C)
            h.index_copy_(0, idx, x[:, 0].float())
            steps, dl = steps + 1, [loop[s] + 1 for s in act]          # dl: loops done per slot
            # ex: exits before the last loop (oracle: from the teacher-forced schedule)
            ex = [exit_mode == "oracle" and dl[i] < R and dl[i] >= schedule[req[s]][pos[s]] for i, s in enumerate(act)]
            if exit_mode == "confidence" and any(d < R for d in dl):
                nf = [i for i in range(len(act)) if dl[i] < R]
                conf = model.head(x[nf, 0]).float().softmax(-1).max(-1).values.tolist()
                for i, c in zip(nf, conf):
                    ex[i] = c >= tau
            emit = [i for i in range(len(act)) if dl[i] == R or ex[i]]  # slots whose token is chosen now
            tok_of = dict(zip(emit, model.head(x[emit, 0]).argmax(-1).tolist() if emit else []))
            # ALGO LOGIC: exited tokens still owe keys/values at the depths they skip. propagate: copy
            # the exited state up (CALM) and project it with each skipped depth's c_attn + LoRA;
            # full: really run the skipped loops (the compute the paper leaves out). EXERCISE: do it lazily, FREE-style
            for lq in range(1, R):
                sel = [i for i in emit if ex[i] and dl[i] <= lq]   # exited tokens that skip loop lq
                if not sel:
                    continue
                si = torch.tensor(sel, device=device)
                rk = torch.tensor([[(lq * K + k) * max_batch + act[i] for i in sel] for k in range(K)], device=device)
                xs, ps = x.index_select(0, si), p.index_select(0, si)   # (b', 1, C), (b',)
                if kv_fill == "full":
                    for k, blk in enumerate(blocks):
                        xs = blk(xs, lq, hook_at(rk[k], ps, mask.index_select(0, si)))
                    x.index_copy_(0, si, xs)  # later skipped loops start from here (h holds its own copy)
                    continue
                kv = torch.cat([blk.attn.c_attn(blk.ln_1(xs), lq)[:, 0, C:] for blk in blocks])  # (K b', 2C)
                kf[rk.flatten(), :, ps.repeat(K)] = kv[:, :C].view(-1, nh, hs).to(dt)   # one write for all K depths
                vf[rk.flatten(), :, ps.repeat(K)] = kv[:, C:].view(-1, nh, hs).to(dt)
            for i, s in enumerate(act):
                if i in tok_of:
                    hist[dl[i] - 1] += left(s) > 0
                    start_token(s, tok_of[i])
                else:
                    loop[s] += 1
            if refill == "static" and not any(left(s) for s in act):
                req[:] = [-1] * max_batch  # the longest request of the batch is done: the batch ends
    sync(device); wall = time.perf_counter() - t0
    n_dec = sum(n - 1 for _, n in requests)  # decode tokens: the first token of each request comes from prefill
    return {"tokens": out, "time_s": wall, "tok_per_s": sum(n for _, n in requests) / wall, "prefill_s": t_pre,
            "decode_tok_per_s": n_dec / max(wall - t_pre, 1e-9), "steps": steps, "exit_hist": hist, "kv": (kc, vc)}

@torch.no_grad()
def trajectory_exits(model, requests, tokens, device):
    """Teacher-force prompt + generated tokens; oracle exit loop per decode position: schedule[i][pos]."""
    sched = []
    for (prompt, n), toks in zip(requests, tokens):
        seq = torch.cat([prompt, torch.tensor(toks[:-1], dtype=torch.long)])[None].to(device)
        with autocast_ctx(device):
            outs, _ = model(seq, all_exits=True)
        am = torch.stack([o[0].argmax(-1) for o in outs])                  # (R, T)
        e = oracle_exits((am == am[-1:]).cpu()).tolist()
        sched.append({q: e[q] for q in range(len(prompt), seq.size(1))})
    return sched

@torch.no_grad()
def step_times(model, batches, ctx, device, reps=10):
    """Measured time of one shared-block pass (K blocks, one loop) at each batch size, KV length ctx."""
    C, nh, dt, res = model.config.n_embd, model.config.n_head, amp_dtype(device), {}
    for b in batches:  # mixed loops (lp) so relaxed models pay their per-row LoRA
        kv = torch.randn(b, nh, ctx, C // nh, device=device, dtype=dt)
        hook = lambda kk, vv, kv=kv: (kv, kv, torch.ones(b, 1, 1, ctx, dtype=torch.bool, device=device))
        x0, lp = torch.randn(b, 1, C, device=device), torch.arange(b, device=device) % model.n_loops
        ts = []
        for i in range(reps + 2):
            sync(device); t0 = time.perf_counter()
            with autocast_ctx(device):
                x = x0
                for blk in model.transformer.h:
                    x = blk(x, lp, hook)
            sync(device); ts.append(time.perf_counter() - t0)
        res[b] = float(np.median(ts[2:]))  # the first two are warm-up
    return res

def simulate(lengths, exits, t_step, max_batch, mode, R):
    """The paper's simulator (Sec. 3.8, App. K): all requests queued at t=0; each step costs the measured
    t_step[active batch] (seconds). lengths: decode tokens per request; exits[i]: exit loop per token. mode:
    static (a batch steps until its longest request ends) | csb (step = full-model pass) | cdb (step = one
    loop of the shared block) | ee_sync (early exit, no CDB: a step waits for its slowest token). -> (tok/s, steps)"""
    t = lambda b, bs=sorted(t_step): float(np.interp(b, bs, [t_step[k] for k in bs]))  # step time at batch b
    total, steps, queue = 0.0, 0, deque(i for i, n in enumerate(lengths) if n > 0)
    slots = []  # [request, token index, loops done]
    while queue or slots:
        if mode in ("csb", "cdb") or not slots:
            while queue and len(slots) < max_batch:
                slots.append([queue.popleft(), 0, 0])
        # ee_sync: every slot makes one token per step, at the cost of the slowest slot's exit loop
        total += t(len(slots)) * (max(exits[s[0]][s[1]] for s in slots) if mode == "ee_sync" else 1)
        steps += 1
        for s in slots:
            s[2] += 1
            if mode != "cdb" or s[2] >= (exits[s[0]][s[1]] if exits else R):
                s[1], s[2] = s[1] + 1, 0
        if mode != "static" or all(s[1] >= lengths[s[0]] for s in slots):  # static: finished rows idle
            slots = [s for s in slots if s[1] < lengths[s[0]]]  # in the batch until it ends; else they leave
    return sum(lengths) / total, steps

# -----------------------------------------------------------------------------
# the study: full model -> every run in cfg.runs, uptrained on the same tokens, evaluated

def cached(cfg, name, spec, device, build):
    """Reuse a finished stage from out_dir/ckpt/<name>-<hash of its spec>.pt, else build() and save
    it as a plain-typed dict {model, model_args, config, step, extras} (loads with weights_only)."""
    path = Path(cfg.out_dir) / "ckpt" / f"{name}-{hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]}.pt"
    if path.exists():
        print(f"{name}: reusing {path}")
        ck = torch.load(path, map_location="cpu", weights_only=True)
        a = ck["model_args"]
        model = GPT(GPTConfig(**{f.name: a[f.name] for f in fields(GPTConfig)}), a["n_loops"], a["lora_rank"])
        model.load_state_dict(ck["model"])
        return model.to(device).eval()
    model, extras = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "config": asdict(cfg),
                "model_args": {**asdict(model.config), "n_loops": model.n_loops, "lora_rank": model.lora_rank},
                "step": extras.get("step", 0), "extras": extras}, path.with_suffix(".part"))
    path.with_suffix(".part").replace(path)  # never a half-written checkpoint
    return model.eval()

def check_config(cfg):
    """Every bad input fails here (or while resolving init_from), before anything is written."""
    for bad, msg in [
            (cfg.n_loops < 1 or cfg.n_layer % cfg.n_loops, f"n_layer={cfg.n_layer} is not divisible by n_loops={cfg.n_loops}"),
            (cfg.lora_rank < 0, f"lora_rank must be >= 0, got {cfg.lora_rank}"),
            (cfg.init not in INITS, f"unknown init {cfg.init!r}: use one of {INITS}"),
            (cfg.lora_init not in ("svd", "zero"), f"unknown lora_init {cfg.lora_init!r}: use svd or zero"),
            (cfg.stage not in STAGES, f"unknown stage {cfg.stage!r}: use one of {STAGES}"),
            (cfg.init_from == "gpt2" and cfg.tokenizer != "gpt2", "init_from=gpt2 needs tokenizer=gpt2"),
            (cfg.kv_fill not in ("propagate", "full"), f"unknown kv_fill {cfg.kv_fill!r}: use propagate or full"),
            (not 0 <= cfg.kd_weight <= 1, f"kd_weight must be in [0, 1], got {cfg.kd_weight}"),
            (cfg.prompt_len + cfg.gen_max > cfg.block_size or not 2 <= cfg.gen_min <= cfg.gen_max,
             "need 2 <= gen_min <= gen_max (>= 1 decode step) and prompt_len + gen_max <= block_size")]:
        if bad:
            raise ValueError(msg)
    for name in cfg.runs.split(","):
        parse_run(name.strip(), cfg.n_layer, cfg.n_loops)

def resolve_full(cfg, data_dir):
    """The full model's source, downloaded / loaded / checked before anything is written.
    Returns (meta, GPTConfig, state dict or None (= pretrain here), cache key)."""
    full_sd = download_gpt2(data_dir) if cfg.init_from == "gpt2" else None
    meta = data.prepare_text(cfg.dataset, cfg.tokenizer, data_dir)
    if cfg.init_from == "gpt2":
        gcfg, key = GPTConfig(1024, 50257, 12, 12, 768, cfg.dropout, True), {"gpt2": GPT2_URL}
    elif cfg.init_from != "pretrain":
        gcfg, full_sd = load_full_checkpoint(cfg.init_from, meta["vocab_size"])
        gcfg.dropout = cfg.dropout
        key = {"path": str(Path(cfg.init_from).resolve()), "mtime": os.path.getmtime(cfg.init_from)}
    else:
        gcfg = GPTConfig(cfg.block_size, meta["vocab_size"], cfg.n_layer, cfg.n_head, cfg.n_embd,
                         cfg.dropout, cfg.bias)
        key = {"pretrain": asdict(gcfg), "iters": cfg.pretrain_iters, "lr": cfg.pretrain_lr, "bs": cfg.batch_size,
               "wd": cfg.weight_decay}
    if (gcfg.n_layer, gcfg.n_head, gcfg.n_embd) != (cfg.n_layer, cfg.n_head, cfg.n_embd):
        print(f"the full model is {gcfg.n_layer} x {gcfg.n_embd} ({gcfg.n_head} heads) ({cfg.init_from}): using it")
        cfg.n_layer, cfg.n_head, cfg.n_embd = gcfg.n_layer, gcfg.n_head, gcfg.n_embd  # config.json tells the truth
        check_config(cfg)
    gcfg.block_size = min(gcfg.block_size, cfg.block_size)  # train/eval context: cut wpe rows
    if cfg.prompt_len + cfg.gen_max > gcfg.block_size:  # a short-context checkpoint: fail now, not after training
        raise ValueError(f"prompt_len + gen_max = {cfg.prompt_len + cfg.gen_max} exceeds the model's context "
                         f"{gcfg.block_size} ({cfg.init_from})")
    if full_sd is not None:
        full_sd["transformer.wpe.weight"] = full_sd["transformer.wpe.weight"][:gcfg.block_size]
    return meta, gcfg, full_sd, {"data": [cfg.dataset, cfg.tokenizer, meta["source_sha256"]], "src": key,
                                 "seed": cfg.seed, "ctx": [gcfg.block_size, gcfg.dropout],
                                 "sched": [cfg.warmup_frac, cfg.min_lr_frac, cfg.grad_clip]}

def run(cfg):
    """The whole pipeline; returns the summary dict (also written to out_dir/summary.json)."""
    check_config(cfg)
    device = get_device(cfg.device)
    meta, gcfg, full_sd, key = resolve_full(cfg, cfg.data_dir or data.DATA_DIR)
    N, R, out = cfg.n_layer, cfg.n_loops, Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    logf = open(out / "log.jsonl", "a")
    log = lambda rec: (logf.write(json.dumps(rec) + "\n"), logf.flush())
    print(f"device {device} | {cfg.dataset} {meta['n_tokens']} | N={N} -> K={N // R} x R={R}")
    tr, va, te = (data.load_split(meta, s) for s in ("train", "val", "test"))

    def build_full():
        set_seed(cfg.seed)
        m = GPT(gcfg).to(device)
        if full_sd is not None:
            m.load_state_dict(full_sd)
            return m, {}
        return m, {"step": cfg.pretrain_iters, "history": train(
            m, tr, cfg, device, cfg.pretrain_iters, cfg.pretrain_lr, name="pretrain", log=log)}
    full = cached(cfg, "full_pretrained", key, device, build_full)
    summary = {"config": asdict(cfg), "device": device, "results": [], "claims": {}, "early_exit": {},
               "throughput": {}, "units": "perplexity per token of the tokenizer"}
    if cfg.stage == "pretrain":
        return finish(cfg, summary, out)

    # ALGO LOGIC: every run is converted from the same full model, then uptrained on the same
    # token windows with the same recipe and KD from the full model (Sec. 3.1, 3.6)
    key = {**key, "up": [cfg.uptrain_iters, cfg.lr, cfg.batch_size, cfg.kd_weight, cfg.kd_temp, cfg.weight_decay, R]}
    main_name = f"rec_{cfg.init}" if cfg.lora_rank == 0 else \
        f"{'relaxed' if cfg.lora_init == 'svd' else 'relaxedzero'}_{cfg.init}_r{cfg.lora_rank}"
    runs = [r.strip() for r in cfg.runs.split(",")]
    runs += [main_name] if cfg.stage != "study" and main_name not in runs else []
    models, before = {}, None
    for name in ["full_pretrained"] + runs:
        K, loops, init, rank, linit = parse_run(name, N, R)

        def build(name=name, K=K, loops=loops, init=init, rank=rank, linit=linit):
            set_seed(cfg.seed)
            m = convert(full, K, loops, init, rank, linit).to(device)
            print(f"{name}: {full.num_params() / 1e6:.2f}M -> {m.num_params() / 1e6:.2f}M non-embedding parameters")
            return m, {"step": cfg.uptrain_iters, "history": train(
                m, tr, cfg, device, cfg.uptrain_iters, cfg.lr, teacher=full, name=name, log=log)}
        m = models[name] = full if name == "full_pretrained" else cached(cfg, name, {**key, "run": name}, device, build)
        v, t = evaluate(m, va, cfg, device), evaluate(m, te, cfg, device, collect=name == main_name)
        before = t if name == main_name else before  # the main model before early-exit training (kept)
        row = {"name": name, "non_emb_params": m.num_params(), "blocks": K, "loops": loops, "init": init,
               "lora_rank": rank, "lora_init": linit if rank else None, "val_ppl": v["ppl"], "test_ppl": t["ppl"],
               "uptrain_tokens": cfg.uptrain_iters * cfg.batch_size * m.config.block_size * (name != "full_pretrained")}
        if loops > 1:
            row["loop_val_ppl"], row["loop_test_ppl"] = v["loop_ppl"], t["loop_ppl"]
        summary["results"].append(row)
        log({"result": row})
        print(f"{name:24s} | {row['non_emb_params'] / 1e6:6.2f}M | val ppl {v['ppl']:8.2f} | test ppl {t['ppl']:8.2f}"
              + (f" | val ppl per loop {' '.join(f'{q:.2f}' for q in v['loop_ppl'])}" if loops > 1 else ""))
    summary["claims"] = check_claims(summary["results"])
    print("\n".join(f"claim {k}: {v}" for k, v in summary["claims"].items()))
    if cfg.stage == "study":
        return finish(cfg, summary, out)

    # early-exit post-training of the main model (Sec. 3.7), then static / oracle / confidence exits
    def build_ee():
        m = convert(full, N // R, R, cfg.init, cfg.lora_rank, cfg.lora_init).to(device)
        m.load_state_dict(models[main_name].state_dict())
        return m, {"step": cfg.ee_iters, "history": train(
            m, tr, cfg, device, cfg.ee_iters, cfg.lr, teacher=full, ee=True, name=main_name + "_ee", log=log)}
    ee_model = cached(cfg, main_name + "_ee", {**key, "run": main_name, "ee": [cfg.ee_iters, cfg.ee_weight]},
                      device, build_ee)
    rv, rt = evaluate(ee_model, va, cfg, device, collect=True), evaluate(ee_model, te, cfg, device, collect=True)
    tau = calibrate_tau(rv["maxp"], rv["agree"], cfg.conf_agree)
    ee = summary["early_exit"] = {
        "model": main_name + "_ee", "loop_test_ppl_before": before["loop_ppl"], "loop_val_ppl": rv["loop_ppl"],
        "loop_test_ppl": rt["loop_ppl"], "oracle_before": exit_stats(before, oracle_exits(before["agree"])),
        "oracle": exit_stats(rt, oracle_exits(rt["agree"])), "tau": tau,
        "confidence": exit_stats(rt, confidence_exits(rt["maxp"], tau))}
    log({"early_exit": ee})
    f = lambda xs: " ".join(f"{q:.2f}" for q in xs)
    print(f"early exit: test ppl per loop {f(rt['loop_ppl'])} (before EE training {f(before['loop_ppl'])}) | "
          f"oracle exit rate {ee['oracle']['exit_rate']:.3f} | confidence exits (tau {tau:.3f}) rate "
          f"{ee['confidence']['exit_rate']:.3f}, agreement {ee['confidence']['agreement']:.3f}, ppl {ee['confidence']['ppl']:.2f}")
    if cfg.stage == "all":
        summary["throughput"] = throughput(cfg, models.get("full", full), ee_model, te, tau, device, log)
    return finish(cfg, summary, out)

def check_claims(rows):
    """The paper's claims as checks on this run's validation perplexities (left out when rows are missing)."""
    ppl, claims = {r["name"]: r["val_ppl"] for r in rows}, {}
    g = lambda *n: all(k in ppl for k in n)
    if g("rec_stepwise", "reduced_random"):
        claims["stepwise_beats_reduced_from_scratch"] = ppl["rec_stepwise"] < ppl["reduced_random"]
    if g("rec_stepwise", "rec_average", "rec_lower"):
        claims["stepwise_best_without_lora"] = ppl["rec_stepwise"] < min(ppl["rec_average"], ppl["rec_lower"])
    for r in rows:
        if r["name"].startswith("relaxed_stepwise_r") and g(r["name"].replace("stepwise", "average")):
            claims[f"average_beats_stepwise_with_svd_r{r['lora_rank']}"] = \
                ppl[r["name"].replace("stepwise", "average")] < ppl[r["name"]]
    avg = sorted((r["lora_rank"], r["val_ppl"]) for r in rows if r["name"].startswith("relaxed_average_r"))
    if len(avg) >= 2:
        claims["relaxed_ppl_falls_with_rank"] = all(a[1] > b[1] for a, b in zip(avg, avg[1:]))
    return claims

def throughput(cfg, full, rec, arr, tau, device, log):
    """Same requests, same hardware: full model (static, CSB) vs recursive CDB (no exit, oracle, confidence;
    best of 3 each), beside the paper's simulator (measured step times x oracle exit trajectories)."""
    rng = np.random.default_rng(cfg.seed)
    reqs = [(torch.from_numpy(arr[s:s + cfg.prompt_len].astype(np.int64)), int(rng.integers(cfg.gen_min, cfg.gen_max + 1)))
            for s in rng.integers(0, len(arr) - cfg.prompt_len, cfg.n_requests)]
    serve(full, reqs[:2], 2, device), serve(rec, reqs[:2], 2, device)  # warm-up (allocator, kernels)
    best = lambda m, **kw: max((serve(m, reqs, cfg.max_batch, device, **kw) for _ in range(3)), key=lambda r: r["tok_per_s"])
    res = {"full_static": best(full, refill="static"), "full_csb": best(full), "cdb_no_exit": best(rec)}
    sched = trajectory_exits(rec, reqs, res["cdb_no_exit"]["tokens"], device)
    res["cdb_oracle"] = best(rec, exit_mode="oracle", schedule=sched, kv_fill=cfg.kv_fill)
    res["cdb_confidence"] = best(rec, exit_mode="confidence", tau=tau, kv_fill=cfg.kv_fill)
    same = lambda a, b: float(np.mean([x == y for ta, tb in zip(a, b) for x, y in zip(ta, tb)]))
    th = {"measured": {k: round(v["tok_per_s"], 1) for k, v in res.items()},
          # decode only (prefill time and each request's first token left out): the simulator's quantity
          "measured_decode": {k: round(v["decode_tok_per_s"], 1) for k, v in res.items()},
          "prefill_s": {k: round(v["prefill_s"], 4) for k, v in res.items()},
          "kv_fill": cfg.kv_fill, "device": device, "n_requests": cfg.n_requests, "max_batch": cfg.max_batch,
          "exit_hist_oracle": res["cdb_oracle"]["exit_hist"], "exit_hist_confidence": res["cdb_confidence"]["exit_hist"],
          "token_agreement_with_full_model_csb": same(res["full_csb"]["tokens"], res["cdb_no_exit"]["tokens"]),
          "token_agreement_oracle_vs_no_exit": same(res["cdb_oracle"]["tokens"], res["cdb_no_exit"]["tokens"])}
    hist, mt = res["cdb_oracle"]["exit_hist"], th["measured"]
    th.update(mean_exit_loop=sum((i + 1) * c for i, c in enumerate(hist)) / max(1, sum(hist)),
              speedup_cdb_oracle_vs_static=mt["cdb_oracle"] / mt["full_static"],
              speedup_cdb_oracle_vs_csb=mt["cdb_oracle"] / mt["full_csb"])
    # ALGO LOGIC: the paper's simulator: measured block-pass times x exit trajectories
    bs = sorted({cfg.max_batch} | {2 ** i for i in range(int(math.log2(cfg.max_batch)) + 1)})
    ctx = cfg.prompt_len + (cfg.gen_min + cfg.gen_max) // 2
    t_full, t_block = step_times(full, bs, ctx, device), step_times(rec, bs, ctx, device)
    lengths = [n - 1 for _, n in reqs]
    exits = [[sched[i][len(reqs[i][0]) + j] for j in range(lengths[i])] for i in range(len(reqs))]
    sim = {k: simulate(lengths, e, t, cfg.max_batch, mode, r)[0] for k, e, t, mode, r in [
        ("full_static", None, t_full, "static", 1), ("full_csb", None, t_full, "csb", 1),
        ("cdb_no_exit", None, t_block, "cdb", rec.n_loops),
        ("cdb_oracle", exits, t_block, "cdb", rec.n_loops), ("ee_sync_no_cdb", exits, t_block, "ee_sync", 0)]}
    th.update(simulated={k: round(v, 1) for k, v in sim.items()},
              sim_speedup_cdb_oracle_vs_static=sim["cdb_oracle"] / sim["full_static"],
              sim_speedup_cdb_oracle_vs_csb=sim["cdb_oracle"] / sim["full_csb"],
              step_time_ms={n: {b: 1e3 * v for b, v in t.items()} for n, t in (("full", t_full), ("block", t_block))})
    log({"throughput": th})
    print("scheduler        measured tok/s (decode only) | simulated tok/s (decode steps, block time only)")
    for k in list(mt) + ["ee_sync_no_cdb"]:
        print(f"{k:16s} {mt.get(k, float('nan')):14.1f} ({th['measured_decode'].get(k, float('nan')):7.1f}) | "
              f"{sim.get(k, float('nan')):14.1f}")
    print(f"CDB + oracle exits: x{th['speedup_cdb_oracle_vs_static']:.2f} vs static, x{th['speedup_cdb_oracle_vs_csb']:.2f} "
          f"vs CSB (simulator x{th['sim_speedup_cdb_oracle_vs_static']:.2f}, x{th['sim_speedup_cdb_oracle_vs_csb']:.2f}); "
          f"mean exit loop {th['mean_exit_loop']:.2f}, histogram {hist}")
    return th

# -----------------------------------------------------------------------------
# outputs

def finish(cfg, summary, out):
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if cfg.plot:
        save_plots(summary, out)
    print(f"wrote {out / 'summary.json'}")
    return summary

def save_plots(summary, out):
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = summary["results"]
    if rows:  # the paper's Pareto picture: perplexity vs non-embedding parameters
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for r in rows:
            xy, fam = (r["non_emb_params"] / 1e6, r["val_ppl"]), r["name"].split("_")[0]
            ax.scatter(*xy, color={"full": "k", "rec": "C0", "relaxed": "C1"}.get(fam, "C2"))
            ax.annotate(r["name"], xy, fontsize=7, xytext=(3, 3), textcoords="offset points")
        avg = sorted((r["non_emb_params"] / 1e6, r["val_ppl"]) for r in rows if r["name"].startswith("relaxed_average"))
        ax.plot(*zip(*avg), color="C1", lw=1) if avg else None  # the relaxed frontier
        ax.set(xlabel="non-embedding parameters (M)", ylabel="validation perplexity",
               title="Recursive / relaxed vs full and reduced models")
        fig.tight_layout(); fig.savefig(out / "pareto.png", dpi=110); plt.close(fig)
    ee, th = summary["early_exit"], summary["throughput"]
    if ee:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        R = len(ee["oracle"]["hist"])
        for j, (k, lab) in enumerate([("oracle", "oracle"), ("confidence", f"confidence (tau {ee['tau']:.2f})")]):
            hst = np.array(ee[k]["hist"]) / max(1, sum(ee[k]["hist"]))
            ax.bar(np.arange(1, R + 1) + 0.2 * (2 * j - 1), hst, width=0.4, label=lab)
        ax.set(xlabel="exit loop", ylabel="fraction of test tokens", title=f"Exit histogram ({ee['model']})")
        ax.set_xticks(range(1, R + 1)); ax.legend()
        fig.tight_layout(); fig.savefig(out / "exit_hist.png", dpi=110); plt.close(fig)
    if th:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        keys, x = list(th["measured"]), np.arange(len(th["measured"]))
        ax.bar(x - 0.2, [th["measured"][k] for k in keys], 0.4, label="measured engine")
        ax.bar(x + 0.2, [th["simulated"].get(k, 0) for k in keys], 0.4, label="simulator (block time)")
        ax.set_xticks(x); ax.set_xticklabels(keys, fontsize=8); ax.legend(fontsize=8)
        ax.set(ylabel="tokens / s", title=f"Greedy decoding throughput ({th['device']})")
        fig.tight_layout(); fig.savefig(out / "throughput.png", dpi=110); plt.close(fig)

def main(argv=None):
    cfg = parse_config(argv)
    print(json.dumps(asdict(cfg)))
    t0, summary = time.time(), run(cfg)
    print(f"done in {fmt_eta(time.time() - t0)}")
    return summary

if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
