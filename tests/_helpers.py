"Helpers shared by the real-data tests."
from fastai.vision.all import *

def fit_quietly(learn, epochs=1, lr=1e-2):
    "Seeded `fit_one_cycle` with no progress bar or log"
    with no_random(0), learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr)
    return learn

# A small convolutional body for vision_learner (resnet18 costs ~3 s a training batch on these 2 CPU cores)
from fastai_bayes.demo import demo_cnn as tiny_cnn

def mnist_dls(n=600, seed=0, bs=64):
    "`ImageDataLoaders` of `n` MNIST digits (the PNG files `mnist_sample` writes once), 20% of them for validation"
    from fastai_bayes.datasets import mnist_sample
    df = mnist_sample(n, seed=seed)
    with no_random(seed):   # a DataLoader seeds its shuffle from the global random state: whatever ran before must not matter
        return ImageDataLoaders.from_df(df, df.attrs['path'], fn_col='fname', label_col='label', valid_col='is_valid',
                                        bs=bs, num_workers=0)

def adult_dls(n=800, seed=0, bs=128):
    "`TabularDataLoaders` of `n` Adult census rows (target `loan`), validation rows as `adult_census` marks them"
    from fastai.tabular.all import TabularDataLoaders, Categorify, FillMissing, Normalize
    from fastai_bayes.datasets import adult_census
    df = adult_census(n, seed=seed)
    with no_random(seed):
        return TabularDataLoaders.from_df(df, y_names='loan', cat_names=df.attrs['cat_names'], cont_names=df.attrs['cont_names'],
                                          procs=[Categorify, FillMissing, Normalize], valid_idx=list(df.index[df.is_valid]),
                                          bs=bs, num_workers=0)

def random_splits(n, n_cal, k, seed=0):
    "`k` random (calibration, test) index splits of `n` items, `n_cal` to calibrate, from a seeded generator"
    g = torch.Generator().manual_seed(seed)
    for _ in range(k):
        p = torch.randperm(n, generator=g)
        yield p[:n_cal], p[n_cal:]

def seg_dls(df, bs=32):
    "Segmentation `DataLoaders` of the canvases `mnist_segmentation` wrote: greyscale images, masks with `SEG_CODES`"
    from fastai_bayes.datasets import SEG_CODES
    p = df.attrs['path']
    db = DataBlock(blocks=(ImageBlock(cls=PILImageBW), MaskBlock(SEG_CODES)), get_x=ColReader('fname', pref=p),
                   get_y=ColReader('mask', pref=p), splitter=ColSplitter('is_valid'))
    with no_random(0): return db.dataloaders(df, bs=bs, num_workers=0)

def seg_learner(n=1500, size=40, max_digits=1, epochs=25):
    "A `unet_learner` (small encoder, decoder dropout) trained on digit canvases, and their DataFrame"
    from fastai_bayes.all import mnist_segmentation, small_encoder, add_dropout
    df = mnist_segmentation(n, size=size, max_digits=max_digits)
    w = torch.tensor([0.1] + [1.]*10)      # background is most pixels: weigh the digits up, or identities come slowly
    learn = unet_learner(seg_dls(df), small_encoder, pretrained=False, n_in=1, loss_func=CrossEntropyLossFlat(axis=1, weight=w))
    add_dropout(learn, p=0.2)
    return fit_quietly(learn, epochs, 1e-2),df
