"""Post-hoc last-layer Laplace (`Learner.laplace`) against independent computations: the GGN by autograd, Bayesian
linear regression in closed form, the probit integral by Monte Carlo. Plain pytest, so it runs on the newest fastai too."""
import math, copy as pycopy, pytest, torch, numpy as np
from torch.autograd.functional import jacobian, hessian
from fastai.vision.all import *
from fastai.tabular.all import *
from fastai_bayes.all import *
from fastai_bayes.laplace import *
from fastai_bayes.sampling import model_stages

from _helpers import fit_quietly as _fit, tiny_cnn, mnist_dls, adult_dls

@pytest.fixture(scope='module')
def adult():
    dls = adult_dls(800, bs=128)
    df = adult_census(800, seed=0)
    with no_random(0): learn = tabular_learner(dls, layers=[16], config=tabular_config(ps=[0.2]), metrics=accuracy)
    return df, _fit(learn, 2)

@pytest.fixture(scope='module')
def mnist():
    dls = mnist_dls(400)
    with no_random(0): learn = vision_learner(dls, tiny_cnn, pretrained=False, metrics=accuracy)
    return _fit(learn, 2, 2e-2)

def _features(model, dl):
    "Last-layer inputs computed independently: every stage of the model but the last, in eval mode"
    stages = model_stages(model)
    assert isinstance(stages[-1], nn.Linear)
    phis, ys = [], []
    model.eval()
    with torch.no_grad():
        for b in dl:
            x = stages[0](*b[:dl.n_inp])
            for s in stages[1:-1]: x = s(x)
            phis.append(x.double()); ys.append(b[dl.n_inp].flatten().long())
    return torch.cat(phis), torch.cat(ys), stages[-1]

def test_full_ggn_is_jt_h_j_by_autograd(adult):
    df, learn = adult
    dl = learn.dls.test_dl(df.iloc[:150], with_labels=True)
    la = learn.laplace('full', prior_precision=1., dl=dl, bar=False)
    phi, y, lin = _features(learn.model, dl)
    W, b = lin.weight.detach().double(), lin.bias.detach().double()
    C, D = W.shape
    theta = torch.cat([W, b[:, None]], 1).flatten()
    ref = torch.zeros(len(theta), len(theta), dtype=torch.float64)
    for p, t in zip(phi, y):
        out = lambda th: th.view(C, D+1)[:, :D] @ p + th.view(C, D+1)[:, D]
        J = jacobian(out, theta)                                                   # C×P
        H = hessian(lambda z: F.cross_entropy(z[None], t[None]), out(theta))      # C×C
        ref += J.T @ H @ J
    # the model's outputs are float32: agreement to ~1e-7 of the largest entry, not to float64 precision
    assert torch.allclose(la.H, ref, atol=1e-6, rtol=1e-5)
    assert torch.allclose(la.theta(), theta)
    # diag is the diagonal of full; the posterior precision is H + δI
    ld = learn.laplace('diag', prior_precision=1., dl=dl, bar=False)
    assert torch.allclose(ld.H, ref.diagonal(), atol=1e-6, rtol=1e-5)
    assert torch.allclose(la.posterior_precision(2.), ref + 2*torch.eye(len(ref), dtype=ref.dtype), atol=1e-6, rtol=1e-5)
    # kron is exact for one item
    dl1 = learn.dls.test_dl(df.iloc[:1], with_labels=True)
    lk = learn.laplace('kron', prior_precision=1., dl=dl1, bar=False)
    l1 = learn.laplace('full', prior_precision=1., dl=dl1, bar=False)
    assert torch.allclose(lk.posterior_precision(), l1.posterior_precision(), atol=1e-10)

def test_one_class_per_structure(adult):
    "`LastLayerLaplace(learn, structure)` and `learn.laplace(structure)` make the structure's subclass; a subclass fits alone"
    df, learn = adult
    dl = learn.dls.test_dl(df.iloc[:100], with_labels=True)
    for s, cls in (('full', FullLaplace), ('kron', KronLaplace), ('diag', DiagLaplace)):
        la = learn.laplace(s, prior_precision=2., dl=dl, bar=False)
        assert type(la) is cls and isinstance(la, LastLayerLaplace) and la.structure == s
        assert type(LastLayerLaplace(learn, structure=s)) is cls and type(pycopy.copy(la)) is cls
        own = cls(learn).fit(dl, bar=False)
        own.prior_precision = 2.
        assert torch.equal(own.posterior_precision(), la.posterior_precision())
        assert torch.equal(own.log_marglik(), la.log_marglik())
    assert type(LastLayerLaplace(learn)) is KronLaplace                  # the default structure
    with pytest.raises(ValueError, match="KronLaplace has structure 'kron', not 'diag'"): KronLaplace(learn, 'diag')
    with pytest.raises(ValueError, match="structure must be"): LastLayerLaplace(learn, 'block')

def test_tabular_predictions(adult):
    df, learn = adult
    la = learn.laplace('full', bar=False)
    ml = la.log_marglik(la.prior_precision * torch.tensor([0.8, 1., 1.25], dtype=torch.float64))
    assert ml[1] >= ml[0] and ml[1] >= ml[2]                       # 'marglik' picked a maximum
    res = la.mc_predict(n=2000, seed=0, with_samples=True)
    assert res.samples.shape == (2000, len(res), 2) and res.n == 2000
    # the MC mean is the mean of the draws, which are softmax(f) with f ~ N(f*, J Σ J^T): check f's moments per item
    xb = learn.dls.valid.one_batch()[:2]
    out, f, fvar = la.forward(xb)
    assert torch.allclose(f.float(), learn.model.eval()(*xb), atol=1e-5)
    phi, _, _ = _features(learn.model, learn.dls.valid.new(shuffle=False))
    phi1 = torch.cat([phi, torch.ones(len(phi), 1, dtype=phi.dtype)], 1)
    Sigma = torch.linalg.inv(la.posterior_precision())
    C, D = 2, phi1.shape[1]
    J = torch.stack([torch.kron(torch.eye(C, dtype=phi.dtype), p[None]) for p in phi1[:len(f)]])
    assert torch.allclose(fvar, J @ Sigma @ J.transpose(1, 2), atol=1e-8, rtol=1e-5)
    # more prior precision, less spread; δ → ∞ gives back the MAP predictions
    map_probs = learn.get_preds()[0]
    la.prior_precision = 1e12
    assert torch.allclose(la.mc_predict(n=5, seed=0).probs, map_probs, atol=1e-4)
    assert torch.allclose(la.mc_predict(n=5, link_approx='probit').probs, map_probs, atol=1e-4)

def test_regression_is_bayesian_linear_regression():
    df = diabetes_df(scaled=True)
    X = torch.tensor(df[df.attrs['cont_names']].values, dtype=torch.float32) * 10
    y = torch.tensor(df.target.values, dtype=torch.float32)[:, None]
    y = (y - y.mean()) / y.std()
    tr, va = list(range(350)), list(range(350, len(df)))
    dls = DataLoaders.from_dsets(list(zip(X[tr], y[tr])), list(zip(X[va], y[va])), bs=64, num_workers=0)
    with no_random(0): learn = Learner(dls, nn.Linear(10, 1), loss_func=MSELossFlat(), lr=1e-2)
    _fit(learn, 2)
    # the exact posterior mean for prior precision δ and noise σ, set as the "trained" weights
    delta, sigma = 3., 0.7
    Xa = torch.cat([X[tr], torch.ones(len(tr), 1)], 1).double()
    P = Xa.T @ Xa / sigma**2 + delta*torch.eye(11, dtype=torch.float64)
    Sigma = torch.linalg.inv(P)
    w = Sigma @ Xa.T @ y[tr].double() / sigma**2
    with torch.no_grad(): learn.model.weight.copy_(w[:10].T); learn.model.bias.copy_(w[10])
    for s in ('full', 'kron', 'diag'):
        la = learn.laplace(s, prior_precision=delta, sigma_noise=sigma, bar=False)
        res = la.mc_predict(link_approx='probit', n=4, seed=0)
        Xv = torch.cat([X[va], torch.ones(len(va), 1)], 1).double()
        assert torch.allclose(res.mean.double().flatten(), (Xv @ w).flatten(), atol=1e-4)
        if s == 'diag': continue
        # predictive std of f: sqrt(x^T Σ x); of y: plus σ²; kron is exact for a Gaussian likelihood
        var = ((Xv @ Sigma) * Xv).sum(1)
        assert torch.allclose(res.std.double().flatten(), var.sqrt(), rtol=1e-4)
        res_y = la.mc_predict(link_approx='probit', n=4, noise=True)
        assert torch.allclose(res_y.std.double().flatten(), (var + sigma**2).sqrt(), rtol=1e-4)
        # at the exact posterior mode the Laplace evidence is the exact one: log N(y; 0, σ²I + X Xᵀ/δ)
        cov = sigma**2*torch.eye(len(tr), dtype=torch.float64) + Xa @ Xa.T / delta
        exact = torch.distributions.MultivariateNormal(torch.zeros(len(tr), dtype=torch.float64), cov).log_prob(y[tr].double().flatten())
        assert la.log_marglik().item() == pytest.approx(exact.item(), rel=1e-6)
    # MC draws of f match the closed form
    la = learn.laplace('full', prior_precision=delta, sigma_noise=sigma, bar=False)
    mc = la.mc_predict(n=4000, seed=0)
    assert torch.allclose(mc.std.double().flatten(), var.sqrt(), rtol=0.06)
    # σ estimated: the RMS of the training residuals
    la = learn.laplace('kron', prior_precision=delta, bar=False)
    assert la.sigma_noise == pytest.approx(((Xa @ w - y[tr].double())**2).mean().sqrt().item(), rel=1e-5)

def test_probit_matches_mc_integral():
    "MacKay's probit: ∫σ(f)N(f; μ, s²) ≈ σ(μ/sqrt(1+πs²/8)), checked against 200k draws"
    torch.manual_seed(0)
    mu, var = torch.tensor([[-2.], [0.3], [1.5], [4.]], dtype=torch.float64), torch.tensor([0.5, 1., 3., 9.], dtype=torch.float64)
    pr = probit(mu, var[:, None, None], OutputKind("sigmoid")).double()
    mc = torch.sigmoid(mu + var.sqrt()[:, None]*torch.randn(200_000, 4, 1, dtype=torch.float64)).mean(0)
    assert torch.allclose(pr, mc, atol=0.02)
    assert not torch.allclose(pr, torch.sigmoid(mu), atol=0.02)   # and it does differ from the plug-in

def test_vision_bias_free_head(mnist):
    learn = mnist
    la = learn.laplace('kron', bar=False)
    assert last_linear(learn.model).bias is None and la.n_in == 512 and la.n_params == 5120
    # features are collected with dropout off: two fits give the same curvature
    la2 = learn.laplace('kron', bar=False)
    assert torch.equal(la.H[0], la2.H[0]) and torch.equal(la.H[1], la2.H[1])
    res = la.mc_predict(n=50, seed=0)
    assert 0 <= res.ece().item() <= 1 and torch.isfinite(res.nll())
    assert (res.mutual_info > 0).all()
    assert torch.allclose(res.probs.sum(1), torch.ones(len(res)), atol=1e-5)
    # probit and MC approximate one integral: close when the output variance is small
    la.prior_precision *= 100
    res, rp = la.mc_predict(n=500, seed=0), la.mc_predict(n=2, link_approx='probit', seed=0)
    assert (res.probs - rp.probs).abs().max() < 0.05   # 0.02–0.03 for models trained from other seeds
    la.prior_precision /= 100
    ld = learn.laplace('diag', prior_precision='val_nll', bar=False)
    assert ld.prior_precision > 0
    # no augmentation while collecting: the same data with random batch augmentation gives the same curvature
    dls = learn.dls
    df = mnist_sample(400, seed=0)
    aug = ImageDataLoaders.from_df(df, df.attrs['path'], fn_col='fname', label_col='label', valid_col='is_valid',
                                   bs=64, num_workers=0, batch_tfms=aug_transforms(do_flip=False, max_rotate=30, max_zoom=1.3))
    la_aug = Learner(aug, learn.model, loss_func=learn.loss_func).laplace('kron', prior_precision=1., check_trained=False, bar=False)
    for u, v in zip(la_aug.H, la.H): assert (u - v).abs().max() < 1e-3 * v.abs().max()   # (float noise of the lighting tfm)
    assert aug.train.after_batch.split_idx in (0, None) and aug.train.dataset.split_idx == 0   # restored

def test_errors(adult, mnist):
    df, learn = adult
    with pytest.raises(ValueError, match="structure must be"): learn.laplace('block')
    with pytest.raises(ValueError, match="prior_precision must be"): learn.laplace(prior_precision='evidence')
    with pytest.raises(ValueError, match="prior_precision must be"): learn.laplace(prior_precision=-1.)
    with pytest.raises(ValueError, match="regression"): learn.laplace(sigma_noise=1.)
    with pytest.raises(MemoryError, match="structure='kron'"): mnist.laplace('full', max_bytes=2**20)
    with pytest.raises(ValueError, match="link_approx"): learn.laplace(bar=False).mc_predict(link_approx='gauss')
    with pytest.raises(ValueError, match="no items"): learn.laplace(dl=learn.dls.test_dl(df.iloc[:0], with_labels=True))
    with no_random(0): fresh = tabular_learner(learn.dls, layers=[16])
    with pytest.raises(ValueError, match="not been trained"): fresh.laplace()
    fresh.laplace('diag', check_trained=False, bar=False)        # the escape hatch works
    # an activation after the last Linear (y_range) is not a linear last layer
    toy = toy_regression(200, seed=0)
    dlr = TabularDataLoaders.from_df(toy, y_names='y', cont_names=['x'], procs=[Normalize], valid_pct=0.2, bs=64, num_workers=0)
    with no_random(0): lr = tabular_learner(dlr, layers=[8], y_range=(-10, 10))
    with pytest.raises(ValueError, match="not the output of its last nn.Linear"): lr.laplace(check_trained=False)
    with pytest.raises(ValueError, match="no nn.Linear"): last_linear(nn.Sequential(nn.Conv2d(1, 2, 3)))
