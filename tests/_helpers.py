"Helpers shared by the real-data tests."
from fastai.vision.all import *

def fit_quietly(learn, epochs=1, lr=1e-2):
    "Seeded `fit_one_cycle` with no progress bar or log"
    with no_random(0), learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr)
    return learn

def tiny_cnn(pretrained=False, **kwargs):
    "A small convolutional body for vision_learner (resnet18 costs ~3 s a training batch on these 2 CPU cores)"
    return nn.Sequential(ConvLayer(3, 16, stride=2), ConvLayer(16, 32, stride=2), ConvLayer(32, 64), nn.AdaptiveAvgPool2d(1))
