#!/usr/bin/env python
"""Per-pixel statistics benchmark: what `SegStats.update` costs per chunk of segmentation passes, against
- the formulation it replaced (votes by `F.one_hot(p.argmax(2))`, summed over passes, a class dim moved), and
- the floor: what the mean and the expected entropy alone need, one sum of the t×B×C×H×W passes and one p·log p for
  every one of them (`p.sum(0)`, `entr(p).sum`). The spread (Welford) and the votes (a max per pixel) come on top.
  python bench/seg_stats.py [--t 20] [--bs 16] [--c 11] [--px 48] [--runs 5] [--threads 1]
Median milliseconds over `--runs`, and the ratios, measured in one run (absolute times depend on the machine)."""
import argparse, statistics, time
import torch, torch.nn.functional as F
from fastai_bayes.all import *

def old_update(st, p):
    "SegStats.update as it was before: one-hot votes over t×B×H×W×C, Welford by explicit sums"
    t,c = p.shape[0],st.count[0].item()
    cm,mean = p.mean(0),st.s1/max(c, 1)
    st.m2 += ((p - cm)**2).sum(0) + (cm - mean)**2 * (c*t/(c+t))
    st.s1 += p.sum(0)
    st.sum_ent += torch.special.entr(p).sum(2).sum(0)
    st.votes += F.one_hot(p.argmax(2), p.shape[2]).sum(0).movedim(-1, 1).float()
    st.count += t

def ms(f, runs):
    f(); ts = []
    for _ in range(runs):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    return 1e3*statistics.median(ts)

if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    for a,d in (('t', 20), ('bs', 16), ('c', 11), ('px', 48), ('runs', 5), ('threads', 1)): ap.add_argument(f'--{a}', type=int, default=d)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    p = torch.randn(a.t, a.bs, a.c, a.px, a.px).softmax(2)
    kind = OutputKind('softmax', dim=1)
    new, old = SegStats(kind).update(p), SegStats(kind).update(p)
    floor_acc,floor_ent = torch.zeros(p.shape[1:]),torch.zeros(a.bs, a.px, a.px)
    old_update(old, p)
    new.update(p)
    assert torch.equal(new.votes, old.votes)   # the same statistics, both ways
    for k in ('s1', 'm2', 'sum_ent'): torch.testing.assert_close(getattr(new, k), getattr(old, k), atol=1e-4, rtol=1e-4)
    r = dict(new=ms(lambda: new.update(p), a.runs), old=ms(lambda: old_update(old, p), a.runs),
             floor=ms(lambda: (floor_acc.add_(p.sum(0)), floor_ent.add_(torch.special.entr(p).sum((0, 2)))), a.runs))
    print(f"SegStats.update, chunk t={a.t} × B={a.bs} × C={a.c} × {a.px}×{a.px} px, {a.threads} thread(s), median of {a.runs}")
    for k,v in r.items(): print(f"  {k:6s} {v:8.1f} ms")
    print(f"  old/new {r['old']/r['new']:.2f}×   new/floor {r['new']/r['floor']:.2f}× (the floor has no spread and no votes)")
