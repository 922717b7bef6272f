"Deep ensembles through the MC API, on sklearn's digits (plain pytest: runs on the newest fastai too)."
import pytest, torch
from fastai.tabular.all import *
from fastai_bayes.all import *

@pytest.fixture(scope='module')
def ens():
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    df = pd.DataFrame(X/16., columns=[f'px{i}' for i in range(64)]).assign(label=y.astype(str))
    to = TabularPandas(df, procs=[], cont_names=list(df.columns[:64]), y_names='label', y_block=CategoryBlock(),
                       splits=RandomSplitter(0.25, seed=0)(range_of(df)))
    dls = to.dataloaders(bs=128)
    e = Ensemble.from_fn(lambda i: tabular_learner(dls, layers=[32], config=tabular_config(ps=[0.2], bn_cont=False)), k=3)
    for l in e.learners:
        with no_random(0), l.no_bar(), l.no_logging(): l.fit_one_cycle(2, 1e-2)
    return e

def test_mean_of_members_and_samples(ens):
    res = ens.mc_predict(with_samples=True)
    members = torch.stack([l.get_preds()[0] for l in ens.learners])
    assert res.n == 3 and torch.allclose(res.samples, members, atol=1e-6)
    assert torch.allclose(res.probs, members.mean(0), atol=1e-6)
    assert not torch.allclose(members[0], members[1], atol=1e-3)         # members differ
    assert torch.allclose(res.mutual_info, mutual_information(members), atol=1e-5)
    assert torch.allclose(ens.mc_predict(offload=True).probs, res.probs)   # members moved one at a time: same numbers

def test_mc_inside_members_and_metrics(ens):
    res = ens.mc_predict(n=4, seed=0)
    assert res.n == 12 and 0 <= res.ece().item() <= 1
    assert (res.mutual_info >= 0).all() and (res.mutual_info <= res.entropy + 1e-5).all()

def test_bad_ensembles(ens):
    with pytest.raises(ValueError, match='at least one learner'): Ensemble([])
    with pytest.raises(ValueError, match='int >= 1'): ens.mc_predict(n=0)
