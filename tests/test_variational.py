"Variational layers, the converter and the ELBO callback, on sklearn's digits (plain pytest: runs on the newest fastai too)."
import pytest, torch
from copy import deepcopy
from torch.distributions import Normal, kl_divergence
from fastai.basics import *
from fastai.callback.all import *
from fastai_bayes.all import *
from fastai_bayes.variational import *
from fastai_bayes.sampling import MCPlan

def _digits_dls(bs=128):
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X/16., dtype=torch.float32), torch.tensor(y)
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, va = idx[:1400], idx[1400:]
    return DataLoaders(DataLoader(list(zip(X[tr], y[tr])), bs=bs, shuffle=True),
                       DataLoader(list(zip(X[va], y[va])), bs=bs))

def _mlp(): return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

def _fit(learn, epochs=2, lr=1e-2, cbs=None):
    with no_random(0), learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr, cbs=cbs)
    return learn

@pytest.fixture(scope='module')
def dls(): return _digits_dls()

@pytest.fixture(scope='module')
def trained(dls):
    with no_random(0): learn = Learner(dls, _mlp(), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    return _fit(learn, 3)

def _kl_ref(layer):
    "KL of a layer by torch.distributions"
    pr = Normal(layer.prior_mu, layer.prior_sigma)
    res = kl_divergence(Normal(layer.weight_mu, F.softplus(layer.weight_rho)), pr).sum()
    if layer.bias_mu is not None: res = res + kl_divergence(Normal(layer.bias_mu, F.softplus(layer.bias_rho)), pr).sum()
    return res

def test_kl_reference():
    with no_random(0):
        layers = [BayesLinear(7, 3, prior_mu=-0.1, prior_sigma=0.3, sigma_init=0.05),
                  BayesConv2d(3, 4, 3, prior_sigma=2., sigma_init=0.5), BayesConv2d(2, 4, 3, bias=False)]
        for l in layers:
            with torch.no_grad(): l.weight_rho.add_(torch.randn_like(l.weight_rho)); l.weight_mu.mul_(3)
    for l in layers: assert torch.allclose(l.kl(), _kl_ref(l), rtol=1e-5)

def test_converter_copies_weights_and_biases():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4*8*8, 5))
    b = bayesianize(deepcopy(net), sigma_init=0.02, prior_sigma=0.5)
    assert isinstance(b[0], BayesConv2d) and isinstance(b[3], BayesLinear)
    for i in (0, 3):
        assert torch.equal(b[i].weight_mu, net[i].weight) and torch.equal(b[i].bias_mu, net[i].bias)
        assert torch.allclose(b[i].weight_sigma, torch.full_like(net[i].weight, 0.02))
        assert torch.allclose(b[i].bias_sigma, torch.full_like(net[i].bias, 0.02)) and b[i].prior_sigma == 0.5
    x = torch.randn(3, 3, 8, 8)
    assert torch.allclose(b.eval()(x), net(x), atol=1e-6)
    shared = nn.Linear(4, 4)                       # one layer used twice: both references converted to one layer
    s = bayesianize(nn.Sequential(shared, nn.ReLU(), shared))
    assert s[0] is s[2] and isinstance(s[0], BayesLinear)
    assert isinstance(bayesianize(nn.Linear(2, 3)), BayesLinear)    # a bare layer: the new layer is returned

def test_sigma_to_zero_on_trained_learner(trained, dls):
    probs, _ = trained.get_preds()
    learn = Learner(dls, deepcopy(trained.model), loss_func=CrossEntropyLossFlat(), metrics=accuracy)
    learn.create_opt()
    assert bayesianize(learn, sigma_init=1e-5) is learn   # passes vary (mc_predict checks that), within 1e-4 of the mean weights
    opt_ids = {id(p) for p in learn.opt.all_params().itemgot(0)}
    assert opt_ids == {id(p) for p in learn.model.parameters()}    # the optimizer holds the new parameters
    assert torch.allclose(learn.get_preds()[0], probs, atol=1e-5)
    res = learn.mc_predict(n=3, with_samples=True, seed=0)
    assert torch.allclose(res.samples, probs[None].expand(3, -1, -1), atol=1e-4)

def test_frozen_learner_stays_frozen(dls):
    learn = Learner(dls, _mlp(), loss_func=CrossEntropyLossFlat(), splitter=lambda m: [list(m[0].parameters()), list(m[2].parameters())])
    learn.freeze()
    bayesianize(learn, names=lambda name, m: True)
    assert learn.opt.frozen_idx == 1 and isinstance(learn.model[0], BayesLinear)
    assert not any(p.requires_grad for p in learn.model[0].parameters()) and all(p.requires_grad for p in learn.model[2].parameters())
    assert len(learn.opt.param_lists[0]) == 4     # μ, ρ of the weight and the bias

def test_tiled_samples_are_independent(trained, dls):
    learn = bayesianize(Learner(dls, deepcopy(trained.model), loss_func=CrossEntropyLossFlat()), sigma_init=0.05)
    x = dls.valid.one_batch()[0][:1]
    plan = MCPlan(learn.model, (x,))
    assert plan.tileable and [o.method for o in stochastic_modules(learn.model, x)] == ['variational']*2
    with no_random(0), mc_dropout(learn.model): out = learn.model(x.expand(2000, -1))
    assert (out[0] - out[1]).abs().max() > 1e-3
    l0 = learn.model[0]         # first layer: per-row draws have the local-reparameterisation mean and variance
    with no_random(0), mc_dropout(learn.model): h = l0(x.expand(4000, -1))
    var = (x**2) @ (l0.weight_sigma**2).T + l0.bias_sigma**2
    assert torch.allclose(h.var(0)/var[0], torch.ones(32), atol=0.15)
    res = learn.mc_predict(n=5, with_samples=True, seed=0)
    assert (res.samples[0] - res.samples[1]).abs().max() > 1e-3 and (res.mutual_info > 0).all()
    assert torch.allclose(learn.get_preds()[0], learn.get_preds()[0])    # eval: the deterministic mean network

class _Grab(Callback):
    order = 60
    def after_loss(self):
        self.got = (self.learn.loss_grad.detach().clone(), self.learn.loss.detach().clone(), self.pred.detach(), self.yb[0])
        raise CancelFitException

@pytest.mark.parametrize('kl_weight,warmup', [(1., 0.), (0.5, 2.)])
def test_elbo_adds_kl_over_n(trained, dls, kl_weight, warmup):
    learn = bayesianize(Learner(dls, deepcopy(trained.model), loss_func=CrossEntropyLossFlat()), sigma_init=0.05)
    grab, elbo = _Grab(), ELBOCallback(kl_weight=kl_weight, warmup=warmup)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 0., cbs=[elbo, grab])
    loss_grad, loss, pred, y = grab.got
    w = kl_weight * (min(1., 1/len(dls.train)/warmup) if warmup else 1.)
    manual = F.cross_entropy(pred, y) + w * sum(_kl_ref(l) for l in bayes_layers(learn.model)) / 1400
    assert elbo.n == 1400
    assert torch.allclose(loss_grad, manual, rtol=1e-5) and torch.allclose(loss, manual, rtol=1e-5)

def test_elbo_training_records_kl_and_fp16(trained, dls):
    learn = bayesianize(Learner(dls, deepcopy(trained.model), loss_func=CrossEntropyLossFlat(), metrics=accuracy),
                        prior_sigma=1.)
    n_met = len(learn.metrics)
    with no_random(0), learn.no_bar(), learn.no_logging(): learn.to_fp16().fine_tune(1, 1e-2, cbs=ELBOCallback(warmup=0.5))
    assert 'kl' in learn.recorder.metric_names and len(learn.metrics) == n_met   # column shown; metrics restored
    kl_col = learn.recorder.metric_names.index('kl') - 1                        # recorder values drop 'epoch'
    kl = learn.recorder.values[-1][kl_col]
    assert 0 < kl < 1e3 and np.isfinite(learn.recorder.values[-1]).all()
    assert learn.validate()[1] > 0.8
    opt = learn.opt      # no weight decay on the variational parameters
    assert all(opt.state[p].get('do_wd', True) is False for l in bayes_layers(learn.model) for p in l.parameters())

def test_bad_input(trained):
    with pytest.raises(ValueError, match='no layer to convert'): bayesianize(nn.Sequential(nn.ReLU(), nn.Tanh()))
    with pytest.raises(ValueError, match='no layer to convert'): bayesianize(_mlp(), names='nothing_called_this')
    for kw in (dict(sigma_init=0), dict(prior_sigma=-1.), dict(prior_sigma=float('nan'))):
        with pytest.raises(ValueError, match='> 0'): bayesianize(trained, **kw)
    with pytest.raises(ValueError, match='converts only'): bayesianize(_mlp(), types=nn.LSTM)
    assert isinstance(trained.model[0], nn.Linear)                  # bad calls left the learner as it was
    with pytest.raises(ValueError, match='prior_sigma'): BayesLinear(3, 2, prior_sigma=0.)
    with pytest.raises(ValueError, match='sigma_init'): BayesConv2d(3, 2, 3, sigma_init=-0.1)
    with pytest.raises(ValueError, match='no variational layer'):
        with trained.no_bar(), trained.no_logging(): trained.fit(1, cbs=ELBOCallback())
    with pytest.raises(ValueError, match='n_items'): ELBOCallback(n_items=0)

def test_conv_flipout_per_example():
    with no_random(0):
        conv = BayesConv2d(8, 4, 3, padding=1, sigma_init=0.1)
        x = torch.randn(1, 8, 6, 6)
        out = conv.train()(x.expand(2, -1, -1, -1))
        assert (out[0] - out[1]).abs().max() > 1e-2                      # two copies in one forward differ
        flip = torch.cat([conv(x.expand(50, -1, -1, -1)) for _ in range(40)]).detach()
        ref = torch.stack([F.conv2d(x, conv.weight_mu + conv.weight_sigma*torch.randn_like(conv.weight_mu),
                                    conv.bias_mu + conv.bias_sigma*torch.randn_like(conv.bias_mu), padding=1)[0]
                           for _ in range(2000)]).detach()
    assert abs((flip.var(0)/ref.var(0)).mean().item() - 1) < 0.05      # exact per-example weight distribution
    assert torch.allclose(conv.eval()(x), F.conv2d(x, conv.weight_mu, conv.bias_mu, padding=1))
