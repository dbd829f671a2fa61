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
  python recursive.py                             # the whole study on PTB, 12 -> 6 x 2, one GPU
  python recursive.py --preset=tiny --device=cpu  # CPU smoke run of every stage, under a minute
  python recursive.py --init_from=gpt2 --n_loops=2  # start from GPT-2 124M (downloads 500 MB)
  python recursive.py --stage=study --runs=rec_stepwise,relaxed_average_r64
Outputs in out/recursive/: config.json, log.jsonl, ckpt/*.pt (stage caches), summary.json, *.png.
Expected output, run times and every result: docs/recursive.md.
Dimension letters: B batch, T time, C n_embd, nh heads, hs head size, R loops, r LoRA rank.
"""
import argparse, functools, hashlib, inspect, json, math, os, random, sys, time, urllib.request
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

STUDY_RUNS = ("full,reduced_random,stepwise_noloop,rec_stepwise,rec_average,rec_lower,"
              "relaxed_average_r16,relaxed_average_r64,relaxed_average_r128,relaxed_stepwise_r64")

@dataclass
class Config:
    # data
    dataset: str = "ptb"          # data.py name: ptb | wikitext2 | shakespeare | text:PATH
    tokenizer: str = "gpt2"       # gpt2 (tiktoken) | char
    data_dir: str = ""            # '' = data.DATA_DIR (<repo>/data)
    # full model (init_from=gpt2 or a checkpoint path brings its own shape)
    init_from: str = "pretrain"   # pretrain (here, cached) | gpt2[-medium|-large|-xl] | a ckpt.pt
    n_layer: int = 12             # N, depth of the full model
    n_head: int = 6               # attention heads; n_embd must divide by it
    n_embd: int = 384             # C; 384 keeps the default study inside ~5 H100 minutes
    block_size: int = 256         # context length T
    dropout: float = 0.1          # PTB is small (~1.2M GPT-2 tokens): some dropout
    bias: bool = True             # biases in linear layers and LayerNorms (GPT-2 has them)
    # recursion / relaxation of the main model (early-exit trained, served by the CDB engine)
    n_loops: int = 2              # R (the paper's B); K = n_layer // n_loops shared blocks
    init: str = "stepwise"        # stepwise | average | lower | random
    lora_rank: int = 0            # 0 = plain recursive; capped per matrix at min(in, out)
    lora_init: str = "svd"        # svd (SVD of the residual, Eq. 4-5) | zero (B = 0 ablation)
    # the study
    runs: str = STUDY_RUNS        # comma list of study rows (names: parse_run)
    # training
    batch_size: int = 16          # sequences per step (16 x 256 = 4096 tokens)
    pretrain_iters: int = 1200    # steps for init_from=pretrain (~4.9M tokens, ~4 PTB epochs)
    pretrain_lr: float = 1e-3     # peak lr of the pretraining (same warmup / cosine)
    uptrain_iters: int = 300      # steps per study row: every row sees the same ~1.2M tokens
    lr: float = 3e-4              # uptraining peak lr (paper 2e-4 at a 2M-token batch)
    warmup_frac: float = 0.03     # warmup as a fraction of steps (paper ~2.8%)
    min_lr_frac: float = 0.1      # cosine floor as a fraction of the peak
    weight_decay: float = 0.1     # AdamW, on matrices only
    grad_clip: float = 1.0        # gradient-norm clip (0 = off)
    kd_weight: float = 0.5        # lambda in (1 - lambda) CE + lambda FKL(teacher || student)
    kd_temp: float = 1.0          # distillation temperature
    # early exit (post-training after uptraining, Sec. 3.7)
    ee_iters: int = 100           # ~1/3 of the uptraining tokens
    ee_weight: float = 0.1        # weight of each earlier loop's CE + self-distillation (Agg 0.1)
    conf_agree: float = 0.95      # confidence exits: tau set on val for this agreement with loop R
    # serving (CDB engine vs static / continuous sequence batching)
    n_requests: int = 128         # requests served (prompts from the test split)
    max_batch: int = 32           # slots
    prompt_len: int = 32          # prompt tokens per request
    gen_min: int = 16             # new tokens per request ~ uniform[gen_min, gen_max]
    gen_max: int = 192            # prompt_len + gen_max <= block_size
    kv_fill: str = "exact"        # exited tokens' skipped KV: exact (run lazily) | propagate | full
    engine: str = "auto"          # serving engine state: lists (host) | tensors (device) | auto
    engine_compile: bool = False  # tensors engine, fixed-shape step, torch.compile reduce-overhead
    bench_rounds: int = 5         # serving benchmark: interleaved rounds (median and range)
    # eval / system
    eval_tokens: int = 0          # cap per split for perplexity (0 = whole split)
    eval_batch_size: int = 8      # sequences per evaluation batch
    log_interval: int = 50        # steps between progress lines
    stage: str = "all"            # last stage: pretrain | study | early_exit | all (+ serving)
    preset: str = ""              # '' | tiny (CPU, under a minute)
    device: str = "auto"          # auto | cpu | cuda | mps
    threads: int = 0              # torch CPU threads; 0 = 1 on the CPU unless OMP_NUM_THREADS set
    seed: int = 1337              # every RNG; the same seed gives the same run on one machine
    compile: bool = False         # torch.compile the training forward
    peak_tflops: float = 0.0      # for MFU; 0 = look up the GPU name
    out_dir: str = "out/recursive"  # everything a run writes; ckpt/ holds the stage caches
    plot: bool = True             # write the PNG plots

TINY = dict(tokenizer="char", n_layer=4, n_head=2, n_embd=64, block_size=64, dropout=0.0,
            batch_size=8, pretrain_iters=60, uptrain_iters=12, ee_iters=8, eval_tokens=4096,
            eval_batch_size=8,
            runs="full,reduced_random,stepwise_noloop,rec_stepwise,rec_average,rec_lower,"
                 "relaxed_average_r8,relaxed_average_r32,relaxed_average_r64,relaxed_stepwise_r32",
            n_requests=8, max_batch=4, prompt_len=8, gen_min=4, gen_max=24, log_interval=20)
INITS = ("stepwise", "average", "lower", "random")
STAGES = ("pretrain", "study", "early_exit", "all")
GPT2_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")

# -----------------------------------------------------------------------------
# utilities

class UsageError(ValueError):
    """A mistake the user can fix (a flag, a size, a file): main prints it as one `error:` line."""

class ArgParser(argparse.ArgumentParser):
    def error(self, message):  # argparse's usage + error lines -> one UsageError
        raise UsageError(f"{message} (see --help)")

def flag_help():
    """{field: its comment in Config}: the --help text of every flag."""
    lines = inspect.getsource(Config).splitlines()
    flags = [ln for ln in lines if "#" in ln and ":" in ln and not ln.strip().startswith("#")]
    return {ln.split(":")[0].strip(): ln.split("#", 1)[1].strip() for ln in flags}

def parse_bool(name):
    def parse(v):
        if v.lower() not in ("true", "false", "1", "0"):
            raise UsageError(f"--{name}={v}: use true, false, 1 or 0")
        return v.lower() in ("true", "1")
    parse.__name__ = "boolean (true/false/1/0)"  # argparse names it in its error
    return parse

def parse_config(argv=None):
    """--key=value flags built from Config's fields; --preset=tiny applies before other flags."""
    p, helps = ArgParser(description=__doc__.split("\n")[1]), flag_help()
    for f in fields(Config):
        kind = parse_bool(f.name) if isinstance(f.default, bool) else type(f.default)
        p.add_argument(f"--{f.name}", type=kind, default=None,
                       help=f"{helps.get(f.name, '')} (default {f.default!r})".replace("%", "%%"))
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    if args.get("preset", "") not in ("", "tiny"):
        raise UsageError(f"unknown preset {args['preset']!r}: use tiny")
    return Config(**{**asdict(Config()), **(TINY if args.get("preset") == "tiny" else {}), **args})

def get_device(pref="auto"):  # cuda -> mps -> cpu unless given; cuda:N -> "cuda" on that GPU
    if pref.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device={pref}: no CUDA GPU here; use auto or cpu")
    if pref.startswith("cuda:"):  # every check below compares device == "cuda"
        torch.cuda.set_device(torch.device(pref))
        return "cuda"
    if pref == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device=mps: MPS is not available here; use auto or cpu")
    if pref not in ("auto", "cpu", "cuda", "mps"):
        raise UsageError(f"unknown --device={pref}: use auto, cpu, cuda, cuda:N or mps")
    if pref != "auto":
        return pref
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"

def amp_dtype(device):  # bf16 on CUDA with bf16 support, else fp32 (no fp16, no GradScaler)
    return torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32

def autocast_ctx(device):  # the KV caches of the engine use the same dtype (amp_dtype)
    if amp_dtype(device) == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()

def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

# queued GPU work done, then read a clock
sync = lambda device: torch.cuda.synchronize() if device == "cuda" else None
fmt_eta = lambda s: f"{int(s // 60)}m{int(s % 60):02d}s"

# -----------------------------------------------------------------------------
# GPT: nanoGPT's module names; a Recursive Transformer is a GPT whose n_layer blocks run n_loops
# times

@dataclass
class GPTConfig:
    block_size: int = 256
    vocab_size: int = 50257
    n_layer: int = 12      # blocks stored (K for a recursive model, N for the full one)
    n_head: int = 6               # attention heads; n_embd must divide by it
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True             # biases in linear layers and LayerNorms (GPT-2 has them)

class LoRALinear(nn.Linear):
    """nn.Linear plus one low-rank update per loop: y = W x + b + B_l A_l x (scaling 1, Eq. 3).
    Identical to the base layer when B = 0 or rank = 0 (then it holds only weight and bias)."""
    def __init__(self, fan_in, fan_out, bias, n_loops=1, rank=0):
        super().__init__(fan_in, fan_out, bias=bias)
        # capped at min(in, out): docs/recursive.md, "Implementation details"
        self.rank = min(rank, fan_in, fan_out)
        if self.rank > 0:
            self.lora_A = nn.Parameter(torch.empty(n_loops, self.rank, fan_in))   # (R, r, in)
            self.lora_B = nn.Parameter(torch.zeros(n_loops, fan_out, self.rank))  # (R, out, r)
            for a in self.lora_A:  # standard LoRA init: Kaiming-uniform A, zero B
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def forward(self, x, loop=None):
        """x (B, T, in); loop: None (no LoRA), an int, or one loop per row (B,) (the CDB engine)."""
        y = super().forward(x)  # W' x + b
        if self.rank == 0 or loop is None:
            return y
        if isinstance(loop, int):  # ALGO LOGIC (Eq. 3): W' x + B_l A_l x
            return y + (x @ self.lora_A[loop].t()) @ self.lora_B[loop].t()
        return y + self.per_row_lora(x, loop)

    def per_row_lora(self, x, loop):
        """B_l A_l x with each row's own loop l = loop[i] (Eq. 3 per row). SPEED: instead of
        gathering one adapter per row, ALL loops' A in one matmul (R r is small), the other loops'
        columns zeroed, then all B; a test checks it against Eq. 3 row by row.
        EXERCISE: group the rows by loop instead and time both with step_times."""
        R, r = self.lora_A.shape[:2]
        z = x @ self.lora_A.flatten(0, 1).t()                                       # (B, T, R r)
        hot = loop[:, None] == torch.arange(R, device=x.device)                   # (B, R)
        keep = hot.repeat_interleave(r, 1)                                         # (B, R r)
        return (z * keep[:, None]) @ rearrange(self.lora_B, "R o r -> (R r) o")    # (B, T, out)

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
        # view/transpose, not einops: einops costs ~3 us per call in the decode loop
        B, T, C = x.shape
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
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
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's own GELU (HF's gelu_new)
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
        """Stored parameters; non-embedding excludes wte (= lm_head) and wpe (the paper's 'Emb')."""
        emb = self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return sum(p.numel() for p in self.parameters()) - emb * non_embedding

    def embed(self, idx, pos=None):
        pos = torch.arange(idx.size(1), device=idx.device) if pos is None else pos
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        return self.transformer.drop(x)

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
        loss = None
        if targets is not None:
            loss = F.cross_entropy(outs[-1].flatten(0, 1).float(), targets.flatten())
        return (outs if all_exits else outs[-1]), loss

@torch.no_grad()
def generate(model, idx, max_new_tokens):
    """Plain greedy decoding without a KV cache (the reference the CDB engine must match)."""
    for _ in range(max_new_tokens):  # logits (B, T, V): append the last position's argmax
        logits = model(idx[:, -model.config.block_size:])[0]
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
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
        flat = torch.frombuffer(bytearray(raw[base + a:base + b]), dtype=dtypes[info["dtype"]])
        return flat.reshape(info["shape"])
    return {name: tensor(info).float() for name, info in header.items() if name != "__metadata__"}

def gpt2_to_nanogpt(sd):
    """HF GPT-2 state dict (with or without 'transformer.') -> our keys; Conv1D (in, out) ->
    (out, in)."""
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("transformer.")
        if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
            continue  # causal-mask buffers; lm_head is tied to wte
        if k.endswith(conv1d):
            v = v.t()
        out["transformer." + k] = v.contiguous()
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out

def gpt2_url(name):  # gpt2 (124M) | gpt2-medium | gpt2-large | gpt2-xl
    return f"https://huggingface.co/openai-community/{name}/resolve/main/model.safetensors"

def download_gpt2(data_dir, name="gpt2"):
    """The safetensors of a GPT-2 size, downloaded once to data_dir/<name>/ -> our state dict."""
    path, url = Path(data_dir) / name / "model.safetensors", gpt2_url(name)
    if not path.exists():
        print(f"downloading {name} weights from {url}")
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                raw = r.read()
        except Exception as e:
            raise UsageError(f"could not download {name} weights from {url} ({e}); put "
                             f"model.safetensors at {path} by hand, or use --init_from=pretrain")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".part").write_bytes(raw)
        path.with_suffix(".part").replace(path)
    try:
        return gpt2_to_nanogpt(parse_safetensors(path.read_bytes()))
    except Exception as e:  # truncated or not a GPT-2 file
        raise UsageError(f"{path} is not a readable GPT-2 safetensors file ({e!r}): delete it and "
                         f"run again to download it") from None

def gpt2_config(sd, dropout):
    """The shape of a GPT-2 state dict: every size has 64-wide heads (n_head = n_embd / 64)."""
    V, C = sd["transformer.wte.weight"].shape
    n_layer = len({k.split(".")[2] for k in sd if k.startswith("transformer.h.")})
    return GPTConfig(sd["transformer.wpe.weight"].shape[0], V, n_layer, C // 64, C, dropout, True)

def load_full_checkpoint(path, vocab_size):
    """A nanoGPT-style ckpt.pt {model, model_args} of a plain GPT -> (GPTConfig, state dict)."""
    if not Path(path).is_file():
        raise UsageError(f"init_from: no checkpoint at {path} "
                         "(use pretrain, gpt2 or a ckpt.pt path)")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ck, dict) or "model" not in ck or "model_args" not in ck:
        raise UsageError(f"init_from: {path} is not a ckpt.pt with 'model' and 'model_args'")
    a = ck["model_args"]
    gcfg = GPTConfig(**{f.name: a[f.name] for f in fields(GPTConfig) if f.name in a})
    if a.get("n_loops", 1) != 1 or a.get("lora_rank", 0) != 0 or gcfg.vocab_size != vocab_size:
        raise UsageError(f"init_from: {path} must hold a plain GPT with vocab_size {vocab_size} "
                         f"(the tokenizer's); it has vocab_size {gcfg.vocab_size}, "
                         f"n_loops {a.get('n_loops', 1)}")
    sd = {k.removeprefix("_orig_mod."): v for k, v in ck["model"].items()}
    ref = {k: v.shape for k, v in GPT(gcfg).state_dict().items()}
    bad = sorted(set(ref) ^ set(sd)) + [k for k in ref if k in sd and sd[k].shape != ref[k]]
    if bad:  # missing, unexpected or misshapen tensors
        raise UsageError(f"init_from: {path} does not match a nanoGPT GPT of its model_args "
                         f"(e.g. {bad[:3]})")
    return gcfg, sd

# -----------------------------------------------------------------------------
# conversion: full N-layer GPT -> K shared blocks x R loops (+ per-depth SVD-LoRA)

def source_layers(init, N, K):
    """For each shared block k, the original layers it is made from (paper Sec. 2.2, Fig. 2)."""
    if init == "stepwise":  # first and last kept, fixed intervals between: round(linspace)
        return [[round(float(x))] for x in np.linspace(0, N - 1, K)]
    if init == "average":   # all layers tied to block k under CYCLE: k, k+K, ...
        return [list(range(k, N, K)) for k in range(K)]
    if init == "lower":
        return [[k] for k in range(K)]
    # random: fresh init. EXERCISE: add 'upper' (last K) and SEQUENCE (d // R)
    return [[] for _ in range(K)]

@torch.no_grad()
def convert(full, n_blocks, n_loops, init="stepwise", lora_rank=0, lora_init="svd"):
    """Full GPT -> GPT with n_blocks shared blocks x n_loops loops. Embeddings, ln_f and head are
    copied (not for init=random: the reduced-size baseline is trained from scratch, Sec. 3.1);
    block k is copied/averaged from source_layers; with LoRA, depth d's adapters are the truncated
    SVD of (W_d - W_shared) in fp32: B = U S, A = V^T (Eq. 4-5, no alpha/r factor)."""
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
                    # the original weight of depth d, (out, in)
                    W = src[f"transformer.h.{loop * K + k}.{mname}.weight"].float().cpu()
                    res = W - m.weight.float().cpu()
                    if not res.any():  # the depth's own layer is the shared one: keep the random
                        continue       # A and zero B of standard LoRA (App. C)
                    U, S, Vh = torch.linalg.svd(res, full_matrices=False)
                    m.lora_B[loop] = U[:, :m.rank] * S[:m.rank]  # (out, r): singular values into B
                    m.lora_A[loop] = Vh[:m.rank]                 # (r, in)
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
            raise UsageError(f"run {name!r}: LoRA rank must be >= 0, got {rank}")
        return K, R, parts[1], rank, "zero" if parts[0] == "relaxedzero" else "svd"
    raise UsageError(f"unknown run {name!r}: use full, reduced_random, <init>_noloop, rec_<init>, "
                     f"relaxed_<init>_r<rank> or relaxedzero_<init>_r<rank> with init in {INITS}")

# -----------------------------------------------------------------------------
# losses and training

def kd_loss(s_logits, t_logits, temp=1.0):
    """Forward KL(p_teacher || p_student) at temperature temp (x temp^2), mean over tokens.
    The authors' later code uses -sum p_T log p_S: it differs by the teacher's entropy, a
    constant."""
    s, t = (F.log_softmax(z.float() / temp, -1) for z in (s_logits, t_logits))
    return (t.exp() * (t - s)).sum(-1).mean() * temp ** 2

def uptrain_loss(logits, targets, t_logits, kd_weight, temp):
    """(1 - lambda) CE + lambda FKL from the full model (Sec. 3.6; the paper gives neither lambda
    nor T). At T = 1 that is ONE cross-entropy against the mixed target
    q = (1 - lambda) onehot(y) + lambda p_T, minus lambda H(p_T), a constant: one (N, V) student
    log-softmax instead of two (1.8x faster on CPU)."""
    # (N, V), (N,) token ids (no ignore_index)
    s, y = logits.flatten(0, 1).float(), targets.flatten()
    if t_logits is None or kd_weight == 0 or temp != 1:
        ce = F.cross_entropy(s, y)
        if t_logits is None or kd_weight == 0:
            return ce
        return (1 - kd_weight) * ce + kd_weight * kd_loss(logits, t_logits, temp)
    with torch.no_grad():
        t = F.log_softmax(t_logits.flatten(0, 1).float(), -1)
        q = t.exp()                   # p_T (N, V)
        h = -(q * t).sum(-1).mean()   # H(p_T): the logged value stays CE + KL
        del t
        q.mul_(kd_weight)[torch.arange(len(y), device=y.device), y] += 1 - kd_weight
    return F.cross_entropy(s, q) - kd_weight * h

def early_exit_loss(loop_logits, targets, t_logits, cfg):
    """ALGO LOGIC (Sec. 3.7, "Agg 0.1 + KD"): the last loop keeps the uptraining loss at weight 1;
    every earlier loop adds ee_weight * (CE + KL from the detached last loop). Returns (loss,
    per-loop CE). EXERCISE: compare the paper's "weighted CE" (loop i weighted i / sum j) on loop-1
    vs final perplexity."""
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
    peaks = (("H100", 989), ("H200", 989), ("A100", 312))
    return next((v * 1e12 for k, v in peaks if k in name), 0.0)

def train(model, train_arr, cfg, device, iters, lr, teacher=None, ee=False, name="",
          log=lambda rec: None):
    """AdamW + warmup/cosine on random windows; KD from `teacher` when given; early-exit loss if
    ee."""
    model.train()
    groups = [{"params": [p for p in model.parameters() if (p.dim() >= 2) == d],
               # no decay on norms/biases
               "weight_decay": cfg.weight_decay if d else 0.0} for d in (True, False)]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    fwd = torch.compile(model) if cfg.compile else model  # save `model` (the raw module), never fwd
    gen = torch.Generator().manual_seed(cfg.seed)  # every run sees the same token windows
    T, C, depth = model.config.block_size, model.config.n_embd, model.config.n_layer * model.n_loops
    # FLOPs/token (PaLM / nanoGPT): 6 x weights that run (looped blocks count R times; wpe excluded)
    # + attention, + 2 x the teacher's weights for its forward pass
    # each LoRA runs once, the shared weights n_loops times
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    shared = model.num_params() - lora
    weights = model.num_params(False) - model.transformer.wpe.weight.numel()
    weights += shared * (model.n_loops - 1)
    n_flop = 6 * weights + 12 * depth * C * T + 2 * (teacher.num_params(False) if teacher else 0)
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
            dt = (time.perf_counter() - t_log) / (it - it_log)
            t_log, it_log = time.perf_counter(), it
            tps = cfg.batch_size * T / dt
            mfu = f" | mfu {100 * n_flop * tps / peak:.1f}%" if peak else ""
            exits = " | loop CE " + " ".join(f"{c:.3f}" for c in ces) if ces else ""
            print(f"{name} step {it:4d}/{iters} | loss {loss.item():.4f}{exits} | "
                  f"lr {get_lr(it, iters, lr, cfg):.1e} | {1000 * dt:.0f} ms/step | "
                  f"{tps / 1e3:.1f}k tok/s{mfu} | eta {fmt_eta(dt * (iters - it - 1))}")
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
    R, nll_sum, n = model.n_loops, torch.zeros(model.n_loops), 0
    per = {"nll": [], "maxp": [], "agree": []}
    total = min(len(arr) - 1, cfg.eval_tokens or len(arr))
    t0 = t_print = time.perf_counter()
    for x, y in data.iter_eval_batches(arr, cfg.eval_batch_size, model.config.block_size, device):
        if time.perf_counter() - t_print > 10:  # no phase silent for more than ~10 s
            t_print, done = time.perf_counter(), n / max(total, 1)
            eta = (t_print - t0) * (1 - done) / max(done, 1e-9)
            print(f"  eval {n:,}/{total:,} tokens | eta {fmt_eta(eta)}")
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
    """agree (R, n) bool -> exit loop per token (1-based): the earliest loop whose argmax equals
    the last."""
    return agree.float().argmax(0) + 1  # the last row is all True, so argmax finds the first True

def confidence_exits(maxp, tau):
    """Exit after the first loop whose max probability >= tau (CALM-style softmax response)."""
    return oracle_exits(torch.cat([maxp[:-1] >= tau, maxp[-1:] >= 0]))  # the last loop always exits

def calibrate_tau(maxp, agree, target):
    """Smallest tau (most exits) whose exits agree with the last loop on >= target of ALL tokens
    (docs/recursive.md, "Implementation details").
    EXERCISE: calibrate the top-1 - top-2 margin instead."""
    n = agree.shape[1]
    # <= ~100k values from every early loop
    sub = maxp[:-1, ::max(1, n * (maxp.shape[0] - 1) // 100_000)]
    cands = torch.quantile(sub.flatten(), torch.linspace(0, 1, 101)).tolist() + [1.01]
    for tau in sorted(set(cands)):
        if agree[confidence_exits(maxp, tau) - 1, torch.arange(n)].float().mean() >= target:
            return tau  # tau = 1.01 (no early exit) always qualifies

def exit_stats(res, exits):
    """Exit rate, mean exit loop, histogram, agreement and perplexity of a per-token exit choice."""
    # (n,) at each exit loop
    R, agree = res["agree"].shape[0], res["agree"].gather(0, exits[None] - 1)[0].float()
    return {"exit_rate": (exits < R).float().mean().item(),
            "mean_exit_loop": exits.float().mean().item(),
            "hist": torch.bincount(exits - 1, minlength=R).tolist(),
            "agreement": agree.mean().item(),  # of all tokens (those at loop R agree)
            "agreement_of_exits": agree[exits < R].mean().nan_to_num(1.0).item(),
            "ppl": math.exp(res["nll"].gather(0, exits[None] - 1).mean().item())}

# -----------------------------------------------------------------------------
# serving: a real batched greedy-decoding engine (static / CSB / CDB) + the paper's simulator
#
# How the engine works (docs/recursive.md, "The CDB engine"). One engine step is ONE pass of the
# K shared blocks over a list of rows. A row is one token of one slot at one loop, and rows at
# different loops mix freely: Continuous Depth-wise Batching (Sec. 2.4). A row is one of
#   decode   the token in flight of a slot, at the loop it runs next;
#   prefill  a prompt token of a newly admitted request (chunked prefill: a P-token prompt is P
#            rows, at loop 0 in its first step, at loop 1 in the next, ...);
#   lazy     (kv_fill=exact) a loop skipped by a token that exited early, run in the next step so
#            the cache ends up holding exactly what running that loop gives (FREE-style).
# The KV cache: one key and one value tensor (N S, nh, Tmax, hs) for the N = K R effective depths
# and S slots. Row d S + s holds depth d = loop K + k of slot s; column t holds its token at
# position t. A pass reads every row's own depth with one index_select per block.

KV_FILLS = ("exact", "propagate", "full")
ENGINES = ("auto", "lists", "tensors")

class Slot:
    """The state of one engine slot: its request and the token (or prompt) in flight."""
    def __init__(self):
        self.req = -1     # request index; -1 = free
        # > 0: the request's prompt (this many tokens) is in flight as prefill rows
        self.prompt = 0
        self.pos = 0      # position of the token in flight = its cache column
        self.loop = 0     # the loop it runs next (0-based)
        self.tok = 0      # its input when loop == 0: the token, embedded ...
        # ... else: this row of the previous pass's output (the first of a prompt's)
        self.src = 0
        self.lazy = []    # kv_fill=exact: [pos, loop, src] of skipped loops due in the next pass

class PhaseTimer:
    """Seconds per engine phase when on (it synchronises CUDA at every mark: profile runs only)."""
    def __init__(self, device, on):
        self.device, self.on, self.s, self.t = device, on, {}, time.perf_counter()

    def mark(self, phase):  # charge the time since the previous mark to phase
        if self.on:
            sync(self.device)
            now = time.perf_counter()
            self.s[phase], self.t = self.s.get(phase, 0.0) + now - self.t, now

def block_pass(model, x, slot, pos, loop, L, kf, vf, timer):
    """ALGO LOGIC: one pass of the K shared blocks; row i runs loop[i] with that depth's LoRA and
    reads / writes its cache rows (loop K + k) S + slot at column pos (slot -1: a padding row, the
    spare row). x (n, 1, C) -> (n, 1, C). L > max(pos): the live context (the empty tail of the
    cache is never read)."""
    K, spare = model.config.n_layer, kf.size(0) - 1  # the spare last cache row: padding rows
    S = spare // (K * model.n_loops)
    mask = (torch.arange(L, device=x.device)[None] <= pos[:, None])[:, None, None]  # (n, 1, 1, L)

    def hook_for(rows):  # attention hook: store this pass's k, v (n, nh, 1, hs), return the past
        def hook(k, v):
            timer.mark("blocks")
            kf[rows, :, pos], vf[rows, :, pos] = k[:, :, 0].to(kf.dtype), v[:, :, 0].to(vf.dtype)
            past_k = kf[:, :, :L].index_select(0, rows)  # (n, nh, L, hs)
            past_v = vf[:, :, :L].index_select(0, rows)
            timer.mark("kv cache")
            return past_k, past_v, mask
        return hook
    for k, blk in enumerate(model.transformer.h):
        x = blk(x, loop, hook_for(torch.where(slot < 0, spare, (loop * K + k) * S + slot)))
    timer.mark("blocks")
    return x

def fill_skipped_kv(model, x, slot, pos, done, L, kf, vf, kv_fill, timer):
    """Exited tokens (slot >= 0; done (m,): the loops each ran, < R) owe K/V at the depths they
    skip. propagate: copy the exited state up (CALM) through each skipped depth's ln_1 + c_attn
    (+ its LoRA); full: run the skipped loops now. x (m, 1, C). (kv_fill=exact: Engine.update.)"""
    K, R, C = model.config.n_layer, model.n_loops, model.config.n_embd
    spare, nh = kf.size(0) - 1, model.config.n_head
    S = spare // (K * R)
    for lq in range(1, R):
        s = torch.where(done <= lq, slot, -1)  # the tokens that skip loop lq; -1: the spare row
        lp = torch.full_like(slot, lq)
        if kv_fill == "full":
            y = block_pass(model, x, s, pos, lp, L, kf, vf, timer)
            x = torch.where((s >= 0)[:, None, None], y, x)
            continue
        for k, blk in enumerate(model.transformer.h):
            kv = blk.attn.c_attn(blk.ln_1(x), lp)[:, 0, C:]  # (m, 2C): this depth's k, v
            rows = torch.where(s >= 0, (lq * K + k) * S + s, spare)
            kf[rows, :, pos] = kv[:, :C].view(-1, nh, C // nh).to(kf.dtype)
            vf[rows, :, pos] = kv[:, C:].view(-1, nh, C // nh).to(vf.dtype)
    timer.mark("kv fill")

class Engine:
    """Greedy decoding of requests [(prompt (P,) LongTensor, n_new)] through max_batch slots.
    refill: static (a batch of requests runs until its longest ends; finished rows compute on,
    their tokens dropped) | continuous (a freed slot takes the next request: CSB when R = 1, CDB
    when R > 1). exit_mode: none | oracle (schedule[req][pos] = exit loop, 1-based) | confidence
    (exit after the first loop whose max probability >= tau). kv_fill: what an exited token puts
    in the cache at the depths it skipped: exact | propagate | full (see the section comment)."""
    def __init__(self, model, requests, max_batch, device, refill="continuous", exit_mode="none",
                 schedule=None, tau=1.0, kv_fill="exact", profile=False):
        c = model.config
        self.model, self.device, self.refill, self.exit_mode = model, device, refill, exit_mode
        self.schedule, self.tau, self.kv_fill = schedule, tau, kv_fill
        self.prompts, self.n_new = [p.tolist() for p, _ in requests], [n for _, n in requests]
        self.K, self.R = c.n_layer, model.n_loops
        T = max(map(len, self.prompts)) + max(self.n_new)
        assert T <= c.block_size, f"prompt + new tokens ({T}) exceed the context {c.block_size}"
        shape = (self.K * self.R * max_batch + 1, c.n_head, T, c.n_embd // c.n_head)  # + spare
        dt = amp_dtype(device)
        self.kf, self.vf = (torch.zeros(shape, device=device, dtype=dt) for _ in "kv")
        # (N, S, nh, T, hs) views without the spare row
        self.kc, self.vc = (f[:-1].view(self.K * self.R, max_batch, *shape[1:])
                            for f in (self.kf, self.vf))
        self.slots, self.queue = [Slot() for _ in range(max_batch)], deque(range(len(requests)))
        self.out, self.exit_hist, self.steps = [[] for _ in requests], [0] * self.R, 0
        self.prev = torch.zeros(0, 1, c.n_embd, device=device)  # the previous pass's output rows
        self.timer = PhaseTimer(device, profile)

    def busy(self):
        return bool(self.queue) or any(s.req >= 0 for s in self.slots)

    def owed(self, s):  # tokens slot s's request still owes
        return self.n_new[s.req] - len(self.out[s.req])

    def admit(self):
        """Free slots take the next queued requests (static: only once the whole batch is free).
        Their prompts enter the next pass as prefill rows."""
        free = [s for s in self.slots if s.req < 0]
        if self.refill == "static" and len(free) < len(self.slots):
            return
        for s in free[:len(self.queue)]:
            s.req = self.queue.popleft()
            s.prompt, s.pos, s.loop, s.lazy = len(self.prompts[s.req]), 0, 0, []

    def rows(self):
        """This step's rows: (kind, slot) per row and the (n, 4) tensor slot | pos | loop | input,
        input = a token id (loop 0: embedded) or a row of the previous pass's output."""
        who, rows = [], []
        for i, s in enumerate(self.slots):
            if s.req < 0:
                continue
            if s.prompt:
                toks = self.prompts[s.req]
                inp = [toks[t] if s.loop == 0 else s.src + t for t in range(s.prompt)]
                rows += [(i, t, s.loop, inp[t]) for t in range(s.prompt)]
                who += [("prefill", s)] * s.prompt
            else:
                rows.append((i, s.pos, s.loop, s.tok if s.loop == 0 else s.src))
                who.append(("decode", s))
            rows += [(i, p, lq, src) for p, lq, src in s.lazy]
            who += [("lazy", s)] * len(s.lazy)
            s.lazy = []
        return who, rows, torch.tensor(rows, device=self.device)  # ONE host -> device copy per step

    def inputs(self, pos, loop, inp):
        """(n, 1, C): the embedding of loop-0 rows' tokens, the carried state of the others."""
        first = (loop == 0)[:, None, None]
        emb = self.model.embed(torch.where(loop == 0, inp, 0)[:, None], pos[:, None])
        if len(self.prev) == 0:
            return emb
        return torch.where(first, emb, self.prev.index_select(0, torch.where(loop == 0, 0, inp)))

    def step(self):
        """ONE engine step: admit, one pass over every row, exits, tokens -> (had prefill rows,
        decode tokens emitted)."""
        self.admit()
        who, rows, t = self.rows()
        slot, pos, loop, inp = t.unbind(1)
        x = self.inputs(pos, loop, inp)
        self.timer.mark("rows + embed")
        L = max(r[1] for r in rows) + 1  # from the host's copy: no device read
        x = self.prev = block_pass(self.model, x, slot, pos, loop, L, self.kf, self.vf, self.timer)
        emit, ask = self.exits(who, rows)
        heads = list(emit) + ask
        vals = self.head(x, heads) if heads else []
        toks = {j: int(v[0]) for j, v in zip(heads, vals)}
        for j, v in zip(ask, vals[len(emit):]):
            if v[1] >= self.tau:  # confidence exit (Sec. 4.2 names CALM's softmax response)
                emit[j] = rows[j][2] + 1
        self.timer.mark("head + exits")
        n_dec, exited = self.update(who, rows, emit, toks)
        self.timer.mark("bookkeeping")
        if exited and self.kv_fill != "exact":
            e = torch.tensor([j for j, _ in exited], device=self.device)
            done = torch.tensor([d for _, d in exited], device=self.device)
            fill_skipped_kv(self.model, x[e], slot[e], pos[e], done, L, self.kf, self.vf,
                            self.kv_fill, self.timer)
        self.steps += 1
        return any(kind == "prefill" for kind, _ in who), n_dec

    def exits(self, who, rows):
        """-> ({row: loops done} of rows that emit a token now, rows whose exit needs the head)."""
        emit, ask = {}, []
        for j, ((kind, s), (_, p, lq, _)) in enumerate(zip(who, rows)):
            if kind == "prefill" and lq + 1 == self.R and p == s.prompt - 1:
                emit[j] = self.R  # the prompt's last row gives the request's first token
            elif kind == "decode":
                oracle = self.R
                if self.exit_mode == "oracle":
                    oracle = self.schedule[s.req].get(p, self.R)
                if lq + 1 == self.R or lq + 1 >= oracle:
                    emit[j] = lq + 1
                elif self.exit_mode == "confidence":
                    ask.append(j)
        return emit, ask

    def head(self, x, rows):
        """[(argmax, max probability)] of the rows' logits (ln_f + lm_head): the ONE host read."""
        logits = self.model.head(x[rows, 0]).float()  # (m, V)
        conf = torch.zeros(len(rows), device=x.device)
        if self.exit_mode == "confidence":
            conf = (logits.max(-1).values - logits.logsumexp(-1)).exp()
        return torch.stack([logits.argmax(-1).float(), conf], 1).tolist()

    def update(self, who, rows, emit, toks):
        """Move every slot on after a pass -> (decode tokens emitted, [[row, loops done]] of the
        tokens that exited before the last loop)."""
        n_dec, exited = 0, []
        for j, ((kind, s), (_, p, lq, _)) in enumerate(zip(who, rows)):
            if kind == "lazy":  # its next skipped loop, if any, runs in the next pass
                if lq + 1 < self.R and s.req >= 0:
                    s.lazy.append([p, lq + 1, j])
            elif kind == "prefill" and p == s.prompt - 1:  # the prompt's last row moves it on
                if lq + 1 < self.R:
                    s.loop, s.src = lq + 1, j - p
                else:
                    s.prompt = 0
                    self.next_token(s, toks[j], p)
            elif kind == "decode" and j not in emit:
                s.loop, s.src = lq + 1, j
            elif kind == "decode":
                d = emit[j]
                if self.owed(s) > 0:
                    self.exit_hist[d - 1] += 1
                    n_dec += 1
                if d < self.R:
                    exited.append([j, d])
                    if self.kv_fill == "exact":  # ALGO LOGIC: its loop d runs in the next pass
                        s.lazy.append([p, d, j])
                self.next_token(s, toks[j], p)
        if self.refill == "static" and all(s.req < 0 or self.owed(s) == 0 for s in self.slots):
            for s in self.slots:  # the longest request of the batch is done: the batch ends
                s.req, s.lazy = -1, []
        return n_dec, exited

    def next_token(self, s, tok, p):
        """Record the token chosen at position p; the slot moves on to p + 1, or frees."""
        owed = self.owed(s)
        if owed > 0:
            self.out[s.req].append(tok)
        # a finished row of a static batch computes on, as padding at its last position
        s.pos, s.loop, s.tok = p + 1 if owed > 0 else p, 0, tok
        if self.owed(s) == 0 and self.refill != "static":
            s.req, s.lazy = -1, []  # pending lazy rows are dropped: nothing reads them any more

    def result(self):  # tokens per request, exit histogram of the decode tokens
        return self.out, self.exit_hist

SLOT, POS, LOOP, TOK, SRC = range(5)  # the columns of TensorEngine.lanes

@functools.lru_cache(maxsize=None)
def compiled(fn):
    return torch.compile(fn, mode="reduce-overhead", dynamic=False)  # one graph per shape set

class TensorEngine:
    """Engine's schedule with every piece of scheduler state in device tensors, moved on by tensor
    ops: ONE small host read per step (the next step's row count and context, busy, the decode
    tokens emitted, whether it prefilled); the tokens themselves are read once, at the end.
    fixed_rows=True pads every pass to the row budget with the whole cache as context, so every
    step has the same shapes (CUDA graphs), and compile=True then wraps the step in
    torch.compile(mode="reduce-overhead").

    Lanes. Every row a step can run has a fixed lane, its state one row of `lanes` (slot | pos |
    loop | tok | src: the Engine's row fields) and a flag in `active`:
      prefill  S x P lanes: lane (s, t) is prompt token t of slot s (P = the longest prompt)
      decode   S lanes: the token in flight of slot s; while its prompt is in flight, this lane
               is off but keeps the prompt's loop and the position of its last token
      lazy     S x (R - 1) lanes: lane (s, l) is loop l + 1 of a token of slot s that exited
               early (kv_fill=exact); it moves to lane (s, l + 1) after each pass.
    A step runs the active lanes as rows, in lane order. A slot holds at most max(P, R) active
    lanes, so S max(P, R) rows is the budget; a padding row reads and writes the spare last
    cache row only, so it changes no result (a test checks it)."""
    def __init__(self, model, requests, max_batch, device, refill="continuous", exit_mode="none",
                 schedule=None, tau=1.0, kv_fill="exact", profile=False, fixed_rows=False,
                 compile=False):
        c, S, R = model.config, max_batch, model.n_loops
        self.model, self.device, self.refill, self.exit_mode = model, device, refill, exit_mode
        self.tau, self.kv_fill, self.fixed = tau, kv_fill, fixed_rows
        self.S, self.K, self.R = S, c.n_layer, R
        P, G = max(len(p) for p, _ in requests), max(n for _, n in requests)
        self.P, self.G, self.T, self.n_req = P, G, P + G, len(requests)
        assert self.T <= c.block_size, f"prompt + new tokens ({self.T}) exceed {c.block_size}"
        dev = lambda t: t.to(device)
        self.prompts = dev(torch.stack([F.pad(p, (0, P - len(p))) for p, _ in requests]))  # (Q, P)
        self.plen = dev(torch.tensor([len(p) for p, _ in requests]))                      # (Q,)
        self.n_new = dev(torch.tensor([n for _, n in requests]))                          # (Q,)
        sched = torch.full((self.n_req, self.T), R)  # oracle exit loop per (request, position)
        for i, e in enumerate(schedule if exit_mode == "oracle" else []):
            for p, loop in e.items():
                sched[i, p] = loop
        self.sched = dev(sched)
        # lanes: [prefill S x P | decode S | lazy S x (R - 1)]; the group views share storage
        slot = torch.arange(S)
        lanes = torch.zeros(S * (P + R), 5, dtype=torch.long)
        lanes[:, SLOT] = torch.cat([slot.repeat_interleave(P), slot, slot.repeat_interleave(R - 1)])
        lanes[S * (P + 1):, LOOP] = torch.arange(1, R).repeat(S)
        self.lanes, self.active = dev(lanes), dev(torch.zeros(len(lanes), dtype=torch.bool))
        # each lane's row in the last pass
        self.row_of_lane = dev(torch.zeros(len(lanes), dtype=torch.long))
        groups = lambda t: (t[:S * P].view(S, P, *t.shape[1:]), t[S * P:S * (P + 1)],
                            t[S * (P + 1):].view(S, R - 1, *t.shape[1:]))
        self.pre, self.dec, self.lazy = groups(self.lanes)
        self.pre_on, self.dec_on, self.lazy_on = groups(self.active)
        self.pre_row, self.dec_row, self.lazy_row = groups(self.row_of_lane)
        self.budget = S * max(P, R)
        self.req = dev(torch.full((S,), -1))       # request per slot; -1 = free
        self.next_req = dev(torch.zeros((), dtype=torch.long))  # the queue's head
        self.count = dev(torch.zeros(self.n_req, dtype=torch.long))  # tokens emitted per request
        self.out = dev(torch.zeros(self.n_req, G + 1, dtype=torch.long))  # column G: discarded
        self.hist = dev(torch.zeros(R, dtype=torch.long))  # decode tokens per exit loop
        shape = (c.n_layer * R * S + 1, c.n_head, self.T, c.n_embd // c.n_head)  # + a spare row
        self.kf, self.vf = (dev(torch.zeros(shape, dtype=amp_dtype(device))) for _ in "kv")
        self.kc, self.vc = (f[:-1].view(c.n_layer * R, S, *shape[1:]) for f in (self.kf, self.vf))
        self.prev = dev(torch.zeros(self.budget, 1, c.n_embd))  # the last pass's output rows
        self.timer, self.steps = PhaseTimer(device, profile), 0
        self.admit()
        self.n_rows, self.L, self.more = self.counts()[:3].tolist()
        self.advance = self.pass_and_update
        if compile and not profile:  # one compiled function for every engine (no recompiles)
            self.advance = functools.partial(compiled(TensorEngine.pass_and_update), self)

    def busy(self):
        return bool(self.more)

    def admit(self):
        """Free slots take the next queued requests in slot order (static: only when every slot
        is free); a taken slot's prompt lanes switch on at loop 0."""
        free = self.req < 0
        if self.refill == "static":
            free &= free.all()
        new = self.next_req + free.cumsum(0) - 1
        take = free & (new < self.n_req)
        self.req.copy_(torch.where(take, new, self.req))
        self.next_req += take.sum()
        r, t = self.req.clamp(min=0), torch.arange(self.P, device=self.req.device)
        on, take2 = take[:, None], take[:, None].expand(-1, self.P)
        self.pre[..., POS].copy_(torch.where(take2, t, self.pre[..., POS]))
        self.pre[..., LOOP].masked_fill_(take2, 0)
        self.pre[..., TOK].copy_(torch.where(take2, self.prompts[r], self.pre[..., TOK]))
        self.pre_on.copy_(torch.where(on, t < self.plen[r][:, None], self.pre_on))
        self.dec[:, POS].copy_(torch.where(take, self.plen[r] - 1, self.dec[:, POS]))
        self.dec[:, LOOP].masked_fill_(take, 0)
        self.dec_on.masked_fill_(take, False)
        self.lazy_on.masked_fill_(on, False)

    def counts(self):
        """(rows, context) of the next pass, busy; the first three numbers of the host read."""
        L = (self.lanes[:, POS] * self.active).max() + 1
        busy = (self.req >= 0).any() | (self.next_req < self.n_req)
        return torch.stack([self.active.sum(), L, busy.long()])

    def step(self):
        """ONE engine step -> (had prefill rows, decode tokens emitted)."""
        n, L = (self.budget, self.T) if self.fixed else (self.n_rows, self.L)
        stats = self.advance(n, L).tolist()  # THE host read of the step
        self.n_rows, self.L, self.more, n_dec, prefill = stats
        self.steps += 1
        return bool(prefill), n_dec

    def pass_and_update(self, n, L):
        """Rows from the active lanes, one pass, exits, lanes moved on, admission -> host read."""
        lane = torch.argsort((~self.active).to(torch.uint8), stable=True)[:n]  # active lanes first
        real = self.active[lane]  # (n,) False: a padding row
        slot, pos, loop, tok, src = self.lanes[lane].unbind(1)
        self.row_of_lane[lane] = torch.arange(n, device=lane.device)
        prefill = self.pre_on.any()
        emb = self.model.embed(torch.where(loop == 0, tok, 0)[:, None], pos[:, None])  # (n, 1, C)
        carried = self.prev.index_select(0, torch.where(loop == 0, 0, src))
        x = torch.where((loop == 0)[:, None, None], emb, carried)
        self.timer.mark("rows + embed")
        x = block_pass(self.model, x, torch.where(real, slot, -1), pos, loop, L, self.kf, self.vf,
                       self.timer)
        self.prev[:n].copy_(x)
        emit, done, tokens, head_row = self.exits(x)
        self.timer.mark("head + exits")
        n_dec = self.update(emit, done, tokens, head_row, L)
        self.admit()
        self.timer.mark("bookkeeping")
        return torch.cat([self.counts(), torch.stack([n_dec, prefill.long()])])

    def exits(self, x):
        """Per slot: does its head row emit a token now, loops done, the token, the row. The head
        row is the decode lane's row, or the row of the prompt's last token during prefill."""
        S, R = self.S, self.R
        in_pre = self.pre_on.any(1)
        r = self.req.clamp(min=0)
        last_lane = torch.arange(S, device=r.device) * self.P + self.plen[r] - 1
        head_row = torch.where(in_pre, self.row_of_lane[last_lane], self.dec_row)
        head_row = torch.where(self.req >= 0, head_row, 0)  # a free slot's rows are stale
        logits = self.model.head(x[head_row, 0]).float()  # (S, V)
        done = self.dec[:, LOOP] + 1
        stop = done == R
        if self.exit_mode == "oracle":
            stop |= ~in_pre & (done >= self.sched[r, self.dec[:, POS]])
        if self.exit_mode == "confidence":  # Sec. 4.2 names CALM's softmax response
            maxp = (logits.max(-1).values - logits.logsumexp(-1)).exp()
            stop |= ~in_pre & (maxp >= self.tau)
        return (self.req >= 0) & stop, done, logits.argmax(-1), head_row

    def update(self, emit, done, tokens, head_row, L):
        """Move every lane on after a pass (tensor ops only) -> decode tokens emitted."""
        S, R, in_pre, r = self.S, self.R, self.pre_on.any(1), self.req.clamp(min=0)
        pos = self.dec[:, POS].clone()
        keep = emit & (self.n_new[r] > self.count[r])  # a finished row of a static batch: padding
        self.out[r, torch.where(keep, self.count[r], self.G)] = tokens
        self.count.index_add_(0, r, keep.long())
        decoded = keep & ~in_pre
        self.hist.index_add_(0, done - 1, decoded.long())
        exited = emit & ~in_pre & (done < R)
        # lazy lanes: each moves one loop on; an exited token's next loop starts its chain
        self.lazy_on[:, 1:] = self.lazy_on[:, :-1].clone()
        self.lazy_on[:, :1] = False
        self.lazy[:, 1:, POS] = self.lazy[:, :-1, POS].clone()
        self.lazy[:, 1:, SRC] = self.lazy_row[:, :-1]
        if self.kv_fill == "exact":  # ALGO LOGIC: its loop `done` runs in the next pass
            start = exited[:, None] & (torch.arange(R - 1, device=r.device) == done[:, None] - 1)
            self.lazy_on |= start
            self.lazy[..., POS].copy_(torch.where(start, pos[:, None], self.lazy[..., POS]))
            self.lazy[..., SRC].copy_(torch.where(start, head_row[:, None], self.lazy[..., SRC]))
        else:
            slot = torch.where(exited, torch.arange(S, device=r.device), -1)
            fill_skipped_kv(self.model, self.prev[head_row], slot, pos, done, L, self.kf, self.vf,
                            self.kv_fill, self.timer)
        # decode and prefill lanes: one loop on, or (emitted) the next token at loop 0
        go = (self.req >= 0) & ~emit
        self.dec[:, LOOP].copy_(torch.where(go, done, 0))
        self.dec[:, SRC].copy_(torch.where(go, head_row, self.dec[:, SRC]))
        self.dec[:, POS].copy_(torch.where(keep, pos + 1, pos))
        self.dec[:, TOK].copy_(torch.where(emit, tokens, self.dec[:, TOK]))
        self.dec_on |= emit
        self.pre[..., LOOP].copy_(self.dec[:, LOOP, None].expand(-1, self.P))
        self.pre[..., SRC].copy_(self.pre_row)
        self.pre_on &= ~emit[:, None]
        # a request with every token emitted frees its slot (static: the whole batch at once)
        finished = (self.req >= 0) & (self.n_new[r] == self.count[r])
        if self.refill == "static":
            finished = (self.req >= 0) & ((self.req < 0) | finished).all()
        self.req.masked_fill_(finished, -1)
        self.active &= ~finished[self.lanes[:, SLOT]]
        return decoded.sum()

    def result(self):
        tokens = [self.out[i, :n].tolist() for i, n in enumerate(self.n_new.tolist())]
        return tokens, self.hist.tolist()

@torch.no_grad()
def serve(model, requests, max_batch, device, engine="lists", **kw):
    """Run an Engine (its arguments in **kw) to the end -> tokens per request, time, throughput
    end to end and decode only (the steps without prefill rows), steps, exit histogram of the
    decode tokens, the KV cache (kc, vc) and, with profile=True, seconds per phase."""
    cls = TensorEngine if engine == "tensors" else Engine
    eng = cls(model, requests, max_batch, device, **kw)
    sync(device)
    t0, dec_s, dec_n = time.perf_counter(), 0.0, 0
    with autocast_ctx(device):
        while eng.busy():
            t1 = time.perf_counter()
            prefill, n = eng.step()
            if not prefill:
                dec_s, dec_n = dec_s + time.perf_counter() - t1, dec_n + n
    sync(device)
    wall = time.perf_counter() - t0
    tokens, hist = eng.result()
    return {"tokens": tokens, "time_s": wall, "tok_per_s": sum(n for _, n in requests) / wall,
            "decode_tok_per_s": dec_n / max(dec_s, 1e-9), "steps": eng.steps,
            "exit_hist": hist, "kv": (eng.kc, eng.vc), "phases_s": eng.timer.s}

@torch.no_grad()
def trajectory_exits(model, requests, continuations, device):
    """Teacher-force each prompt + its continuation (real text, as the paper's trajectories, Sec.
    3.8) -> schedule[i][pos] = oracle exit loop of the token at each decode position."""
    sched = []
    for (prompt, n), cont in zip(requests, continuations):
        seq = torch.cat([prompt, cont[:n - 1]])[None].to(device)
        with autocast_ctx(device):
            outs, _ = model(seq, all_exits=True)
        am = torch.stack([o[0].argmax(-1) for o in outs])  # (R, T)
        e = oracle_exits((am == am[-1:]).cpu()).tolist()
        sched.append({q: e[q] for q in range(len(prompt), seq.size(1))})
    return sched

@torch.no_grad()
def step_times(model, batches, ctx, device, reps=30):
    """Seconds of one shared-block pass (K blocks, one loop, KV length ctx) per batch size: the
    median of reps passes, the batch sizes interleaved so that a load change hits them all."""
    C, nh, dt = model.config.n_embd, model.config.n_head, amp_dtype(device)
    ins, ts = {}, {b: [] for b in batches}
    for b in batches:  # mixed loops (lp) so relaxed models pay their per-row LoRA
        kv = torch.randn(b, nh, ctx, C // nh, device=device, dtype=dt)
        mask = torch.ones(b, 1, 1, ctx, dtype=torch.bool, device=device)
        lp = torch.arange(b, device=device) % model.n_loops
        ins[b] = (torch.randn(b, 1, C, device=device), lp, lambda k, v, kv=kv, m=mask: (kv, kv, m))
    for i in range(reps + 2):  # the first two rounds are warm-up
        for b in batches:
            x, lp, hook = ins[b]
            sync(device)
            t0 = time.perf_counter()
            with autocast_ctx(device):
                for blk in model.transformer.h:
                    x = blk(x, lp, hook)
            sync(device)
            ts[b].append(time.perf_counter() - t0)
    return {b: float(np.median(t[2:])) for b, t in ts.items()}

def simulate(lengths, exits, t_step, max_batch, mode, R):
    """The paper's simulator (Sec. 3.8, App. K): all requests queued at t=0; each step costs the
    measured t_step[active batch] (seconds). lengths: decode tokens per request; exits[i]: exit
    loop per token. mode: static (a batch steps until its longest request ends) | csb (step = one
    full-model pass) | cdb (step = one loop of the shared block) | ee_sync (early exit without
    CDB: batches as static, a step costs its slowest token's exit loop) -> (tok/s, steps)."""
    t = lambda b, bs=sorted(t_step): float(np.interp(b, bs, [t_step[k] for k in bs]))
    total, steps, queue = 0.0, 0, deque(i for i, n in enumerate(lengths) if n > 0)
    slots = []  # [request, token index, loops done]
    while queue or slots:
        if mode in ("csb", "cdb") or not slots:
            while queue and len(slots) < max_batch:
                slots.append([queue.popleft(), 0, 0])
        live = [s for s in slots if s[1] < lengths[s[0]]]  # finished rows of a batch compute on
        total += t(len(slots)) * (max(exits[s[0]][s[1]] for s in live) if mode == "ee_sync" else 1)
        steps += 1
        for s in slots:
            s[2] += 1
            if mode != "cdb" or s[2] >= (exits[s[0]][s[1]] if exits else R):
                s[1], s[2] = s[1] + 1, 0
        if mode in ("csb", "cdb") or all(s[1] >= lengths[s[0]] for s in slots):
            slots = [s for s in slots if s[1] < lengths[s[0]]]
    return sum(lengths) / total, steps

# -----------------------------------------------------------------------------
# the study: full model -> every run in cfg.runs, uptrained on the same tokens, evaluated

# the code each stage is built by: a change in any of it gives the stage a new cache key
STAGE_CODE = {"pretrain": ("GPT", "Block", "CausalSelfAttention", "MLP", "LoRALinear", "train",
                           "get_lr", "uptrain_loss", "kd_loss"),
              "study": ("convert", "source_layers"), "early_exit": ("early_exit_loss",)}

def code_version(stage):
    """Hash of the source of every function or class that builds the stage (and those before)."""
    names = [n for st in STAGES[:STAGES.index(stage) + 1] for n in STAGE_CODE.get(st, ())]
    src = "".join(inspect.getsource(globals()[n]) for n in names)
    return hashlib.sha1(src.encode()).hexdigest()[:10]

def cached(cfg, name, spec, device, build):
    """Reuse a finished stage from out_dir/ckpt/<name>-<hash of its spec>.pt, else build() and save
    it as a plain-typed dict {model, model_args, config, step, extras} (loads with weights_only).
    A damaged file is reported in one line and rebuilt."""
    key = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    path = Path(cfg.out_dir) / "ckpt" / f"{name}-{key}.pt"
    if path.exists():
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
            a = ck["model_args"]
            model = GPT(GPTConfig(**{f.name: a[f.name] for f in fields(GPTConfig)}), a["n_loops"],
                        a["lora_rank"])
            model.load_state_dict(ck["model"])
            print(f"{name}: reusing {path}")
            return model.to(device).eval()
        except Exception as e:
            print(f"{name}: {path} is damaged ({type(e).__name__}), rebuilding it")
    model, extras = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    model_args = {**asdict(model.config), "n_loops": model.n_loops, "lora_rank": model.lora_rank}
    torch.save({"model": model.state_dict(), "config": asdict(cfg), "model_args": model_args,
                "step": extras.get("step", 0), "extras": extras}, path.with_suffix(".part"))
    path.with_suffix(".part").replace(path)  # never a half-written checkpoint
    return model.eval()

def check_config(cfg):
    """Every bad input fails here (or while resolving init_from), before anything is written."""
    positive = ("n_layer", "n_head", "n_embd", "block_size", "n_loops", "batch_size",
                "eval_batch_size", "log_interval", "n_requests", "max_batch", "prompt_len",
                "bench_rounds")
    counts = ("pretrain_iters", "uptrain_iters", "ee_iters", "eval_tokens", "lora_rank", "threads")
    for name in positive + counts:
        v = getattr(cfg, name)
        if v < (1 if name in positive else 0):
            raise UsageError(f"--{name}={v}: must be >= {1 if name in positive else 0}")
    for bad, msg in [
            (cfg.n_embd % cfg.n_head,
             f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}"),
            (cfg.n_layer % cfg.n_loops,
             f"n_layer={cfg.n_layer} is not divisible by n_loops={cfg.n_loops}"),
            (cfg.init not in INITS, f"unknown init {cfg.init!r}: use one of {INITS}"),
            (cfg.lora_init not in ("svd", "zero"),
             f"unknown lora_init {cfg.lora_init!r}: use svd or zero"),
            (cfg.stage not in STAGES, f"unknown stage {cfg.stage!r}: use one of {STAGES}"),
            (cfg.tokenizer not in ("gpt2", "char"),
             f"unknown tokenizer {cfg.tokenizer!r}: use gpt2 or char"),
            (cfg.init_from in GPT2_SIZES and cfg.tokenizer != "gpt2",
             f"init_from={cfg.init_from} needs tokenizer=gpt2"),
            (cfg.kv_fill not in KV_FILLS,
             f"unknown kv_fill {cfg.kv_fill!r}: use one of {KV_FILLS}"),
            (cfg.engine not in ENGINES, f"unknown engine {cfg.engine!r}: use one of {ENGINES}"),
            (not 0 <= cfg.kd_weight <= 1, f"kd_weight must be in [0, 1], got {cfg.kd_weight}"),
            (not 0 <= cfg.dropout < 1, f"dropout must be in [0, 1), got {cfg.dropout}"),
            (not 0 <= cfg.conf_agree <= 1, f"conf_agree must be in [0, 1], got {cfg.conf_agree}"),
            (not 0 <= cfg.warmup_frac <= 1 or not 0 <= cfg.min_lr_frac <= 1,
             "warmup_frac and min_lr_frac must be in [0, 1]"),
            (min(cfg.lr, cfg.pretrain_lr, cfg.kd_temp) <= 0,
             "lr, pretrain_lr and kd_temp must be > 0"),
            (min(cfg.ee_weight, cfg.weight_decay, cfg.grad_clip) < 0,
             "ee_weight, weight_decay and grad_clip must be >= 0"),
            (cfg.prompt_len + cfg.gen_max > cfg.block_size or not 2 <= cfg.gen_min <= cfg.gen_max,
             "need 2 <= gen_min <= gen_max (>= 1 decode step) and "
             "prompt_len + gen_max <= block_size")]:
        if bad:
            raise UsageError(msg)
    for name in cfg.runs.split(","):
        parse_run(name.strip(), cfg.n_layer, cfg.n_loops)

def resolve_full(cfg, data_dir):
    """The full model's source, downloaded / loaded / checked before anything is written.
    Returns (meta, GPTConfig, state dict or None (= pretrain here), cache key)."""
    gpt2 = cfg.init_from in GPT2_SIZES
    full_sd = download_gpt2(data_dir, cfg.init_from) if gpt2 else None
    meta = data.prepare_text(cfg.dataset, cfg.tokenizer, data_dir)
    if cfg.stage == "all" and meta["n_tokens"]["test"] <= cfg.prompt_len + cfg.gen_max:
        raise UsageError(f"the test split ({meta['n_tokens']['test']} tokens) is too short for "
                         "serving requests of prompt_len + gen_max = "
                         f"{cfg.prompt_len + cfg.gen_max}")
    if gpt2:
        gcfg, key = gpt2_config(full_sd, cfg.dropout), {"gpt2": gpt2_url(cfg.init_from)}
    elif cfg.init_from != "pretrain":
        gcfg, full_sd = load_full_checkpoint(cfg.init_from, meta["vocab_size"])
        gcfg.dropout = cfg.dropout
        key = {"path": str(Path(cfg.init_from).resolve()), "mtime": os.path.getmtime(cfg.init_from)}
    else:
        gcfg = GPTConfig(cfg.block_size, meta["vocab_size"], cfg.n_layer, cfg.n_head, cfg.n_embd,
                         cfg.dropout, cfg.bias)
        key = {"pretrain": asdict(gcfg), "iters": cfg.pretrain_iters, "lr": cfg.pretrain_lr,
               "bs": cfg.batch_size, "wd": cfg.weight_decay}
    if (gcfg.n_layer, gcfg.n_head, gcfg.n_embd) != (cfg.n_layer, cfg.n_head, cfg.n_embd):
        print(f"the full model is {gcfg.n_layer} x {gcfg.n_embd} ({gcfg.n_head} heads) "
              f"({cfg.init_from}): using it")
        # config.json tells the truth
        cfg.n_layer, cfg.n_head, cfg.n_embd = gcfg.n_layer, gcfg.n_head, gcfg.n_embd
        check_config(cfg)
    gcfg.block_size = min(gcfg.block_size, cfg.block_size)  # train/eval context: cut wpe rows
    # a short-context checkpoint: fail now, not after training
    if cfg.prompt_len + cfg.gen_max > gcfg.block_size:
        raise UsageError(f"prompt_len + gen_max = {cfg.prompt_len + cfg.gen_max} exceeds the "
                         f"model's context {gcfg.block_size} ({cfg.init_from})")
    if full_sd is not None:
        full_sd["transformer.wpe.weight"] = full_sd["transformer.wpe.weight"][:gcfg.block_size]
    key = {"data": [cfg.dataset, cfg.tokenizer, meta["source_sha256"]], "src": key,
           "code": code_version("pretrain"),
           "seed": cfg.seed, "ctx": [gcfg.block_size, gcfg.dropout],
           "sched": [cfg.warmup_frac, cfg.min_lr_frac, cfg.grad_clip]}
    return meta, gcfg, full_sd, key

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
    print(f"device {device} ({torch.get_num_threads()} threads) | {cfg.dataset} "
          f"{meta['n_tokens']} | N={N} -> K={N // R} x R={R}")
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
    summary = {"config": asdict(cfg), "device": device, "results": [], "claims": {},
               "early_exit": {}, "throughput": {},
               "units": "perplexity per token of the tokenizer"}
    if cfg.stage == "pretrain":
        return finish(cfg, summary, out)

    # ALGO LOGIC: every run is converted from the same full model, then uptrained on the same
    # token windows with the same recipe and KD from the full model (Sec. 3.1, 3.6)
    key = {**key, "code": code_version("study"),
           "up": [cfg.uptrain_iters, cfg.lr, cfg.batch_size, cfg.kd_weight, cfg.kd_temp,
                  cfg.weight_decay, R]}
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
            print(f"{name}: {full.num_params() / 1e6:.2f}M -> {m.num_params() / 1e6:.2f}M "
                  "non-embedding parameters")
            return m, {"step": cfg.uptrain_iters, "history": train(
                m, tr, cfg, device, cfg.uptrain_iters, cfg.lr, teacher=full, name=name, log=log)}
        if name == "full_pretrained":
            m = models[name] = full
        else:
            m = models[name] = cached(cfg, name, {**key, "run": name}, device, build)
        v, t = evaluate(m, va, cfg, device), evaluate(m, te, cfg, device, collect=name == main_name)
        # the main model before early-exit training (kept)
        before = t if name == main_name else before
        row = {"name": name, "non_emb_params": m.num_params(), "blocks": K, "loops": loops,
               "init": init, "lora_rank": rank, "lora_init": linit if rank else None,
               "val_ppl": v["ppl"], "test_ppl": t["ppl"],
               "uptrain_tokens": cfg.uptrain_iters * cfg.batch_size * m.config.block_size
               * (name != "full_pretrained")}
        if loops > 1:
            row["loop_val_ppl"], row["loop_test_ppl"] = v["loop_ppl"], t["loop_ppl"]
        summary["results"].append(row)
        log({"result": row})
        per_loop = f" | val ppl per loop {' '.join(f'{q:.2f}' for q in v['loop_ppl'])}"
        print(f"{name:24s} | {row['non_emb_params'] / 1e6:6.2f}M | val ppl {v['ppl']:8.2f} | "
              f"test ppl {t['ppl']:8.2f}" + (per_loop if loops > 1 else ""))
    summary["claims"] = check_claims(summary["results"])
    noise = " (tiny preset: noise at this size)" if cfg.preset == "tiny" else ""
    print("\n".join(f"claim {k}: {v}{noise}" for k, v in summary["claims"].items()))
    if cfg.stage == "study":
        return finish(cfg, summary, out)

    # early-exit post-training of the main model (Sec. 3.7), then static / oracle / confidence exits
    def build_ee():
        m = convert(full, N // R, R, cfg.init, cfg.lora_rank, cfg.lora_init).to(device)
        m.load_state_dict(models[main_name].state_dict())
        return m, {"step": cfg.ee_iters, "history": train(
            m, tr, cfg, device, cfg.ee_iters, cfg.lr, teacher=full, ee=True,
            name=main_name + "_ee", log=log)}
    ee_key = {**key, "run": main_name, "ee": [cfg.ee_iters, cfg.ee_weight],
              "code": code_version("early_exit")}
    ee_model = cached(cfg, main_name + "_ee", ee_key, device, build_ee)
    rv = evaluate(ee_model, va, cfg, device, collect=True)
    rt = evaluate(ee_model, te, cfg, device, collect=True)
    tau = calibrate_tau(rv["maxp"], rv["agree"], cfg.conf_agree)
    ee = summary["early_exit"] = {
        "model": main_name + "_ee", "loop_test_ppl_before": before["loop_ppl"],
        "loop_val_ppl": rv["loop_ppl"], "loop_test_ppl": rt["loop_ppl"],
        "oracle_before": exit_stats(before, oracle_exits(before["agree"])),
        "oracle": exit_stats(rt, oracle_exits(rt["agree"])), "tau": tau,
        "confidence": exit_stats(rt, confidence_exits(rt["maxp"], tau))}
    log({"early_exit": ee})
    f = lambda xs: " ".join(f"{q:.2f}" for q in xs)
    print(f"early exit: test ppl per loop {f(rt['loop_ppl'])} "
          f"(before EE training {f(before['loop_ppl'])}) | "
          f"oracle exit rate {ee['oracle']['exit_rate']:.3f} | "
          f"confidence exits (tau {tau:.3f}) rate "
          f"{ee['confidence']['exit_rate']:.3f}, agreement {ee['confidence']['agreement']:.3f}, "
          f"ppl {ee['confidence']['ppl']:.2f}")
    if cfg.stage == "all":
        full_model = models.get("full", full)
        summary["throughput"] = throughput(cfg, full_model, ee_model, te, tau, device, log)
    return finish(cfg, summary, out)

def check_claims(rows):
    """The paper's claims as checks on this run's validation perplexities (left out when rows are
    missing)."""
    ppl, claims = {r["name"]: r["val_ppl"] for r in rows}, {}
    g = lambda *n: all(k in ppl for k in n)
    if g("rec_stepwise", "reduced_random"):
        claims["stepwise_beats_reduced_from_scratch"] = ppl["rec_stepwise"] < ppl["reduced_random"]
    if g("rec_stepwise", "rec_average", "rec_lower"):
        others = min(ppl["rec_average"], ppl["rec_lower"])
        claims["stepwise_best_without_lora"] = ppl["rec_stepwise"] < others
    for r in rows:
        twin = r["name"].replace("stepwise", "average")
        if r["name"].startswith("relaxed_stepwise_r") and g(twin):
            claims[f"average_beats_stepwise_with_svd_r{r['lora_rank']}"] = \
                ppl[r["name"].replace("stepwise", "average")] < ppl[r["name"]]
    avg = sorted((r["lora_rank"], r["val_ppl"]) for r in rows
                 if r["name"].startswith("relaxed_average_r"))
    if len(avg) >= 2:
        claims["relaxed_ppl_falls_with_rank"] = all(a[1] > b[1] for a, b in zip(avg, avg[1:]))
    return claims

def serving_requests(cfg, arr):
    """n_requests prompts from the test split, each with its real continuation -> (requests,
    conts)."""
    rng, P = np.random.default_rng(cfg.seed), cfg.prompt_len
    starts = rng.integers(0, len(arr) - P - cfg.gen_max, cfg.n_requests)
    lens = rng.integers(cfg.gen_min, cfg.gen_max + 1, cfg.n_requests)
    piece = lambda a, b: torch.from_numpy(arr[a:b].astype(np.int64))
    return [(piece(s, s + P), int(n)) for s, n in zip(starts, lens)], \
        [piece(s + P, s + P + n) for s, n in zip(starts, lens)]

def spread(xs):  # median and range of per-round figures
    return {"median": float(np.median(xs)), "min": float(min(xs)), "max": float(max(xs))}

def engine_options(cfg, device):
    """The serve() options of --engine and --engine_compile (compiled on CUDA only)."""
    if cfg.engine_compile:
        return dict(engine="tensors", fixed_rows=True, compile=True)
    auto = "tensors" if device == "cuda" else "lists"
    return dict(engine=auto if cfg.engine == "auto" else cfg.engine)

def throughput(cfg, full, rec, arr, tau, device, log):
    """The serving benchmark: the same requests through the full model (static batching, CSB) and
    the recursive model (CDB without exits, with oracle exits from real text, with confidence
    exits), interleaved over bench_rounds rounds; one profiled round per scheduler for the time
    per phase; and the paper's simulator (measured step times x the same exit trajectories)."""
    reqs, conts = serving_requests(cfg, arr)
    sched = trajectory_exits(rec, reqs, conts, device)
    kinds = {"full_static": (full, dict(refill="static")), "full_csb": (full, {}),
             "cdb_no_exit": (rec, {}),
             "cdb_oracle": (rec, dict(exit_mode="oracle", schedule=sched, kv_fill=cfg.kv_fill)),
             "cdb_confidence": (rec, dict(exit_mode="confidence", tau=tau, kv_fill=cfg.kv_fill))}
    eng = engine_options(cfg, device)
    kinds = {k: (m, {**kw, **eng}) for k, (m, kw) in kinds.items()}
    for m, kw in kinds.values():  # warm-up (allocator, kernels; with engine_compile, compiling)
        serve(m, reqs, cfg.max_batch, device, **kw)
    runs, t0 = {k: [] for k in kinds}, time.perf_counter()
    # off CUDA the phase timer never synchronises: profile every round (not a compiled step)
    prof = device != "cuda" and not cfg.engine_compile
    for r in range(cfg.bench_rounds):  # interleaved: a change of machine load hits every scheduler
        for k, (m, kw) in kinds.items():
            runs[k].append(serve(m, reqs, cfg.max_batch, device, profile=prof, **kw))
        eta = (time.perf_counter() - t0) / (r + 1) * (cfg.bench_rounds - r)
        speeds = " | ".join(f"{k} {v[-1]['tok_per_s']:.0f}" for k, v in runs.items())
        print(f"serving round {r + 1}/{cfg.bench_rounds} | {speeds} tok/s | eta {fmt_eta(eta)}")
    if prof:  # seconds per phase, the mean of a run over the rounds
        phases = {k: {p: float(np.mean([r["phases_s"][p] for r in v])) for p in v[0]["phases_s"]}
                  for k, v in runs.items()}
    else:  # one more, profiled (uncompiled), run per scheduler: its synchronisations slow CUDA
        phases = {k: serve(m, reqs, cfg.max_batch, device, profile=True, **kw)["phases_s"]
                  for k, (m, kw) in kinds.items()}
    e2e = {k: [r["tok_per_s"] for r in v] for k, v in runs.items()}
    dec = {k: [r["decode_tok_per_s"] for r in v] for k, v in runs.items()}
    ratio = lambda m, a, b: spread([x / y for x, y in zip(m[a], m[b])])  # per round, then spread
    pairs = [(a, b) for a in ("cdb_oracle", "cdb_confidence", "cdb_no_exit")
             for b in ("full_static", "full_csb")]
    hist = runs["cdb_oracle"][0]["exit_hist"]
    same = lambda a, b: float(np.mean([x == y for ta, tb in zip(a, b) for x, y in zip(ta, tb)]))
    th = {"measured": {k: spread(v) for k, v in e2e.items()},
          "measured_decode": {k: spread(v) for k, v in dec.items()},
          "speedup": {f"{a}_vs_{b}": ratio(e2e, a, b) for a, b in pairs},
          "speedup_decode": {f"{a}_vs_{b}": ratio(dec, a, b) for a, b in pairs},
          "phases_s": phases, "rounds": cfg.bench_rounds, "kv_fill": cfg.kv_fill, "device": device,
          "engine": eng,
          "n_requests": cfg.n_requests, "max_batch": cfg.max_batch, "exit_hist_oracle": hist,
          "exit_hist_confidence": runs["cdb_confidence"][0]["exit_hist"],
          "mean_exit_loop": sum((i + 1) * c for i, c in enumerate(hist)) / max(1, sum(hist)),
          "token_agreement_cdb_vs_full_csb": same(runs["full_csb"][0]["tokens"],
                                                  runs["cdb_no_exit"][0]["tokens"]),
          "token_agreement_oracle_vs_no_exit": same(runs["cdb_oracle"][0]["tokens"],
                                                    runs["cdb_no_exit"][0]["tokens"])}
    th.update(simulator(cfg, full, rec, reqs, sched, device))
    log({"throughput": th})
    print_throughput(cfg, th)
    return th

def simulator(cfg, full, rec, reqs, sched, device):
    """ALGO LOGIC: the paper's simulator: measured block-pass times x the oracle exit trajectories,
    the KV cache at the simulator's context, prompt + half the generation (mean over requests)."""
    bs = sorted({cfg.max_batch} | {2 ** i for i in range(int(math.log2(cfg.max_batch)) + 1)})
    ctx = cfg.prompt_len + round(np.mean([n for _, n in reqs]) / 2)
    t_full, t_block = step_times(full, bs, ctx, device), step_times(rec, bs, ctx, device)
    lengths = [n - 1 for _, n in reqs]
    exits = [[sched[i][len(p) + j] for j in range(lengths[i])] for i, (p, _) in enumerate(reqs)]
    sim = {k: simulate(lengths, e, t, cfg.max_batch, mode, r)[0] for k, e, t, mode, r in [
        ("full_static", None, t_full, "static", 1), ("full_csb", None, t_full, "csb", 1),
        ("cdb_no_exit", None, t_block, "cdb", rec.n_loops),
        ("cdb_oracle", exits, t_block, "cdb", rec.n_loops),
        ("ee_sync_no_cdb", exits, t_block, "ee_sync", 0)]}
    tables = {"full": t_full, "block": t_block}
    monotonic = {n: all(t[a] <= t[b] for a, b in zip(bs, bs[1:])) for n, t in tables.items()}
    return {"simulated": {k: round(v, 1) for k, v in sim.items()}, "sim_context": ctx,
            "sim_speedup_cdb_oracle_vs_static": sim["cdb_oracle"] / sim["full_static"],
            "sim_speedup_cdb_oracle_vs_csb": sim["cdb_oracle"] / sim["full_csb"],
            "step_time_ms": {n: {b: 1e3 * v for b, v in t.items()} for n, t in tables.items()},
            "step_times_monotonic": monotonic}

def print_throughput(cfg, th):
    tiny = " (tiny preset: timing noise at this size)" if cfg.preset == "tiny" else ""
    f = lambda s, p=0: f"{s['median']:.{p}f} [{s['min']:.{p}f}, {s['max']:.{p}f}]"
    print(f"serving{tiny}: {th['n_requests']} requests, {th['max_batch']} slots, "
          f"kv_fill {th['kv_fill']}, {th['rounds']} interleaved rounds; tok/s median [min, max]")
    print(f"{'scheduler':16s} {'end to end':>24s} {'decode only':>24s} {'simulated':>10s}")
    for k in th["measured"]:
        print(f"{k:16s} {f(th['measured'][k]):>24s} {f(th['measured_decode'][k]):>24s} "
              f"{th['simulated'].get(k, float('nan')):10.1f}")
    print(f"{'ee_sync_no_cdb':16s} {'':>24s} {'':>24s} {th['simulated']['ee_sync_no_cdb']:10.1f}")
    for k in ("cdb_oracle_vs_full_static", "cdb_oracle_vs_full_csb"):
        print(f"speedup {k}: end to end x{f(th['speedup'][k], 2)} | "
              f"decode only x{f(th['speedup_decode'][k], 2)}")
    print(f"simulator x{th['sim_speedup_cdb_oracle_vs_static']:.2f} vs static, "
          f"x{th['sim_speedup_cdb_oracle_vs_csb']:.2f} vs CSB at context {th['sim_context']}; "
          f"mean exit loop {th['mean_exit_loop']:.2f}, histogram {th['exit_hist_oracle']}")
    for n, ok in th["step_times_monotonic"].items():
        if not ok:
            times = " ".join(f"{b}:{t:.3f}" for b, t in th["step_time_ms"][n].items())
            print(f"note: the measured {n} step times are not monotonic in batch size "
                  f"(a loaded machine?): {times} ms")
    for k, ph in th["phases_s"].items():
        tot = sum(ph.values())
        shares = " | ".join(f"{p} {100 * v / tot:.0f}%" for p, v in ph.items())
        print(f"phases {k:16s} {shares} of {tot:.3f} s")

# -----------------------------------------------------------------------------
# outputs

def finish(cfg, summary, out):
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if cfg.plot:
        save_plots(summary, out)
    print(f"wrote {out / 'summary.json'}")
    return summary

def save_plots(summary, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = summary["results"]
    if rows:  # the paper's Pareto picture: perplexity vs non-embedding parameters
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for r in rows:
            xy, fam = (r["non_emb_params"] / 1e6, r["val_ppl"]), r["name"].split("_")[0]
            ax.scatter(*xy, color={"full": "k", "rec": "C0", "relaxed": "C1"}.get(fam, "C2"))
            ax.annotate(r["name"], xy, fontsize=7, xytext=(3, 3), textcoords="offset points")
        avg = sorted((r["non_emb_params"] / 1e6, r["val_ppl"]) for r in rows
                     if r["name"].startswith("relaxed_average"))
        ax.plot(*zip(*avg), color="C1", lw=1) if avg else None  # the relaxed frontier
        ax.set(xlabel="non-embedding parameters (M)", ylabel="validation perplexity",
               title="Recursive / relaxed vs full and reduced models")
        fig.tight_layout()
        fig.savefig(out / "pareto.png", dpi=110)
        plt.close(fig)
    ee, th = summary["early_exit"], summary["throughput"]
    if ee:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        R = len(ee["oracle"]["hist"])
        labels = [("oracle", "oracle"), ("confidence", f"confidence (tau {ee['tau']:.2f})")]
        for j, (k, lab) in enumerate(labels):
            hst = np.array(ee[k]["hist"]) / max(1, sum(ee[k]["hist"]))
            ax.bar(np.arange(1, R + 1) + 0.2 * (2 * j - 1), hst, width=0.4, label=lab)
        ax.set(xlabel="exit loop", ylabel="fraction of test tokens",
               title=f"Exit histogram ({ee['model']})")
        ax.set_xticks(range(1, R + 1))
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "exit_hist.png", dpi=110)
        plt.close(fig)
    if th:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        keys, x = list(th["measured"]), np.arange(len(th["measured"]))
        for off, (src, lab) in zip((-0.27, 0, 0.27), (("measured", "engine, end to end"),
                                                       ("measured_decode", "engine, decode only"))):
            med = [th[src][k]["median"] for k in keys]
            err = [[m - th[src][k]["min"] for m, k in zip(med, keys)],
                   [th[src][k]["max"] - m for m, k in zip(med, keys)]]
            ax.bar(x + off, med, 0.27, yerr=err, capsize=2, label=lab)
        sim = [th["simulated"].get(k, 0) for k in keys]
        ax.bar(x + 0.27, sim, 0.27, label="simulator (block time)")
        ax.set_xticks(x)
        ax.set_xticklabels(keys, fontsize=8)
        ax.legend(fontsize=8)
        ax.set(ylabel="tokens / s",
               title=f"Greedy decoding, median of {th['rounds']} rounds ({th['device']})")
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=110)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(6.4, 3.6))  # where the engine's time goes, per scheduler
        keys, left = list(th["phases_s"]), np.zeros(len(th["phases_s"]))
        for ph in dict.fromkeys(p for v in th["phases_s"].values() for p in v):
            w = np.array([th["phases_s"][k].get(ph, 0.0) for k in keys])
            ax.barh(keys, w, left=left, label=ph)
            left += w
        ax.invert_yaxis()
        ax.legend(fontsize=8)
        ax.set(xlabel="seconds per run", title=f"Engine time per phase (kv_fill {th['kv_fill']})")
        fig.tight_layout()
        fig.savefig(out / "phases.png", dpi=110)
        plt.close(fig)

def main(argv=None):
    """The command line. A user mistake is one `error:` line on stderr and exit code 2."""
    threads = torch.get_num_threads()
    try:
        cfg = parse_config(argv)
        print(json.dumps(asdict(cfg)))
        # these models are small: more threads than one fight each other (and any other job) for
        # the cores; on a shared 2-core machine the tiny run took 1m47s with 2 threads, 23 s with 1
        if cfg.threads or (get_device(cfg.device) == "cpu" and "OMP_NUM_THREADS" not in os.environ):
            torch.set_num_threads(cfg.threads or 1)
        t0, summary = time.time(), run(cfg)
    except (UsageError, data.DataError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print(f"\nstopped: finished stages are in {Path(cfg.out_dir) / 'ckpt'}; the same command "
              f"continues from them", file=sys.stderr)
        raise SystemExit(130)
    finally:
        torch.set_num_threads(threads)  # main(argv) called from Python leaves the process as it was
    print(f"done in {fmt_eta(time.time() - t0)}")
    return summary

if __name__ == "__main__":
    main()
