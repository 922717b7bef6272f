"""Monte Carlo standard errors and n='auto' (#19), on a small CNN trained on real MNIST digits.
Statistical checks with bands tight enough that a wrong estimator (off by sqrt(2), or dividing by the passes where it
should divide by the groups) falls outside them. Plain pytest, so it runs on the newest fastai too."""
import math, pytest, torch
from copy import deepcopy
from fastai.vision.all import *
from fastai_bayes.all import *

from _helpers import fit_quietly, tiny_cnn, mnist_dls

SCORES4 = ('entropy', 'mutual_info', 'max_prob', 'variation_ratio')

@pytest.fixture(scope='module')
def learn():
    dls = mnist_dls(600, seed=0)
    with no_random(0): learn = vision_learner(dls, tiny_cnn, pretrained=False, lin_ftrs=[64])   # a small head: cheap passes
    learn = fit_quietly(learn, 2, 2e-2)
    learn.remove_cb(ProgressCallback)
    return learn

@pytest.fixture(scope='module')
def dl(learn):
    "All 600 digits (120 validation and 480 training rows), labelled, decoded and normalised once"
    items = pd.concat([learn.dls.valid.items, learn.dls.train.items])
    bs = list(learn.dls.test_dl(items, with_labels=True, bs=100))
    return DataLoader(list(zip(torch.cat([b[0] for b in bs]), torch.cat([b[1] for b in bs]))), bs=100)

def rms(x): return x.pow(2).mean().sqrt().item()

def rerun_ratio(learn, dl, n, scores, reruns=5):
    "Per score: root mean square over items of the reported SE, over that of the score's sd across reruns with other seeds"
    runs = [learn.mc_predict(dl, n=n, seed=10+s) for s in range(reruns)]
    return {k: rms(torch.stack([r.se(k) for r in runs])) / rms(torch.stack([r.score(k) for r in runs]).std(0)) for k in scores}

SMOOTH = (0.85, 1.15)   # 1.15/0.85 < sqrt(2): an SE off by sqrt(2) cannot land in this band when the right one does

@pytest.mark.parametrize('n', [16, 64])
def test_se_matches_spread_over_reruns(learn, dl, n):
    "n=16: one pass per group (the delta method itself); n=64: batch means over 32 groups of 2 passes"
    assert SMOOTH[1]/SMOOTH[0] < math.sqrt(2)
    ratios = rerun_ratio(learn, dl, n, SCORES4 + ('margin', 'expected_entropy'))
    # scores with a kink where the top two classes tie (votes, margin; max_prob = 1 − max_c p̄_c with one pass a group):
    # near ties their linearisation overstates the spread, never understates it. Over models trained from 4 seeds the
    # margin's ratio reached 1.57 with one pass a group and 1.22 with two; votes 1.29, max_prob 1.28 with one
    kinked = ('variation_ratio', 'margin') + (() if n > 32 else ('max_prob',))
    for k, r in ratios.items():
        if k not in kinked: assert 0.8 <= r <= 1.2, (k, r, ratios)   # the 20%
        else: assert 0.8 <= r <= (1.3 if n > 32 else 1.7), (k, r, ratios)   # conservative, within bounds
        if k in ('entropy', 'mutual_info', 'expected_entropy', 'max_prob') and k not in kinked:   # smooth scores: tighter
            assert SMOOTH[0] <= r <= SMOOTH[1], (k, r, ratios)
            # dividing the between-groups sum of squares by n-1 instead of G-1 would shrink the SE below the band
            if n > 32: assert r*math.sqrt(31/(n-1)) < SMOOTH[0]

def test_se_shrinks_as_inverse_sqrt_n(learn, dl):
    se = {n: rms(learn.mc_predict(dl, n=n, seed=3).se('mutual_info')) for n in (16, 64, 256)}
    for a, b in ((16, 64), (64, 256)): assert 1.6 <= se[a]/se[b] <= 2.4, se   # 1/sqrt(n): 2 per 4x passes

def test_se_matches_bootstrap_over_stored_passes(learn, dl):
    "The engine's SEs (running sums only) against a bootstrap over the passes, scored with the plain functions on samples"
    res = learn.mc_predict(dl, n=64, seed=5, with_samples=True)
    score = {'entropy': lambda x: predictive_entropy(x.mean(0)), 'mutual_info': mutual_information,
             'max_prob': lambda x: 1 - max_prob(x.mean(0)), 'variation_ratio': variation_ratio}
    g = torch.Generator().manual_seed(0)
    boots = [res.samples[torch.randint(0, 64, (64,), generator=g)] for _ in range(100)]
    for k, f in score.items():
        sd = torch.stack([f(x) for x in boots]).std(0)
        r = rms(res.se(k)) / rms(sd)
        assert 0.8 <= r <= 1.2, (k, r)
        # per item too: items with a larger bootstrap spread get larger SEs
        if k != 'variation_ratio': assert torch.corrcoef(torch.stack([res.se(k), sd]))[0, 1] > 0.6, k

def test_auto_agrees_with_n500_reference(learn, dl):
    ref = learn.mc_predict(dl, n=500, seed=0)
    thr = ref.mutual_info.quantile(0.9).item()            # refer the 10% with the highest mutual information
    dec = ref.mutual_info > thr
    agree = lambda r: ((r.mutual_info > thr) == dec).float().mean().item()
    ceiling = agree(learn.mc_predict(dl, n=500, seed=2))  # the reference's own reproducibility: another n=500 run
    ra = learn.mc_predict(dl, n='auto', threshold=thr, max_n=500, seed=1)   # the default call: the decision settles it
    used = ra.n_used.float()
    # as often as two n=500 runs agree with each other, within a point (one item is 0.17 points), with a fifth of the passes
    assert agree(ra) >= ceiling - 0.01 and used.mean() <= 100, (agree(ra), ceiling, used.mean())
    assert len(ra.n_used.unique()) > 3 and ra.n_used.min() == 10 and ra.n == ra.n_used.max()
    # the borderline items got the passes: the 5% nearest the threshold against the half farthest from it
    dist = (ref.mutual_info - thr).abs()
    near, far = dist <= dist.quantile(0.05), dist >= dist.quantile(0.5)
    assert used[near].mean() > 4 * used[far].mean()
    # a fixed n with the same mean budget agrees no better: averaged over 3 seeds each (one run of each differs by a few
    # items either way: a single comparison failed in CI at 0.983 against 0.978)
    budget = int(used.mean().round())
    fixed = [agree(learn.mc_predict(dl, n=budget, seed=s)) for s in (1, 2, 3)]
    autos = [agree(ra)] + [agree(learn.mc_predict(dl, n='auto', threshold=thr, max_n=500, seed=s)) for s in (2, 3)]
    assert sum(fixed) <= sum(autos), (fixed, autos)

def test_auto_settles_each_score_within_tol(learn, dl):
    ra = learn.mc_predict(dl, n='auto', score='entropy', tol=0.04, max_n=150, seed=2)
    se = ra.se('entropy')
    assert ((se <= 0.04) | (ra.n_used == 150)).all() and len(ra.n_used.unique()) > 3
    assert (se[ra.n_used > 10] > 0).all()
    # an item's value is within its reported error of a long run's: the SEs of items stopped early are honest
    long = learn.mc_predict(dl, n=300, seed=9)
    assert ((ra.entropy - long.entropy).abs() <= 4*(se**2 + long.se('entropy')**2).sqrt()).float().mean() >= 0.99

def _stats_bytes(learn, dl, n):
    "The largest number of bytes an `MCStats` held for a batch, and the result's bytes"
    sizes, orig = [], Sampler.new_stats
    def spy(self, keep_samples=False):
        st = orig(self, keep_samples)
        upd = st.update
        def update(chunk, idx=None):
            upd(chunk, idx)
            sizes.append(sum(v.numel()*v.element_size() for v in st.__dict__.values() if isinstance(v, Tensor)))
            return st
        st.update = update
        return st
    Sampler.new_stats = spy
    try: res = learn.mc_predict(dl, n=n, seed=0)
    finally: Sampler.new_stats = orig
    held = sum(v.numel()*v.element_size() for v in [res.mean, res.std, res.n_used, *res.ses.values()])
    return max(sizes), held, res

def test_memory_does_not_grow_with_n(learn, dl):
    s10, h10, r10 = _stats_bytes(learn, dl, 10)
    s300, h300, r300 = _stats_bytes(learn, dl, 300)
    assert s10 == s300 and h10 == h300 and r300.samples is None
    N, C, bs = len(dl.dataset), learn.dls.c, dl.bs
    assert len(r300) == N == 600
    assert h300 <= 20 * N * C * 4                         # O(N·C): a few N×C tensors, far from 300×N×C
    assert s300 <= (4*32 + 8) * bs * C * 4                # O(groups·B·C) for one batch

def test_ensemble_se_treats_members_as_groups(learn, dl):
    other = deepcopy(learn)
    with torch.no_grad():
        for p in other.model[1].parameters(): p.add_(0.3*torch.randn_like(p))   # a member that differs systematically
    ens = Ensemble([learn, other])
    res = ens.mc_predict(dl, n=8, seed=0, with_samples=True)
    # by hand: the linearised MI of every pass, averaged per member; batch means over the 2 members (1 dof)
    x = res.samples
    l = (-res.mean.log() * x).sum(-1) - entropy(x)
    lm = l.view(2, 8, -1).mean(1)
    torch.testing.assert_close(res.se('mutual_info'), (8*((lm - l.mean(0))**2).sum(0)/1/16).sqrt(), rtol=1e-4, atol=1e-6)
    pm = x.view(2, 8, *x.shape[1:]).mean(1)
    torch.testing.assert_close(res.se('mean'), (8*((pm - res.mean)**2).sum(0)/16).sqrt(), rtol=1e-4, atol=1e-6)
    # treating the 16 passes as i.i.d. would understate it: the members differ more than passes within a member
    iid = delta_se(x, 'mutual_info')
    assert res.se('mutual_info').mean() > 1.5 * iid.mean()

def test_auto_refused_where_passes_cannot_be_added(learn, dl):
    flags = [m.training for m in learn.model.modules()]
    with pytest.raises(ValueError, match=r"learn.mc_predict\(dl, n='auto'"): Ensemble([learn, learn]).mc_predict(dl, n='auto')
    with pytest.raises(ValueError, match="pass n='auto' with them"): learn.mc_predict(dl, n=20, threshold=0.1)
    with pytest.raises(ValueError, match="choose from"): learn.mc_predict(dl, n='auto', score='bald')
    assert [m.training for m in learn.model.modules()] == flags and not learn.cbs.filter(lambda c: isinstance(c, SamplingCallback))
