"""CPU evidence for neuron_path.py --recheck (not part of CI; the README cites its output).
ViT-B/16 with random weights on random images, m = 20, as the GPU bench. Along the fp32 greedy path,
at every (image, layer) decision, the whole-layer scores in fp32 and in bf16 (CPU autocast, with
explicit softmax and with SDPA) given the same prefix. A bf16 search with --recheck=M keeps the fp32
path exactly when, at every decision, bf16 picks the fp32 neuron or its top-2 gap is below M (the
row is then rescored in full precision). Then an end-to-end bf16 + SDPA search with --recheck=M.
  usage (repo root): PYTHONPATH=. python .ci/recheck_cpu.py N_IMAGES BATCH [M ...]   (~2.6 min/image)
                     PYTHONPATH=. python .ci/recheck_cpu.py --analyse   (decisions.json of a run)"""
import json, sys, time
import numpy as np
import torch
import neuron_path as NP

OUT = "out/recheck_cpu"

def collect(N, PB, margins):
    cfg = NP.make_config(model="vit_b_16", weights="random", m=20, device="cpu", path_batch=PB)
    torch.manual_seed(cfg.seed)
    model = NP.ViT(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x, y = torch.randn(N, 3, 224, 224), torch.randint(0, 1000, (N,))
    rec, paths, t0 = [], [], time.time()
    for i in range(0, N, PB):
        xb, yb = x[i:i + PB], y[i:i + PB]
        hbar = NP.clean_acts(model, xb)[1]
        prefix, chosen = [], []
        for l in range(12):
            out = {}
            for name, prec, sdpa in [("fp32", "fp32", False), ("bf16", "bf16", False), ("bf16_sdpa", "bf16", True)]:
                for b in model.h:
                    b.attn.sdpa = sdpa
                s = NP.layer_scores(model, xb, yb, hbar, prefix, NP.replace(cfg, precision=prec))
                v, idx = s.topk(2, dim=1)
                if name == "fp32":
                    s32, top, top10 = s, idx[:, :1], s.topk(10, dim=1).indices
                scale = s32.gather(1, top)[:, 0].abs()
                out[name] = dict(pick=idx[:, 0].tolist(), relgap=((v[:, 0] - v[:, 1]) / v[:, 0].abs()).tolist(),
                                 relerr10=((s - s32).gather(1, top10).abs().amax(1) / scale).tolist(),
                                 relerr_all=((s - s32).abs().amax(1) / scale).tolist())
            for b_ in range(len(xb)):
                rec.append({"img": i + b_, "layer": l, **{k: {kk: vv[b_] for kk, vv in o.items()} for k, o in out.items()}})
            prefix.append(torch.zeros_like(hbar[l], dtype=torch.bool).scatter_(1, top, True))
            chosen.append(top)
            print(f"img {i}-{i + len(xb) - 1} layer {l} done, {time.time() - t0:.0f}s", flush=True)
        paths.append(torch.stack(chosen, 1))
    ref = torch.cat(paths)
    json.dump(rec, open(f"{OUT}/decisions.json", "w"))
    for margin in margins:
        for b in model.h:
            b.attn.sdpa = True
        st, t1 = {}, time.time()
        c = NP.replace(cfg, precision="bf16", recheck=margin)
        p = torch.cat([NP.greedy_path(model, x[i:i + PB], y[i:i + PB], c, stats=st) for i in range(0, N, PB)])
        print(f"end-to-end bf16 sdpa recheck={margin}: identical paths {(p == ref).all(-1).all(-1).float().mean():.3f}, "
              f"neurons {(p == ref).float().mean():.4f}, rechecked {st['rechecked']}/{st['rows']}, "
              f"{time.time() - t1:.0f}s", flush=True)

def analyse():
    R = json.load(open(f"{OUT}/decisions.json"))
    print(f"{len(R)} decisions ({len({r['img'] for r in R})} images x 12 layers)")
    g32 = np.array([r["fp32"]["relgap"] for r in R])
    print("fp32 top-2 gap / |top score|, quantiles 10/25/50%:", np.percentile(g32, [10, 25, 50]).round(4))
    for v in ("bf16", "bf16_sdpa"):
        flip = np.array([r[v]["pick"] != r["fp32"]["pick"] for r in R])
        gap = np.array([r[v]["relgap"] for r in R])
        d = np.abs(gap - g32)[~flip]  # error of the top-2 gap where the pick agrees
        e10 = np.array([r[v]["relerr10"] for r in R])
        print(f"{v}: picks differing from fp32 {flip.sum()}/{len(R)}; score error on fp32's top 10 / |top|: "
              f"median {np.median(e10):.1e}, max {e10.max():.1e}; gap error median {np.median(d):.1e}, "
              f"p99 {np.percentile(d, 99):.1e}, max {d.max():.1e}")
        for M in (0, 0.001, 0.002, 0.005, 0.01, 0.02):
            ok, imgs = (~flip) | (gap < M), {}
            for r, o in zip(R, ok):
                imgs.setdefault(r["img"], []).append(o)
            print(f"   recheck {M}: rescored {100 * (gap < M).mean():.1f}% of decisions, "
                  f"paths identical to fp32 {100 * np.mean([all(o) for o in imgs.values()]):.0f}%")

if __name__ == "__main__":
    import os
    os.makedirs(OUT, exist_ok=True)
    if sys.argv[1:] != ["--analyse"]:
        collect(int(sys.argv[1]), int(sys.argv[2]), [float(a) for a in sys.argv[3:]])
    analyse()
