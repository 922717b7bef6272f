import os
os.environ.setdefault('MPLBACKEND', 'Agg')

def pytest_pycollect_makeitem(collector, name, obj):
    "Collect only tests defined in the test module itself, not `test_*` helpers star-imported from fastai/fastcore"
    mod = getattr(collector, 'module', None)
    if name.startswith('test') and callable(obj) and mod is not None and getattr(obj, '__module__', mod.__name__) != mod.__name__:
        return []

# Robustness check, off by default: FASTAI_BAYES_TEST_SEED_SHIFT=k shifts every seed the tests themselves give
# `no_random`/`set_seed` (the trained models, the data splits) by k·1009. A statistical test must hold for the models
# other seeds train, as it must on a machine whose floating point gives a different model from the same seed.
_SHIFT = int(os.environ.get('FASTAI_BAYES_TEST_SEED_SHIFT', 0))

def pytest_collection_modifyitems(session, config, items):
    if not _SHIFT: return
    import sys
    from fastai.torch_core import no_random, set_seed
    shifted = {no_random: lambda seed=42, reproducible=True: no_random(seed + 1009*_SHIFT, reproducible),
               set_seed: lambda s, reproducible=False: set_seed(s + 1009*_SHIFT, reproducible)}
    mods = {item.module for item in items} | {sys.modules.get('_helpers')}
    for m in mods - {None}:
        for name in ('no_random', 'set_seed'):
            if getattr(m, name, None) in shifted: setattr(m, name, shifted[getattr(m, name)])

import pytest

@pytest.fixture(scope='module', autouse=True)
def _same_start_per_file():
    "Every test file starts from the same random state, whatever files ran before it (a fastai DataLoader seeds its shuffle from it)"
    from fastai.torch_core import set_seed
    set_seed(1009*_SHIFT)
