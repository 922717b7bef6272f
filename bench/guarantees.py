"""The figures behind #18, measured in one run: temperature scaling on an overconfident MNIST CNN and an over-fitted Adult
tabular learner (ECE, NLL, accuracy on items not used to fit), the mean coverage of each conformal method over 400
random calibration/test splits against its bounds, and how often the certified referral threshold keeps the error
among kept items <= risk over 200 splits, beside the same rule without the binomial test.

    .venv/bin/python bench/guarantees.py            # about 3 minutes on 2 CPU cores
"""
import math, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent.parent/'tests'))
from fastai.vision.all import *
from fastai.tabular.all import *
from fastai_bayes.all import *
from _helpers import fit_quietly, tiny_cnn, random_splits


def temperature(name, learn, n_cal):
    with learn.no_bar(): res = learn.mc_predict(n=20, seed=0, with_samples=True)
    cal, test = res[torch.arange(n_cal)], res[torch.arange(n_cal, len(res))]
    sc = fit_scaling(cal)
    learn.calibration = sc
    with learn.no_bar(): after = learn.mc_predict(n=20, seed=0)[torch.arange(n_cal, len(res))]
    learn.calibration = None
    print(f"{name}: T = {sc.t:.3f} fitted on {n_cal}; on {len(test)} other items ECE {test.ece():.4f} -> {after.ece():.4f}, "
          f"NLL {test.nll():.4f} -> {after.nll():.4f}, accuracy {test.correct().mean():.4f} -> {after.correct().mean():.4f}")
    return res

t0 = time.time()
df = mnist_sample(3600, seed=3, valid_pct=5/6)
dls = ImageDataLoaders.from_df(df, df.attrs['path'], fn_col='fname', label_col='label', valid_col='is_valid', bs=64, num_workers=0)
with no_random(0): learn = vision_learner(dls, tiny_cnn, pretrained=False, ps=0.1)
fit_quietly(learn, 15, 1e-2)
res = temperature('MNIST CNN (600 training digits, 15 epochs)', learn, 1000)
res.samples = None

ad = adult_census(4000, seed=1, valid_pct=0.6)
adls = TabularDataLoaders.from_df(ad, y_names='loan', cat_names=ad.attrs['cat_names'], cont_names=ad.attrs['cont_names'],
                                  procs=[Categorify, FillMissing, Normalize], valid_idx=list(ad.index[ad.is_valid]), bs=128)
with no_random(0): alearn = tabular_learner(adls, layers=[400, 200], config=tabular_config(ps=[0.05, 0.05]))
fit_quietly(alearn, 15, 1e-2)
temperature('Adult tabular (1600 training rows, 15 epochs)', alearn, 1200)

alpha, n_cal = 0.1, 100
print(f"\nconformal sets, alpha = {alpha}, n_cal = {n_cal}, 400 splits of {len(res)} MNIST items: "
      f"bounds [{1-alpha:.4f}, {1-alpha+1/(n_cal+1):.4f}]")
for m in ('lac', 'aps', 'raps'):
    cv, sz = [], []
    for i,(c,t) in enumerate(random_splits(len(res), n_cal, 400)):
        cf = conformal(res[c], alpha, m, seed=i); cv.append(cf.coverage(res[t])); sz.append(cf.size(res[t]))
    cv = torch.tensor(cv, dtype=torch.float64)
    print(f"  {m:5s} mean coverage {cv.mean():.4f} ± {cv.std()/math.sqrt(len(cv)):.4f} (s.e.), mean set size {np.mean(sz):.2f}")
k = math.ceil((n_cal+1)*(1-alpha))
cv = []
for c,t in random_splits(len(res), n_cal, 400):
    cf = conformal(res[c], alpha, 'lac')
    cf.qhat = (1 - res[c].probs.double().gather(1, res[c].targs[:,None]))[:,0].sort()[0][k-2].item()
    cv.append(cf.coverage(res[t]))
cv = torch.tensor(cv, dtype=torch.float64)
print(f"  wrong: LAC with k = ceil(n(1-alpha)) mean coverage {cv.mean():.4f} ± {cv.std()/math.sqrt(len(cv)):.4f}")

eps, delta, n_cal = 0.03, 0.1, 1500
ok, ok_tol, ok_naive, kept = [], [], [], []
for c,t in random_splits(len(res), n_cal, 200, seed=2):
    rc, rt = res[c], res[t]
    thr = risk_threshold(rc, 'mutual_info', risk=eps, delta=delta)
    keep = ~thr.refer(rt); k_ = int(keep.sum())
    err = (1 - rt.correct()[keep].mean()).item() if k_ else 0.
    ok.append(err <= eps); ok_tol.append(err <= eps + math.sqrt(eps*(1-eps)/max(k_, 1))); kept.append(k_/len(rt))
    s = rc.score('mutual_info'); o = s.argsort()
    e = (1 - rc.correct()[o]).cumsum(0)/torch.arange(1, len(o)+1)
    kn = rt.score('mutual_info') <= s[o][(e <= eps).nonzero().max()]
    en = (1 - rt.correct()[kn].mean()).item()
    ok_naive.append(en <= eps + math.sqrt(eps*(1-eps)/int(kn.sum())))
print(f"\ncertified referral, risk {eps}, delta {delta}, 200 splits ({n_cal} to fit, {len(res)-n_cal} to check; model error "
      f"{1-res.correct().mean():.3f}):\n  error among kept <= risk in {np.mean(ok):.3f} of splits (<= risk + the check's own "
      f"s.e.: {np.mean(ok_tol):.3f}; floor 1 - delta = {1-delta}), mean share kept {np.mean(kept):.3f}\n"
      f"  without the binomial test (largest threshold with calibration error <= risk): {np.mean(ok_naive):.3f}")
print(f"\n({time.time()-t0:.0f} s)")
