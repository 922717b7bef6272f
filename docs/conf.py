"""Sphinx configuration of the docs site. `make docs` runs tools/docs.py, which writes the pages' sources into
_proc/docs (the README as the home page, a page per module, the tutorials) and builds them with this file: Sphinx,
MyST-NB (executes the tutorials), the Furo theme and a local MathJax, all from PyPI and all offline."""
import configparser
from pathlib import Path

_cfg = configparser.ConfigParser(delimiters=['='])
_cfg.read(Path(__file__).resolve().parent.parent/'settings.ini', encoding='utf-8')
_cfg = _cfg['DEFAULT']

project = _cfg['lib_name']
author = _cfg['author']
copyright = _cfg['copyright']
release = version = _cfg['version']

extensions = ['myst_nb']
source_suffix = {'.md': 'myst-nb', '.ipynb': 'myst-nb'}
exclude_patterns = ['_build', '**.ipynb_checkpoints']
root_doc = 'index'

# MyST: $math$, heading anchors for links to a function's section, notebook-style links (`page.md#name`)
myst_enable_extensions = ['dollarmath', 'amsmath', 'colon_fence', 'deflist']
myst_heading_anchors = 3
suppress_warnings = ['myst.header']  # module pages put `### name` headings straight under the page title

# MyST-NB: execute every tutorial at build time (no cache: the pictures are always those of the current library),
# stop the build on an error, leave warnings printed to stderr out of the pages
nb_execution_mode = 'force'
nb_execution_timeout = 900
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_output_stderr = 'remove'
nb_merge_streams = True

# MathJax from the files of the PyPI package sphinx-mathjax-offline (MathJax 3.2.2), not from a CDN: the package's own
# extension cannot be imported (its folder has dashes in its name), so this file copies the files as it would
mathjax_path = 'mathjax/tex-chtml.js'

def _mathjax_dir() -> Path:
    from importlib.metadata import distribution
    dist = distribution('sphinx-mathjax-offline')
    core = next(f for f in dist.files if f.name == 'tex-chtml.js' and f.parent.name == 'mathjax')
    return Path(dist.locate_file(core)).parent

def _copy_mathjax(app, exc):
    if exc is None and app.builder.format == 'html':
        from sphinx.util.fileutil import copy_asset
        copy_asset(_mathjax_dir(), Path(app.outdir)/'_static'/'mathjax')

def setup(app):
    _mathjax_dir()  # fail early when the package is missing
    app.connect('build-finished', _copy_mathjax)

html_theme = 'furo'
html_title = f"{project} {release}"
html_static_path = ['_static']
html_css_files = ['custom.css']
html_show_sourcelink = False
html_copy_source = False
html_theme_options = {'navigation_with_keys': True}
