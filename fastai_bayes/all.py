"Everything public in fastai_bayes: `from fastai_bayes.all import *` (hand-written, not generated)"
from .core import *
from .datasets import *
from .dropout import *
from .uncertainty import *
from .sampling import *
from .callback.mc import *
from .predictions import *
from .metrics import *
from .ensemble import *
from .interpret import *
from .variational import *
from .laplace import *
from .active import *
from .demo import *
from .report import *
from .triage import *
from .cli import *
