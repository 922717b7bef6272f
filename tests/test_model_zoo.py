"""Model-zoo conformance suite: for every kind of model a fastai user brings, `learn.mc_predict` is right or refuses.

Each row is a real fastai learner on real offline data (MNIST PNGs, Rotten Tomatoes, Adult census, diabetes). For each:
 (a) SPREAD: the per-item spread across passes of `res.samples` matches an independent reference loop written here
     (one pass per forward, every module of `REF_TYPES` in train mode and nothing else, under `torch.enable_grad()` so
     no fused fast path can skip dropout): the ratio of the mean per-item pass variances is within 4 standard errors
     of 1, and the test is strong enough to see a ratio of 1.5;
 (b) MEANS: per-item mean predictions agree within Monte Carlo error (z-scores; the bound on mean |z| is calibrated
     by permuting passes between the two runs, so correlated outputs, e.g. one shared weight mask, are fair);
 (c) STATE: `.training` flags, the full `state_dict()` and buffers, module attributes and (language model) hidden
     states are as before, also after an exception mid-pass.
Two more rows must be refused with an error naming `register_stochastic`: dropout that only `F.dropout(...,
training=self.training)` applies, and an `nn.Dropout` module that the forward bypasses.
Plain pytest, public fastai API only, so it runs on the newest fastai too. Models are barely trained: the checks are
about sampling, not accuracy."""
import functools, itertools, math, re, pytest, torch
from fastai.vision.all import *
from fastai.text.all import *
from fastai.tabular.all import *
from fastai_bayes.all import *
from fastai.text.models.awdlstm import RNNDropout, WeightDropout, EmbeddingDropout

def fit_quietly(learn, epochs=1, lr=1e-2):
    "Seeded `fit_one_cycle` with no progress bar or log"
    with no_random(0), learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr)
    return learn

def tiny_cnn(pretrained=False, **kwargs):
    "A small convolutional body for `vision_learner` (BatchNorm inside, so its statistics must survive sampling)"
    return nn.Sequential(ConvLayer(3, 16, stride=2), ConvLayer(16, 32, stride=2), ConvLayer(32, 64), nn.AdaptiveAvgPool2d(1))

try:
    import timm
    from timm.layers.attention import Attention as _TimmAttention
    from timm.layers.drop import DropPath as _TimmDropPath
    _TIMM = (_TimmAttention, _TimmDropPath)
except ImportError: timm, _TIMM = None, ()

needs_timm = pytest.mark.skipif(timm is None, reason='timm is not installed')

# Modules whose `.training` flag turns their randomness on: the reference switches on these and nothing else
REF_TYPES = (nn.modules.dropout._DropoutNd, RNNDropout, WeightDropout, EmbeddingDropout, nn.RNNBase,
             nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, BayesLinear, BayesConv2d,
             *_TIMM)

@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """These models are tiny: torch's second thread gains little, and when other processes load the 2 cores, its
    OpenMP waits make forwards 10-70x slower. One thread for this module, restored afterwards"""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

N_PASSES = 100   # passes per item, for both the library and the reference
MC_SEED, REF_SEED = 1, 2

# ------------------------------------------------------------------------------------------------------------------
# data: small, real, offline

@functools.cache
def _mnist_df():
    "48 training and 48 validation MNIST digits as PNGs (3 channels once loaded)"
    df = mnist_sample(600, seed=0)
    df = pd.concat([df[~df.is_valid].iloc[:192], df[df.is_valid].iloc[:48]])
    df.attrs['path'] = mnist_sample(600, seed=0).attrs['path']
    return df

@functools.cache
def mnist_dls(bs=24):
    df = _mnist_df()
    return ImageDataLoaders.from_df(df, df.attrs['path'], fn_col='fname', label_col='label', valid_col='is_valid',
                                    item_tfms=Resize(32), bs=bs, num_workers=0)

@functools.cache
def mnist_multilabel_dls():
    "Two labels per digit: 'even'/'odd' and 'big' (>= 5)/'small'; sigmoid outputs, BCE loss"
    df = _mnist_df().copy()
    d = df.label.astype(int)
    df['tags'] = np.where(d % 2 == 0, 'even', 'odd') + ';' + np.where(d >= 5, 'big', 'small')
    return ImageDataLoaders.from_df(df, _mnist_df().attrs['path'], fn_col='fname', label_col='tags', label_delim=';',
                                    valid_col='is_valid', item_tfms=Resize(32), bs=24, num_workers=0)

@functools.cache
def _rotten_df(n_train=256, n_valid=48):
    df = rotten_tomatoes(n_train + n_valid, seed=0)
    df['is_valid'] = np.arange(len(df)) >= n_train
    return df

@functools.cache
def text_cls_dls():
    "Rotten Tomatoes fresh/rotten, small vocabulary; the validation DataLoader sorts by length, as fastai's text does"
    blk = DataBlock(blocks=(TextBlock.from_df('text', seq_len=72, min_freq=2, max_vocab=1000, n_workers=1), CategoryBlock),
                    get_x=ColReader('text'), get_y=ColReader('label'), splitter=ColSplitter('is_valid'))
    return blk.dataloaders(_rotten_df(), bs=24, seq_len=72, num_workers=0)

@functools.cache
def text_lm_dls():
    "Rotten Tomatoes as one token stream for a language model: 8 rows of 12 tokens per batch, ~200-token vocabulary"
    df = _rotten_df(256, 12)
    blk = DataBlock(blocks=TextBlock.from_df('text', is_lm=True, seq_len=12, min_freq=2, max_vocab=200, n_workers=1),
                    get_x=ColReader('text'), splitter=ColSplitter('is_valid'))
    return blk.dataloaders(df, bs=8, seq_len=12, num_workers=0)

def adult_dls(n=800, seed=0, bs=24):
    df = adult_census(n, seed=seed)
    df = pd.concat([df[~df.is_valid].iloc[:256], df[df.is_valid].iloc[:48]]).reset_index(drop=True)
    return TabularDataLoaders.from_df(df, y_names='loan', cat_names=df.attrs['cat_names'], cont_names=df.attrs['cont_names'],
                                      procs=[Categorify, FillMissing, Normalize], valid_idx=list(df.index[df.is_valid]),
                                      bs=bs, num_workers=0)

def diabetes_dls():
    df = diabetes_df()
    return TabularDataLoaders.from_df(df, y_names='target', cont_names=df.attrs['cont_names'], procs=[Normalize],
                                      valid_idx=list(range(0, len(df), 9)), bs=32, num_workers=0)

# ------------------------------------------------------------------------------------------------------------------
# models a user brings

class TransformerTextClassifier(Module):
    "Embedding, `nn.TransformerEncoder` (dropout 0.3 in the layers and the attention), mean pooling, linear head"
    def __init__(self, vocab_sz, d=16):
        self.emb = nn.Embedding(vocab_sz, d, padding_idx=1)
        layer = nn.TransformerEncoderLayer(d_model=d, nhead=2, dim_feedforward=32, dropout=0.3, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 2)
    def forward(self, x): return self.head(self.enc(self.emb(x)).mean(1))

class LSTMRowsClassifier(Module):
    "A digit's 32 pixel rows as a sequence: 2-layer `nn.LSTM` whose only dropout is its own `dropout=0.3` between layers"
    def __init__(self):
        self.lstm = nn.LSTM(32, 32, num_layers=2, dropout=0.3, batch_first=True)
        self.head = nn.Linear(32, 10)
    def forward(self, x):
        out, _ = self.lstm((x.as_subclass(Tensor).mean(1) - 0.13) / 0.31)   # MNIST pixel mean and std
        return self.head(out[:, -1])

class FunctionalDropoutNet(Module):
    "Its only dropout is functional, gated by the model's own `training` flag"
    def __init__(self): self.l1, self.l2 = nn.Linear(3*32*32, 32), nn.Linear(32, 10)
    def forward(self, x):
        h = F.relu(self.l1(x.as_subclass(Tensor).flatten(1)))
        return self.l2(F.dropout(h, 0.3, training=self.training))

class BypassedDropoutNet(Module):
    "Has an `nn.Dropout` module, but the forward applies `F.dropout` with its `p` instead of calling it"
    def __init__(self): self.l1, self.drop, self.l2 = nn.Linear(3*32*32, 32), nn.Dropout(0.3), nn.Linear(32, 10)
    def forward(self, x):
        h = F.relu(self.l1(x.as_subclass(Tensor).flatten(1)))
        return self.l2(F.dropout(h, self.drop.p, training=self.training))

def _small_awd(cfg, **kw): return {**cfg, 'emb_sz': 32, 'n_hid': 32, 'n_layers': 2, **kw}

# Each row: how to build the (barely) trained learner, and the activation of one pass ('softmax', 'sigmoid', 'identity')
def _resnet18():
    with no_random(0): learn = vision_learner(mnist_dls(), resnet18, pretrained=False, ps=0.5)
    return fit_quietly(learn, 1, 1e-2)

def _vit():
    with no_random(0):
        # ps=0.1: with fastai's default head dropout (0.5) the head's randomness dwarfs the body's (attention dropout,
        # stochastic depth), and a sampler that leaves those off would pass unnoticed (checked: 6% of the spread)
        learn = vision_learner(mnist_dls(), 'vit_tiny_patch16_224', pretrained=False, img_size=32, patch_size=8, depth=3,
                               drop_rate=0.1, attn_drop_rate=0.2, drop_path_rate=0.1, ps=0.1)
    return fit_quietly(learn, 1, 1e-3)

def _convnext():
    # timm's layer scale starts at 1e-6, so in a barely trained ConvNeXt the residual branches, and the DropPath on them,
    # hardly reach the output; ls_init_value=1 makes them count as in a trained one. ps=0.1: see `_vit`
    with no_random(0):
        learn = vision_learner(mnist_dls(), 'convnext_atto', pretrained=False, drop_path_rate=0.2, ls_init_value=1., ps=0.1)
    return fit_quietly(learn, 1, 1e-3)

def _transformer_text():
    dls = text_cls_dls()
    with no_random(0): learn = Learner(dls, TransformerTextClassifier(len(dls.vocab[0])), loss_func=CrossEntropyLossFlat())
    return fit_quietly(learn, 1, 1e-2)

def _awd_lstm_clas():
    with no_random(0):
        learn = text_classifier_learner(text_cls_dls(), AWD_LSTM, drop_mult=0.5, pretrained=False,
                                        config=_small_awd(awd_lstm_clas_config))
    return fit_quietly(learn, 1, 1e-2)

def _awd_lstm_lm():
    with no_random(0):
        learn = language_model_learner(text_lm_dls(), AWD_LSTM, drop_mult=0.5, pretrained=False,
                                       config=_small_awd(awd_lstm_lm_config))
    return fit_quietly(learn, 1, 1e-2)

def _tabular_clas():
    with no_random(0):
        learn = tabular_learner(adult_dls(), layers=[50, 20], config=tabular_config(ps=[0.1, 0.1], embed_p=0.1))
    return fit_quietly(learn, 1, 1e-2)

def _tabular_reg():
    with no_random(0):
        learn = tabular_learner(diabetes_dls(), layers=[64, 32], y_range=(0, 400), config=tabular_config(ps=[0.2, 0.1]))
    return fit_quietly(learn, 2, 1e-2)

def _multilabel():
    with no_random(0): learn = vision_learner(mnist_multilabel_dls(), tiny_cnn, pretrained=False, ps=0.5)
    return fit_quietly(learn, 1, 1e-2)

def _custom_lstm():
    with no_random(0): learn = Learner(mnist_dls(), LSTMRowsClassifier(), loss_func=CrossEntropyLossFlat())
    return fit_quietly(learn, 2, 3e-2)   # less and its predictions are so flat that the passes hardly differ

def _bayes_cnn():
    "A small CNN trained as usual, then every conv and linear layer made variational with a posterior σ of 0.05"
    with no_random(0): learn = vision_learner(mnist_dls(), tiny_cnn, pretrained=False, ps=0.)
    fit_quietly(learn, 1, 1e-2)
    bayesianize(learn, sigma_init=0.05)
    assert len(bayes_layers(learn.model)) >= 5 and not [m for m in learn.model.modules() if isinstance(m, nn.Dropout) and m.p > 0]
    return learn

class ColourMixBayes(Module):
    "A learned 3-to-1 colour mix (1×1 conv) in front of a small CNN"
    def __init__(self):
        self.mix = nn.Conv2d(3, 1, 1, bias=False)
        self.body = nn.Sequential(ConvLayer(1, 16, stride=2), ConvLayer(16, 32, stride=2), nn.AdaptiveAvgPool2d(1), Flatten())
        self.head = nn.Linear(32, 10)
    def forward(self, x): return self.head(self.body(self.mix(x)))

def _bayes_colour_mix():
    """Only the 1×1 colour mix made variational (σ 0.2): three weights feed each output, so replicates that share one
    Flipout weight sample (only the signs differ) have visibly the wrong spread; in `_bayes_cnn` the many weights per
    output hide that (the sign flips make shared-sample replicates nearly independent)"""
    with no_random(0): learn = Learner(mnist_dls(), ColourMixBayes(), loss_func=CrossEntropyLossFlat())
    fit_quietly(learn, 1, 1e-2)
    bayesianize(learn, names=r'^mix$', sigma_init=0.2)
    return learn

ROWS = dict(
    resnet18=(_resnet18, 'softmax'), timm_vit=(_vit, 'softmax'), timm_convnext=(_convnext, 'softmax'),
    transformer_text=(_transformer_text, 'softmax'), awd_lstm_clas=(_awd_lstm_clas, 'softmax'),
    awd_lstm_lm=(_awd_lstm_lm, 'softmax'), tabular_clas=(_tabular_clas, 'softmax'), tabular_reg=(_tabular_reg, 'identity'),
    multilabel=(_multilabel, 'sigmoid'), custom_lstm=(_custom_lstm, 'softmax'), bayes_cnn=(_bayes_cnn, 'softmax'),
    bayes_colour_mix=(_bayes_colour_mix, 'softmax'))
TIMM_ROWS = {'timm_vit', 'timm_convnext'}
STATEFUL_ROWS = {'awd_lstm_lm'}
params = [pytest.param(k, marks=needs_timm) if k in TIMM_ROWS else k for k in ROWS]

@functools.cache
def learner(row):
    learn = ROWS[row][0]()
    learn.model.eval()   # as fastai's own validation leaves it
    return learn

def valid_dl(row):
    "The row's validation DataLoader; for the language model one whose batches all have the same sequence length"
    dl = learner(row).dls.valid
    if row not in STATEFUL_ROWS: return dl
    # LMDataLoader's last batch is shorter when the stream does not split evenly: pick a batch size and length that do
    for bs, sl in itertools.product(range(8, 3, -1), range(14, 5, -1)):
        new = dl.new(bs=bs, seq_len=sl)
        if new.last_len == sl and new.n_batches >= 3: return new
    raise AssertionError('test setup: no even split of the language-model validation stream')

# ------------------------------------------------------------------------------------------------------------------
# the independent reference: one pass per forward, only REF_TYPES in train mode

def _pred(out): return out[0] if isinstance(out, (tuple, list)) else out

def _act(out, kind):
    out = out.detach().float()
    return F.softmax(out, -1) if kind == 'softmax' else torch.sigmoid(out) if kind == 'sigmoid' else out

def _awd(model): return next((m for m in model.modules() if isinstance(m, AWD_LSTM)), None)

def _hidden_of(awd):
    return ([tuple(h.clone() for h in hc) for hc in awd.hidden], awd.bs)

def _set_hidden(awd, state):
    hidden, bs = state
    awd.hidden, awd.bs = [tuple(h.clone() for h in hc) for hc in hidden], bs

def reference_samples(learn, dl, n, seed, kind, stateful=False):
    """n×N×... activated passes, items in dataset order. Stateful (language model): every pass of a batch starts from the
    state at the start of the batch; after the batch the state is the one the first pass left"""
    model = learn.model
    flags = [(m, m.training) for m in model.modules()]
    outs = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            model.eval()
            for m in model.modules():
                if isinstance(m, REF_TYPES): m.training = True
            awd = _awd(model) if stateful else None
            if stateful: model.reset()
            with torch.enable_grad():
                for b in dl:
                    xb = tuple(o.as_subclass(Tensor) if isinstance(o, Tensor) else o for o in b[:learn.dls.n_inp])
                    start, ps = (_hidden_of(awd) if stateful else None), []
                    for t in range(n):
                        if stateful: _set_hidden(awd, start)
                        ps.append(_act(_pred(model(*xb)), kind))
                        if stateful and t == 0: after_first = _hidden_of(awd)
                    if stateful: _set_hidden(awd, after_first)
                    outs.append(torch.stack(ps))
        finally:
            for m, f in flags: m.training = f
    # a language model's rows are text streams continued from batch to batch: batches join along the sequence (as
    # fastai's `LMLearner.get_preds` does), and there are no items to reorder
    if stateful: return torch.cat(outs, 2)
    res = torch.cat(outs, 1)
    # batches come in the DataLoader's order (text: sorted by length); items back in dataset order, as get_preds does
    return res[:, torch.tensor(dl.get_idxs()).argsort()] if hasattr(dl, 'get_idxs') else res

@functools.cache
def samples(row):
    "(library samples, reference samples, result) of one row, n×N×... each"
    learn, kind, dl = learner(row), ROWS[row][1], valid_dl(row)
    res = learn.mc_predict(dl, N_PASSES, with_samples=True, seed=MC_SEED)
    ref = reference_samples(learn, dl, N_PASSES, REF_SEED, kind, stateful=row in STATEFUL_ROWS)
    return res.samples.as_subclass(Tensor), ref.as_subclass(Tensor), res

# ------------------------------------------------------------------------------------------------------------------
# statistics

def _flat(s): return s.as_subclass(Tensor).reshape(s.shape[0], -1).double()

def spread(s):
    """Mean over items and outputs of the per-item variance across passes, and its standard error. The passes are
    independent, so the per-pass contributions d_t are too: correlated items (one weight mask per forward) are fair"""
    x = _flat(s); n = len(x)
    d = ((x - x.mean(0))**2).mean(1)
    return d.sum().item()/(n-1), (d.std()*math.sqrt(n)/(n-1)).item()

def check_spread(s_mc, s_ref, z_max=4., power=math.log(1.5)):
    "Fails (with a message saying how) unless the two sets of passes have the same mean per-item spread"
    assert s_mc.shape == s_ref.shape, f"samples of shape {tuple(s_mc.shape)}, reference {tuple(s_ref.shape)}"
    (v_mc, se_mc), (v_ref, se_ref) = spread(s_mc), spread(s_ref)
    assert v_ref > 1e-6, f"test setup: the reference's passes hardly differ (mean variance {v_ref:.2e})"
    ratio = v_mc / v_ref
    assert ratio > 0.1, (f"spread ratio {ratio:.3g} (mean per-item variance across passes, library/reference = "
                         f"{v_mc:.3g}/{v_ref:.3g}): replicates share randomness or none is drawn")
    se_log = math.sqrt((se_mc/v_mc)**2 + (se_ref/v_ref)**2)
    assert z_max*se_log < power, f"test setup: too few passes to tell the spread apart (s.e. of log ratio {se_log:.3f})"
    why = ("too little spread: replicates share randomness, or some stochastic module is not switched on / not drawn"
           if ratio < 1 else "too much spread: a module is random that should not be, or passes are not from the model")
    assert abs(math.log(ratio)) <= z_max*se_log, (f"spread ratio {ratio:.3f} (library/reference mean per-item variance "
        f"{v_mc:.4g}/{v_ref:.4g}; allowed ×/÷{math.exp(z_max*se_log):.3f}): {why}")
    return ratio, se_log

def _zscores(sum_a, sq_a, sum_b, sq_b, n, floor=1e-6):
    ma, mb = sum_a/n, sum_b/n
    va, vb = (sq_a - n*ma**2).clamp_min(0)/(n-1), (sq_b - n*mb**2).clamp_min(0)/(n-1)
    return (ma - mb) / ((va + vb)/n + floor**2).sqrt()

def check_means(s_mc, s_ref, n_perm=200, max_cols=20000, seed=0):
    """Per-item, per-output z-scores of the difference of the two means. Bound on mean |z|: 1.3 (E|Z| = 0.8), or higher
    where the outputs are correlated, as permutations of whole passes between the two runs show; max |z| < 6"""
    x, y = _flat(s_mc), _flat(s_ref); n = len(x)
    g = torch.Generator().manual_seed(seed)
    keep = ((x.var(0) + y.var(0)) > 1e-10).nonzero().flatten()
    assert len(keep), "test setup: no output varies across passes"
    if len(keep) > max_cols: keep = keep[torch.randperm(len(keep), generator=g)[:max_cols]]
    x, y = x[:, keep], y[:, keep]
    z = _zscores(x.sum(0), (x**2).sum(0), y.sum(0), (y**2).sum(0), n)
    pool = torch.cat([x, y]); tot, tot2 = pool.sum(0), (pool**2).sum(0)
    w = torch.zeros(n_perm, 2*n, dtype=torch.float64)
    for i in range(n_perm): w[i, torch.randperm(2*n, generator=g)[:n]] = 1.
    sa, qa = w @ pool, w @ pool**2
    null = _zscores(sa, qa, tot - sa, tot2 - qa, n).abs().mean(1)
    bound = max(1.3, (null.mean() + 6*null.std()).item())
    mz, i = z.abs().max(0)
    col = keep[i].item()
    where = (f"output {col} (flat): library mean {x[:, i].mean().item():.4g} ± {x[:, i].std().item():.3g}, "
             f"reference {y[:, i].mean().item():.4g} ± {y[:, i].std().item():.3g}")
    assert z.abs().mean() < bound, (f"means differ: mean |z| = {z.abs().mean().item():.2f} over {len(keep)} outputs "
                                    f"(bound {bound:.2f}); worst {where}")
    assert mz < 6, f"means differ: max |z| = {mz.item():.1f}; {where}"
    return z.abs().mean().item(), bound

# ------------------------------------------------------------------------------------------------------------------
# state snapshots

def snapshot(model):
    mods = list(model.modules())
    return dict(flags=[m.training for m in mods], attrs=[set(m.__dict__) for m in mods],
                hooks=[(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in mods],
                state={k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
                buffers={k: v.clone() for k, v in model.named_buffers(remove_duplicate=False)},
                params={k: v.detach().clone() for k, v in model.named_parameters(remove_duplicate=False)})

def assert_same_state(before, after, when=''):
    mods = len(before['flags'])
    assert before['flags'] == after['flags'], (f"{when}.training flags changed at module(s) " +
        str([i for i in range(mods) if before['flags'][i] != after['flags'][i]][:10]))
    diff = [(i, after['attrs'][i] ^ before['attrs'][i]) for i in range(mods) if before['attrs'][i] != after['attrs'][i]]
    assert not diff, f"{when}attributes added to or removed from modules: {diff[:5]}"
    assert before['hooks'] == after['hooks'], f"{when}hooks left on modules"
    for k in ('state', 'buffers', 'params'):
        assert before[k].keys() == after[k].keys(), f"{when}{k} keys changed"
        bad = [n for n in before[k] if not torch.equal(before[k][n], after[k][n])]
        assert not bad, f"{when}{k} changed (not bit-identical): {bad[:5]}"

def _inner_module(model):
    "A module inside the sampled part: the last leaf that has parameters"
    return [m for m in model.modules() if not list(m.children()) and list(m.parameters(recurse=False))][-1]

# ------------------------------------------------------------------------------------------------------------------
# the suite

@pytest.mark.parametrize('row', params)
def test_spread_matches_reference(row):
    "(a) same mean per-item spread across passes as one-pass-per-forward with every dropout-like module on"
    s_mc, s_ref, _ = samples(row)
    check_spread(s_mc, s_ref)

@pytest.mark.parametrize('row', params)
def test_means_match_reference(row):
    "(b) per-item mean predictions agree with the reference within Monte Carlo error"
    s_mc, s_ref, res = samples(row)
    assert torch.allclose(s_mc.mean(0), res.mean, atol=1e-5), "res.mean is not the mean of res.samples"
    check_means(s_mc, s_ref)

@pytest.mark.parametrize('row', params)
def test_state_restored(row):
    "(c) flags, state_dict, buffers, attributes bit-identical after mc_predict, and after an exception mid-pass"
    learn, dl = learner(row), valid_dl(row)
    model = learn.model
    before = snapshot(model)
    learn.mc_predict(dl, 3, seed=0)
    assert_same_state(before, snapshot(model), 'after mc_predict: ')
    calls = []
    def boom(m, i, o):
        calls.append(1)
        if len(calls) == 3: raise RuntimeError('injected failure mid-pass')
    h = _inner_module(model).register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match='injected failure'): learn.mc_predict(dl, 5, seed=0, max_bs=dl.bs)
    finally: h.remove()
    assert len(calls) == 3
    assert_same_state(before, snapshot(model), 'after an exception mid-pass: ')

def test_language_model_passes_start_from_the_same_state():
    """(c) for the stateful row: within a batch all passes start from one hidden state; the next batch starts from the
    state the first pass left; afterwards the hidden state is what fastai's own `get_preds` leaves (ModelResetter)"""
    learn, dl = learner('awd_lstm_lm'), valid_dl('awd_lstm_lm'); awd = _awd(learn.model)
    with learn.no_bar(): learn.get_preds(dl=dl, reorder=False)   # (fastai's LM get_preds can't reorder: concat_dim=1)
    expected_end = _hidden_of(awd)
    calls = []
    def pre(m, args): calls.append(dict(x=args[0].clone(), start=_hidden_of(m)))
    def post(m, args, out): calls[-1]['end'] = _hidden_of(m)
    hs = [awd.register_forward_pre_hook(pre), awd.register_forward_hook(post)]
    try: learn.mc_predict(dl, 6, seed=0, reorder=False)
    finally:
        for h in hs: h.remove()
    groups = []
    for c in calls:
        if groups and groups[-1][0]['x'].shape == c['x'].shape and torch.equal(groups[-1][0]['x'], c['x']): groups[-1].append(c)
        else: groups.append([c])
    assert len(groups) == len(dl), f"{len(calls)} calls of AWD_LSTM in {len(groups)} groups for {len(dl)} batches"
    def same(a, b): return a[1] == b[1] and all(torch.equal(p, q) for hp, hq in zip(a[0], b[0]) for p, q in zip(hp, hq))
    for k, g in enumerate(groups):
        assert len(g) == 6, f"batch {k}: {len(g)} forwards of AWD_LSTM for 6 passes"
        bad = [t for t in range(1, len(g)) if not same(g[0]['start'], g[t]['start'])]
        assert not bad, f"batch {k}: passes {bad} do not start from the hidden state the first pass started from"
        if k: assert same(groups[k-1][0]['end'], g[0]['start']), \
            f"batch {k} does not start from the state the first pass of batch {k-1} left"
    assert same(_hidden_of(awd), expected_end), "hidden state after mc_predict differs from what get_preds leaves"

def test_language_model_default_call():
    """`learn.mc_predict()`, defaults, on a language model's own validation DataLoader (its last batch has shorter
    sequences, LMDataLoader's usual case; fastai's text `get_preds` concatenates along the sequence): no crash, every
    token predicted"""
    learn = learner('awd_lstm_lm'); dl = learn.dls.valid
    assert dl.last_len != dl.seq_len   # the case tested
    res = learn.mc_predict(n=3, seed=0)
    n_tok = dl.bs * ((dl.n_batches - 1)*dl.seq_len + dl.last_len)
    assert sum(o.numel() for o in (res.mean if is_listy(res.mean) else [res.mean])) == n_tok * len(learn.dls.vocab)

# rows that must be refused -------------------------------------------------------------------------------------------

def _refusal_learner(model_cls):
    with no_random(0): learn = Learner(mnist_dls(), model_cls(), loss_func=CrossEntropyLossFlat())
    learn.model.eval()
    return learn

@pytest.mark.parametrize('model_cls', [FunctionalDropoutNet, BypassedDropoutNet], ids=['functional_dropout', 'bypassed_dropout_module'])
def test_unseen_dropout_is_refused(model_cls):
    """Dropout the library cannot switch on (functional, gated by the model's own flag; or a module that is switched on
    but never called) would give n identical passes: an error naming `register_stochastic`, nothing changed"""
    learn = _refusal_learner(model_cls)
    before = snapshot(learn.model)
    try: res = learn.mc_predict(learn.dls.valid, 10, with_samples=True, seed=0)
    except (ValueError, RuntimeError) as e:
        assert re.search('register_stochastic', str(e)), f"refused, but the message does not name the fix: {e}"
    else: pytest.fail(f"mc_predict returned a result (largest std across passes {res.std.max().item():.2e}) instead of "
                      "refusing: its uncertainty would be a silent, wrong zero")
    assert_same_state(before, snapshot(learn.model), 'after the refusal: ')

# the checks themselves can fail ----------------------------------------------------------------------------------

def test_checks_have_power():
    "Two independent reference runs pass; no randomness, shrunk spread, and shifted means fail"
    learn = learner('tabular_clas'); dl = learn.dls.valid
    a = reference_samples(learn, dl, N_PASSES, 10, 'softmax')
    b = reference_samples(learn, dl, N_PASSES, 11, 'softmax')
    check_spread(a, b); check_means(a, b)
    with pytest.raises(AssertionError, match='share randomness or none'): check_spread(b[:1].expand_as(b), a)
    shrunk = b.mean(0) + (b - b.mean(0))*math.sqrt(0.7)
    with pytest.raises(AssertionError, match='too little spread'): check_spread(shrunk, a)
    shifted = b + 0.5*b.std(0)
    with pytest.raises(AssertionError, match='means differ'): check_means(shifted, a)
    tiled = b[::25].repeat_interleave(25, 0)   # 4 independent draws, each repeated 25 times
    with pytest.raises(AssertionError): check_spread(tiled, a); check_means(tiled, a)
