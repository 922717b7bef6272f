"""The docs site, built offline from the notebooks as `make docs` builds it (tools/docs.py: Sphinx + MyST-NB, the
tutorials executed), then read as a person reads it: headless Chromium opens the home page, an API page and every
tutorial, the tutorials' figures load, no internal link is broken, hidden cells and nbdev directives stay out of the
pages. Screenshots of the tutorial pages are written to _screenshots/docs/ (git-ignored) for people to look at."""
import json, re, shutil, subprocess, sys
from pathlib import Path
from urllib.parse import unquote, urlsplit
import pytest

pytest.importorskip('sphinx', reason='the docs generator is in the dev environment (.venv) only')
pytest.importorskip('myst_nb', reason='the docs generator is in the dev environment (.venv) only')
from bs4 import BeautifulSoup

root = Path(__file__).resolve().parent.parent
SHOTS = root/'_screenshots'/'docs'
sys.path.insert(0, str(root/'tools'))
import docs as docs_tool

TUTORIALS = docs_tool.tutorial_notebooks()
MODULES = docs_tool.module_notebooks()

@pytest.fixture(scope='module')
def site(tmp_path_factory):
    "The site, built from scratch into a temporary folder by the same script as `make docs`"
    tmp = tmp_path_factory.mktemp('docs')
    r = subprocess.run([sys.executable, str(root/'tools'/'docs.py'), '--out', str(tmp/'site'), '--work', str(tmp/'work')],
                       capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, f'the docs build failed:\n{r.stdout[-3000:]}\n{r.stderr[-8000:]}'
    return tmp/'site'

def soup(p:Path) -> BeautifulSoup: return BeautifulSoup(p.read_text(encoding='utf-8'), 'html.parser')
def main_text(p:Path) -> str: return soup(p).find('article').get_text('\n')

def test_a_page_for_everything(site):
    assert 'fastai_bayes' in soup(site/'index.html').title.get_text()
    for nb,_ in MODULES: assert (site/'api'/f'{docs_tool.page_stem(nb)}.html').exists(), nb
    for nb in TUTORIALS: assert (site/'tutorials'/f'{nb.stem}.html').exists(), nb
    assert len(TUTORIALS) >= 4 and len(MODULES) >= 15
    # the home page is the README, with the sidebar leading to every tutorial and module
    home = soup(site/'index.html')
    assert home.find('h1').get_text().strip().startswith('fastai_bayes')
    hrefs = {a['href'] for a in home.select('.sidebar-tree a')}
    assert {f'tutorials/{nb.stem}.html' for nb in TUTORIALS} <= hrefs
    assert {f'api/{docs_tool.page_stem(nb)}.html' for nb,_ in MODULES} <= hrefs

def test_api_page_signatures_and_argument_tables(site):
    page = soup(site/'api'/'triage.html')
    art = page.find('article')
    heads = [h.get_text().strip('¶# \n') for h in art.find_all('h3')]
    assert {'triage', 'triage_df', 'load_triage_learner', 'TriageError'} <= set(heads)
    code = art.get_text()
    assert 'triage(\n    learn:Learner | str | Path,' in code and ') -> pd.DataFrame' in code
    # the docments of `triage` as a table: one row per argument, with its type, default and comment
    tbl = next(t for t in art.find_all('table') if 'Refer this fraction' in t.get_text() and 'Monte Carlo passes' in t.get_text())
    rows = {r.find_all('td')[0].get_text().strip(): [c.get_text().strip() for c in r.find_all('td')[1:]]
            for r in tbl.find_all('tr') if r.find_all('td')}
    assert [c.get_text().strip() for c in tbl.find_all('th')] == ['Argument', 'Type', 'Default', 'Details']
    assert rows['refer'][1:] == ['None', 'Refer this fraction of the inputs, the most uncertain (a fixed share)']
    assert rows['refer'][0].replace(' ', '') == 'float|None' and rows['risk'][1] == 'None'
    assert rows['learn'][0] == 'Learner | str | Path' and rows['Returns'][0].replace(' ', '') == 'pd.DataFrame|None'
    # a patched method is documented under its class, the item-text function on its own page
    assert 'Learner.mc_predict' in main_text(site/'api'/'predictions.html')
    items = main_text(site/'api'/'items.html')
    assert 'item_inputs' in items and 'detokenize' in items and 'Positions in the dataset' in items

def test_no_hidden_cells_nor_directives(site):
    for p in site.rglob('*.html'):
        txt = p.read_text(encoding='utf-8')
        assert not re.search(r'#\|\s*(export|hide|default_exp|slow)', txt), p
    squash = lambda t: re.sub(r'\s+', '', t)  # code is split into highlighted spans: compare without whitespace
    for nb in TUTORIALS:
        text = squash(soup(site/'tutorials'/f'{nb.stem}.html').find('article').get_text())
        hidden,shown = [],[]
        for c in docs_tool.read_cells(nb):
            if c['cell_type'] != 'code': continue
            dirs,code = docs_tool.directives(c['source'])
            lines = [squash(l.split('  #')[0]) for l in code.splitlines() if l.strip() and not l.strip().startswith('#')]
            (hidden if 'hide' in dirs else shown).extend(lines)
        assert hidden, f'{nb.name} has no `#| hide` check cells'
        for l in hidden:
            if l not in shown: assert l not in text, f'{nb.name}: a hidden line is on the page: {l}'
        for l in shown: assert l[:40] in text, f'{nb.name}: a visible line is missing: {l}'

def test_internal_links_and_local_resources(site):
    checked,ids = 0,{}
    def page_ids(p):
        if p not in ids: ids[p] = {t.get('id') for t in soup(p).find_all(id=True)} | {t.get('name') for t in soup(p).find_all(attrs={'name': True})}
        return ids[p]
    for p in site.rglob('*.html'):
        s = soup(p)
        for tag,attr in (('a', 'href'), ('img', 'src'), ('script', 'src'), ('link', 'href')):
            for t in s.find_all(tag):
                url = t.get(attr)
                if not url or url.startswith(('mailto:', 'javascript:', 'data:')): continue
                u = urlsplit(url)
                if u.scheme or u.netloc:
                    assert tag == 'a', f'{p.relative_to(site)} loads {url} from the network'
                    continue
                target = p if not u.path else (p.parent/unquote(u.path)).resolve()
                assert target.exists(), f'{p.relative_to(site)}: broken link {url}'
                if u.fragment and target.suffix == '.html':
                    assert unquote(u.fragment) in page_ids(target), f'{p.relative_to(site)}: no #{u.fragment} in {url}'
                checked += 1
    assert checked > 1000

_CHECK_JS = """<script>window.addEventListener('load',()=>setTimeout(()=>{const i=[...document.querySelectorAll('article img')];
const b=document.body.dataset;b.imagesLoaded=i.filter(o=>o.complete&&o.naturalWidth>0&&o.naturalHeight>0).length+'/'+i.length;
b.math=document.querySelectorAll('mjx-container').length;b.pageHeight=document.documentElement.scrollHeight;},3000));</script>"""

def executed_figures(site:Path, stem:str) -> int:
    "Pictures in the shown outputs of a tutorial as MyST-NB executed it (its copy beside the build)"
    nb = json.loads((site.parent/'work'/'jupyter_execute'/'tutorials'/f'{stem}.ipynb').read_text(encoding='utf-8'))
    return sum('image/png' in o.get('data', {}) for c in nb['cells'] if c['cell_type'] == 'code'
               and not {'remove-cell', 'remove-output'} & set(c.get('metadata', {}).get('tags', [])) for o in c['outputs'])

def _chromium():
    b = shutil.which('chromium') or shutil.which('chromium-browser')
    if b is None: pytest.skip('Chromium is not installed (`make test` installs Debian chromium where it can)')
    return b

def _open(browser, url, *args):
    return subprocess.run([browser, '--headless', '--no-sandbox', '--disable-gpu', '--hide-scrollbars',
                           '--virtual-time-budget=20000', *args, url], capture_output=True, text=True, timeout=180)

def test_pages_render_in_chromium(site, tmp_path):
    browser = _chromium()
    copy = tmp_path/'site'
    shutil.copytree(site, copy)
    pages = ['index.html', 'api/triage.html'] + [f'tutorials/{nb.stem}.html' for nb in TUTORIALS]
    for rel in pages:  # the check script goes into a copy: the site itself stays as built
        p = copy/rel
        p.write_text(p.read_text(encoding='utf-8').replace('</body>', _CHECK_JS + '</body>'), encoding='utf-8')
    SHOTS.mkdir(parents=True, exist_ok=True)
    for rel in pages:
        r = _open(browser, (copy/rel).as_uri(), '--window-size=1280,4000', '--dump-dom')
        d = BeautifulSoup(r.stdout, 'html.parser').body
        assert d is not None and d.get('data-images-loaded'), f'{rel} did not finish loading in Chromium: {r.stderr[-2000:]}'
        loaded,total = map(int, d['data-images-loaded'].split('/'))
        assert loaded == total, f'{rel}: only {loaded} of {total} images loaded'
        assert d.find('article').find('h1'), rel
        if rel == 'index.html': assert int(d['data-math']) > 0, 'MathJax (local) typeset nothing on the home page'
        if rel.startswith('tutorials/'):
            made = executed_figures(site, Path(rel).stem)
            assert total == made >= 2, f'{rel} shows {total} figures, its notebook made {made}'
            h = min(int(d['data-page-height']), 16000)
            shot = SHOTS/(Path(rel).stem + '.png')
            shot.unlink(missing_ok=True)
            _open(browser, (copy/rel).as_uri(), f'--window-size=1280,{h}', f'--screenshot={shot}')
            assert shot.read_bytes()[:4] == b'\x89PNG' and shot.stat().st_size > 50_000, shot

def test_tutorial_figures_are_the_notebooks(site):
    "Every picture the executed tutorial made is on its page, as an image file beside the site (not a network URL)"
    for nb in TUTORIALS:
        imgs = soup(site/'tutorials'/f'{nb.stem}.html').find('article').find_all('img')
        srcs = [i['src'] for i in imgs]
        assert srcs and all(s.startswith('../_images/') for s in srcs), (nb.name, srcs[:3])
        assert all((site/'tutorials'/s).stat().st_size > 2000 for s in srcs)
