import os
os.environ.setdefault('MPLBACKEND', 'Agg')

def pytest_pycollect_makeitem(collector, name, obj):
    "Collect only tests defined in the test module itself, not `test_*` helpers star-imported from fastai/fastcore"
    mod = getattr(collector, 'module', None)
    if name.startswith('test') and callable(obj) and mod is not None and getattr(obj, '__module__', mod.__name__) != mod.__name__:
        return []
