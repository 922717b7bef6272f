"""Active learning: the acquisition order against the scores, seeded random and power sampling, BatchBALD against brute
force, the errors, and the loop continuing from its state file. Plain pytest, so it runs on the newest fastai too."""
import itertools, json, math, pytest, torch, numpy as np, pandas as pd
from fastai.vision.all import *
from fastai_bayes.all import *
from fastai_bayes.datasets import mnist_sample, MNIST_CLASSES
from fastai_bayes.uncertainty import mutual_information
from fastai_bayes.active import *

from _helpers import fit_quietly as _fit, tiny_cnn

@pytest.fixture(scope='module')
def data():
    df = mnist_sample(600, seed=0)
    path = df.attrs['path']
    valid_df = df[df.is_valid].reset_index(drop=True)
    pool_df = df[~df.is_valid].reset_index(drop=True)
    truth = pool_df.label.to_numpy()
    dblock = DataBlock(blocks=(ImageBlock, CategoryBlock(vocab=MNIST_CLASSES)), get_x=ColReader('fname', pref=f'{path}/'),
                       get_y=ColReader('label'), splitter=ColSplitter('is_valid'))
    def dls_fn(labelled): return dblock.dataloaders(pd.concat([labelled.assign(is_valid=False), valid_df]), bs=32, num_workers=0)
    return pool_df.drop(columns='label'), truth, dls_fn

@pytest.fixture(scope='module')
def learn(data):
    pool_df, truth, dls_fn = data
    with no_random(0): learn = vision_learner(dls_fn(pool_df.iloc[:100].assign(label=truth[:100])), tiny_cnn,
                                              pretrained=False, metrics=accuracy)
    return _fit(learn, 3, 1e-2)

@pytest.fixture(scope='module')
def pool_dl(learn, data): return learn.dls.test_dl(data[0].iloc[100:])   # 380 digits

def _ref_order(s, k): return torch.sort(s, descending=True, stable=True).indices[:k]

@pytest.mark.parametrize('score,name', [('bald', 'mutual_info'), ('entropy', 'entropy'),
                                        ('variation_ratio', 'variation_ratio'), ('margin', 'margin')])
def test_topk_is_argsort_of_scores(learn, pool_dl, score, name):
    res = learn.mc_predict(pool_dl, n=10, seed=0)
    idx = learn.acquire(pool_dl, 25, score=score, n=10, seed=0)
    assert torch.equal(idx, _ref_order(res.score(name), 25))
    s = res.score(name)
    assert (s[idx][:-1] >= s[idx][1:]).all() and s[idx].min() >= s.sort(descending=True).values[24]
    if name in ('mutual_info', 'entropy'):   # and the score itself against an independent computation from the passes
        r2 = learn.mc_predict(pool_dl, n=10, seed=0, with_samples=True)
        p = r2.samples.double(); pm = p.mean(0)
        ent = -(pm * pm.clamp_min(1e-30).log()).sum(1)
        ref = ent if name == 'entropy' else ent + (p * p.clamp_min(1e-30).log()).sum(2).mean(0)
        assert torch.allclose(s.double(), ref.clamp_min(0), atol=1e-4)

def test_items_and_shuffled_dl(learn, pool_dl, data):
    idx = learn.acquire(pool_dl, 10, seed=0, n=10)
    assert torch.equal(learn.acquire(data[0].iloc[100:], 10, seed=0, n=10), idx)   # items: the same test_dl
    # a shuffled DataLoader: other draws, still dataset-order indices (picks high on BALD measured without shuffling)
    r = learn.mc_predict(pool_dl, n=100, seed=1)
    assert r.mutual_info[learn.acquire(pool_dl.new(shuffle=True), 10, n=100, seed=0)].mean() > r.mutual_info.quantile(0.9)

def test_random_seeded_subset(learn, pool_dl):
    a,b = learn.acquire(pool_dl, 40, 'random', seed=3),learn.acquire(pool_dl, 40, 'random', seed=3)
    assert torch.equal(a, b) and len(set(a.tolist())) == 40 and 0 <= a.min() and a.max() < 380
    assert torch.equal(a, torch.randperm(380, generator=torch.Generator().manual_seed(3))[:40])
    assert not torch.equal(a, learn.acquire(pool_dl, 40, 'random', seed=4))
    full = learn.acquire(pool_dl, 380, 'random', seed=0)
    assert sorted(full.tolist()) == list(range(380))   # k = pool size: a permutation

def test_power_sampling(learn, pool_dl):
    res = learn.mc_predict(pool_dl, n=10, seed=0)
    top = learn.acquire(pool_dl, 20, n=10, seed=0)
    assert torch.equal(learn.acquire(pool_dl, 20, n=10, seed=0, beta=1e12), top)   # β→∞: top-k
    assert torch.equal(acquire_from(res, 20, 'bald', beta=1e12, seed=5), top)
    pw = learn.acquire(pool_dl, 20, n=10, seed=0, beta=1.)
    assert len(set(pw.tolist())) == 20 and not torch.equal(pw, top)
    assert torch.equal(pw, learn.acquire(pool_dl, 20, n=10, seed=0, beta=1.))   # seeded
    # β=1: first-pick frequencies against P ∝ score, over seeds
    s = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    picks = torch.cat([power_sample(s, 1, 1., seed=i) for i in range(20000)])
    assert torch.allclose(torch.bincount(picks, minlength=5) / 20000., s / s.sum(), atol=0.015)
    # β=2: P ∝ score²
    picks = torch.cat([power_sample(s, 1, 2., seed=i) for i in range(20000)])
    assert torch.allclose(torch.bincount(picks, minlength=5) / 20000., s**2 / (s**2).sum(), atol=0.015)

def _brute_joint_mi(p, idx):
    "Joint mutual information of items `idx` by summing over every label configuration with plain loops"
    T,_,C = p.shape
    H = 0.
    for ys in itertools.product(range(C), repeat=len(idx)):
        P = sum(math.prod(float(p[t, i, y]) for i,y in zip(idx, ys)) for t in range(T)) / T
        if P > 0: H -= P * math.log(P)
    cond = sum(-sum(float(p[t, i, c]) * math.log(float(p[t, i, c])) for c in range(C)) for t in range(T) for i in idx) / T
    return H - cond

def test_batchbald_brute_force():
    g = torch.Generator().manual_seed(0)
    p = (torch.randn(5, 8, 3, generator=g) * 2).softmax(-1)
    chosen = []
    for _ in range(3):
        cand = [j for j in range(8) if j not in chosen]
        chosen.append(max(cand, key=lambda j: _brute_joint_mi(p, chosen + [j])))
    assert batchbald(p, 3).tolist() == chosen
    assert math.isclose(float(joint_mutual_info(p[:, chosen])), _brute_joint_mi(p, chosen), rel_tol=1e-9)
    assert int(batchbald(p, 1)[0]) == int(mutual_information(p).argmax())
    with pytest.raises(ValueError, match='power sampling'): batchbald(torch.rand(3, 6, 10).softmax(-1), 5)

def test_batchbald_on_learner(learn, pool_dl):
    res = learn.mc_predict(pool_dl, n=10, seed=0, with_samples=True)
    bb = learn.acquire(pool_dl, 3, 'batchbald', n=10, seed=0)
    assert torch.equal(bb, batchbald(res.samples, 3))
    assert int(bb[0]) == int(_ref_order(res.mutual_info, 1)[0])

def test_errors(learn, pool_dl):
    flags = [m.training for m in learn.model.modules()]
    with pytest.raises(ValueError, match='at most 380'): learn.acquire(pool_dl, 381)
    with pytest.raises(ValueError, match='at least 1'): learn.acquire(pool_dl, 0)
    with pytest.raises(ValueError, match='at least 1'): learn.acquire(pool_dl, -3, 'random')
    with pytest.raises(TypeError, match='must be an int'): learn.acquire(pool_dl, 2.0)
    with pytest.raises(ValueError, match='Unknown score'): learn.acquire(pool_dl, 5, score='curiosity')
    with pytest.raises(ValueError, match='> 0'): learn.acquire(pool_dl, 5, beta=-1.)
    with pytest.raises(TypeError, match='one DataLoader'): learn.acquire(learn.dls, 5)
    assert [m.training for m in learn.model.modules()] == flags
    with no_random(0): nodrop = vision_learner(learn.dls, tiny_cnn, pretrained=False, ps=0)
    with pytest.raises(ValueError, match=r'drew no random number.*ps'): nodrop.acquire(pool_dl, 5)
    assert len(nodrop.acquire(pool_dl, 5, 'random', seed=0)) == 5

def _loop(data, f, score='bald', **kw):
    pool_df, truth, dls_fn = data
    def learner_fn(dls): return vision_learner(dls, tiny_cnn, pretrained=False, metrics=accuracy)
    return ActiveLoop(pool_df.iloc[:300], dls_fn, learner_fn, lambda rows: truth[rows.index], k=10, n_init=20,
                      score=score, epochs=2, n=5, seed=0, state_file=f, **kw)

def test_loop_resumes(data, tmp_path):
    straight = _loop(data, tmp_path/'a.json')
    h = straight.run(2)
    assert h.n_labels.tolist() == [20, 30, 40] and h['round'].tolist() == [0, 1, 2]
    assert len(set(straight.labelled)) == 40 and straight.labels == data[1][straight.labelled].tolist()
    st = json.loads((tmp_path/'a.json').read_text())
    assert st['labelled'] == straight.labelled and len(st['history']) == 3
    # stopped after round 1, then a new loop on the same file: the same picks and the same history as without a stop
    first = _loop(data, tmp_path/'b.json'); first.run(1)
    assert len(first.labelled) == 30
    again = _loop(data, tmp_path/'b.json')
    assert again.labelled == first.labelled and len(again.rows) == 2
    h2 = again.run(2)
    assert again.labelled == straight.labelled
    pd.testing.assert_frame_equal(h2, h)
    with pytest.raises(ValueError, match='delete the file'): _loop(data, tmp_path/'b.json', score='entropy')
    tab = curve_table(pd.concat([h, h2.assign(seed=1)]))
    assert math.isclose(tab[('bald', 'mean')].loc[40], h.accuracy.iloc[2], rel_tol=1e-9)
    # the picks after round 0 are BALD's top 10 of the unlabelled rows under round 0's learner
    c = _loop(data, None); c.run(0)
    un = c.unlabelled()
    res = c.learn.mc_predict(c.learn.dls.test_dl(data[0].iloc[un]), n=5, seed=c._seed(0))
    assert straight.labelled[20:30] == un[_ref_order(res.mutual_info, 10).numpy()].tolist()
