#!/usr/bin/env python3
"""Write README.md from nbs/index.ipynb (markdown cells as they are, code cells as python blocks; `#| hide` cells left
out). nbdev's own `nbdev_readme` needs Quarto, which cannot be installed offline; this does the same for our README.
  python tools/readme.py          # write README.md
  python tools/readme.py --check  # exit 1 if README.md is not what index.ipynb gives"""
import json, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent

def render(nb_path=root/'nbs'/'index.ipynb'):
    out = []
    for c in json.loads(Path(nb_path).read_text())['cells']:
        src = ''.join(c['source'])
        lines = src.splitlines()
        if any(l.strip().replace(' ', '') in ('#|hide', '#|hide_input') for l in lines): continue
        if c['cell_type'] == 'markdown': out.append(src.strip())
        elif c['cell_type'] == 'code':
            code = '\n'.join(l for l in lines if not l.lstrip().startswith('#|')).strip()
            if code: out.append(f"```python\n{code}\n```")
    return '<!-- Generated from nbs/index.ipynb by tools/readme.py: edit the notebook, not this file. -->\n\n' + '\n\n'.join(out) + '\n'

if __name__ == '__main__':
    txt, dest = render(), root/'README.md'
    if '--check' in sys.argv[1:]:
        if not dest.exists() or dest.read_text() != txt: sys.exit('README.md is out of date: run `python tools/readme.py`')
    else: dest.write_text(txt)
