"The `fastai_bayes_triage` console command on real exported learners: outputs, the report in a browser, bad input."
import html as html_mod, json, math, os, re, shutil, subprocess, sys
from pathlib import Path
import pytest
from fastai.vision.all import *
from fastai.tabular.all import *
from fastai_bayes.all import *
from fastai_bayes.triage import *
from _helpers import fit_quietly, mnist_dls

CMD = str(Path(sys.executable).parent/'fastai_bayes_triage')

def run_cli(*args, cwd=None):
    return subprocess.run([CMD, *map(str, args)], capture_output=True, text=True, cwd=cwd)

@pytest.fixture(scope='module')
def vision(tmp_path_factory):
    "An exported MNIST learner and a folder of held-out digits, silhouettes, a broken PNG and a text file"
    tmp = tmp_path_factory.mktemp('triage')
    dls = mnist_dls(400)
    learn = fit_quietly(vision_learner(dls, demo_cnn, pretrained=False), 1)
    learn.export(tmp/'digits.pkl')
    inp = demo_inputs(tmp/'inputs', n_digits=30, n_animals=10)
    (inp/'broken.jpg').write_bytes(b'\xff\xd8\xff' + b'\0'*40)
    (inp/'readme.txt').write_text('not an image')
    return tmp/'digits.pkl',inp

def test_cli_writes_csv_plots_report(vision, tmp_path):
    learner,inp = vision
    r = run_cli(learner, inp, '--n', 8, '--refer', 0.1, '--score', 'entropy', '--out', tmp_path/'out')
    assert r.returncode == 0, r.stderr
    assert 'Triaged 40 inputs with 8 Monte Carlo passes each: 4 referred' in r.stdout
    assert 'Skipped 1 unreadable input(s), e.g. broken.jpg' in r.stdout
    t = pd.read_csv(tmp_path/'out'/'triage.csv')
    assert list(t.columns[:3]) == ['item','pred','prob'] and 'mutual_info' in t and 'refer' in t
    assert len(t) == 40 and t['refer'].sum() == 4
    assert set(t.index[t.refer]) == set(t['entropy'].nlargest(4, keep='first').index)
    # the CSV's numbers are mc_predict's on the same files with the same seed
    learn = load_triage_learner(learner)
    files = [inp/f for f in t['item']]
    res = learn.mc_predict(learn.dls.test_dl(files), n=8, seed=42)
    np.testing.assert_allclose(t['entropy'].values, res.entropy.numpy(), atol=1e-5)
    np.testing.assert_allclose(t['prob'].values, res.mean.max(1)[0].numpy(), atol=1e-5)
    assert (pd.read_csv(tmp_path/'out'/'skipped.csv')['item'] == ['broken.jpg']).all()
    for f in ('uncertainty_scores.png', 'predictions.png', 'most_uncertain_inputs.png'):
        assert (tmp_path/'out'/f).read_bytes()[:4] == b'\x89PNG'

def test_report_images_load_in_chromium(vision, tmp_path):
    browser = shutil.which('chromium') or shutil.which('chromium-browser')
    if browser is None: pytest.skip('Chromium is not installed (`make test` installs Debian chromium where it can)')
    learner,inp = vision
    assert run_cli(learner, inp, '--n', 5, '--out', tmp_path/'out').returncode == 0
    html_ = tmp_path/'out'/'report.html'
    assert 'src=\'data:image/png;base64,' in html_.read_text() and 'src="http' not in html_.read_text()
    r = subprocess.run([browser, '--headless', '--no-sandbox', '--disable-gpu', '--virtual-time-budget=10000',
                        '--dump-dom', html_.as_uri()], capture_output=True, text=True, timeout=120)
    m = re.search(r'data-images-loaded="(\d+)/(\d+)"', r.stdout)
    assert m, f'the report did not finish loading in Chromium: {r.stderr[-2000:]}'
    loaded,total = map(int, m.groups())
    # 3 plots and one thumbnail per row of the 30 most uncertain inputs, every one decoded by the browser
    assert total == 33 and loaded == total

def test_cli_bad_input(vision, tmp_path):
    learner,inp = vision
    def err(*args):
        r = run_cli(*args, '--out', tmp_path/'o')
        assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr
        return r.stderr
    assert 'does not exist' in err(tmp_path/'nope.pkl', inp)
    (tmp_path/'junk.pkl').write_bytes(b'definitely not a pickle')
    assert 'is not a fastai learner export' in err(tmp_path/'junk.pkl', inp)
    (tmp_path/'empty').mkdir()
    assert 'holds no image files' in err(learner, tmp_path/'empty')
    assert 'Pass both LEARNER and INPUTS' in err(learner)
    assert 'must be in [0, 1)' in err(learner, inp, '--refer', 2)
    bad = tmp_path/'bad'; bad.mkdir(); (bad/'a.png').write_bytes(b'\x89PNG junk')
    assert 'None of the 1 image files' in err(learner, bad)
    (tmp_path/'afile').write_text('x')
    r = run_cli(learner, inp, '--out', tmp_path/'afile')
    assert r.returncode == 1 and 'Traceback' not in r.stderr and 'is a file: name a folder' in r.stderr, r.stderr
    assert (tmp_path/'afile').read_text() == 'x'
    h = run_cli('--help')
    assert h.returncode == 0 and 'only load files you trust' in h.stdout.replace('\n', ' ')

def test_tabular_csv(tmp_path):
    df = adult_census(800)
    a = df.attrs
    dls = TabularDataLoaders.from_df(df, procs=[Categorify, FillMissing, Normalize], cat_names=a['cat_names'],
                                     cont_names=a['cont_names'], y_names=a['y_names'], valid_idx=list(range(600, 800)), bs=64)
    learn = fit_quietly(tabular_learner(dls, layers=[50], config=tabular_config(ps=[0.2], embed_p=0.1)), 1)
    learn.export(tmp_path/'adult.pkl')
    new = df.iloc[600:700].drop(columns=a['y_names'])
    new.to_csv(tmp_path/'rows.csv', index=False)
    r = run_cli(tmp_path/'adult.pkl', tmp_path/'rows.csv', '--n', 10, '--out', tmp_path/'out')
    assert r.returncode == 0, r.stderr
    t = pd.read_csv(tmp_path/'out'/'triage.csv')
    assert len(t) == 100 and t['refer'].sum() == 5 and t['pred'].isin(learn.dls.vocab).all()
    res = learn.mc_predict(learn.dls.test_dl(new), n=10, seed=42)
    np.testing.assert_allclose(t['mutual_info'].values, res.mutual_info.numpy(), atol=1e-5)
    # the row's own fields beside the prediction: every column of the CSV, as it was
    assert list(t.columns[:len(new.columns)+2]) == ['item', *new.columns, 'pred'][:len(new.columns)+2]
    pd.testing.assert_frame_equal(t[list(new.columns)], pd.read_csv(tmp_path/'rows.csv'))
    page = (tmp_path/'out'/'report.html').read_text()
    top = t.sort_values('mutual_info', ascending=False, kind='stable').head(30)
    rows = re.findall(r"<tr class='(?:refer)?'>(.*?)</tr>", page, re.S)
    def shown(v): return '' if pd.isna(v) else f'{v:.4g}' if isinstance(v, float) else html_mod.escape(str(v))
    assert len(rows) == 30
    for row,(_,r) in zip(rows, top.iterrows()):   # each report row shows that input's fields, in the ranking's order
        cells = re.findall(r"<td class='input'>(.*?)</td>", row)
        assert cells == [shown(r[c]) for c in new.columns], (cells, r)
    assert not (tmp_path/'out'/'most_uncertain_inputs.png').exists()
    new.drop(columns=[a['cont_names'][0], a['cat_names'][0]]).to_csv(tmp_path/'short.csv', index=False)
    r = run_cli(tmp_path/'adult.pkl', tmp_path/'short.csv', '--out', tmp_path/'o2')
    assert r.returncode == 1 and f"lacks the learner's columns {[a['cat_names'][0], a['cont_names'][0]]}" in r.stderr
    # checked before the held-out fit: that fit would fail on this held-out file, which has no target column
    r = run_cli(tmp_path/'adult.pkl', tmp_path/'short.csv', '--risk', 0.1, '--heldout', tmp_path/'rows.csv', '--out', tmp_path/'o3')
    assert r.returncode == 1 and "lacks the learner's columns" in r.stderr and 'target column' not in r.stderr, r.stderr
    assert 'holds no image files' not in r.stderr and 'pass a CSV file' in run_cli(tmp_path/'adult.pkl', tmp_path).stderr

def test_demo_default(tmp_path):
    "No arguments: the demo learner (cached after its first training) triages digits mixed with silhouettes"
    r = run_cli(cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    t = pd.read_csv(tmp_path/'triage'/'triage.csv')
    ani = t['item'].str.startswith('animal_')
    assert len(t) == 250 and ani.sum() == 50
    assert ani[t.refer].mean() > 2*ani.mean()
    assert re.search(r'Animal silhouettes are 20% of the inputs \(50 of 250\) and \d+% of the referred', r.stdout)
    assert 'with probability ≥ 90% the error among the items kept is ≤ 5.0% (fitted on 1000 held-out items' in r.stdout
    assert (tmp_path/'triage'/'referral.pkl').exists()

def test_demo_refers_more_with_more_animals(tmp_path):
    "A threshold fitted once on held-out digits: the share referred follows the inputs, where a fixed fraction would not"
    learn = load_triage_learner(demo_learner(progress=False))
    rule = fit_triage_referral(learn, demo_calibration(), risk=DEMO_RISK, progress=False)
    assert isinstance(rule, RiskThreshold) and math.isfinite(rule.threshold) and rule.n_cal == 1000
    shares,shifts = [],[]
    for na in (0, 50, 200):
        t = triage(learn, demo_inputs(tmp_path/f'in{na}', n_digits=200, n_animals=na), out=None, progress=False)
        assert t.attrs['rule'] == rule.describe()            # the learner's fitted rule is the default
        shares.append(t.refer.mean()); shifts.append(t.attrs['shift'])
        dig = t['item'].str.startswith('digit_')
        kept = dig & ~t.refer
        wrong = t.loc[kept, 'pred'] != t.loc[kept, 'item'].str.extract(r'_(\d)\.png$')[0]
        assert wrong.mean() <= DEMO_RISK + 0.05, wrong.mean()   # 200 digits: the guarantee's rate within noise
    assert shares[0] < shares[1] < shares[2] and shares[2] - shares[0] > 0.2, shares
    # half animals: the summary says the inputs do not look like the held-out digits; held-out-like digits: no warning
    assert shifts[0] is None and shifts[2] is not None and 'Warning: These inputs do not look like the held-out data' in triage_summary(t)

def test_cli_risk_and_coverage_rules(vision, tmp_path):
    "--risk/--coverage fit on labelled held-out folders; a learner exported with its referral uses it; errors say what to pass"
    learner, inp = demo_learner(progress=False), vision[1]   # the demo's learner: 88% right, so sets of one class are common
    cal = demo_calibration(tmp_path/'cal', n=300)
    r = run_cli(learner, inp, '--coverage', 0.9, '--heldout', cal, '--n', 8, '--out', tmp_path/'cov')
    assert r.returncode == 0, r.stderr
    t = pd.read_csv(tmp_path/'cov'/'triage.csv', keep_default_na=False)
    sizes = t['conformal_set'].map(lambda s: len(s.split(';')) if s else 0)
    assert (t['refer'] == (sizes > 1)).all() and t['refer'].any() and (~t['refer']).any()   # an empty APS set keeps its top class
    assert (t.loc[sizes == 0, 'reason'].str.startswith('empty set: the top class alone')).all()
    assert (t.loc[sizes > 1, 'reason'] == sizes[sizes > 1].map(lambda k: f'{k} classes in the set')).all()
    assert 'APS conformal prediction sets at coverage 90%' in r.stdout and 'fitted on 300 held-out items' in r.stdout
    page = (tmp_path/'cov'/'report.html').read_text()
    assert 'fitted on 300 held-out items' in page
    rule = torch.load(tmp_path/'cov'/'referral.pkl', weights_only=False)
    assert isinstance(rule, Conformal) and rule.n == 8
    # the written rule reused on the next pool: no held-out fit, the same rule in the report
    r = run_cli(learner, inp, '--referral', tmp_path/'cov'/'referral.pkl', '--out', tmp_path/'reuse')
    assert r.returncode == 0 and 'fitted on 300 held-out items' in r.stdout and not (tmp_path/'reuse'/'referral.pkl').exists(), r.stderr
    assert pd.read_csv(tmp_path/'reuse'/'triage.csv', keep_default_na=False)['conformal_set'].equals(t['conformal_set'])
    r = run_cli(learner, inp, '--referral', learner, '--out', tmp_path/'bad')
    assert r.returncode == 1 and 'not a referral rule: pass the referral.pkl that a run with --heldout' in r.stderr, r.stderr
    r = run_cli(learner, inp, '--referral', tmp_path/'cov'/'referral.pkl', '--refer', 0.1)
    assert r.returncode == 1 and 'referral reuses a fitted rule: pass it without refer and calibrate_on' in r.stderr
    # stored with the learner: fit_referral, export, and the command uses it with no option
    learn = load_learner(learner)
    rt = fit_triage_referral(learn, cal, risk=0.1, progress=False)
    learn.export(tmp_path/'with_rule.pkl')
    r = run_cli(tmp_path/'with_rule.pkl', inp, '--out', tmp_path/'stored')
    assert r.returncode == 0, r.stderr
    assert rt.describe() in r.stdout
    r = run_cli(tmp_path/'with_rule.pkl', inp, '--risk', 0.1, '--out', tmp_path/'same')
    assert r.returncode == 0 and rt.describe() in r.stdout
    # n='auto': as many passes per input as its side of the fitted threshold needs
    r = run_cli(tmp_path/'with_rule.pkl', inp, '--n', 'auto', '--out', tmp_path/'auto')
    assert r.returncode == 0, r.stderr
    assert "n='auto' Monte Carlo passes (per input until its referral was settled: mean" in r.stdout
    ta = pd.read_csv(tmp_path/'auto'/'triage.csv')
    assert ta['n_used'].between(10, 200).all() and ta['n_used'].nunique() > 1
    assert run_cli(learner, inp, '--n', 'many').stderr.strip().endswith("--n is a number of passes or 'auto', not 'many'")
    # errors, before anything runs
    r = run_cli(learner, inp, '--risk', 0.05)
    assert r.returncode == 1 and 'must be fitted on held-out labelled inputs first' in r.stderr and '--heldout' in r.stderr
    r = run_cli(learner, inp, '--risk', 0.05, '--refer', 0.1)
    assert r.returncode == 1 and 'Pass one of refer, risk and coverage' in r.stderr
    r = run_cli(learner, inp, '--coverage', 1.5, '--heldout', cal)
    assert r.returncode == 1 and 'coverage must lie in (0, 1)' in r.stderr
    (tmp_path/'badcal'/'seven').mkdir(parents=True)
    shutil.copy(next(cal.rglob('*.png')), tmp_path/'badcal'/'seven'/'x.png')
    r = run_cli(learner, inp, '--risk', 0.05, '--heldout', tmp_path/'badcal')
    assert r.returncode == 1 and "Labels ['seven']" in r.stderr and 'one subfolder per class' in r.stderr
    # too few held-out inputs for the rule asked for: an error that says how many, and the learner keeps its rule
    few = demo_calibration(tmp_path/'few', n=5)
    with pytest.raises(TriageError, match=r'every input would be referred\. Even with no error at all a threshold needs 45 held-out'):
        fit_triage_referral(learn, few, risk=0.05, progress=False)
    with pytest.raises(TriageError, match=r'5 held-out inputs are too few for coverage 0\.9: .* at least c/\(1 - c\) = 9 '):
        fit_triage_referral(learn, few, coverage=0.9, progress=False)
    assert learn.referral is rt

def test_text_and_regression_csv(tmp_path):
    "A text classifier reads the CSV's text column; a regression learner is ranked by the spread of its passes"
    from fastai.text.all import TextDataLoaders, text_classifier_learner, AWD_LSTM
    df = rotten_tomatoes(400)
    dls = TextDataLoaders.from_df(df, text_col='text', label_col='label', valid_col='is_valid', bs=32, num_workers=0)
    learn = text_classifier_learner(dls, AWD_LSTM, pretrained=False, config=dict(emb_sz=16, n_hid=16, n_layers=1), drop_mult=0.5)
    fit_quietly(learn, 1).export(tmp_path/'text.pkl')
    df.iloc[:40][['text', 'label']].to_csv(tmp_path/'reviews.csv', index=False)
    t = triage(tmp_path/'text.pkl', tmp_path/'reviews.csv', n=5, out=tmp_path/'t', progress=False)
    lt = load_triage_learner(tmp_path/'text.pkl')
    res = lt.mc_predict(lt.dls.test_dl(df.iloc[:40]['text'].tolist(), bs=64), n=5, seed=42)
    np.testing.assert_allclose(t['mutual_info'].values, res.mutual_info.numpy(), atol=1e-6)
    assert len(t) == 40 and t.refer.sum() == 2 and t['pred'].isin(lt.dls.vocab[1]).all()
    # triage.csv: the reviews themselves and the CSV's own label column, then the prediction
    saved = pd.read_csv(tmp_path/'t'/'triage.csv')
    assert list(saved.columns[:4]) == ['item', 'text', 'label', 'pred']
    assert saved['text'].tolist() == df['text'][:40].tolist() and saved['label'].tolist() == df['label'][:40].tolist()
    page = (tmp_path/'t'/'report.html').read_text()
    assert 'xxbos' not in page and 'xxmaj' not in page
    top = saved.sort_values('mutual_info', ascending=False, kind='stable').head(30)
    for txt in top['text']:
        shown = html_mod.escape(txt)
        # a long review: shortened in the cell, the whole of it inside <details>; a short one as it is
        assert (f'</summary>{shown}</details>' if len(txt) > 120 else f"<td class='input'>{shown}</td>") in page
    assert page.count('<details>') == (top['text'].str.len() > 120).sum() > 0
    df.iloc[:5][['label']].to_csv(tmp_path/'labels.csv', index=False)
    with pytest.raises(TriageError, match=r"lacks the learner's columns \['text'\]"): triage(lt, tmp_path/'labels.csv', out=None)
    d = diabetes_df()
    dls = TabularDataLoaders.from_df(d, y_names='target', cont_names=d.attrs['cont_names'], procs=[Normalize],
                                     valid_idx=list(range(350, len(d))), bs=64, num_workers=0)
    fit_quietly(tabular_learner(dls, layers=[32], config=tabular_config(ps=[0.2]), y_range=(0, 400)), 2).export(tmp_path/'reg.pkl')
    d.iloc[350:].drop(columns=['target']).to_csv(tmp_path/'patients.csv', index=False)
    t = triage(tmp_path/'reg.pkl', tmp_path/'patients.csv', n=10, refer=0.1, out=tmp_path/'r', progress=False)
    assert list(t.columns) == ['item', *d.attrs['cont_names'], 'mean', 'std', 'refer'] and t.attrs['score'] == 'std'
    np.testing.assert_allclose(t[d.attrs['cont_names']].to_numpy(), d.iloc[350:][d.attrs['cont_names']].to_numpy())
    assert set(t.index[t.refer]) == set(t['std'].nlargest(math.ceil(0.1*len(t)), keep='first').index)
    assert (tmp_path/'r'/'report.html').exists()

def test_resume_only_on_the_same_inputs(vision, tmp_path, monkeypatch, capsys):
    "A chunked run interrupted before its join, then an image added, removed or replaced in a subfolder: the rerun starts again and writes what an uninterrupted run writes; unchanged inputs resume"
    import fastai_bayes.triage as T
    learner,inp = vision
    files = sorted(inp.glob('*.png'))[:11]
    def tree(root:Path) -> Path:
        for i,f in enumerate(files[:9]): (root/f'd{i%3}').mkdir(parents=True, exist_ok=True); shutil.copy(f, root/f'd{i%3}'/f.name)
        return root
    def replace(root:Path):   # other pixels under the same name and modification time: only the size tells
        dst = root/'d0'/files[0].name; st = dst.stat()
        assert files[10].stat().st_size != st.st_size
        shutil.copy(files[10], dst); os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
    changes = dict(same=lambda r: None, added=lambda r: shutil.copy(files[9], r/'d1'/files[9].name),
                   removed=lambda r: (r/'d2'/files[2].name).unlink(), replaced=replace)
    def boom(*a, **k): raise RuntimeError('interrupted')
    kw = dict(n=4, refer=0.2, chunk=4, bs=4)
    for k,change in changes.items():
        root,out = tree(tmp_path/k),tmp_path/f'out_{k}'
        with monkeypatch.context() as m:
            m.setattr(T, '_join_parts', boom)
            with pytest.raises(RuntimeError, match='interrupted'): triage(learner, root, out=out, progress=False, **kw)
        assert json.loads((out/'.triage_parts'/'state.json').read_text())['done'] == 3
        change(root); capsys.readouterr()
        triage(learner, root, out=out, progress=True, **kw)
        said = capsys.readouterr().out
        triage(learner, root, out=tmp_path/f'ref_{k}', progress=False, **kw)   # never interrupted
        assert (out/'triage.csv').read_bytes() == (tmp_path/f'ref_{k}'/'triage.csv').read_bytes(), k
        assert ('Resuming: 3 chunk(s)' in said) == (k == 'same') and ('Not resuming' in said) == (k != 'same'), (k, said[-500:])

def test_stopped_run_says_so_and_leaves_no_older_run(vision, tmp_path):
    "SIGTERM or Ctrl-C during a run: a one-line error saying what was not written, no traceback, and none of an older run's files left beside it"
    import signal, time
    learner,inp = vision
    old = ('triage.csv', 'report.html', 'uncertainty_scores.png', 'skipped.csv')
    for sig,why in ((signal.SIGTERM, 'stopped by signal SIGTERM'), (signal.SIGINT, 'interrupted (Ctrl-C)')):
        out = tmp_path/sig.name; out.mkdir()
        for f in old: (out/f).write_text('an older run')
        p = subprocess.Popen([CMD, str(learner), str(inp), '--n', '20000', '--out', str(out)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        t0 = time.time()
        while (out/'triage.csv').exists():        # deleted just before the passes start
            assert p.poll() is None and time.time() - t0 < 120, p.communicate()
            time.sleep(0.05)
        time.sleep(0.5); p.send_signal(sig)
        so,se = p.communicate(timeout=120)
        assert p.returncode == 1 and 'Traceback' not in se, se[-3000:]
        assert f'fastai_bayes_triage: error: the run stopped before the end ({why}). No {out}/triage.csv was written.' in se, se
        assert not any((out/f).exists() for f in old), list(out.iterdir())
