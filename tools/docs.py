#!/usr/bin/env python3
"""Build the docs site from the notebooks, offline (nbdev's own docs need Quarto, which cannot be installed here).
  python tools/docs.py               # the site in _docs/ (open _docs/index.html); `make docs` runs this
  python tools/docs.py --out DIR     # elsewhere (tests/test_docs.py builds into a temporary folder)
Two steps. 1: write the pages' sources into _proc/docs: README.md as the home page; a page per module notebook (its
prose and examples, and in place of each `#| export` cell the signature, docstring and docments argument table of
what it defines, rendered from the installed package); each tutorial notebook with `#| hide` cells tagged
`remove-cell` (they still run) and every `#|` directive line taken out. 2: Sphinx with MyST-NB (docs/conf.py)
executes the tutorials and writes the HTML, the plots as image files beside the pages."""
import argparse, ast, importlib, inspect, json, os, re, shutil, subprocess, sys, time
from pathlib import Path

root = Path(__file__).resolve().parent.parent
NBS = root/'nbs'
TUTORIAL_ORDER = ['tutorial_vision', 'tutorial_text', 'tutorial_tabular', 'tutorial_regression', 'tutorial_segmentation']
_re_dir = re.compile(r'^\s*#\|\s*([\w-]+):?\s*(.*?)\s*$')

def directives(src:str) -> tuple:
    "`({directive: value}, source without directive lines)` of a code cell (nbdev's `#| name value` comments)"
    dirs,keep = {},[]
    for line in src.splitlines():
        m = _re_dir.match(line)
        if m: dirs[m.group(1)] = m.group(2)
        else: keep.append(line)
    return dirs,'\n'.join(keep).strip('\n')

def read_cells(nb:Path) -> list:
    return [dict(c, source=''.join(c['source'])) for c in json.loads(nb.read_text(encoding='utf-8'))['cells']]

def page_stem(nb:Path) -> str:
    "A notebook's page name, as nbdev names it: the number prefix dropped (`95_triage` → `triage`)"
    return re.sub(r'^\d+[a-z]?_', '', nb.stem)

def module_notebooks() -> list:
    "`(notebook, module)` of every notebook that exports a module, in reading order"
    out = []
    for nb in sorted(NBS.glob('*.ipynb')):
        if nb.name.startswith('_'): continue
        for c in read_cells(nb):
            m = re.search(r'^\s*#\|\s*default_exp\s+(\S+)', c['source'], re.M) if c['cell_type'] == 'code' else None
            if m: out.append((nb, m.group(1))); break
    return out

def tutorial_notebooks() -> list:
    found = {p.stem: p for p in NBS.glob('tutorial*.ipynb')}
    return [found.pop(s) for s in TUTORIAL_ORDER if s in found] + sorted(found.values())

# ---- API pages: signature, docstring and docments table of each exported name ----

def _anno(a) -> str:
    if a is inspect.Parameter.empty: return ''
    if isinstance(a, str): return a
    if isinstance(a, type): return a.__qualname__
    return str(a).replace('typing.', '')

def _default(v) -> str:
    "A default value as code: classes and functions by name (not `<class '...'>`), the rest as `repr`"
    if isinstance(v, (tuple, list)): return ('({})' if isinstance(v, tuple) else '[{}]').format(', '.join(map(_default, v)) + (',' if len(v) == 1 and isinstance(v, tuple) else ''))
    if isinstance(v, type) or inspect.isfunction(v): return v.__qualname__
    return repr(v)

def signature(obj, name:str) -> str:
    "`name(arg:type=default, ...) -> ret`, wrapped at 100 characters"
    bases = lambda: ', '.join(b.__qualname__ for b in obj.__bases__ if b is not object)
    try: sig = inspect.signature(obj)
    except (TypeError, ValueError): return f"class {name}({bases()})" if isinstance(obj, type) else name
    parts,star = [],False
    for p in sig.parameters.values():
        if p.kind == p.KEYWORD_ONLY and not star: parts.append('*'); star = True
        s = {p.VAR_POSITIONAL: '*', p.VAR_KEYWORD: '**'}.get(p.kind, '') + p.name
        if p.kind == p.VAR_POSITIONAL: star = True
        if p.annotation is not p.empty: s += ':' + _anno(p.annotation)
        if p.default is not p.empty: s += '=' + _default(p.default)
        parts.append(s)
    ret = '' if sig.return_annotation is sig.empty else ' -> ' + _anno(sig.return_annotation)
    one = f"{name}({', '.join(parts)}){ret}"
    if len(one) <= 100: return one
    return f"{name}(\n" + ''.join(f"    {o},\n" for o in parts) + f"){ret}"

def _cell(s) -> str: return str(s).replace('|', '\\|').replace('\n', ' ')

def argument_table(obj) -> str:
    "The docments of `obj` as a Markdown table (argument, type, default, details); '' when it has none"
    from fastcore.docments import docments
    try: sig,dm = inspect.signature(obj),docments(obj, full=True)
    except (TypeError, ValueError): return ''
    params = [p for p in sig.parameters.values() if p.name not in ('self', 'cls')]
    if not any((dm.get(p.name) or {}).get('docment') for p in params): return ''
    rows = ['| Argument | Type | Default | Details |', '|---|---|---|---|']
    for p in params:
        pre = {p.VAR_POSITIONAL: '\\*', p.VAR_KEYWORD: '\\*\\*'}.get(p.kind, '')
        default = '' if p.default is p.empty else f'`{_cell(_default(p.default))}`'
        rows.append(f"| {pre}`{p.name}` | {_cell(_anno(p.annotation))} | {default} | {_cell((dm.get(p.name) or {}).get('docment') or '')} |")
    if sig.return_annotation is not sig.empty:
        rows.append(f"| **Returns** | {_cell(_anno(sig.return_annotation))} | | {_cell((dm.get('return') or {}).get('docment') or '')} |")
    return '\n'.join(rows)

def doc_block(obj, name:str) -> str:
    "What nbdev's `show_doc` shows, as MyST: a heading, the signature, the docstring, the argument table"
    f = getattr(obj, '__wrapped__', obj) if callable(obj) and not isinstance(obj, type) else obj
    doc = (inspect.getdoc(f) or '').strip()
    out = [f"### {name}", f"```python\n{signature(f, name)}\n```"]
    if doc: out.append(doc)
    tbl = argument_table(f)
    if tbl: out.append(tbl)
    return '\n\n'.join(out)

def _defined_names(src:str) -> list:
    "Public functions and classes a cell defines; a `@patch`ed method as `Class.method`"
    names = []
    for node in ast.parse(src).body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith('_'): continue
        cls = None
        for d in node.decorator_list:
            d = d.func if isinstance(d, ast.Call) else d
            if getattr(d, 'id', getattr(d, 'attr', None)) == 'patch' and node.args.args:
                a = node.args.args[0].annotation
                cls = ast.unparse(a).split('|')[0].strip() if a is not None else None
        names.append(f'{cls}.{node.name}' if cls else node.name)
    return names

def _resolve(name:str, ns:dict):
    obj = ns[name.split('.')[0]]
    for a in name.split('.')[1:]: obj = getattr(obj, a)
    return obj

def _link(md:str, pages:dict, up:str='') -> str:
    "nbdev-style links between notebooks (`triage.html#x`) and README links (`nbs/...`) as links between the pages"
    def to(stem, anchor, whole): return f"]({pages[stem]}{anchor or ''})" if stem in pages else whole
    md = re.sub(r'\]\(([\w.\-]+)\.html(#[\w\-.]*)?\)', lambda m: to(m.group(1), m.group(2), m.group(0)), md)
    md = re.sub(r'\]\(nbs/([\w.\-]+)\.ipynb(#[\w\-.]*)?\)', lambda m: to(page_stem(Path(m.group(1))), m.group(2), m.group(0)), md)
    return md.replace('](nbs/images/', f']({up}images/')

def api_page(nb:Path, module:str, pages:dict) -> str:
    "A module notebook as a MyST page: prose and example code as they are, each export replaced by its documentation"
    all_ns = vars(importlib.import_module('fastai_bayes.all'))
    mod = importlib.import_module(f'fastai_bayes.{module}')
    ns = {**all_ns, **vars(mod)}
    out,first_md = [],True
    for c in read_cells(nb):
        src = c['source']
        if c['cell_type'] == 'markdown':
            out.append(_link(src, pages, up='../'))
            if first_md and src.lstrip().startswith('# '):
                first_md = False
                out.append(f"<small>Module `fastai_bayes.{module}`, written in the notebook `nbs/{nb.name}`.</small>")
            continue
        if c['cell_type'] != 'code': continue
        dirs,code = directives(src)
        if dirs.keys() & {'hide', 'default_exp', 'exporti'} or not code.strip(): continue
        if dirs.keys() & {'export', 'exports'}:
            out += [doc_block(_resolve(n, ns), n) for n in _defined_names(code)]
            if 'exports' in dirs: out.append(f"```python\n{code}\n```")
            continue
        shown = re.findall(r'^show_doc\((.+)\)\s*$', code, re.M)
        if shown and len(shown) == len(code.strip().splitlines()):
            for expr in shown:
                expr = expr.split(',')[0].strip()
                out.append(doc_block(eval(expr, ns), expr))
            continue
        out.append(f"```python\n{code}\n```")
    return '\n\n'.join(out) + '\n'

# ---- tutorials: executed by MyST-NB; `#| hide` cells run but are not shown ----

def tutorial_nb(nb:Path) -> dict:
    d = json.loads(nb.read_text(encoding='utf-8'))
    for c in d['cells']:
        if c['cell_type'] != 'code': continue
        dirs,code = directives(''.join(c['source']))
        tags = set(c.get('metadata', {}).get('tags', []))
        if 'hide' in dirs: tags.add('remove-cell')
        if 'hide_input' in dirs or dirs.get('echo') == 'false': tags.add('remove-input')
        if 'hide_output' in dirs or dirs.get('output') == 'false': tags.add('remove-output')
        if dirs.get('eval') == 'false': tags.add('skip-execution')
        c['source'] = code
        c['outputs'],c['execution_count'] = [],None
        c.setdefault('metadata', {})['tags'] = sorted(tags)
    d['metadata']['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
    return d

def home_page(pages:dict, tutorials:list, modules:list) -> str:
    readme = (root/'README.md').read_text(encoding='utf-8')
    readme = re.sub(r'^<!--.*?-->\s*', '', readme, flags=re.S)
    toc = lambda caption, docs: f"```{{toctree}}\n:caption: {caption}\n:hidden:\n\n" + '\n'.join(docs) + "\n```"
    return '\n\n'.join([_link(readme, pages),
                        toc('Tutorials', [f'tutorials/{p.stem}' for p in tutorials]),
                        toc('API', [f'api/{page_stem(nb)}' for nb,_ in modules])]) + '\n'

def stage(src:Path) -> dict:
    "Write the pages' sources into `src`; the counts of pages"
    if src.exists(): shutil.rmtree(src)
    (src/'api').mkdir(parents=True); (src/'tutorials').mkdir()
    modules,tutorials = module_notebooks(),tutorial_notebooks()
    pages = {page_stem(nb): f'api/{page_stem(nb)}.md' for nb,_ in modules}
    pages.update({p.stem: f'tutorials/{p.stem}.ipynb' for p in tutorials})
    from_api = {k: v[4:] if v.startswith('api/') else '../' + v for k,v in pages.items()}
    for nb,module in modules: (src/'api'/f'{page_stem(nb)}.md').write_text(api_page(nb, module, from_api), encoding='utf-8')
    for p in tutorials: (src/'tutorials'/p.name).write_text(json.dumps(tutorial_nb(p), indent=1), encoding='utf-8')
    (src/'index.md').write_text(home_page(pages, tutorials, modules), encoding='utf-8')
    if (NBS/'images').exists(): shutil.copytree(NBS/'images', src/'images')
    return dict(modules=len(modules), tutorials=len(tutorials))

def loopback_up() -> None:
    """Jupyter kernels talk to the build over 127.0.0.1. Under `unshare -n` (how `make docs` and the test command run)
    the new network namespace's loopback starts down, so the tutorials' kernels never answer: bring it up. Nothing
    outside the namespace becomes reachable; outside a fresh namespace the interface is already up and this does nothing."""
    import fcntl, socket, struct
    SIOCGIFFLAGS,SIOCSIFFLAGS,IFF_UP = 0x8913,0x8914,0x1
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            flags = struct.unpack('16sh', fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack('16sh', b'lo', 0))[:18])[1]
            if not flags & IFF_UP: fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack('16sh', b'lo', flags | IFF_UP))
    except OSError as e: print(f"docs: could not bring the loopback interface up ({e}); kernels may not start", flush=True)

def build(out:Path, work:Path, jobs:str='2') -> None:
    t0 = time.time()
    loopback_up()
    src,html = work/'src',work/'html'
    n = stage(src)
    print(f"docs: staged the home page, {n['modules']} API pages and {n['tutorials']} tutorials in {src} ({time.time()-t0:.0f} s)", flush=True)
    env = {**os.environ, 'PATH': f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # the kernel's `python`
           'MPLBACKEND': 'module://matplotlib_inline.backend_inline', 'PYDEVD_DISABLE_FILE_VALIDATION': '1'}
    if jobs.isdigit() and int(jobs) > 1 and 'OMP_NUM_THREADS' not in os.environ:
        # tutorials run side by side: torch threads that outnumber the cores spin and slow each other down
        env['OMP_NUM_THREADS'] = str(max(1, (os.cpu_count() or 1) // int(jobs)))
    if html.exists(): shutil.rmtree(html)
    cmd = [sys.executable, '-m', 'sphinx', '-b', 'html', '-c', str(root/'docs'), '-d', str(work/'doctrees'),
           '-j', jobs, '-W', '--keep-going', '-q', '-E', str(src), str(html)]
    r = subprocess.run(cmd, env=env, cwd=root)
    if r.returncode: sys.exit(f"docs: sphinx-build failed (exit {r.returncode})")
    if out.exists(): shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(html), str(out))
    print(f"docs: built {out/'index.html'} in {time.time()-t0:.0f} s", flush=True)

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', default=str(root/'_docs'), help='folder of the built site (replaced)')
    ap.add_argument('--work', default=str(root/'_proc'/'docs'), help='folder for the staged sources and Sphinx state')
    ap.add_argument('-j', '--jobs', default='2', help="Sphinx's parallel jobs (tutorials execute in parallel)")
    a = ap.parse_args()
    build(Path(a.out).resolve(), Path(a.work).resolve(), a.jobs)
