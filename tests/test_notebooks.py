"""Run every notebook in nbs/ but the tutorials (the docs build runs those), each in its own process (a notebook patches classes: sharing one interpreter would let
one notebook's definitions leak into the next). Cells flagged `slow` are skipped, as `tst_flags` in settings.ini says."""
from pathlib import Path
import os, subprocess, sys, pytest

pytest.importorskip('nbdev', reason='nbdev 2 is not installed here (the newest-fastai environment)')
root = Path(__file__).resolve().parent.parent
# the tutorials are executed by the docs build of tests/test_docs.py (MyST-NB, which fails on any error): not twice
nbs = sorted(p for p in (root/'nbs').glob('*.ipynb') if not p.name.startswith(('_', 'tutorial_')))

@pytest.mark.parametrize('nb', nbs, ids=[p.stem for p in nbs])
def test_notebook(nb):
    cmd = [str(Path(sys.executable).parent/'nbdev_test'), '--path', str(nb.relative_to(root)), '--n_workers', '0']
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env={**os.environ, 'MPLBACKEND': 'Agg'})
    assert r.returncode == 0, f'{nb.name} failed:\n{r.stderr[-6000:]}'
