"""How many passes? Monte Carlo standard errors and n='auto' on MNIST and Rotten Tomatoes (issue #19), measured in one run.
Run: .venv/bin/python bench/mc_passes.py [--quick]   (about 15-20 minutes on 2 CPU cores; --quick: smaller sets, fewer reruns)

Per data set it prints
  1. the engine's standard error (root mean square over items) against the spread of the same score over reruns with
     other seeds, for four scores at n=20: the ratio should be 1 (floor: within 20%);
  2. the same against a bootstrap over the passes of one run with stored samples (n=100; floor: within 20%);
  3. the rms SE at n = 16, 64, 256: it should fall by 2 per 4x passes (1/sqrt(n); floor: 1.6 to 2.4);
  4. referral decisions (the score above the n=500 reference's 90th percentile, i.e. refer 10%; mutual information on
     MNIST, predictive entropy on Rotten Tomatoes, whose small AWD-LSTM has a mutual information that is mostly MC noise):
     agreement with the reference of n='auto' (threshold rule) and of fixed n, the smallest fixed n that agrees as
     well as n='auto' does (floor: n='auto' agrees >= 99% with mean passes per item <= half that n), and, for scale,
     the agreement of another n=500 run (the reference's own reproducibility, which bounds every method);
  5. what the result holds: bytes per item with n=500 against the n x C samples it does not keep (O(N*C)).
Exit status 1 if a floor is missed."""
import sys, time, warnings; warnings.filterwarnings('ignore')
from fastai.vision.all import *
from fastai.text.all import *
from fastai_bayes.all import *

QUICK = '--quick' in sys.argv
SCORES4 = ('entropy', 'mutual_info', 'max_prob', 'variation_ratio')
missed = []

def fit(learn, epochs, lr):
    with no_random(0), learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr)
    return learn

def mnist():
    df = mnist_sample(2000 if QUICK else 5000, seed=0)
    dls = ImageDataLoaders.from_df(df, df.attrs['path'], fn_col='fname', label_col='label', valid_col='is_valid', bs=64, num_workers=0)
    with no_random(0): learn = vision_learner(dls, demo_cnn, pretrained=False, metrics=accuracy)
    return fit(learn, 4, 2e-2)

def rotten():
    df = rotten_tomatoes(1200 if QUICK else 2000, seed=0)
    dls = TextDataLoaders.from_df(df, text_col='text', label_col='label', valid_col='is_valid', bs=64, seq_len=72, num_workers=0)
    with no_random(0):
        learn = text_classifier_learner(dls, AWD_LSTM, pretrained=False, drop_mult=0.5, metrics=accuracy,
                                        config=dict(emb_sz=64, n_hid=64, n_layers=1))
    return fit(learn, 2, 2e-2)

def floor(ok, what):
    if not ok: missed.append(what)
    return 'ok' if ok else 'MISSED'

def rms(x): return x.pow(2).mean().sqrt().item()

def bench(name, learn, score, images):
    t0 = time.time()
    dl = learn.dls.valid.new(shuffle=False, drop_last=False)
    if images:   # decode and normalise the images once, not at every call
        b = list(dl); dl = DataLoader(list(zip(torch.cat([o[0] for o in b]), torch.cat([o[1] for o in b]))), bs=100)
    N, C = len(dl.dataset), learn.dls.c
    pred = lambda **kw: learn.mc_predict(dl, **kw)
    print(f"\n== {name}: {N} validation items, {C} classes, accuracy {learn.validate()[1]:.3f}")
    # 1. SE against reruns
    R = 6 if QUICK else 10
    runs = [pred(n=20, seed=100+s) for s in range(R)]
    print(f"1. n=20, {R} reruns: rms SE / rms sd over reruns (floor 0.8-1.2)")
    for k in SCORES4:
        sc, se = torch.stack([r.score(k) for r in runs]), torch.stack([r.se(k) for r in runs])
        ratio = rms(se)/rms(sc.std(0))
        print(f"   {k:16s} {ratio:.3f}  (rms SE {rms(se):.2e}) {floor(0.8 <= ratio <= 1.2, f'{name} reruns {k}')}")
    mi = torch.corrcoef(torch.stack([runs[0].mutual_info, runs[1].mutual_info]))[0, 1].item()
    print(f"   (mutual_info of two n=20 runs correlate {mi:.2f} over items: below ~0.5 it is mostly MC noise, so referral "
          f"below uses {score})")
    # 2. SE against a bootstrap over the passes of one run
    rb = pred(n=100, seed=7, with_samples=True)
    g = torch.Generator().manual_seed(0)
    boots = {k: [] for k in SCORES4}
    for _ in range(100 if QUICK else 200):
        i = torch.randint(0, 100, (100,), generator=g)
        st = MCStats(rb.kind).update(rb.samples[i])
        for k in SCORES4: boots[k].append(st.score(k))
    print("2. n=100, bootstrap over the stored passes: rms SE / rms bootstrap sd (floor 0.8-1.2)")
    for k in SCORES4:
        ratio = rms(rb.se(k))/rms(torch.stack(boots[k]).std(0))
        print(f"   {k:16s} {ratio:.3f}  {floor(0.8 <= ratio <= 1.2, f'{name} bootstrap {k}')}")
    # 3. 1/sqrt(n)
    se_n = {n: rms(pred(n=n, seed=3).se('mutual_info')) for n in (16, 64, 256)}
    r1, r2 = se_n[16]/se_n[64], se_n[64]/se_n[256]
    print(f"3. rms SE of mutual_info at n=16, 64, 256: {se_n[16]:.2e}, {se_n[64]:.2e}, {se_n[256]:.2e}; "
          f"ratios {r1:.2f}, {r2:.2f} (1/sqrt(n): 2; floor 1.6-2.4) {floor(1.6 <= r1 <= 2.4 and 1.6 <= r2 <= 2.4, f'{name} 1/sqrt(n)')}")
    # 4. referral decisions against an n=500 reference
    ref = pred(n=500, seed=0)
    sc = ref.score(score)
    thr = sc.quantile(0.9).item()
    dec = sc > thr
    agree = lambda r: ((r.score(score) > thr) == dec).float().mean().item()
    ceiling = agree(pred(n=500, seed=2))
    print(f"4. refer {score} > {thr:.4g} (the n=500 reference's 90th percentile: refer 10%); agreement with the reference")
    print(f"   another n=500 run (the reference's own reproducibility): {ceiling:.4f}")
    ra = pred(n='auto', score=score, threshold=thr, tol=1e-6, max_n=500, seed=1)
    aa, mp = agree(ra), ra.n_used.float().mean().item()
    q = ra.n_used.float().quantile(torch.tensor([0.5, 0.9, 0.99])).tolist()
    print(f"   n='auto' (threshold, z=3, min_n=10, step=10, max_n=500): agreement {aa:.4f}, mean passes per item {mp:.1f} "
          f"(median {q[0]:.0f}, 90% {q[1]:.0f}, 99% {q[2]:.0f}; {(ra.n_used == 500).sum()} items at max_n)")
    n_same, fixed = None, []
    for n in (10, 20, 30, 50, 75, 100, 150, 200, 300, 400, 500):
        a = agree(pred(n=n, seed=1))
        fixed.append(f"{n}: {a:.4f}")
        if a >= aa: n_same = n; break
    print("   fixed n: " + ", ".join(fixed))
    print(f"   smallest fixed n that agrees as well as n='auto': {n_same}")
    print(f"   floor: agreement >= 0.99: {floor(aa >= 0.99, f'{name} n=auto agreement')}"
          f" (within a point of the reference's own {ceiling:.4f}: {'yes' if aa >= ceiling - 0.01 else 'no'});"
          f" mean passes {mp:.1f} <= {n_same}/2: {floor(n_same is not None and mp <= n_same/2, f'{name} n=auto passes')}")
    # 5. memory
    held = sum(v.numel()*v.element_size() for v in [ref.mean, ref.std, ref.entropy, ref.expected_entropy, ref.mutual_info,
                                                   ref.variation_ratio, ref.n_used, *ref.ses.values()])
    print(f"5. an n=500 result holds {held/N:.0f} bytes per item ({held/(N*C*4):.1f} x N x C float32), "
          f"not the {500*C*4} bytes per item of its samples; samples kept: {ref.samples is not None} "
          f"{floor(ref.samples is None and held < 20*N*C*4 + 64*N, f'{name} memory')}")
    print(f"   ({time.time()-t0:.0f} s)")

for name, make, score, images in (('MNIST, small CNN (MC dropout in the head, tiled)', mnist, 'mutual_info', True),
                                  ('Rotten Tomatoes, AWD-LSTM (shared masks: one forward per pass)', rotten, 'entropy', False)):
    t0 = time.time(); learn = make(); print(f"\n(trained in {time.time()-t0:.0f} s)", end='')
    with learn.no_bar(): bench(name, learn, score, images)
print("\nfloors missed: " + (", ".join(missed) if missed else "none"))
sys.exit(1 if missed else 0)
