#!/usr/bin/env python
"""Sampling-engine benchmark: fastai's MC-dropout recipe (n x `get_preds` with fastai's `MCDropoutCallback`) against
`learn.mc_predict(dl, n)`, relative to one deterministic `get_preds`, on small learners trained on the offline data.
Prints one table: median seconds over `--runs` runs, ratios, peak extra memory (CPU: resident set; CUDA: allocated).
  python bench/mc_engine.py [--n 20] [--runs 3] [--only vision,tabular,text,unet,unet_final] [--px 64]
The U-Net rows add the floor: each batch read once, the deterministic prefix once and the stochastic suffix n times, in a
bare loop with nothing else (`floor`); mc_predict's ratio to it is the engine's overhead.
Ratios measured within one run are what to compare; absolute seconds depend on the machine."""
import argparse, ctypes, gc, os, statistics, sys, time, warnings
warnings.filterwarnings('ignore')
import torch
from fastai.vision.all import *
from fastai.text.all import *
from fastai.tabular.all import *
from fastai.callback.preds import MCDropoutCallback as FastaiMCDropout
from fastai_bayes.all import *

def _rss_reset():
    "Give freed heap pages back to the OS, then restart the peak-RSS counter, so the peak seen is this call's working set"
    try: ctypes.CDLL('libc.so.6').malloc_trim(0)
    except OSError: pass
    try: Path('/proc/self/clear_refs').write_text('5')
    except OSError: pass

def _kib(field):
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(field): return int(line.split()[1])
    return 0

def seconds(f, device):
    "Wall time of one call of `f`"
    if device.type == 'cuda': torch.cuda.synchronize()
    t = time.perf_counter(); f()
    if device.type == 'cuda': torch.cuda.synchronize()
    return time.perf_counter() - t

def peak_mib(f, device):
    """Peak memory of one call of `f` above what was in use when it started (MiB); a separate call from the timed ones,
    because giving memory back to the OS first makes the call that follows slower"""
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    else: _rss_reset(); base = _kib('VmRSS:') * 1024
    f()
    if device.type == 'cuda': torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated()
    else: peak = _kib('VmHWM:') * 1024
    return max(0, peak - base) / 2**20

def fastai_recipe(learn, dl, n):
    "What the source article and fastai's callback suggest: n x get_preds with dropout on, then the mean"
    return torch.stack([learn.get_preds(dl=dl, cbs=[FastaiMCDropout()])[0] for _ in range(n)]).mean(0)

def quiet(learn):
    learn.remove_cbs([cb for cb in learn.cbs if isinstance(cb, ProgressCallback)])
    learn.logger = noop
    return learn

PX = 64

def vision(device):
    "The issue's setup: resnet18 on MNIST PNGs resized to 64 px (`--px`)"
    df = mnist_sample(1280, seed=0, valid_pct=0.2)
    dls = ImageDataLoaders.from_df(df, df.attrs['path'], fn_col='fname', label_col='label', valid_col='is_valid',
                                   item_tfms=Resize(PX), bs=64, num_workers=0, device=device)
    learn = quiet(vision_learner(dls, resnet18, pretrained=False, metrics=accuracy))
    learn.fit_one_cycle(1, 1e-2)
    return f'vision_learner resnet18, MNIST PNGs at {PX} px', learn, dls.valid

def tabular(device):
    df = adult_census(8000, seed=0)
    dls = TabularDataLoaders.from_df(df, y_names='loan', cat_names=df.attrs['cat_names'], cont_names=df.attrs['cont_names'],
                                     procs=[Categorify, FillMissing, Normalize], valid_idx=list(df.index[df.is_valid]),
                                     bs=256, device=device)
    learn = quiet(tabular_learner(dls, layers=[200, 100], config=tabular_config(ps=[0.1, 0.1], embed_p=0.1), metrics=accuracy))
    learn.fit_one_cycle(1, 1e-2)
    return 'tabular_learner [200,100] ps=0.1 embed_p=0.1, Adult', learn, dls.valid

def text(device):
    df = rotten_tomatoes(1600, seed=0)
    dls = TextDataLoaders.from_df(df, text_col='text', label_col='label', valid_col='is_valid', bs=64, device=device)
    learn = quiet(text_classifier_learner(dls, AWD_LSTM, pretrained=False, drop_mult=0.5, metrics=accuracy,
                                          config=dict(emb_sz=200, n_hid=400, n_layers=2)))
    learn.fit_one_cycle(1, 1e-2)
    return 'text_classifier_learner AWD-LSTM (emb 200, hid 400, 2 layers), Rotten Tomatoes', learn, dls.valid

def _unet(device, where):
    df = mnist_segmentation(400, seed=0)
    p = df.attrs['path']
    db = DataBlock(blocks=(ImageBlock(cls=PILImageBW), MaskBlock(SEG_CODES)), get_x=ColReader('fname', pref=p),
                   get_y=ColReader('mask', pref=p), splitter=ColSplitter('is_valid'))
    dls = db.dataloaders(df, bs=32, num_workers=0, device=device)
    learn = quiet(unet_learner(dls, resnet18, pretrained=False, n_in=1))
    add_dropout(learn, 0.2, where=where)
    learn.fit_one_cycle(1, 1e-3)
    return f"unet_learner resnet18, MNIST canvases 48 px, add_dropout(where='{where}')", learn, dls.valid

def unet(device): return _unet(device, 'decoder')
def unet_final(device): return _unet(device, 'final')

def floor(learn, dl, n, plan):
    "The least work n passes need: each batch read once, the prefix once, the suffix n times (one pass per forward), nothing kept"
    with torch.no_grad(), mc_dropout(learn.model):
        for xb,_ in dl:
            args = plan.prefix((xb,))
            for _ in range(n): plan.suffix(args)

def bench(make, device, n, runs):
    name, learn, dl = make(device)
    dl = dl.new(shuffle=False)
    xb = dl.one_batch()[:dl.n_inp]
    plan = MCPlan(learn.model, xb)
    strategies = {'get_preds (1 deterministic pass)': lambda: learn.get_preds(dl=dl),
                  'probe (MCPlan on one batch; part of mc_predict)': lambda: MCPlan(learn.model, xb),
                  f'fastai recipe ({n} x get_preds)': lambda: fastai_recipe(learn, dl, n),
                  f'mc_predict(n={n})': lambda: learn.mc_predict(dl, n=n),
                  f'mc_predict(n={n}, max_bs=1): one forward per pass': lambda: learn.mc_predict(dl, n=n, max_bs=1)}
    if isinstance(learn.model, DynamicUnet):
        strategies[f'floor: prefix once + {n} x suffix, bare loop'] = lambda: floor(learn, dl, n, plan)
        # on a CPU, mc_predict runs a per-pixel model one pass per forward (its default); tiled passes, for comparison
        strategies.pop(f'mc_predict(n={n}, max_bs=1): one forward per pass')
        strategies[f'mc_predict(n={n}, max_bs={dl.bs*n}): all passes tiled'] = lambda: learn.mc_predict(dl, n=n, max_bs=dl.bs*n)
    for f in strategies.values(): f()   # warm-up
    times = {k: [] for k in strategies}
    for _ in range(runs):   # interleaved, so a slow spell of the machine hits every strategy alike
        for k, f in strategies.items(): times[k].append(seconds(f, device))
    rows = {k: (statistics.median(times[k]), peak_mib(f, device)) for k, f in strategies.items()}
    return name, rows, plan, len(dl.dataset)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--n', type=int, default=20); ap.add_argument('--runs', type=int, default=3)
    ap.add_argument('--only', default='vision,tabular,text')
    ap.add_argument('--px', type=int, default=64, help='image size for vision (the MNIST PNGs are 28 px)')
    a = ap.parse_args()
    global PX; PX = a.px
    devices = [torch.device('cpu')] + ([torch.device('cuda')] if torch.cuda.is_available() else [])
    t0 = time.time()
    for device in devices:
        print(f"\n## {device.type.upper()}: {torch.get_num_threads()} threads, torch {torch.__version__}, n={a.n}, median of {a.runs} runs\n")
        print('| learner | strategy | seconds | × one get_preds | speed-up vs fastai recipe | peak extra MiB |')
        print('|---|---|---|---|---|---|')
        for k in a.only.split(','):
            name, rows, plan, n_items = bench(globals()[k], device, a.n, a.runs)
            base, recipe = rows['get_preds (1 deterministic pass)'][0], rows[f'fastai recipe ({a.n} x get_preds)'][0]
            for s, (sec, mem) in rows.items():
                print(f'| {name} ({n_items} items) | {s} | {sec:.3f} | {sec/base:.2f} | {recipe/sec:.1f} | {mem:.0f} |')
            fl = [v for k,v in rows.items() if k.startswith('floor')]
            if fl: print(f"|  | mc_predict / floor: {rows[f'mc_predict(n={a.n})'][0]/fl[0][0]:.2f} (target <= 1.2) | | | | |")
            print(f'|  | engine plan: {len(plan.stages) - plan.split} of {len(plan.stages)} stages per pass, '
                  f"{'tiled' if plan.tileable else 'one forward per pass (shared draws or state)'} | | | | |", flush=True)
    # memory does not grow with n: the default result keeps running sums, not n x N x C samples
    _, learn, dl = tabular(torch.device('cpu'))
    mems = {n: peak_mib(lambda: learn.mc_predict(dl, n=n, max_bs=4096), torch.device('cpu')) for n in (20, 1000)}
    print(f"\nmemory vs n (tabular, max_bs=4096, CPU): peak extra {mems[20]:.0f} MiB at n=20, {mems[1000]:.0f} MiB at n=1000")
    # the masks alone: torch's CPU dropout against fast_dropout, which mc_dropout gives plain nn.Dropout and WeightDropout
    print('\n| dropout masks, CPU, 1280×1024 float32 | F.dropout ms | fast_dropout ms | speed-up |\n|---|---|---|---|')
    x = torch.randn(1280, 1024)
    for p in (0.1, 0.25, 0.5):
        ms = {f.__name__: 1e3 * statistics.median(seconds(lambda: f(x, p), torch.device('cpu')) for _ in range(15))
              for f in (F.dropout, fast_dropout)}
        print(f"| p={p} | {ms['dropout']:.2f} | {ms['fast_dropout']:.2f} | {ms['dropout']/ms['fast_dropout']:.1f}× |")
    print(f"total benchmark time {time.time()-t0:.0f} s")

if __name__ == '__main__': main()
