"""Model-zoo conformance suite: for every kind of model a fastai user brings, `learn.mc_predict` is right or refuses.

Each row is a real fastai learner on real offline data (MNIST PNGs, Rotten Tomatoes, Adult census, diabetes), most of
them around models someone else wrote: torchvision, timm and Hugging Face `transformers` classes built from small
configs (no weights), torch's own `nn.Transformer`/`nn.GRU`/`nn.LSTM`, fastai's learners. For each:
 (a) SPREAD: the per-item spread across passes of `res.samples` matches an independent reference loop written here
     (one pass per forward under `no_grad`: `model.train()`, then every BatchNorm, and InstanceNorm with running
     statistics, back to `eval()`; nothing else): the ratio of the mean per-item pass variances is within 4 standard
     errors of 1, and the test is strong enough to see a ratio of 1.5;
 (b) MEANS: per-item mean predictions agree within Monte Carlo error (z-scores; the bound on mean |z| is calibrated
     by permuting passes between the two runs, so correlated outputs, e.g. one shared weight mask, are fair);
 (c) STATE: `.training` flags, the full `state_dict()` and buffers, module attributes and (language model) hidden
     states are as before, also after an exception mid-pass.
What MC mode would get wrong must be refused with `MCModeError`, the module named, nothing changed: torchvision's
Inception (auxiliary logits in training mode), timm's distilled DeiT in distillation training (a tuple), a timm EvoNorm
(running statistics in a buffer), and a model that draws nothing (its drop probabilities listed).
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

try: import timm
except ImportError: timm = None
try: import transformers
except ImportError: transformers = None

needs_timm = pytest.mark.skipif(timm is None, reason='timm is not installed')
needs_transformers = pytest.mark.skipif(transformers is None, reason='transformers is not installed')

def _eval_in_reference(m):
    "The reference keeps these in eval mode: running statistics, nothing random"
    return isinstance(m, nn.modules.batchnorm._BatchNorm) or (isinstance(m, nn.modules.instancenorm._InstanceNorm)
                                                             and m.track_running_stats)

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
def mnist_dls(bs=24, size=32):
    df = _mnist_df()
    return ImageDataLoaders.from_df(df, df.attrs['path'], fn_col='fname', label_col='label', valid_col='is_valid',
                                    item_tfms=Resize(size), bs=bs, num_workers=0)

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

# torchvision: its own classes, small configs. Plain `Learner`s on the digits, as a user brings a model; DenseNet through
# `vision_learner`, where its functional dropout sits in the body that fastai's head follows
def _tv(model, epochs=1, lr=1e-2):
    with no_random(0): learn = Learner(mnist_dls(), model, loss_func=CrossEntropyLossFlat())
    return fit_quietly(learn, epochs, lr)

def _tv_efficientnet():
    "StochasticDepth in every MBConv block (row mode), dropout in the classifier"
    from torchvision.models.efficientnet import EfficientNet, MBConvConfig
    with no_random(0):
        cfg = [MBConvConfig(1, 3, 1, 16, 16, 1), MBConvConfig(4, 3, 2, 16, 24, 2), MBConvConfig(4, 3, 2, 24, 32, 2)]
        m = EfficientNet(cfg, dropout=0.2, stochastic_depth_prob=0.3, num_classes=10, last_channel=64)
    return _tv(m)

def _tv_densenet():
    "`_DenseLayer.forward` drops out with `F.dropout(..., training=self.training)`: no dropout module in the body"
    from torchvision.models.densenet import DenseNet
    def densenet_small(pretrained=False, **kwargs):
        return DenseNet(growth_rate=8, block_config=(2, 2, 2), num_init_features=16, bn_size=2, drop_rate=0.2)
    model_meta[densenet_small] = dict(cut=-1, split=default_split)   # as fastai's own entries for torchvision's DenseNets
    with no_random(0): learn = vision_learner(mnist_dls(), densenet_small, pretrained=False, ps=0.1)
    return fit_quietly(learn, 1, 1e-2)

def _tv_swin():
    "Shifted-window attention drops out functionally; StochasticDepth; MLP dropout modules"
    from torchvision.models.swin_transformer import SwinTransformer
    with no_random(0):
        m = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
                            dropout=0.1, attention_dropout=0.3, stochastic_depth_prob=0.2, num_classes=10)
    return _tv(m, 3, 1e-2)

def _tv_mobilenet():
    from torchvision.models import mobilenet_v3_small
    with no_random(0): m = mobilenet_v3_small(width_mult=0.5, dropout=0.3, num_classes=10)
    return _tv(m, 3, 3e-2)

def _tv_vit():
    "nn.MultiheadAttention (attention dropout in its fused call) inside torchvision's encoder blocks"
    from torchvision.models.vision_transformer import VisionTransformer
    with no_random(0):
        m = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                              dropout=0.1, attention_dropout=0.3, num_classes=10)
    return _tv(m, 3, 3e-3)

# timm: plain `Learner`s around `timm.create_model` (its own head, whose `drop_rate` is `F.dropout` in `forward_head`)
def _timm(name, lr=1e-2, **kwargs):
    with no_random(0): learn = Learner(mnist_dls(), timm.create_model(name, pretrained=False, num_classes=10, **kwargs),
                                       loss_func=CrossEntropyLossFlat())
    return fit_quietly(learn, 1, lr)

def _timm_resnet():
    "timm's ResNet class, narrow: stochastic depth in the blocks, the head's `drop_rate` as `F.dropout`"
    from timm.models.resnet import ResNet, BasicBlock
    with no_random(0):
        m = ResNet(BasicBlock, [1, 1, 1, 1], channels=(16, 32, 64, 128), stem_width=16, num_classes=10, drop_rate=0.3,
                   drop_path_rate=0.1)
    return _tv(m)

def _timm_efficientnet(): return _timm('tinynet_e', drop_rate=0.3, drop_path_rate=0.1)
def _timm_mobilenetv3(): return _timm('mobilenetv3_small_050', drop_rate=0.3)
def _timm_pvt():
    "Fused attention: `F.scaled_dot_product_attention(dropout_p=self.attn_drop.p if self.training else 0.)`"
    return _timm('pvt_v2_b0', lr=1e-3, attn_drop_rate=0.3, drop_path_rate=0.1)

# Hugging Face: BERT from a small config. The adapter a user writes: input ids in, logits out, padding masked
class HFClassifier(Module):
    "A `transformers` sequence classifier in a fastai `Learner`: token ids in, logits out"
    def __init__(self, hf_model, pad_idx=1): self.hf,self.pad_idx = hf_model,pad_idx
    def forward(self, x):
        x = x.as_subclass(Tensor)
        return self.hf(input_ids=x, attention_mask=(x != self.pad_idx).long()).logits

def _bert(impl):
    from transformers import BertConfig, BertForSequenceClassification
    dls = text_cls_dls()
    cfg = BertConfig(vocab_size=len(dls.vocab[0]), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, pad_token_id=1, num_labels=2,
                     hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.3)
    cfg._attn_implementation = impl
    with no_random(0): learn = Learner(dls, HFClassifier(BertForSequenceClassification(cfg)), loss_func=CrossEntropyLossFlat())
    assert learn.model.hf.config._attn_implementation == impl
    return fit_quietly(learn, 1, 1e-3)

def _bert_eager(): return _bert('eager')
def _bert_sdpa(): return _bert('sdpa')

# torch's own modules
class TransformerSeq2One(Module):
    "nn.Transformer (encoder and decoder, dropout 0.3): the review encoded, one learned query decoded, a linear head"
    def __init__(self, vocab_sz, d=16):
        self.emb,self.query = nn.Embedding(vocab_sz, d, padding_idx=1),nn.Parameter(torch.randn(1, 1, d))
        self.tf = nn.Transformer(d, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32, dropout=0.3,
                                 batch_first=True)
        self.head = nn.Linear(d, 2)
    def forward(self, x):
        src = self.emb(x)
        return self.head(self.tf(src, self.query.expand(len(x), -1, -1))[:, 0])

def _nn_transformer():
    dls = text_cls_dls()
    with no_random(0): learn = Learner(dls, TransformerSeq2One(len(dls.vocab[0])), loss_func=CrossEntropyLossFlat())
    return fit_quietly(learn, 1, 1e-2)

class GRURowsClassifier(LSTMRowsClassifier):
    "The digit's rows through a 2-layer `nn.GRU` whose only dropout is its own `dropout=0.3` between layers"
    def __init__(self):
        super().__init__()
        self.lstm = nn.GRU(32, 32, num_layers=2, dropout=0.3, batch_first=True)

def _gru():
    with no_random(0): learn = Learner(mnist_dls(), GRURowsClassifier(), loss_func=CrossEntropyLossFlat())
    return fit_quietly(learn, 2, 3e-2)

class SELUNet(Module):
    "Channel dropout (`nn.Dropout2d`) in a conv body, `nn.AlphaDropout` in a SELU head"
    def __init__(self):
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(), nn.Dropout2d(0.2), nn.Conv2d(16, 32, 3, stride=2),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(32, 32), nn.SELU(), nn.AlphaDropout(0.2), nn.Linear(32, 10))
    def forward(self, x): return self.head(self.body(x))

def _alpha_dropout2d():
    with no_random(0): learn = Learner(mnist_dls(), SELUNet(), loss_func=CrossEntropyLossFlat())
    return fit_quietly(learn, 1, 1e-2)

def _functional_dropout():
    with no_random(0): learn = Learner(mnist_dls(), FunctionalDropoutNet(), loss_func=CrossEntropyLossFlat())
    return fit_quietly(learn, 1, 1e-2)

def _bypassed_dropout():
    with no_random(0): learn = Learner(mnist_dls(), BypassedDropoutNet(), loss_func=CrossEntropyLossFlat())
    return fit_quietly(learn, 1, 1e-2)

ROWS = dict(
    resnet18=(_resnet18, 'softmax'), timm_vit=(_vit, 'softmax'), timm_convnext=(_convnext, 'softmax'),
    transformer_text=(_transformer_text, 'softmax'), awd_lstm_clas=(_awd_lstm_clas, 'softmax'),
    awd_lstm_lm=(_awd_lstm_lm, 'softmax'), tabular_clas=(_tabular_clas, 'softmax'), tabular_reg=(_tabular_reg, 'identity'),
    multilabel=(_multilabel, 'sigmoid'), custom_lstm=(_custom_lstm, 'softmax'), bayes_cnn=(_bayes_cnn, 'softmax'),
    bayes_colour_mix=(_bayes_colour_mix, 'softmax'),
    tv_efficientnet=(_tv_efficientnet, 'softmax'), tv_densenet=(_tv_densenet, 'softmax'), tv_swin=(_tv_swin, 'softmax'),
    tv_mobilenet=(_tv_mobilenet, 'softmax'), tv_vit=(_tv_vit, 'softmax'),
    timm_resnet=(_timm_resnet, 'softmax'), timm_efficientnet=(_timm_efficientnet, 'softmax'),
    timm_mobilenetv3=(_timm_mobilenetv3, 'softmax'), timm_pvt=(_timm_pvt, 'softmax'),
    hf_bert_eager=(_bert_eager, 'softmax'), hf_bert_sdpa=(_bert_sdpa, 'softmax'),
    nn_transformer=(_nn_transformer, 'softmax'), gru=(_gru, 'softmax'), alpha_dropout2d=(_alpha_dropout2d, 'softmax'),
    functional_dropout=(_functional_dropout, 'softmax'), bypassed_dropout=(_bypassed_dropout, 'softmax'))
TIMM_ROWS = {'timm_vit', 'timm_convnext', 'timm_resnet', 'timm_efficientnet', 'timm_mobilenetv3', 'timm_pvt'}
HF_ROWS = {'hf_bert_eager', 'hf_bert_sdpa'}
STATEFUL_ROWS = {'awd_lstm_lm'}
params = [pytest.param(k, marks=needs_timm) if k in TIMM_ROWS else pytest.param(k, marks=needs_transformers) if k in HF_ROWS
          else k for k in ROWS]

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
# the independent reference: one pass per forward, training mode but for BatchNorm (and InstanceNorm with statistics)

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

def reference_samples(learn, dl, n, seed, kind, stateful=False, keep_eval=()):
    """n×N×... activated passes, items in dataset order. Stateful (language model): every pass of a batch starts from the
    state at the start of the batch; after the batch the state is the one the first pass left. `keep_eval`: more module
    types kept in eval mode"""
    model = learn.model
    flags = [(m, m.training) for m in model.modules()]
    outs = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            model.train()
            for m in model.modules():
                if _eval_in_reference(m) or isinstance(m, keep_eval): m.eval()
            awd = _awd(model) if stateful else None
            if stateful: model.reset()
            with torch.no_grad():
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
    h = _inner_module(model).register_forward_hook(lambda m, i, o: calls.append(1))
    try: learn.mc_predict(dl, 5, seed=0, max_bs=dl.bs)
    finally: h.remove()
    for at in (2, len(calls) - 2):   # inside the probe of the first batch, and mid-pass in the last batch
        calls = []
        def boom(m, i, o):
            calls.append(1)
            if len(calls) == at: raise RuntimeError('injected failure')
        h = _inner_module(model).register_forward_hook(boom)
        try:
            with pytest.raises(RuntimeError, match='injected failure'): learn.mc_predict(dl, 5, seed=0, max_bs=dl.bs)
        finally: h.remove()
        assert len(calls) == at
        assert_same_state(before, snapshot(model), f'after an exception at forward {at} of the module: ')

def _same_hidden(a, b): return a[1] == b[1] and all(torch.equal(p, q) for hp, hq in zip(a[0], b[0]) for p, q in zip(hp, hq))

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
    # the first batch is probed first (two rows, in MC and eval mode), and the probe puts the state back as it found it
    n_probe = next(i for i, c in enumerate(calls) if c['x'].shape[0] == dl.bs)
    assert n_probe >= 2 and all(c['x'].shape[0] == MCProbe.n_rows for c in calls[:n_probe])
    assert _same_hidden(calls[0]['start'], calls[n_probe]['start']), "the probe changed the hidden state"
    calls = calls[n_probe:]
    groups = []
    for c in calls:
        if groups and groups[-1][0]['x'].shape == c['x'].shape and torch.equal(groups[-1][0]['x'], c['x']): groups[-1].append(c)
        else: groups.append([c])
    assert len(groups) == len(dl), f"{len(calls)} calls of AWD_LSTM in {len(groups)} groups for {len(dl)} batches"
    same = _same_hidden
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

# what MC mode would get wrong is refused -----------------------------------------------------------------------------

def _inception():
    "torchvision's Inception v3 returns `InceptionOutputs(logits, aux_logits)` in training mode, a tensor in eval mode"
    from torchvision.models import inception_v3
    with no_random(0): m = inception_v3(weights=None, aux_logits=True, init_weights=False, num_classes=10)
    return Learner(mnist_dls(bs=8, size=299), m, loss_func=CrossEntropyLossFlat())

def _deit_distilled():
    "timm's distilled DeiT in distillation training returns (class logits, distillation logits) in training mode"
    with no_random(0):
        m = timm.create_model('deit_tiny_distilled_patch16_224', pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=10, drop_rate=0.1)
    m.set_distilled_training(True)
    return Learner(mnist_dls(), m, loss_func=CrossEntropyLossFlat())

class EvoNormNet(Module):
    "A conv body normalised by timm's EvoNorm-B0, whose training mode updates its `running_var` buffer"
    def __init__(self):
        from timm.layers import EvoNorm2dB0
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), EvoNorm2dB0(16), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(16, 10))
    def forward(self, x): return self.head(self.body(x))

def _evonorm():
    with no_random(0): return Learner(mnist_dls(), EvoNormNet(), loss_func=CrossEntropyLossFlat())

def _no_randomness():
    "fastai's default `tabular_learner` has p=0 everywhere"
    with no_random(0): return tabular_learner(adult_dls(), layers=[50, 20])

def _unregister_eval(cls):
    from fastai_bayes.dropout import _eval_registry, _lookups
    del _eval_registry[cls]; _lookups.clear()

REFUSED = dict(
    inception_aux_logits=(_inception, [r'`model` \(Inception3\) returns InceptionOutputs\(', r'also runs `AuxLogits`',
                                       r'register_eval\(Inception3\)', 'aux_logits=False']),
    deit_distillation=(_deit_distilled, [r'\(VisionTransformerDistilled\) returns tuple\(', r'register_eval\(VisionTransformerDistilled\)']),
    evonorm_running_var=(_evonorm, [r'`body.1` \(EvoNorm2dB0\) updates `running_var`', r'register_eval\(EvoNorm2dB0\)']),
    no_randomness=(_no_randomness, [r'drew no random number', r'`emb_drop.p`=0', r'tabular_config\(ps=']))

@pytest.mark.parametrize('row', [pytest.param(k, marks=needs_timm) if k in ('deit_distillation', 'evonorm_running_var') else k
                                 for k in REFUSED])
def test_refused_naming_the_module(row):
    """What MC mode would get wrong (an output of another structure in training mode, running statistics torch does not
    know, no randomness at all) raises `MCModeError` before any pass, naming the module and the fix; nothing changes"""
    make, patterns = REFUSED[row]
    learn = make(); learn.model.eval()
    before = snapshot(learn.model)
    with pytest.raises(MCModeError) as e: learn.mc_predict(learn.dls.valid, 5, seed=0)
    for pat in patterns: assert re.search(pat, str(e.value)), f"the message does not say {pat!r}: {e.value}"
    assert_same_state(before, snapshot(learn.model), 'after the refusal: ')
    if row == 'evonorm_running_var':   # the fix the message names works, and is then right against the reference
        from timm.layers import EvoNorm2dB0
        register_eval(EvoNorm2dB0)
        try:
            dl = learn.dls.valid
            res = learn.mc_predict(dl, N_PASSES, with_samples=True, seed=MC_SEED)
            ref = reference_samples(learn, dl, N_PASSES, REF_SEED, 'softmax', keep_eval=(EvoNorm2dB0,))
            check_spread(res.samples.as_subclass(Tensor), ref); check_means(res.samples.as_subclass(Tensor), ref)
        finally: _unregister_eval(EvoNorm2dB0)
        assert_same_state(before, snapshot(learn.model), 'after sampling with the fix: ')

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
