"""`UncertaintyInterpretation` on real learners and offline data: every plot saved as PNG and checked for content,
rankings against the scores, one result behind every plot. Plain pytest, so it runs on the newest fastai too.
Set FASTAI_BAYES_PNG_DIR to keep the PNGs."""
import os, re, pytest, torch, numpy as np, pandas as pd
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
from fastai.vision.all import *
from fastai.text.all import *
from fastai.tabular.all import *
from fastai_bayes.all import *

from _helpers import fit_quietly as _fit, tiny_cnn, mnist_dls, adult_dls

@pytest.fixture(scope='module')
def png_dir(tmp_path_factory):
    d = os.environ.get('FASTAI_BAYES_PNG_DIR')
    if d: os.makedirs(d, exist_ok=True); return Path(d)
    return tmp_path_factory.mktemp('png')

def _save(obj, png_dir, name):
    "Save the figure of `obj` (axes, array of axes) as PNG, check it is a real picture, close it"
    ax = obj if isinstance(obj, matplotlib.axes.Axes) else np.asarray(obj).flat[0]
    fig, f = ax.figure, png_dir/f'{name}.png'
    fig.savefig(f, dpi=60)
    img = plt.imread(f)
    assert img.shape[0] > 100 and img.shape[1] > 100 and img[..., :3].std() > 0.05   # not blank
    plt.close(fig)
    return fig

def _heights(ax):
    "Bar heights of a histogram on `ax` (one `stairs` patch, or bars)"
    if len(ax.patches) == 1 and hasattr(ax.patches[0], 'get_data'): return ax.patches[0].get_data().values.tolist()
    return [p.get_height() for p in ax.patches]

# --- fixtures: small learners trained for seconds --------------------------------------------------------------

@pytest.fixture(scope='module')
def mnist_learn():
    dls = mnist_dls(600)
    with no_random(0): learn = vision_learner(dls, tiny_cnn, pretrained=False, metrics=accuracy)
    return _fit(learn, 2, 2e-2)

@pytest.fixture(scope='module')
def interp(mnist_learn):
    return UncertaintyInterpretation.from_learner(mnist_learn, n=10, seed=0)

@pytest.fixture(scope='module')
def text_interp():
    "An untrained AWD-LSTM: the display of texts does not depend on training"
    df = rotten_tomatoes(300, seed=0)
    dls = TextDataLoaders.from_df(df, text_col='text', label_col='label', valid_col='is_valid', bs=32, num_workers=0)
    with no_random(0):
        learn = text_classifier_learner(dls, AWD_LSTM, pretrained=False, config=dict(emb_sz=16, n_hid=16, n_layers=1),
                                        drop_mult=0.5)
    return UncertaintyInterpretation.from_learner(learn, n=4, seed=0)

@pytest.fixture(scope='module')
def adult():
    dls = adult_dls(1500, bs=256)
    df = adult_census(1500, seed=0)
    with no_random(0):
        learn = tabular_learner(dls, layers=[32], config=tabular_config(ps=[0.2], embed_p=0.1), metrics=accuracy)
    return df, UncertaintyInterpretation.from_learner(_fit(learn), n=10, seed=0)

@pytest.fixture(scope='module')
def toy_interp():
    toy = toy_regression(300, seed=0)
    dls = TabularDataLoaders.from_df(toy, y_names='y', cont_names=['x'], procs=[Normalize], valid_pct=0.2, bs=64,
                                     num_workers=0)
    with no_random(0):
        learn = tabular_learner(dls, layers=[64, 64], config=tabular_config(ps=[0.1, 0.1], use_bn=False, bn_final=False, bn_cont=False),
                                loss_func=MSELossFlat())
    return UncertaintyInterpretation.from_learner(_fit(learn, 5), n=20, seed=0)

# --- one result behind everything ------------------------------------------------------------------------------

def test_every_plot_uses_the_one_result(mnist_learn, monkeypatch, png_dir):
    calls, seen = [], set()
    orig_predict, orig_score = Learner.mc_predict, MCPredictions.score
    def counting(self, *args, **kwargs): calls.append(kwargs.get('n')); return orig_predict(self, *args, **kwargs)
    def recording(self, name='entropy'): seen.add(id(self)); return orig_score(self, name)
    monkeypatch.setattr(Learner, 'mc_predict', counting)
    monkeypatch.setattr(MCPredictions, 'score', recording)
    it = UncertaintyInterpretation.from_learner(mnist_learn, n=6, seed=1)
    res = it.res
    assert calls == [6] and res.inputs is not None
    ax_r = it.plot_referral('entropy')
    it.plot_confusion_hist(max_classes=3); it.plot_confusion_hist(compact=True)
    df = it.top_uncertain(5); it.plot_top_uncertain(4); it.plot_reliability(deterministic=True)
    assert calls == [6] and seen == {id(res)} and it.res is res      # no fresh sampling; only `res` was scored
    # ... and the drawn numbers are those of `res`
    np.testing.assert_allclose(ax_r.lines[0].get_ydata(), res.referral_curve('entropy').acc.numpy())
    np.testing.assert_allclose(df.entropy.to_numpy(), res.entropy.sort(descending=True).values[:5].numpy())
    # an OOD DataLoader is other data: exactly one more mc_predict, with the same n
    animals = animal_silhouettes(100, seed=0)
    ood = mnist_learn.dls.test_dl([animals.attrs['path']/f for f in animals.fname])
    _save(it.plot_ood(ood), png_dir, 'ood')
    assert calls == [6, 6] and it.ood.n == 6 and len(it.ood) == 100
    it.plot_ood(it.ood)
    assert calls == [6, 6]
    plt.close('all')

def test_from_preds(mnist_learn, interp):
    dl = mnist_learn.dls.valid
    it = UncertaintyInterpretation.from_preds(mnist_learn, interp.res, dl)
    assert it.res is interp.res
    with pytest.raises(ValueError, match='pass the DataLoader'): UncertaintyInterpretation.from_preds(mnist_learn, interp.res, mnist_learn.dls.train)
    # a result without inputs: plot_top_uncertain reads the items from dl, same pictures
    res = mnist_learn.mc_predict(dl, n=3, seed=0)
    it = UncertaintyInterpretation.from_preds(mnist_learn, res, dl)
    axs = it.plot_top_uncertain(3)
    idx = it.top_uncertain(3).index.tolist()
    stored = UncertaintyInterpretation.from_preds(mnist_learn, mnist_learn.mc_predict(dl, n=3, seed=0, with_input=True), dl)
    assert it.res.inputs is None and stored.res.inputs is not None
    np.testing.assert_array_equal(it._inputs(idx)[0].numpy(), stored._inputs(idx)[0].numpy())
    assert len([a for a in axs.flat if a.images]) == 3
    plt.close('all')

# --- confusion histograms --------------------------------------------------------------------------------------

def test_confusion_hist_grid(interp, png_dir):
    res = interp.res
    axs = interp.plot_confusion_hist()
    assert axs.shape == (10, 10)
    y, p = res.targs, res.decoded
    total = 0
    for a in range(10):
        for b in range(10):
            ax, m = axs[a, b], (y == a) & (p == b)
            assert sum(_heights(ax)) == m.sum().item()
            total += sum(_heights(ax))
            title = f"n={m.sum().item()}" + (f", mean {res.entropy[m].mean():.3f}" if m.any() else '')
            assert ax.get_title() == title
    assert total == len(res)
    assert 'entropy per confusion cell' in axs[0, 0].figure._suptitle.get_text()
    _save(axs, png_dir, 'confusion_hist_mnist')
    # a subset of classes, and the automatic choice for many classes
    axs = interp.plot_confusion_hist('mutual_info', classes=['3', '5', '8'])
    assert axs.shape == (3, 3) and axs[2, 0].get_xlabel().startswith('pred 3') and axs[1, 0].get_ylabel().startswith('actual 5')
    errs = torch.bincount(y[y != p], minlength=10) + torch.bincount(p[y != p], minlength=10)
    axs = interp.plot_confusion_hist(max_classes=4)
    shown = [int(ax.get_ylabel().split()[1]) for ax in axs[:, 0]]
    assert sorted(errs[shown].tolist()) == sorted(errs.tolist())[-4:]
    plt.close('all')

def test_confusion_hist_compact(interp, png_dir):
    ax = interp.plot_confusion_hist('mutual_info', compact=True, figsize=(5, 3))
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    hit = interp.res.decoded == interp.res.targs
    assert labels == [f"right: n={hit.sum().item()}, mean {interp.res.mutual_info[hit].mean():.3f}",
                      f"wrong: n={(~hit).sum().item()}, mean {interp.res.mutual_info[~hit].mean():.3f}"]
    assert tuple(ax.figure.get_size_inches()) == (5, 3)
    _save(ax, png_dir, 'confusion_hist_compact')

def test_confusion_hist_binary_text(text_interp, png_dir):
    res = text_interp.res
    axs = text_interp.plot_confusion_hist()
    assert axs.shape == (2, 2)
    y, p = res.targs, res.decoded
    for (a, b), tag in zip([(0, 0), (0, 1), (1, 0), (1, 1)], ['TN', 'FP', 'FN', 'TP']):
        n = ((y == a) & (p == b)).sum().item()
        assert axs[a, b].get_title().startswith(f"{tag}: n={n}") and sum(_heights(axs[a, b])) == n
    assert 'positive class rotten' in axs[0, 0].figure._suptitle.get_text()
    _save(axs, png_dir, 'confusion_hist_text')

# --- rankings and item displays ---------------------------------------------------------------------------------

@pytest.mark.parametrize('score', ['entropy', 'expected_entropy', 'mutual_info', 'variation_ratio', 'max_prob', 'margin', 'std'])
def test_top_uncertain_order(interp, score):
    res = interp.res
    s = res.score(score)
    for largest in (True, False):
        df = interp.top_uncertain(7, score, largest=largest)
        ref = torch.sort(s, descending=largest, stable=True)
        assert df.index.tolist() == ref.indices[:7].tolist()
        np.testing.assert_allclose(df[score].to_numpy(), ref.values[:7].numpy(), rtol=1e-6)
    df = interp.top_uncertain(None, score)
    assert len(df) == len(res) and set(df.columns) >= {'target', 'pred', 'prob', 'entropy', 'mutual_info', 'max_prob', 'margin', 'std'}
    np.testing.assert_allclose(df.prob.to_numpy(), res.probs.max(1).values[df.index].numpy(), rtol=1e-6)

def test_top_uncertain_images(interp, png_dir):
    df = interp.top_uncertain(6)
    items = interp.dl.items
    assert df.fname.tolist() == items.fname.iloc[df.index].tolist()       # the file name, row i of dl.items
    assert df.target.tolist() == items.label.iloc[df.index].tolist()
    axs = interp.plot_top_uncertain(6, ncols=3)
    assert axs.shape == (2, 3) and len([a for a in axs.flat if a.images]) == 6
    for ax, (_, r) in zip(axs.flat, df.iterrows()):
        assert ax.get_title() == f"{r.pred}/{r.target}\nentropy {r.entropy:.3f}, p {r.prob:.2f}"
        assert (ax.title.get_color() == 'red') == (r.pred != r.target)
    _save(axs, png_dir, 'top_uncertain_mnist')

def test_top_uncertain_text(text_interp):
    res = text_interp.res
    df = text_interp.plot_top_uncertain(5, score='mutual_info')
    assert isinstance(df, pd.DataFrame) and list(df.columns[:3]) == ['text', 'target', 'pred']
    assert df.index.tolist() == res.mutual_info.argsort(descending=True, stable=True)[:5].tolist()
    raw = text_interp.dl.items.text.iloc[df.index]                     # tokens of the dataset's items
    for t, toks in zip(df.text, raw):   # the review as written, not fastai's tokens
        assert not re.search(r'\bxx(bos|maj|up|pad)\b', t) and t.startswith(detokenize(toks)[:40])
    assert (df.target.isin(['fresh', 'rotten'])).all()

def test_top_uncertain_tabular(adult, png_dir):
    raw, it = adult
    df = it.plot_top_uncertain(5)
    orig = raw.iloc[it.dl.items.index[df.index]]                     # the rows as they were before the procs
    for c in ('education', 'workclass'):   # a missing category shows as fastai's '#na#', as in `show_batch`
        assert df[c].tolist() == orig[c].astype(object).fillna('#na#').tolist(), c
    np.testing.assert_allclose(df.age.to_numpy(), orig.age.to_numpy(), atol=1e-3)
    assert df.target.tolist() == orig.loan.tolist()
    assert (np.diff(df.entropy.to_numpy()) <= 0).all()
    axs = it.plot_confusion_hist()
    assert [a.get_title()[:2] for a in axs.flat] == ['TN', 'FP', 'FN', 'TP']
    _save(axs, png_dir, 'confusion_hist_adult')
    _save(it.plot_referral(), png_dir, 'referral_adult')

# --- referral, reliability ---------------------------------------------------------------------------------------

def _aurc_of(label): return float(re.search(r'AURC (\d\.\d+)', label).group(1))

def test_referral(interp, png_dir):
    res = interp.res
    ax = interp.plot_referral(['entropy', 'mutual_info', 'max_prob'])
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert [l.split(' ')[0] for l in labels] == ['entropy', 'mutual_info', 'max_prob', 'oracle', 'random']
    for l, s in zip(labels, ['entropy', 'mutual_info', 'max_prob']):
        assert _aurc_of(l) == pytest.approx(res.aurc(s).item(), abs=6e-4)
    acc = (res.decoded == res.targs).float().mean().item()
    assert _aurc_of(labels[4]) == pytest.approx(1 - acc, abs=6e-4)
    assert _aurc_of(labels[3]) <= min(_aurc_of(l) for l in labels[:3])      # nothing beats the oracle
    assert np.allclose(ax.lines[4].get_ydata(), acc)                          # random: flat
    oracle = ax.lines[3].get_ydata()
    n_err = int(round((1 - acc) * len(res)))
    assert oracle[n_err] == pytest.approx(1.0)                               # errors referred first
    assert ax.get_xlabel().startswith('fraction referred') and ax.get_ylabel().startswith('accuracy')
    _save(ax, png_dir, 'referral_mnist')

def test_reliability(mnist_learn, interp, png_dir):
    res = interp.res
    ax = interp.plot_reliability(n_bins=10)
    assert ax.get_title() == f"MC dropout (10 passes): ECE {res.ece(n_bins=10):.3f}"
    counts = [int(t.get_text()) for t in ax.texts]
    rel = res.reliability(n_bins=10)
    assert counts == rel.count[rel.count > 0].int().tolist() and sum(counts) == len(res)
    _save(ax, png_dir, 'reliability_mc')
    axs = interp.plot_reliability(deterministic=True)
    assert len(axs) == 2
    p, t = mnist_learn.get_preds(dl=interp.dl)
    dp, dt = interp.deterministic_preds()
    assert torch.allclose(dp, p) and torch.equal(dt, res.targs) and not torch.allclose(dp, res.probs)
    assert axs[1].get_title() == f"dropout off: ECE {expected_calibration_error(p, t):.3f}"
    _save(axs, png_dir, 'reliability_both')

def test_deterministic_sets_mc_callback_aside(mnist_learn):
    it = UncertaintyInterpretation.from_learner(mnist_learn, n=3, seed=0)
    mnist_learn.add_cb(MCDropoutCallback(n=3))
    try: p, _ = it.deterministic_preds()
    finally: mnist_learn.remove_cbs(MCDropoutCallback)
    assert torch.allclose(p, mnist_learn.get_preds(dl=it.dl)[0])

# --- regression -----------------------------------------------------------------------------------------------------

def test_intervals_1d(toy_interp, png_dir):
    res = toy_interp.res
    axs = toy_interp.plot_intervals(k=2)
    assert len(axs) == 2
    mu, sd, y = res.mean.flatten(), res.std.flatten(), res.targs.flatten()
    cover = ((y - mu).abs() <= 2*sd).float().mean().item()
    assert axs[0].get_title().startswith(f"{cover:.0%} of targets within ±2·std")
    assert axs[1].get_xlabel() == 'x' and len(axs[1].collections) >= 1          # the band
    x = toy_interp.dl.items.x.to_numpy()                                          # normalised by the procs ...
    xs = toy_interp.top_uncertain(None, 'std').sort_index().x.to_numpy()         # ... decoded back for display
    assert not np.allclose(x, xs) and np.allclose(np.sort(xs), axs[1].lines[0].get_xdata(), atol=1e-4)
    _save(axs, png_dir, 'intervals_toy')

def test_intervals_feature_diabetes(png_dir):
    df = diabetes_df()
    dls = TabularDataLoaders.from_df(df, y_names='target', cont_names=df.attrs['cont_names'], procs=[Normalize],
                                     valid_idx=list(range(0, len(df), 5)), bs=64, num_workers=0)
    with no_random(0): learn = tabular_learner(dls, layers=[32], y_range=(0, 400), config=tabular_config(ps=[0.2]))
    it = UncertaintyInterpretation.from_learner(_fit(learn, 2), n=10, seed=0)
    axs = it.plot_intervals(x='bmi', figsize=(9, 4))
    assert len(axs) == 2 and axs[1].get_xlabel() == 'bmi'
    assert not any(isinstance(c, matplotlib.collections.PolyCollection) for c in axs[1].collections)  # error bars, no band
    assert len(axs[1].containers) == 1
    assert it.plot_intervals().get_xlabel() == 'target'                       # 10 inputs: no feature panel by default
    with pytest.raises(ValueError, match="No input column 'age_x'"): it.plot_intervals(x='age_x')
    _save(axs, png_dir, 'intervals_diabetes')

# --- every plot from an ensemble and from a Laplace posterior ----------------------------------------------------

@pytest.fixture(scope='module')
def ensemble(mnist_learn):
    "The MNIST CNN and one more member from another initialisation"
    def member(i):
        with no_random(0): return _fit(vision_learner(mnist_learn.dls, tiny_cnn, pretrained=False), 2, 2e-2)
    return Ensemble([mnist_learn, *Ensemble.from_fn(member, k=1, seed=1).learners])

@pytest.fixture(scope='module')
def predictor_interps(mnist_learn, ensemble):
    "Interpretations of an ensemble (2 members × 2 MC passes) and of a last-layer Laplace posterior (10 draws)"
    return {'ensemble': UncertaintyInterpretation.from_learner(ensemble, n=2, seed=0),
            'laplace': UncertaintyInterpretation.from_learner(mnist_learn.laplace(bar=False), n=10, seed=0)}

@pytest.mark.parametrize('name', ['ensemble', 'laplace'])
def test_every_plot_from_other_predictors(name, predictor_interps, mnist_learn, ensemble, png_dir):
    it = predictor_interps[name]
    res, label = it.res, it.res.label
    assert it.learn is mnist_learn and it.dl.n == len(mnist_learn.dls.valid_ds)      # the learner that shows the items
    if name == 'ensemble':
        assert it.predictor is ensemble and label == 'deep ensemble (2 members × 2 passes)'
        assert (res.method, res.n, res.n_per_member) == ('deep ensemble', 4, 2)
    else:
        assert it.predictor.learn is mnist_learn and res.method == 'last-layer Laplace' and label.startswith('last-layer Laplace')
    axs = it.plot_confusion_hist(max_classes=3)
    assert axs.shape == (3, 3) and label in axs[0, 0].figure._suptitle.get_text()
    _save(axs, png_dir, f'confusion_hist_{name}')
    ax = it.plot_confusion_hist('mutual_info', compact=True)
    assert label in ax.get_title() and ax.get_xlabel() == 'mutual information (BALD)'
    plt.close('all')
    df = it.top_uncertain(4, 'mutual_info')
    np.testing.assert_allclose(df.mutual_info.to_numpy(), res.mutual_info.sort(descending=True).values[:4].numpy(), rtol=1e-6)
    axs = it.plot_top_uncertain(4)
    assert len([a for a in axs.flat if a.images]) == 4 and label in axs[0, 0].figure._suptitle.get_text()
    _save(axs, png_dir, f'top_uncertain_{name}')
    ax = it.plot_referral()
    assert [l.get_text().split(' ')[0] for l in ax.get_legend().get_texts()] == ['entropy', 'mutual_info', 'max_prob', 'oracle', 'random']
    assert label in ax.get_title()
    _save(ax, png_dir, f'referral_{name}')
    axs = it.plot_reliability(n_bins=10, deterministic=True)
    assert len(axs) == 2 and axs[0].get_title() == f"{label}: ECE {res.ece(n_bins=10):.3f}"
    det = {'ensemble': 'first member, no sampling', 'laplace': 'MAP network, no sampling'}[name]
    assert axs[1].get_title().startswith(f"{det}: ECE")
    assert torch.allclose(it.deterministic_preds()[0], mnist_learn.get_preds(dl=it.dl)[0])   # the lead / MAP network
    assert sum(int(t.get_text()) for t in axs[0].texts) == len(res)
    _save(axs, png_dir, f'reliability_{name}')
    # OOD: the same predictor, the same passes per member (for the ensemble: every member, 2 passes each)
    animals = animal_silhouettes(60, seed=0)
    ax = it.plot_ood(mnist_learn.dls.test_dl([animals.attrs['path']/f for f in animals.fname]))
    ood = it.ood
    assert (ood.method, ood.n_per_member, ood.n, ood.label) == (res.method, res.n_per_member, res.n, label)
    assert len(ood) == 60 and label in ax.get_title() and len(ax.get_legend().get_texts()) == 2
    _save(ax, png_dir, f'ood_{name}')

def test_ensemble_from_preds_and_default_n(ensemble, mnist_learn):
    dl = mnist_learn.dls.valid
    it = UncertaintyInterpretation.from_learner(ensemble, dl)            # n not given: the ensemble's 1 pass per member
    assert (it.res.n, it.res.n_per_member, it.res.label) == (2, 1, 'deep ensemble (2 members)')
    it = UncertaintyInterpretation.from_preds(ensemble, ensemble.mc_predict(dl, n=2, seed=0), dl, seed=0)
    assert it.learn is mnist_learn and it.predictor is ensemble
    it.plot_ood(mnist_learn.dls.test_dl(mnist_learn.dls.valid_ds.items.iloc[:10]))   # any other data
    assert (it.ood.method, it.ood.n, it.ood.n_per_member) == ('deep ensemble', 4, 2)   # not res.n=4 passes of each member
    assert it.plot_reliability().get_title().startswith('deep ensemble (2 members × 2 passes): ECE')
    with pytest.raises(TypeError, match='an `Ensemble` or a Laplace'): UncertaintyInterpretation.from_preds(dl, it.res, dl)
    plt.close('all')

def test_intervals_from_laplace(toy_interp, png_dir):
    la = toy_interp.learn.laplace(bar=False)
    it = UncertaintyInterpretation.from_learner(la, toy_interp.dl, n=30, seed=0)
    axs = it.plot_intervals(k=2)
    mu, sd, y = it.res.mean.flatten(), it.res.std.flatten(), it.res.targs.flatten()
    cover = ((y - mu).abs() <= 2*sd).float().mean().item()
    assert len(axs) == 2 and axs[0].get_title() == f"{cover:.0%} of targets within ±2·std; {len(y)} items\nlast-layer Laplace (30 passes)"
    assert axs[1].get_xlabel() == 'x' and it.top_uncertain(3, 'std').columns[:3].tolist() == ['x', 'target', 'mean']
    _save(axs, png_dir, 'intervals_laplace')

# --- errors that name the fix ----------------------------------------------------------------------------------

def test_errors(interp, toy_interp):
    with pytest.raises(ValueError, match='needs a regression result'): interp.plot_intervals()
    for f in (toy_interp.plot_confusion_hist, toy_interp.plot_referral, toy_interp.plot_reliability):
        with pytest.raises(ValueError, match='use `plot_intervals`'): f()
    with pytest.raises(ValueError, match='Unknown score'): interp.plot_confusion_hist('entropyy')
    with pytest.raises(ValueError, match='Unknown score'): interp.plot_referral(['entropy', 'bald'])
    with pytest.raises(ValueError, match="only the 'std' score"): toy_interp.top_uncertain(3, 'entropy')
    assert matplotlib.get_backend().lower() == 'agg'
