"Calibration, selective-prediction and OOD metrics against independent references (sklearn, plain loops) and properties"
import itertools, math
import numpy as np, pytest, torch
import torch.nn.functional as F
import sklearn.metrics as skm
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from hypothesis import given, settings, strategies as st, HealthCheck
from hypothesis.extra.numpy import arrays

from fastai_bayes.metrics import (expected_calibration_error, max_calibration_error, classwise_ece, reliability_data,
    brier_score, nll, mean_predictive_entropy, referral_curve, aurc, accuracy_at_coverage, ood_auroc, ood_aupr,
    fpr_at_95_tpr, ECE, Brier, NLL, MeanEntropy)
from fastai_bayes.uncertainty import PROB_FLOOR

f = lambda t: float(t)
HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------- references (numpy, straight from the definitions)

def ece_ref(conf, hit, n_bins=15, adaptive=False, agg='ece'):
    "ECE / MCE of (confidence, hit) pairs by an explicit loop over bins"
    conf, hit = np.asarray(conf, np.float64), np.asarray(hit, np.float64)
    N = len(conf)
    if adaptive: groups = np.array_split(np.lexsort((hit, conf)), n_bins)
    else:
        e = np.arange(n_bins + 1) / n_bins
        groups = [np.nonzero(((conf > e[b]) | (b == 0)) & ((conf <= e[b+1]) | (b == n_bins-1)))[0] for b in range(n_bins)]
    gaps = [(len(g), abs(hit[g].mean() - conf[g].mean())) for g in groups if len(g)]
    assert sum(n for n, _ in gaps) == N
    return sum(n / N * gap for n, gap in gaps) if agg == 'ece' else max(gap for _, gap in gaps)

def top_label(probs, targs):
    probs, targs = np.asarray(probs, np.float64), np.asarray(targs)
    if probs.shape == targs.shape:  # Bernoulli
        return np.maximum(probs, 1 - probs).ravel(), ((probs > .5) == (targs > .5)).ravel()
    return probs.max(1), probs.argmax(1) == targs

def referral_ref(score, correct):
    "Quadratic: for each k, everything scoring above the cut referred, the tied group at the cut in proportion"
    s, c = np.asarray(score, np.float64), np.asarray(correct, np.float64)
    N, v_sorted, out = len(s), np.sort(s)[::-1], []
    for k in range(N):
        v = v_sorted[k]
        above, tied = s > v, s == v
        ref = c[above].sum() + (k - above.sum()) * c[tied].mean()
        out.append((c.sum() - ref) / (N - k))
    return np.array(out)

def referral_perm_ref(score, correct):
    "Expectation over every order of the items, ties broken by that order: the meaning of 'ties averaged'"
    s, c = np.asarray(score, np.float64), np.asarray(correct, np.float64)
    N, tot = len(s), np.zeros(len(s))
    perms = list(itertools.permutations(range(N)))
    for p in perms:
        p = np.array(p)
        o = p[np.argsort(-s[p], kind='stable')]
        tot += np.array([c[o[k:]].mean() for k in range(N)])
    return tot / len(perms)

def aurc_ref(score, correct):
    "Geifman et al.: risk among the m most confident items, averaged over m = 1..N (distinct scores)"
    c = np.asarray(correct, np.float64)[np.argsort(np.asarray(score))]
    return np.mean([1 - c[:m].mean() for m in range(1, len(c) + 1)])

def fpr_ref(si, so, tpr=.95):
    "Scan the distinct thresholds from high to low; FPR at the first one whose TPR reaches `tpr`"
    si, so = np.asarray(si), np.asarray(so)
    for t in np.unique(np.concatenate([si, so]))[::-1]:
        if (so >= t).mean() >= tpr: return (si >= t).mean()

def ood_labels(si, so): return np.r_[np.zeros(len(si)), np.ones(len(so))], np.r_[si, so]

# ---------------------------------------------------------------- data

@pytest.fixture(scope='module')
def digits():
    "Real probabilities: logistic regression on sklearn digits, valid split; OOD: the same images, pixels shuffled"
    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(X)); tr, va = idx[:1200], idx[1200:]
    clf = LogisticRegression(max_iter=300, C=0.05).fit(X[tr] / 16, y[tr])
    p = clf.predict_proba(X[va] / 16)
    x_ood = np.stack([x[rng.permutation(64)] for x in X[va] / 16])
    return p, y[va], clf.predict_proba(x_ood)

def dirichlet(n, c, seed, conc=.5):
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(c, conc), n), rng.integers(0, c, n)

# ---------------------------------------------------------------- calibration

@pytest.mark.parametrize('adaptive', [False, True])
@pytest.mark.parametrize('n_bins', [1, 5, 15, 40])
def test_ece_mce_vs_loop(digits, adaptive, n_bins):
    p, y, _ = digits
    for probs, targs in [(p, y), dirichlet(500, 4, n_bins), (p.astype(np.float32), y)]:
        conf, hit = top_label(probs, targs)
        assert f(expected_calibration_error(probs, targs, n_bins, adaptive)) == pytest.approx(ece_ref(conf, hit, n_bins, adaptive), abs=1e-12)
        assert f(max_calibration_error(probs, targs, n_bins, adaptive)) == pytest.approx(ece_ref(conf, hit, n_bins, adaptive, 'mce'), abs=1e-12)
        # torch input gives the same as numpy input
        assert f(expected_calibration_error(torch.as_tensor(probs), torch.as_tensor(targs), n_bins, adaptive)) == \
            pytest.approx(f(expected_calibration_error(probs, targs, n_bins, adaptive)), abs=1e-15)

def test_ece_bernoulli_vs_loop(digits):
    p, y, _ = digits
    pb, yb = p[:, :4], (y[:, None] == np.arange(4)).astype(np.float32)   # one-vs-rest labels: multi-label input
    for probs, targs in [(pb, yb), (pb[:, 0], yb[:, 0])]:
        conf, hit = top_label(probs, targs)
        for ad in (False, True):
            assert f(expected_calibration_error(probs, targs, 10, ad)) == pytest.approx(ece_ref(conf, hit, 10, ad), abs=1e-12)

def test_reliability_data(digits):
    p, y, _ = digits
    rel = reliability_data(p, y, n_bins=10)
    conf, hit = top_label(p, y)
    b = np.clip(np.ceil(conf * 10).astype(int) - 1, 0, 9)  # (lo, hi] bins; safe here: no confidence sits on an edge
    assert not np.isclose(conf * 10, np.round(conf * 10)).any()
    np.testing.assert_array_equal(rel.count.numpy(), np.bincount(b, minlength=10))
    for k in range(10):
        if (b == k).any():
            assert f(rel.conf[k]) == pytest.approx(conf[b == k].mean(), abs=1e-12)
            assert f(rel.acc[k]) == pytest.approx(hit[b == k].mean(), abs=1e-12)
        else: assert math.isnan(f(rel.conf[k])) and math.isnan(f(rel.acc[k]))
    np.testing.assert_array_equal(rel.edges.numpy(), np.arange(11) / 10)
    ra = reliability_data(p, y, n_bins=7, adaptive=True)
    sizes = [len(g) for g in np.array_split(np.arange(len(y)), 7)]
    np.testing.assert_array_equal(ra.count.numpy(), sizes)
    srt = np.sort(conf)
    np.testing.assert_allclose(ra.edges[1:-1].numpy(), [(srt[s-1] + srt[s]) / 2 for s in np.cumsum(sizes)[:-1]])

def test_bins_are_closed_on_the_right():
    "A confidence exactly on an edge belongs to the bin it closes: (lo, hi]; 0 goes to the first bin"
    probs, targs = np.array([[.5, .5], [.75, .25], [1., 0.], [.625, .375]]), np.array([0, 1, 0, 0])
    rel = reliability_data(probs, targs, n_bins=4)
    np.testing.assert_array_equal(rel.count.numpy(), [0, 1, 2, 1])
    np.testing.assert_allclose(rel.acc.numpy()[1:], [1, .5, 1])
    assert f(expected_calibration_error(probs, targs, 4)) == pytest.approx(ece_ref(*top_label(probs, targs), 4), abs=1e-15)
    assert f(expected_calibration_error(probs, targs, 4)) == pytest.approx((.5 + 2 * abs(.5 - .6875) + 0) / 4)
    cw = reliability_data(np.array([0., .25, 1.]), np.array([0., 1., 1.]), n_bins=4)  # Bernoulli: conf 1, .75, 1
    np.testing.assert_array_equal(cw.count.numpy(), [0, 0, 1, 2])
    assert f(classwise_ece(np.array([0., .25, 1.]), np.array([0., 1., 1.]), 4)) == pytest.approx(.75 / 3)

def test_classwise_ece_vs_loop(digits):
    p, y, _ = digits
    for probs, targs in [(p, y), dirichlet(300, 3, 1)]:
        C = probs.shape[1]
        ref = np.mean([ece_ref(probs[:, c], targs == c, 15) for c in range(C)])
        assert f(classwise_ece(probs, targs)) == pytest.approx(ref, abs=1e-12)
        ref = np.mean([ece_ref(probs[:, c], targs == c, 6, adaptive=True) for c in range(C)])
        assert f(classwise_ece(probs, targs, 6, adaptive=True)) == pytest.approx(ref, abs=1e-12)

def test_brier_vs_sklearn(digits):
    p, y, _ = digits
    for probs, targs in [(p, y), dirichlet(400, 5, 2), dirichlet(400, 2, 3)]:
        for half in ('auto', True, False):
            ref = skm.brier_score_loss(targs, probs, scale_by_half=half, labels=np.arange(probs.shape[1]))
            assert f(brier_score(probs, targs, scale_by_half=half)) == pytest.approx(ref, abs=1e-12)
    # binary (N,) probabilities of the positive class
    rng = np.random.default_rng(4)
    pb, yb = rng.random(300), rng.integers(0, 2, 300)
    assert f(brier_score(pb, yb.astype(float))) == pytest.approx(skm.brier_score_loss(yb, pb), abs=1e-12)
    assert f(brier_score(pb, yb.astype(float), scale_by_half=False)) == pytest.approx(skm.brier_score_loss(yb, pb, scale_by_half=False), abs=1e-12)
    # multi-label: the mean over labels of the binary score
    pm, ym = p[:, :4], (y[:, None] == np.arange(4)).astype(float)
    ref = np.mean([skm.brier_score_loss(ym[:, l], pm[:, l]) for l in range(4)])
    assert f(brier_score(pm, ym)) == pytest.approx(ref, abs=1e-12)

def test_nll_vs_sklearn(digits):
    p, y, _ = digits
    for probs, targs in [(p, y), dirichlet(400, 5, 5, conc=2.), (p.astype(np.float32), y)]:
        ref = skm.log_loss(targs, probs, labels=np.arange(probs.shape[1]))
        assert f(nll(probs, targs)) == pytest.approx(ref, rel=1e-6)
    rng = np.random.default_rng(6)
    pb, yb = rng.uniform(.01, .99, 300), rng.integers(0, 2, 300)
    assert f(nll(pb, yb.astype(float))) == pytest.approx(skm.log_loss(yb, pb), rel=1e-9)
    pm, ym = np.clip(p[:, :4], 1e-6, 1 - 1e-6), (y[:, None] == np.arange(4)).astype(float)
    ref = np.mean([skm.log_loss(ym[:, l], pm[:, l], labels=[0, 1]) for l in range(4)])
    assert f(nll(pm, ym)) == pytest.approx(ref, rel=1e-9)
    # the torch loss on logits agrees too
    logits = torch.randn(50, 7, generator=torch.Generator().manual_seed(0)) * 3
    t = torch.randint(0, 7, (50,), generator=torch.Generator().manual_seed(1))
    assert f(nll(F.softmax(logits.double(), 1), t)) == pytest.approx(F.cross_entropy(logits.double(), t).item(), rel=1e-9)

def test_mean_entropy_vs_scipy(digits):
    from scipy.stats import entropy
    p, y, _ = digits
    assert f(mean_predictive_entropy(p, y)) == pytest.approx(entropy(p, axis=1).mean(), rel=1e-5)
    pm = p[:, :4]; ym = (y[:, None] == np.arange(4)).astype(float)
    ref = sum(entropy(np.stack([pm[:, l], 1 - pm[:, l]]), axis=0) for l in range(4)).mean()
    assert f(mean_predictive_entropy(pm, ym)) == pytest.approx(ref, rel=1e-5)

def test_bad_input(digits):
    p, y, _ = digits
    with pytest.raises(ValueError, match='logits'): expected_calibration_error(np.log(p + 1e-3), y)
    with pytest.raises(ValueError, match='logits'): nll(p * 2, y)
    with pytest.raises(ValueError, match='shape'): brier_score(p, y[:-1])
    with pytest.raises(ValueError, match='no items'): nll(p[:0], y[:0])

# ---------------------------------------------------------------- selective prediction

@pytest.mark.parametrize('seed', range(4))
def test_referral_vs_quadratic(digits, seed):
    p, y, _ = digits
    rng = np.random.default_rng(seed)
    correct = p.argmax(1) == y
    ent = -(p * np.log(p)).sum(1)
    for score in [ent, np.round(ent * 3) / 3, rng.integers(0, 4, len(y)), np.zeros(len(y))]:  # real, coarse, ties, all tied
        np.testing.assert_allclose(referral_curve(score, correct).acc.numpy(), referral_ref(score, correct), atol=1e-12)
    soft = rng.random(len(y))  # float "correct"
    np.testing.assert_allclose(referral_curve(ent, soft).acc.numpy(), referral_ref(ent, soft), atol=1e-12)

def test_referral_no_ties_is_sort_and_drop(digits):
    p, y, _ = digits
    correct = (p.argmax(1) == y).astype(float)
    score = 1 - p.max(1) + np.random.default_rng(0).random(len(y)) * 1e-9   # distinct
    o = np.argsort(-score)
    ref = [correct[o[k:]].mean() for k in range(len(y))]
    rc = referral_curve(score, correct)
    np.testing.assert_allclose(rc.acc.numpy(), ref, atol=1e-12)
    np.testing.assert_allclose(rc.frac.numpy(), np.arange(len(y)) / len(y))
    assert f(aurc(score, correct)) == pytest.approx(aurc_ref(score, correct), abs=1e-12)
    assert f(aurc(score, correct)) == pytest.approx(np.mean(1 - np.array(ref)), abs=1e-12)
    for cov in (1., .9, .5, .01):
        m = math.ceil(round(cov * len(y), 9))
        assert f(accuracy_at_coverage(score, correct, cov)) == pytest.approx(correct[o[::-1][:m]].mean(), abs=1e-12)
    fr = referral_curve(score, correct, fracs=[0, .25, .5])
    np.testing.assert_allclose(fr.acc.numpy(), [ref[0], ref[int(.25 * len(y))], ref[int(.5 * len(y))]], atol=1e-12)

def test_aurc_ordering(digits):
    p, y, _ = digits
    correct = p.argmax(1) == y
    ent = -(p * np.log(p)).sum(1)
    oracle, anti = (~correct).astype(float), correct.astype(float)
    assert f(aurc(oracle, correct)) < f(aurc(ent, correct)) < f(aurc(np.zeros(len(y)), correct)) < f(aurc(anti, correct))
    assert f(aurc(np.zeros(len(y)), correct)) == pytest.approx(1 - correct.mean(), abs=1e-12)  # all tied: flat curve

@HYP
@given(st.lists(st.tuples(st.integers(0, 2), st.booleans()), min_size=1, max_size=6))
def test_referral_ties_are_expectation_over_orders(items):
    score, correct = map(np.array, zip(*items))
    np.testing.assert_allclose(referral_curve(score, correct).acc.numpy(), referral_perm_ref(score, correct), atol=1e-12)

@HYP
@given(st.lists(st.tuples(st.integers(0, 5), st.floats(0, 1)), min_size=1, max_size=60), st.randoms())
def test_referral_fast_equals_quadratic_and_order_free(items, rnd):
    score, correct = map(np.array, zip(*items))
    acc = referral_curve(score, correct).acc.numpy()
    np.testing.assert_allclose(acc, referral_ref(score, correct), atol=1e-9)
    perm = list(range(len(score))); rnd.shuffle(perm)
    np.testing.assert_allclose(referral_curve(score[perm], correct[perm]).acc.numpy(), acc, atol=1e-9)
    assert f(aurc(score[perm], correct[perm])) == pytest.approx(f(aurc(score, correct)), abs=1e-9)
    assert ((acc >= -1e-12) & (acc <= 1 + 1e-12)).all()

# ---------------------------------------------------------------- OOD

def test_ood_vs_sklearn(digits):
    p, _, p_ood = digits
    ent_in, ent_out = -(p * np.log(p)).sum(1), -(p_ood * np.log(p_ood)).sum(1)
    rng = np.random.default_rng(0)
    cases = [(ent_in, ent_out), (np.round(ent_in, 1), np.round(ent_out, 1)),            # real, real with ties
             (rng.integers(0, 5, 200), rng.integers(2, 8, 50)), (rng.normal(size=300), rng.normal(.5, 1, 80))]
    for si, so in cases:
        lab, s = ood_labels(si, so)
        assert f(ood_auroc(si, so)) == pytest.approx(skm.roc_auc_score(lab, s), abs=1e-12)
        assert f(ood_aupr(si, so)) == pytest.approx(skm.average_precision_score(lab, s), abs=1e-12)
        fpr, tpr, _ = skm.roc_curve(lab, s, drop_intermediate=False)
        for t in (.95, .8, .5):
            assert f(fpr_at_95_tpr(si, so, tpr=t)) == pytest.approx(fpr[np.searchsorted(tpr, t)], abs=1e-12)
            assert f(fpr_at_95_tpr(si, so, tpr=t)) == pytest.approx(fpr_ref(si, so, t), abs=1e-12)
    assert f(ood_auroc(ent_in, ent_out)) > .8   # the score does separate shuffled pixels from digits

@HYP
@given(arrays(np.float64, st.integers(1, 30), elements=st.floats(-3, 3)),
       arrays(np.float64, st.integers(1, 30), elements=st.floats(-3, 3)))
def test_ood_properties(si, so):
    si, so = np.round(si, 1), np.round(so, 1)   # plenty of ties
    lab, s = ood_labels(si, so)
    assert f(ood_auroc(si, so)) == pytest.approx(skm.roc_auc_score(lab, s), abs=1e-12)
    assert f(ood_aupr(si, so)) == pytest.approx(skm.average_precision_score(lab, s), abs=1e-12)
    assert f(fpr_at_95_tpr(si, so)) == pytest.approx(fpr_ref(si, so), abs=1e-12)
    assert f(ood_auroc(so, si)) == pytest.approx(1 - f(ood_auroc(si, so)), abs=1e-12)   # swapping flips it
    assert f(ood_auroc(si[::-1], so[::-1])) == pytest.approx(f(ood_auroc(si, so)), abs=1e-12)

# ---------------------------------------------------------------- calibration properties

probs_st = st.integers(1, 40).flatmap(lambda n: st.integers(2, 5).flatmap(lambda c: st.tuples(
    arrays(np.float64, (n, c), elements=st.sampled_from([0., 0., 1., .5, .1, .9, .3, .25])),
    arrays(np.int64, n, elements=st.integers(0, c - 1)))))

def _normalise(w):
    w = w.copy(); w[w.sum(1) == 0, 0] = 1.   # rows of exact 0s and 1s stay exact
    return w / w.sum(1, keepdims=True)

@HYP
@given(probs_st, st.integers(1, 20), st.booleans(), st.randoms())
def test_calibration_bounds_order_and_finiteness(pt, n_bins, adaptive, rnd):
    w, y = pt
    p = _normalise(w)
    perm = list(range(len(y))); rnd.shuffle(perm)
    for fn in (expected_calibration_error, max_calibration_error, classwise_ece):
        v = f(fn(p, y, n_bins, adaptive))
        assert 0 <= v <= 1 + 1e-12 and math.isfinite(v)
        assert f(fn(p[perm], y[perm], n_bins, adaptive)) == pytest.approx(v, abs=1e-12)
    conf, hit = top_label(p, y)
    assert f(expected_calibration_error(p, y, n_bins, adaptive)) == pytest.approx(ece_ref(conf, hit, n_bins, adaptive), abs=1e-12)
    for fn, hi in ((brier_score, 2), (nll, -math.log(PROB_FLOOR)), (mean_predictive_entropy, math.log(5))):
        v = f(fn(p, y))
        assert math.isfinite(v) and 0 <= v <= hi + 1e-6   # entropy is computed in float32
        assert f(fn(p[perm], y[perm])) == pytest.approx(v, abs=1e-12)

@HYP
@given(arrays(np.float32, st.tuples(st.integers(1, 20), st.integers(1, 4)),
              elements=st.sampled_from([0., 1., .5, .2, .999])), st.data())
def test_bernoulli_exact_zero_one(p, data):
    y = data.draw(arrays(np.float32, p.shape, elements=st.sampled_from([0., 1.])))
    for fn in (expected_calibration_error, max_calibration_error, classwise_ece, brier_score, nll, mean_predictive_entropy):
        v = f(fn(p, y))
        assert math.isfinite(v) and v >= 0
    assert f(brier_score(p, y)) == pytest.approx(((p.astype(np.float64) - y) ** 2).mean(), abs=1e-12)
    assert f(nll(p, y)) <= -math.log(PROB_FLOOR) + 1e-9    # the float32 input is floored at PROB_FLOOR, not its eps
    p64 = p.astype(np.float64)
    ref = -(y * np.log(np.maximum(p64, PROB_FLOOR)) + (1 - y) * np.log(np.maximum(1 - p64, PROB_FLOOR))).mean()
    assert f(nll(p, y)) == pytest.approx(ref, rel=1e-12)

# ---------------------------------------------------------------- fastai metrics in a real Learner

def _digits_learner(metrics, multi=False):
    from fastai.basics import DataLoaders, Learner, CrossEntropyLossFlat, BCEWithLogitsLossFlat, set_seed, nn
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16, dtype=torch.float32), torch.tensor(y)
    if multi: y = torch.stack([y % 2 == 0, y > 4, torch.isin(y, torch.tensor([0, 6, 8, 9])), y == 1], 1).float()
    idx = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    tr, va = idx[:1400], idx[1400:]
    dls = DataLoaders.from_dsets(list(zip(X[tr], y[tr])), list(zip(X[va], y[va])), bs=128)
    set_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, 4 if multi else 10))
    return Learner(dls, model, loss_func=BCEWithLogitsLossFlat() if multi else CrossEntropyLossFlat(), metrics=metrics)

@pytest.mark.parametrize('multi', [False, True])
def test_fastai_metrics_in_fit(multi):
    learn = _digits_learner([ECE(), ECE(n_bins=5, adaptive=True), Brier(), NLL(), MeanEntropy()], multi=multi)
    learn.fit(2, 1e-2)
    vals = learn.recorder.values[-1][1:]   # valid_loss, metrics
    probs, targs = learn.get_preds()
    ref = [expected_calibration_error(probs, targs), expected_calibration_error(probs, targs, 5, True),
           brier_score(probs, targs), nll(probs, targs), mean_predictive_entropy(probs, targs)]
    np.testing.assert_allclose(vals[1:], [f(r) for r in ref], atol=1e-6)
    assert vals[0] == pytest.approx(vals[4], abs=1e-5)   # the loss is the NLL of the probabilities
    assert 0 < vals[1] < .5 and 0 < vals[3] < 1

def test_fastai_metrics_see_mc_predictions():
    from fastai_bayes.callback.mc import MCDropoutCallback
    learn = _digits_learner([ECE(), Brier(), NLL(), MeanEntropy()])
    learn.fit(2, 1e-2)
    det = learn.validate()
    mc = learn.validate(cbs=MCDropoutCallback(n=6, seed=0))
    p_mc, targs = learn.get_preds(cbs=MCDropoutCallback(n=6, seed=0))
    ref = [expected_calibration_error(p_mc, targs), brier_score(p_mc, targs), nll(p_mc, targs), mean_predictive_entropy(p_mc)]
    np.testing.assert_allclose(mc[1:], [f(r) for r in ref], atol=1e-6)
    assert abs(mc[3] - det[3]) > 1e-3 and abs(mc[4] - det[4]) > 1e-3   # not the deterministic numbers
    # the same numbers from the result object of the same seeded passes
    res = learn.mc_predict(n=6, seed=0)
    assert f(res.nll()) == pytest.approx(mc[0], abs=1e-5) and f(res.nll()) == pytest.approx(mc[3], abs=1e-5)
    np.testing.assert_allclose([f(res.ece()), f(res.brier())], mc[1:3], atol=1e-6)
    correct = res.probs.argmax(1) == res.targs
    assert f(res.aurc('mutual_info')) == pytest.approx(np.mean(1 - referral_ref(res.mutual_info.numpy(), correct.numpy())), abs=1e-12)
    np.testing.assert_allclose(res.referral_curve('entropy').acc.numpy(), referral_ref(res.entropy.numpy(), correct.numpy()), atol=1e-12)

def test_metric_without_activation_needs_act():
    from functools import partial
    from fastai.basics import nn
    learn = _digits_learner([NLL()])
    learn.loss_func = nn.CrossEntropyLoss()    # no `activation`: the metric would get logits
    with pytest.raises(ValueError, match='logits'): learn.validate()
    learn.metrics = [NLL(act=partial(F.softmax, dim=-1))]
    loss, v = learn.validate()
    assert v == pytest.approx(loss, abs=1e-5)

# ---------------------------------------------------------------- target shapes (issue 16, defects 4 and 5)

def test_one_column_probs_are_bernoulli(digits):
    "(N,1) probabilities with (N,) targets, or (N,) with (N,1), are one binary label each: the flattened input's numbers"
    p, y, _ = digits
    pb, yb = p[:, 3], (y == 3).astype(np.float32)        # one-vs-rest probability of a '3', real and well spread
    col = lambda a: a[:, None]
    fns = [expected_calibration_error, max_calibration_error, classwise_ece, brier_score, nll, mean_predictive_entropy,
           lambda p, y: expected_calibration_error(p, y, 7, True)]
    p32, y32 = torch.as_tensor(pb).float(), torch.as_tensor(yb)
    for probs, targs, fp, fy in [(col(pb), yb, pb, yb), (pb, col(yb), pb, yb), (col(p32), y32, p32, y32), (p32, col(y32), p32, y32)]:
        for fn in fns: assert f(fn(probs, targs)) == f(fn(fp, fy))
        rel, ref = reliability_data(probs, targs, 10), reliability_data(fp, fy, 10)
        for a, b in zip(rel, ref): torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    conf, hit = top_label(pb, yb)
    assert f(expected_calibration_error(col(pb), yb)) == pytest.approx(ece_ref(conf, hit), abs=1e-12)

def test_column_class_targets_are_indices(digits):
    "(N,C) probabilities with (N,1) class indices (fastai's tabular targets) give the numbers of (N,) indices"
    p, y, _ = digits
    for fn in (expected_calibration_error, max_calibration_error, classwise_ece, brier_score, nll, mean_predictive_entropy):
        assert f(fn(p, y[:, None])) == f(fn(p, y))
        assert f(fn(torch.as_tensor(p), torch.as_tensor(y[:, None]).to(torch.int8))) == f(fn(p, y))
    with pytest.raises(ValueError, match='class'): nll(p, y[:, None] + 10)   # not a one-class softmax crash either
    with pytest.raises(ValueError, match='shape'): nll(p, np.stack([y, y], 1))

def test_fastai_metrics_on_tabular_learner():
    "ECE/Brier/NLL in `metrics=[...]` of a real tabular_learner on Adult: its targets come as (bs,1) class indices"
    from fastai.tabular.all import tabular_learner, no_random
    from _helpers import adult_dls, fit_quietly
    dls = adult_dls()
    with no_random(0): learn = tabular_learner(dls, layers=[32], metrics=[ECE(), Brier(), NLL()])
    fit_quietly(learn)
    loss, ece, brier, nl = learn.validate()
    probs, targs = learn.get_preds()
    assert targs.shape == (len(dls.valid_ds), 1)
    t = targs.flatten().long()
    np.testing.assert_allclose([ece, brier, nl], [f(expected_calibration_error(probs, t)), f(brier_score(probs, t)),
                                                  f(nll(probs, t))], rtol=1e-6)
    assert nl == pytest.approx(loss, rel=1e-5) and 0 < ece < .5

# ---------------------------------------------------------------- nll: one clamp whatever the dtype (defect 6)

def test_nll_same_in_float32_and_float64(digits):
    p, y, _ = digits
    confident = np.array([[0., 1., 0.], [1e-30, 1 - 1e-30, 0.], [.2, .3, .5], [1e-42, 0., 1.]])  # mistakes; 1e-42 is subnormal in float32
    yc = np.array([0, 0, 2, 0])
    pbin, ybin = np.array([1., 1e-30, .7, 0.]), np.array([0., 1., 1., 1.])                     # Bernoulli mistakes
    for probs, targs in [(p, y), (confident, yc), (pbin, ybin), (pbin[:, None], ybin)]:
        v32, v64 = f(nll(probs.astype(np.float32), targs)), f(nll(probs.astype(np.float64), targs))
        assert v32 == pytest.approx(v64, rel=1e-6)
    floor = -math.log(PROB_FLOOR)
    assert PROB_FLOOR == torch.finfo(torch.float32).tiny and floor == pytest.approx(87.3365, abs=1e-4)
    assert f(nll(confident[:2].astype(np.float32), yc[:2])) == pytest.approx((floor - math.log(1e-30)) / 2, rel=1e-6)
    assert f(nll(confident[3:].astype(np.float32), yc[3:])) == pytest.approx(floor, rel=1e-9)
    assert f(nll(confident[:1], yc[:1], eps=1e-3)) == pytest.approx(-math.log(1e-3))            # an explicit eps still rules

def test_nll_is_torch_nll_loss_of_floored_log(digits):
    p, y, _ = digits
    logits = torch.randn(200, 5, generator=torch.Generator().manual_seed(0)) * 40   # many probabilities under 1e-7
    t = torch.randint(0, 5, (200,), generator=torch.Generator().manual_seed(1))
    for probs in (F.softmax(logits, 1), F.softmax(logits.double(), 1)):
        assert (probs.gather(1, t[:, None]) < torch.finfo(torch.float32).eps).any()
        ref = F.nll_loss(probs.double().clamp_min(PROB_FLOOR).log(), t)
        assert f(nll(probs, t)) == pytest.approx(ref.item(), rel=1e-12)
    # no clamp hit: scikit-learn's log_loss, in both dtypes
    assert p.min() > 1e-6
    for probs in (p, p.astype(np.float32)):
        assert f(nll(probs, y)) == pytest.approx(skm.log_loss(y, probs.astype(np.float64), labels=np.arange(10)), rel=1e-6)

def test_validate_loss_is_nll_of_mc_result_on_confident_mistakes():
    "Under MCDropoutCallback the validate loss, the NLL() metric and `res.nll()` agree, also on confident mistakes"
    from fastai.tabular.all import tabular_learner, tabular_config, no_random
    from fastai_bayes.callback.mc import MCDropoutCallback
    import fastai_bayes.predictions  # noqa: F401  (Learner.mc_predict)
    from _helpers import adult_dls, fit_quietly
    with no_random(0):
        learn = tabular_learner(adult_dls(), layers=[32, 32], config=tabular_config(ps=[.1, .1], embed_p=.1), metrics=NLL())
    fit_quietly(learn, 3)
    with torch.no_grad(): learn.model.layers[-1][0].weight.mul_(300)  # an over-confident model: saturated mistakes
    loss, nl = learn.validate(cbs=MCDropoutCallback(n=8, seed=0))
    res = learn.mc_predict(n=8, seed=0)
    p_true = res.probs[torch.arange(len(res)), res.targs.flatten().long()]
    assert (p_true < torch.finfo(torch.float32).eps).sum() >= 10 and (p_true < PROB_FLOOR).sum() >= 3  # the clamps matter
    assert f(res.nll()) == pytest.approx(loss, rel=1e-5) and nl == pytest.approx(loss, rel=1e-5)
