"""What one forward per pass costs a bayesianized CNN (`BayesConv2d` draws one kernel perturbation per forward, so its
passes are not tiled: tiled copies would share it and give a wrong spread), against the old tiled run, relative to one
deterministic `get_preds`. Floor: n full forwards, since every pass needs its own kernel sample.
Run: .venv/bin/python bench/variational_tiling.py   (about a minute on 2 CPU cores; measure alone)"""
import sys, time, warnings; warnings.filterwarnings('ignore')
from pathlib import Path
from fastai.vision.all import *
from fastai_bayes.all import *
sys.path.insert(0, str(Path(__file__).resolve().parent.parent/'tests'))
from _helpers import mnist_dls, fit_quietly

def median_time(f, runs=3):
    ts = []
    for _ in range(runs): t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts)//2]

dls = mnist_dls(600)
with no_random(0): learn = vision_learner(dls, demo_cnn, pretrained=False)
bayesianize(fit_quietly(learn, 1), sigma_init=0.05)
dl, n = dls.valid.new(shuffle=False), 20
with learn.no_bar():
    det = median_time(lambda: learn.get_preds(dl=dl))
    now = median_time(lambda: learn.mc_predict(dl, n=n))
    orig = MCPlan.__init__
    def tiled(self, model, xb): orig(self, model, xb); self.tileable = True
    MCPlan.__init__ = tiled
    try: old = median_time(lambda: learn.mc_predict(dl, n=n))
    finally: MCPlan.__init__ = orig
print(f"bayesianized demo CNN, {len(dl.dataset)} MNIST items, n={n}: get_preds {det:.3f} s; "
      f"mc_predict, a forward per pass {now:.3f} s = {now/det:.1f}x; tiled (shared kernel samples, wrong spread) "
      f"{old:.3f} s = {old/det:.1f}x; floor: {n} full forwards")
