"Run every notebook in nbs/ (cells flagged `slow` skipped, as `tst_flags` in settings.ini says), one test each."
from pathlib import Path
import os, pytest

nbdev_test = pytest.importorskip('nbdev.test', reason='nbdev 2 is not installed here (the newest-fastai environment)')
root = Path(__file__).resolve().parent.parent
nbs = sorted(p for p in (root/'nbs').glob('*.ipynb') if not p.name.startswith('_'))

@pytest.mark.parametrize('nb', nbs, ids=[p.stem for p in nbs])
def test_notebook(nb, monkeypatch):
    monkeypatch.chdir(nb.parent)
    monkeypatch.setenv('MPLBACKEND', 'Agg')
    ok, _ = nbdev_test.test_nb(nb, skip_flags=['slow'], force_flags=[], do_print=False)
    assert ok, f'{nb.name} failed: run `nbdev_test --path {nb.relative_to(root)}` to see the failing cell'
