#!/usr/bin/env python
"""The models of issue #27 ("Right or refused on every real model"), full size as the issue tried them: the spread of
`mc_predict`'s passes against an independent reference loop (`model.train()`, every BatchNorm back in `eval()`, one
pass per forward under `no_grad`), as the ratio of the mean per-item variances with its standard error. Before the
MC-mode redesign these were 0.73, 0.56, 0.06, 0.60, 0.46, 0.55 (issue #27). Each model is a plain fastai `Learner` (DenseNet
through `vision_learner`) trained one epoch on 192 MNIST digits at 32 px (BERT: Rotten Tomatoes), then sampled on 48
validation items.
  python bench/real_models.py [--n 100] [--items 48] [--only BERT]      (about 10 minutes alone on 2 CPU cores, most of it swin_t)"""
import argparse, math, sys, time, warnings
warnings.filterwarnings('ignore')
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent.parent/'tests'))
import test_model_zoo as zoo
from fastai.vision.all import *
from fastai_bayes.all import *

def tv_efficientnet_b0():
    from torchvision.models import efficientnet_b0
    with no_random(0): return zoo._tv(efficientnet_b0(num_classes=10))

def tv_densenet121():
    from torchvision.models import densenet121
    def arch(pretrained=False, **kwargs): return densenet121(drop_rate=0.2)
    model_meta[arch] = dict(cut=-1, split=default_split)
    with no_random(0): learn = vision_learner(zoo.mnist_dls(), arch, pretrained=False)
    return zoo.fit_quietly(learn, 1, 1e-2)

def tv_swin_t():
    from torchvision.models import swin_t
    with no_random(0): return zoo._tv(swin_t(num_classes=10, dropout=0.1, attention_dropout=0.3), 1, 1e-3)

def timm_efficientnet_b0(): return zoo._timm('efficientnet_b0', drop_rate=0.2, drop_path_rate=0.1)
def timm_pvt_v2_b0(): return zoo._timm('pvt_v2_b0', lr=1e-3, attn_drop_rate=0.3)

def bert(impl, p):
    from transformers import BertConfig, BertForSequenceClassification
    dls = zoo.text_cls_dls()
    cfg = BertConfig(vocab_size=len(dls.vocab[0]), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, pad_token_id=1, num_labels=2, attention_probs_dropout_prob=p,
                     hidden_dropout_prob=0.)   # attention dropout alone: what the old allow-list missed
    cfg._attn_implementation = impl
    with no_random(0): learn = Learner(dls, zoo.HFClassifier(BertForSequenceClassification(cfg)), loss_func=CrossEntropyLossFlat())
    return zoo.fit_quietly(learn, 1, 1e-3)

MODELS = {'torchvision efficientnet_b0': (tv_efficientnet_b0, 0.73), 'torchvision densenet121 (drop_rate=0.2, vision_learner)': (tv_densenet121, 0.56),
          'torchvision swin_t': (tv_swin_t, 0.06), 'timm efficientnet_b0 (drop_rate, drop_path_rate)': (timm_efficientnet_b0, 0.60),
          'timm pvt_v2_b0 (attn_drop_rate=0.3)': (timm_pvt_v2_b0, 0.46),
          'HF BERT eager, attention dropout 0.3 (the only dropout)': (partial(bert, 'eager', 0.3), 0.55), 'HF BERT sdpa, attention dropout 0.3 (the only dropout)': (partial(bert, 'sdpa', 0.3), 0.55),
          'HF BERT sdpa, attention dropout 0.1 (the only dropout)': (partial(bert, 'sdpa', 0.1), '0.81-0.84')}

def main():
    ap = argparse.ArgumentParser(); ap.add_argument('--n', type=int, default=100); ap.add_argument('--items', type=int, default=48)
    ap.add_argument('--only', default='', help='run the models whose name contains this')
    a = ap.parse_args()
    print(f"| model | before (issue #27) | spread ratio now ± s.e. | means: mean abs z (bound) | probe: modules that draw | tiled | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, (make, before) in MODELS.items():
        if a.only not in name: continue
        t0 = time.time()
        learn = make(); learn.model.eval(); learn.remove_cbs(learn.cbs.filter(lambda c: isinstance(c, ProgressCallback)))
        dl = learn.dls.test_dl(learn.dls.valid_ds.items.iloc[:a.items], with_labels=True, bs=12)
        res = learn.mc_predict(dl, a.n, with_samples=True, seed=1)
        ref = zoo.reference_samples(learn, dl, a.n, 2, 'softmax')
        s_mc, s_ref = res.samples.as_subclass(Tensor), ref.as_subclass(Tensor)
        (v_mc, se_mc), (v_ref, se_ref) = zoo.spread(s_mc), zoo.spread(s_ref)
        ratio = v_mc / v_ref
        se = ratio * math.sqrt((se_mc/v_mc)**2 + (se_ref/v_ref)**2)
        mz, bound = zoo.check_means(s_mc, s_ref)
        plan = MCPlan(learn.model, dl.one_batch()[:1])
        print(f"| {name} | {before} | {ratio:.3f} ± {se:.3f} | {mz:.2f} ({bound:.2f}) | {len(plan.mods)} | {plan.tileable} | {time.time()-t0:.0f} |", flush=True)

if __name__ == '__main__': main()
