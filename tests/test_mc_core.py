"""MC core on real learners and real offline data (MNIST sample, Rotten Tomatoes, Adult census, diabetes).
Plain pytest, so it runs on the newest fastai too."""
import math, pytest, torch
from fastai.vision.all import *
from fastai.text.all import *
from fastai.tabular.all import *
from fastai_bayes.all import *

from _helpers import fit_quietly as _fit, tiny_cnn

@pytest.fixture(scope='module')
def mnist_dls():
    df = mnist_sample(600, seed=0)
    return ImageDataLoaders.from_df(df, df.attrs['path'], fn_col='fname', label_col='label', valid_col='is_valid',
                                    bs=64, num_workers=0)

@pytest.fixture(scope='module')
def mnist_learn(mnist_dls):
    with no_random(0): learn = vision_learner(mnist_dls, tiny_cnn, pretrained=False, metrics=accuracy)
    return _fit(learn, 2)

def test_resnet18_vision_learner(mnist_dls):
    "The real thing, untrained: body once, head x20 in one forward, flags and BatchNorm statistics as they were"
    with no_random(0): learn = vision_learner(mnist_dls, resnet18, pretrained=False)
    learn.model.eval()   # fastai's own validation leaves the model in eval mode; compare with that
    before, calls = _snapshot(learn), []
    h1 = learn.model[0][0].register_forward_hook(lambda m,i,o: calls.append('body'))
    h2 = learn.model[1][-1].register_forward_hook(lambda m,i,o: calls.append(o.shape[0]))
    try: res = learn.mc_predict(learn.dls.test_dl(learn.dls.valid_ds.items.iloc[:10]), n=20, seed=0)
    finally: h1.remove(); h2.remove()
    assert calls == ['body', 2, 'body', 2] + ['body', 200]   # the probe on two rows (MC mode, eval mode), then 20 passes
    assert res.probs.shape == (10, 10) and (res.std.sum(1) > 0).all()
    _assert_same(before, _snapshot(learn))

def _snapshot(learn):
    return (learn.model, [m.training for m in learn.model.modules()],
            {k: v.clone() for k,v in learn.model.state_dict().items()}, list(learn.cbs))

def _assert_same(a, b):
    assert a[0] is b[0] and a[1] == b[1] and a[3] == b[3]
    for k in a[2]: assert torch.equal(a[2][k], b[2][k]), k

def _pred(out): return out[0] if isinstance(out, tuple) else out

def _hand_loop(learn, dl, n):
    "n independent forwards of the whole model per batch in training mode, BatchNorm in eval"
    model = learn.model.eval(); outs = []
    try:
        with torch.no_grad():
            for b in dl:
                xb = b[:getattr(learn.dls, 'n_inp', 1)]
                model.train()
                for m in model.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm): m.eval()
                outs.append(torch.stack([F.softmax(_pred(model(*xb)), -1) for _ in range(n)]))
                model.eval()
    finally: model.eval()
    res = torch.cat(outs, 1)
    # batches come in the DataLoader's order (text: sorted by length); items back in dataset order, as get_preds does
    return res[:, torch.tensor(dl.get_idxs()).argsort()] if hasattr(dl, 'get_idxs') else res

def _assert_same_distribution(res, ref, rel_spread):
    """`res` (the engine, n passes) and `ref` (n×N×C passes of a hand loop) agree: means within 5 s.e. of their Monte Carlo
    error, and the same mean spread of the passes (a wrong engine giving identical passes would have std 0)"""
    se = ((ref.var(0) + res.std**2) / len(ref)).sqrt()
    assert ((res.probs - ref.mean(0)).abs() <= 5*se + 1e-4).all()
    assert res.std.mean() == pytest.approx(ref.std(0, correction=0).mean().item(), rel=rel_spread)

def test_vision_engine_matches_hand_loop_statistically(mnist_learn):
    "Tiled engine (body once, head x n in one forward) vs n full forwards: same distribution, so the means agree within MC error"
    learn, n = mnist_learn, 200
    dl = learn.dls.valid.new(shuffle=False)
    torch.manual_seed(0); ref = _hand_loop(learn, dl, n)
    res = learn.mc_predict(dl, n=n, seed=1)
    _assert_same_distribution(res, ref, rel_spread=0.1)

def test_validate_loss_is_nll_of_mc_probs(mnist_learn):
    learn = mnist_learn
    loss, acc = learn.validate(cbs=MCDropoutCallback(n=20, seed=5))
    res = learn.mc_predict(n=20, seed=5)
    nll = -res.probs[torch.arange(len(res)), res.targs].log().mean()
    assert loss == pytest.approx(nll.item(), rel=1e-4)
    assert acc == pytest.approx((res.decoded == res.targs).float().mean().item(), abs=1e-6)

def test_batchnorm_and_flags_unchanged_also_after_exception(mnist_learn):
    learn = mnist_learn
    before = _snapshot(learn)
    learn.mc_predict(n=10)
    _assert_same(before, _snapshot(learn))
    calls = []
    def boom(m, i, o):
        calls.append(1)
        if len(calls) == 2: raise RuntimeError('injected')
    h = learn.model[1][-1].register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match='injected'): learn.mc_predict(n=10, max_bs=64)
    finally: h.remove()
    _assert_same(before, _snapshot(learn))

def test_bounds_and_no_nan(mnist_learn):
    res = mnist_learn.mc_predict(n=10, seed=0)
    assert not any(t.isnan().any() for t in (res.entropy, res.expected_entropy, res.mutual_info, res.variation_ratio))
    assert (res.mutual_info >= 0).all() and (res.mutual_info <= res.entropy + 1e-5).all()
    assert (res.entropy <= math.log(10) + 1e-5).all()

# --- text: AWD-LSTM, shared masks -------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def text_learn():
    df = rotten_tomatoes(1200, seed=0)
    dls = TextDataLoaders.from_df(df, text_col='text', label_col='label', valid_col='is_valid', bs=64, seq_len=72)
    cfg = dict(emb_sz=64, n_hid=96, n_layers=2)
    with no_random(0): learn = text_classifier_learner(dls, AWD_LSTM, pretrained=False, config=cfg, drop_mult=0.5, metrics=accuracy)
    return _fit(learn, 1, 1e-2)

def _only_shared_masks(learn):
    "Switch off every per-row dropout, leaving WeightDropout and EmbeddingDropout as the only randomness"
    for o in stochastic_modules(learn):
        if o.mask == 'element': o.module.p = 0.

def test_text_passes_draw_independent_masks(text_learn):
    learn = text_learn
    old = {o.module: o.p for o in stochastic_modules(learn)}
    _only_shared_masks(learn)
    try:
        dl = learn.dls.test_dl(learn.dls.valid_ds.items.iloc[:128], with_labels=True)
        n = 60   # one mask per pass is shared by all items: the spread is estimated from n draws, ±13% (1 s.e.) at n=60
        torch.manual_seed(0); ref = _hand_loop(learn, dl, n)
        res = learn.mc_predict(dl, n=n, seed=1)
        ref_spread, spread = ref.std(0, correction=0).mean().item(), res.std.mean().item()
        assert ref_spread > 1e-3                               # the shared-mask modules do make passes differ
        assert spread == pytest.approx(ref_spread, rel=0.35)    # ... and by as much as truly independent passes
        se = ((ref.var(0) + res.std**2) / n).sqrt()
        assert ((res.probs - ref.mean(0)).abs() <= 5*se + 1e-4).float().mean() > 0.99
        assert not MCPlan(learn.model, dl.one_batch()[:1]).tileable     # shared masks: one forward per pass
        # the test can fail: tiling replicates in one forward shares the masks and collapses the spread
        orig = MCPlan.__init__
        def tiled(self, model, xb): orig(self, model, xb); self.tileable = True
        MCPlan.__init__ = tiled
        try: wrong = learn.mc_predict(dl, n=n, seed=1).std.mean().item()
        except ValueError as e:   # tiled copies share every mask: identical passes, refused by the guard
            assert 'came out identical' in str(e); wrong = 0.
        finally: MCPlan.__init__ = orig
        assert wrong < 0.2 * ref_spread
    finally:
        for m,p in old.items():
            if hasattr(m, 'p'): m.p = p

def test_text_row_order_and_tuple_output(text_learn):
    learn = text_learn
    res = learn.mc_predict(n=4, seed=0)
    p, t = learn.get_preds(cbs=MCDropoutCallback(n=4, seed=0))
    assert torch.allclose(p, res.probs, atol=1e-5) and torch.equal(t, res.targs)
    assert res.to_df().target.isin(['fresh','rotten']).all()

def test_text_no_dropout_error():
    df = rotten_tomatoes(200, seed=1)
    dls = TextDataLoaders.from_df(df, text_col='text', label_col='label', valid_col='is_valid', bs=32)
    learn = text_classifier_learner(dls, AWD_LSTM, pretrained=False, config=dict(emb_sz=16, n_hid=16, n_layers=1),
                                   drop_mult=0., ps=[0.])
    with pytest.raises(ValueError, match='drop_mult'): learn.mc_predict(n=3)

# --- tabular: Adult census, classification and regression -------------------------------------------------------

@pytest.fixture(scope='module')
def adult_dls():
    df = adult_census(4000, seed=0)
    return TabularDataLoaders.from_df(df, y_names='loan', cat_names=df.attrs['cat_names'], cont_names=df.attrs['cont_names'],
                                      procs=[Categorify, FillMissing, Normalize], valid_idx=list(df.index[df.is_valid]), bs=256)

def test_tabular_default_learner_has_no_dropout(adult_dls):
    learn = tabular_learner(adult_dls, metrics=accuracy)
    before = _snapshot(learn)
    with pytest.raises(ValueError, match=r'tabular_config\(ps='): learn.mc_predict(n=5)
    _assert_same(before, _snapshot(learn))

def test_tabular_with_dropout(adult_dls):
    with no_random(0):
        learn = tabular_learner(adult_dls, layers=[64, 32], config=tabular_config(ps=[0.2, 0.1], embed_p=0.1), metrics=accuracy)
    _fit(learn)
    res = learn.mc_predict(n=20, seed=0)
    df = res.to_df()
    assert len(df) == len(adult_dls.valid_ds) and set(df.target) <= {'<=50K', '>50K'}
    assert (res.std.sum(1) > 0).all()
    loss, _ = learn.validate(cbs=MCDropoutCallback(n=20, seed=0))
    assert loss == pytest.approx(-res.probs[torch.arange(len(res)), res.targs.flatten().long()].log().mean().item(), rel=1e-4)
    # the tiled engine with fast_dropout masks vs whole-model forwards with torch's dropout: the same distribution
    dl = adult_dls.valid.new(shuffle=False)
    torch.manual_seed(0); ref = _hand_loop(learn, dl, 200)
    res = learn.mc_predict(dl, n=200, seed=1)
    _assert_same_distribution(res, ref, rel_spread=0.05)

def test_tabular_regression_with_y_range():
    df = diabetes_df()
    dls = TabularDataLoaders.from_df(df, y_names='target', cont_names=df.attrs['cont_names'], procs=[Normalize],
                                     valid_idx=list(range(0, len(df), 5)), bs=64)
    with no_random(0):
        learn = tabular_learner(dls, layers=[64], y_range=(0, 400), config=tabular_config(ps=[0.2]))
    _fit(learn, 3, 1e-2)
    res = learn.mc_predict(n=30, seed=0)
    assert res.kind == 'identity' and res.probs is None
    assert res.mean.shape == (len(dls.valid_ds), 1) and (res.std > 0).all()
    assert ((res.mean > 0) & (res.mean < 400)).all()
    df = res.to_df()
    assert list(df.columns) == ['target', 'mean', 'std'] and df.target.dtype.kind == 'f'   # one number per item
    with pytest.raises(ValueError, match="only the 'std' score"): res.score('entropy')

# --- a plain Learner around a custom nn.Module (no Sequential: the whole model is one stage) --------------------

class Net(Module):
    def __init__(self): self.l1,self.dp,self.l2 = nn.Linear(64, 32),nn.Dropout(0.3),nn.Linear(32, 10)
    def forward(self, x): return self.l2(self.dp(F.relu(self.l1(x))))

def test_custom_module_exact_against_hand_loop():
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    ds = [(torch.tensor(x, dtype=torch.float32)/16, torch.tensor(t)) for x, t in zip(X, y)]
    dls = DataLoaders(DataLoader(ds[:1400], bs=64, shuffle=True), DataLoader(ds[1400:], bs=64))
    with no_random(0): learn = Learner(dls, Net(), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    _fit(learn, 2)
    dl = dls.valid
    with mc_dropout(learn.model):   # the engine's dropout masks (fast_dropout), drawn in the same order
        torch.manual_seed(3); ref = _hand_loop(learn, dl, 6)
    res = learn.mc_predict(dl, n=6, seed=3, max_bs=1, with_samples=True)   # one pass per forward: same draws
    assert torch.allclose(res.samples, ref, atol=1e-6)
    # and against torch's own dropout masks: the same distribution
    torch.manual_seed(4); ref = _hand_loop(learn, dl, 400)
    res = learn.mc_predict(dl, n=400, seed=5)
    _assert_same_distribution(res, ref, rel_spread=0.05)

def test_multilabel_sigmoid():
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    Y = torch.stack([torch.tensor(y % 2 == 0), torch.tensor(y > 4)], 1).float()   # labels 'even', 'big'
    ds = [(torch.tensor(x, dtype=torch.float32)/16, t) for x, t in zip(X, Y)]
    dls = DataLoaders(DataLoader(ds[:1400], bs=64, shuffle=True), DataLoader(ds[1400:], bs=64))
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 2))
    with no_random(0): learn = Learner(dls, model, loss_func=BCEWithLogitsLossFlat())
    _fit(learn, 2)
    res = learn.mc_predict(n=20, seed=0, with_samples=True)
    assert res.kind == 'sigmoid' and res.entropy.shape == (len(res), 2)
    assert torch.allclose(res.mutual_info, mutual_information(res.samples, 'sigmoid'), atol=1e-5)
    assert torch.equal(res.decoded, res.probs > 0.5)
    assert torch.allclose(res.score('entropy'), res.entropy.sum(1))
    assert ((res.decoded == res.targs.bool()).float().mean() > 0.8)
