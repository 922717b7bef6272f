"Segmentation (#20): per-pixel maps from a real `unet_learner`, OOD silhouettes, memory per item, TTA × MC parts"
from copy import deepcopy as _deepcopy
import numpy as np, pytest, torch
import fastai.torch_core
from fastai.vision.all import *
from fastai_bayes.all import *
from _helpers import fit_quietly, mnist_dls, seg_learner

@pytest.fixture(scope='module')
def seg(): return seg_learner(n=600, epochs=6)   # seconds of training: enough for the mechanics

@pytest.fixture(scope='module')
def seg_trained():
    "A model that tells the digits apart (about 86% of digit pixels right): 25 epochs, ~90 s on 2 cores; once per CI run"
    pytest.importorskip('nbdev', reason='a property of the trained model, not of the fastai version: checked in the dev environment')
    return seg_learner()

def test_maps_equal_a_hand_loop(seg):
    "Every map and per-image score equals the pure functions applied to the same passes run by hand as full forwards"
    learn,df = seg
    dl = learn.dls.valid.new(shuffle=False)
    xb,_ = dl.one_batch()
    res = learn.mc_predict(dl, n=5, seed=7, max_bs=dl.bs)    # one pass per forward: the hand loop's order of draws
    torch.manual_seed(7)
    torch.empty((), dtype=torch.int64).random_()              # iterating a DataLoader draws torch's base seed first
    with torch.no_grad(), mc_dropout(learn.model):
        ps = torch.stack([F.softmax(learn.model(xb).float(), 1) for _ in range(5)])
    B,C = ps.shape[1:3]
    px = ps.permute(0, 1, 3, 4, 2).reshape(5, -1, C)
    r = res[torch.arange(B)]
    torch.testing.assert_close(r.mi_map.float().flatten(), mutual_information(px), atol=2e-3, rtol=1e-2)
    torch.testing.assert_close(r.entropy_map.float().flatten(), predictive_entropy(px.mean(0)), atol=2e-3, rtol=1e-2)
    torch.testing.assert_close(r.mutual_info, mutual_information(px).view(B, -1).mean(1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(r.variation_ratio, variation_ratio(px).view(B, -1).mean(1), atol=1e-5, rtol=1e-4)
    assert torch.equal(r.decoded.long(), ps.mean(0).argmax(1))
    # a wrong reduction (classes taken on the last dim, as the classification path would) is far off
    wrong = mutual_information(ps.reshape(5, -1, ps.shape[-1])).view(B, -1).mean(1)
    assert not torch.allclose(wrong, r.mutual_info, atol=1e-3)

def test_silhouettes_light_up(seg_trained):
    """Animal silhouettes (never seen in training): per image, canvases holding one rank far above clean canvases by mean
    MI; per pixel, their entropy is above the digits' (paired over canvases) and their MI far above the background's"""
    learn,df = seg_trained
    odf = mnist_segmentation(200, size=40, max_digits=1, ood=True, valid_pct=0., seed=3)
    p = odf.attrs['path']
    res = learn.mc_predict(learn.dls.test_dl([p/f for f in odf.fname]), n=10, seed=0)
    read = lambda col: torch.stack([torch.from_numpy(np.array(PILImage.create(p/f).convert('L'))) for f in odf[col]])
    ood,digit = read('ood') > 0,read('mask') > 0
    d = (region_mean(res, ood, 'entropy_map') - region_mean(res, digit, 'entropy_map'))
    d = d[~d.isnan()]
    assert d.mean() / (d.std() / len(d)**0.5) > 2, d.mean()               # paired t over the canvases
    assert region_mean(res, ood).nanmean() > 3*region_mean(res, ~(ood | digit)).nanmean()
    clean = learn.mc_predict(n=10, seed=0)                                # held-out canvases with a digit only
    assert ood_auroc(clean.mutual_info, res.mutual_info) > 0.9
    # maps that were not mapped to their own pixels (here: another canvas's) lose the per-pixel signal
    shifted = res[torch.arange(len(res)).roll(1)]
    assert region_mean(shifted, ood).nanmean() < region_mean(res, ood).nanmean()

def test_memory_per_item_does_not_grow_with_n(seg):
    "The result holds O(H·W) per image — the same bytes for n=2 and n=40 — and no per-pixel probabilities unless asked"
    learn,_ = seg
    dl = learn.dls.valid.new(shuffle=False)
    size = lambda r: sum(v.numel()*v.element_size() for v in vars(r).values() if isinstance(v, torch.Tensor))
    r2,r40 = learn.mc_predict(dl, n=2, seed=0),learn.mc_predict(dl, n=40, seed=0)
    N,H,W = r2.decoded.shape
    assert r2.mean is None and size(r2) == size(r40)
    assert size(r2) <= N*H*W*(8 + 4*2 + 1) + N*64    # targets (int64), four float16 maps, the uint8 mask, the scores
    rp = learn.mc_predict(dl, n=2, seed=0, with_probs=True)
    assert rp.mean.shape == (N, 11, H, W) and rp.mean.dtype == torch.float16

def test_tta_parts_add_up_segmentation(seg):
    "Segmentation TTA: entropy = augmentation part + model part + expected entropy, per image and per pixel; parts >= 0"
    learn,_ = seg
    res = learn.mc_predict(n=4, tta=4, seed=0)
    torch.testing.assert_close(res.entropy, res.aug_info + res.model_info + res.expected_entropy, atol=1e-5, rtol=0)
    assert (res.aug_info >= 0).all() and (res.model_info >= 0).all() and res.aug_info.mean() > 0
    assert res.n == 16 and res.n_per_member == 4 and 'views' in res.label

def test_tta_views_are_mapped_back(seg):
    "A flip's passes are mapped back to the original pixels: TTA's mask agrees with the plain mask (a missing inverse would not)"
    learn,_ = seg
    plain,tta = learn.mc_predict(n=4, seed=0),learn.mc_predict(n=4, tta=2, seed=0)
    agree = (plain.decoded == tta.decoded).float().mean()
    assert agree > 0.97, agree

def test_interpretation_and_errors(seg):
    learn,_ = seg
    interp = UncertaintyInterpretation.from_learner(learn, n=4, seed=0)
    axs = interp.plot_top_uncertain(k=3, score='mutual_info')
    assert axs.shape == (3, 5)
    ax = interp.plot_reliability()
    assert 'per pixel' in ax.get_title() and 'ECE' in ax.get_title()
    with pytest.raises(ValueError, match='segmentation result'): interp.plot_confusion_hist()
    with pytest.raises(ValueError, match='fixed n'): learn.mc_predict(n='auto')
    df = interp.top_uncertain(5, score='mi_p95')
    assert list(df.mi_p95) == sorted(df.mi_p95, reverse=True) and 'pixel_acc' in df

def test_tta_classification_parts_match_independent_views():
    "Classification TTA with training augmentations: the combined result equals the views predicted one by one, and its parts add up"
    from fastai_bayes.datasets import mnist_sample
    from _helpers import tiny_cnn
    df = mnist_sample(600, seed=0)
    dls = ImageDataLoaders.from_df(df, df.attrs['path'], fn_col='fname', label_col='label', valid_col='is_valid', bs=64,
                                   num_workers=0, batch_tfms=aug_transforms(do_flip=False, max_rotate=20, max_zoom=1.2, p_lighting=0))
    learn = fit_quietly(vision_learner(dls, tiny_cnn, pretrained=False, ps=0.3))
    res = learn.mc_predict(n=5, tta=3, seed=11)
    torch.testing.assert_close(res.entropy, res.aug_info + res.model_info + res.expected_entropy, atol=1e-5, rtol=0)
    assert (res.aug_info > -1e-6).all() and (res.model_info > -1e-6).all() and res.aug_info.mean() > 1e-3
    dl = learn.dls.valid.new(shuffle=False)
    views = []
    with dl.dataset.set_split_idx(0):
        for a in range(3):
            # the library's own seeding for view a (`fastai.torch_core.no_random`, never shifted by conftest's check)
            with fastai.torch_core.no_random(11 + a): views.append(learn.mc_predict(dl, n=5))
    torch.testing.assert_close(res.probs, torch.stack([v.probs for v in views]).mean(0), atol=1e-5, rtol=1e-4)
    vh = torch.stack([v.entropy for v in views]).mean(0)
    torch.testing.assert_close(res.aug_info, res.entropy - vh, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(res.expected_entropy, torch.stack([v.expected_entropy for v in views]).mean(0), atol=1e-5, rtol=1e-4)
    again = learn.mc_predict(n=5, tta=3, seed=11)
    assert torch.equal(again.probs, res.probs)
    plain = fit_quietly(vision_learner(mnist_dls(300), tiny_cnn, pretrained=False, ps=0.3))
    with pytest.raises(ValueError, match='training augmentations'): plain.mc_predict(n=3, tta=2)

def test_triage_on_a_unet(seg, tmp_path):
    "Triage of a folder of canvases with an exported U-Net: per-image scores as mc_predict gives them, the most uncertain referred, their maps in the report"
    import shutil
    from fastai_bayes.triage import triage
    learn, df = seg
    folder = tmp_path/'in'; folder.mkdir()
    for f in df.fname[df.is_valid].iloc[:24]: shutil.copy(Path(df.attrs['path'])/f, folder/Path(f).name)
    (folder/'broken.png').write_bytes(b'not an image')
    learn.export(tmp_path/'unet.pkl')
    t = triage(tmp_path/'unet.pkl', folder, n=4, refer=0.25, out=tmp_path/'out', progress=False)
    assert len(t) == 24 and 'pred' not in t and {'mutual_info', 'mi_p95', 'uncertain_area'} <= set(t.columns)
    assert t.attrs['skipped'][0][0] == 'broken.png'
    files = [folder/i for i in t['item']]
    ref = learn.mc_predict(learn.dls.test_dl(files), n=4, seed=42)
    np.testing.assert_allclose(t.mutual_info, ref.mutual_info.numpy(), rtol=1e-5, atol=1e-7)
    assert t.refer.sum() == 6 and set(t.index[t.refer]) == set(t.mutual_info.nlargest(6).index)
    out = tmp_path/'out'
    html = (out/'report.html').read_text()
    assert 'Uncertainty maps' in html and 'What the model predicted' not in html and (out/'uncertainty_maps.png').read_bytes()[:4] == b'\x89PNG'
    # the maps: worst first, one row each, named, the referred ones in orange
    fig = plot_triage_maps(t, ref, learn.dls.test_dl(files), k=8)
    rows = [a for a in fig.axes if a.get_ylabel()]
    order = t.mutual_info.sort_values(ascending=False, kind='stable').index[:8]
    assert [a.get_ylabel().split('\n')[0] for a in rows] == list(t.item[order])
    assert [a.yaxis.label.get_color() for a in rows] == ['tab:orange']*6 + ['k']*2
    plt.close('all')

def test_ensemble_of_unets_equals_its_members(seg):
    "An ensemble of two U-Nets (one forward each, dropout off): maps and scores equal those of the members' averaged softmax"
    learn, _ = seg
    other = Learner(learn.dls, _deepcopy(learn.model), loss_func=learn.loss_func)
    with torch.no_grad():
        for p in other.model.parameters(): p.add_(0.05*torch.randn_like(p))
    dl = learn.dls.valid.new(shuffle=False)
    res = Ensemble([learn, other]).mc_predict(dl, n=1, with_probs=True)
    assert res.kind == 'segmentation' and res.n == 2 and res.method == 'deep ensemble'
    xb, _ = dl.one_batch()
    with torch.no_grad():
        ps = torch.stack([F.softmax(m.eval()(xb).float(), 1) for m in (learn.model, other.model)])   # 2×B×C×H×W
    B, mean = len(xb), ps.mean(0)
    h, eh = torch.special.entr(mean).sum(1), torch.special.entr(ps).sum(2).mean(0)
    r = res[torch.arange(B)]
    torch.testing.assert_close(r.probs.float(), mean, atol=2e-3, rtol=0)                      # float16 probabilities
    torch.testing.assert_close(r.entropy_map.float(), h, atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(r.mi_map.float(), (h - eh).clamp_min(0), atol=2e-3, rtol=1e-2)
    torch.testing.assert_close(r.mutual_info, (h - eh).clamp_min(0).flatten(1).mean(1), atol=1e-5, rtol=1e-4)
    assert torch.equal(r.decoded.long(), mean.argmax(1))
    assert r.mutual_info.mean() > 1e-4   # the members differ, so there is something to check

def test_variational_unet_equals_a_hand_loop(seg):
    "bayesianize on a U-Net (every conv samples its weights, decoder dropout too): the maps equal full forwards run by hand"
    learn, _ = seg
    vl = bayesianize(Learner(learn.dls, _deepcopy(learn.model), loss_func=learn.loss_func), sigma_init=0.02)
    dl = learn.dls.valid.new(shuffle=False)
    xb, _ = dl.one_batch()
    res = vl.mc_predict(dl, n=4, seed=3, max_bs=dl.bs)   # one pass per forward, as the hand loop
    assert res.kind == 'segmentation' and 'variational' in res.method
    torch.manual_seed(3)
    torch.empty((), dtype=torch.int64).random_()          # iterating a DataLoader draws torch's base seed first
    with torch.no_grad(), mc_dropout(vl.model):
        ps = torch.stack([F.softmax(vl.model(xb).float(), 1) for _ in range(4)])
    B, mean = len(xb), ps.mean(0)
    h, eh = torch.special.entr(mean).sum(1), torch.special.entr(ps).sum(2).mean(0)
    r = res[torch.arange(B)]
    torch.testing.assert_close(r.mi_map.float(), (h - eh).clamp_min(0), atol=2e-3, rtol=1e-2)
    torch.testing.assert_close(r.mutual_info, (h - eh).clamp_min(0).flatten(1).mean(1), atol=1e-5, rtol=1e-4)
    assert torch.equal(r.decoded.long(), mean.argmax(1)) and r.mutual_info.mean() > 1e-4
