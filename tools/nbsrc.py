#!/usr/bin/env python3
"""Round-trip notebooks through a plain-text cell format, for editing notebooks outside Jupyter.

Format: cells separated by lines `#%%` (code) or `#%% md` (markdown); everything up to the next marker is the cell.
  python tools/nbsrc.py to-nb SRC.txt nbs/NAME.ipynb   # write a clean notebook (stable cell ids, no outputs)
  python tools/nbsrc.py to-src nbs/NAME.ipynb          # print a notebook in the text format
The notebook is the source of truth; text files made with this tool are scratch and are not committed."""
import hashlib, json, re, sys
from pathlib import Path

def _cells(txt):
    cells, cur = [], None
    for line in txt.splitlines():
        m = re.fullmatch(r'#%%(\s+md)?\s*', line)
        if m:
            if cur: cells.append(cur)
            cur = ['markdown' if m.group(1) else 'code', []]
        elif cur is not None: cur[1].append(line)
    if cur: cells.append(cur)
    for kind, lines in cells:
        while lines and not lines[-1].strip(): lines.pop()
        while lines and not lines[0].strip(): lines.pop(0)
    return [(k, '\n'.join(l)) for k, l in cells if l]

def _cell_id(src, seen):
    h = hashlib.sha1(src.encode()).hexdigest()[:8]
    while h in seen: h = hashlib.sha1((h + src).encode()).hexdigest()[:8]
    seen.add(h)
    return h

def to_nb(src, dest):
    seen, cells = set(), []
    for kind, text in _cells(Path(src).read_text()):
        lines = text.splitlines(keepends=True)
        c = dict(cell_type=kind, id=_cell_id(text, seen), metadata={}, source=lines)
        if kind == 'code': c.update(execution_count=None, outputs=[])
        cells.append(c)
    nb = dict(cells=cells, metadata=dict(kernelspec=dict(display_name='python3', language='python', name='python3')),
              nbformat=4, nbformat_minor=5)
    Path(dest).write_text(json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + '\n')

def to_src(nb):
    out = []
    for c in json.loads(Path(nb).read_text())['cells']:
        out.append('#%% md' if c['cell_type'] == 'markdown' else '#%%')
        out.append(''.join(c['source']))
        out.append('')
    return '\n'.join(out)

if __name__ == '__main__':
    cmd, *args = sys.argv[1:]
    if cmd == 'to-nb': to_nb(*args)
    elif cmd == 'to-src': print(to_src(*args))
    else: sys.exit(__doc__)
