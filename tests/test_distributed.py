"""`mc_predict`, ensembles, `acquire` and the triage command across 2 CPU processes started by the real launchers
(torchrun, accelerate launch; gloo), compared with one process; a process killed mid-run; streaming triage of a CSV
much larger than one chunk: flat peak memory, and a resumed run equal to an uninterrupted one."""
import json, math, os, signal, socket, subprocess, sys, time
from pathlib import Path
import pytest, torch
from fastai.tabular.all import *
from fastai_bayes.all import *
from fastai_bayes.triage import triage

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
N_ROWS,BS = 203,32        # 6 full batches dealt to 2 processes, then 11 rows split 6 + 6: one padded row to cut off

def _loopback_up():
    "Under `unshare -n` (how the suite runs) the loopback starts down, and gloo talks over 127.0.0.1"
    sys.path.insert(0, str(ROOT/'tools'))
    from docs import loopback_up
    loopback_up()

def _free_port() -> int:
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def _env() -> dict:
    return {**os.environ, 'GLOO_SOCKET_IFNAME': 'lo', 'MASTER_ADDR': '127.0.0.1', 'OMP_NUM_THREADS': '1',
            'PYTHONWARNINGS': 'ignore'}

def torchrun(*args):
    return [str(BIN/'torchrun'), '--nproc_per_node', '2', '--master_addr', '127.0.0.1', '--master_port', str(_free_port()), *map(str, args)]

def accelerate_launch(*args):
    return [str(BIN/'accelerate'), 'launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
            '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_ip', '127.0.0.1',
            '--main_process_port', str(_free_port()), *map(str, args)]

def run(cmd, timeout=120): return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)

@pytest.fixture(scope='module')
def adult(tmp_path_factory):
    "Two small Adult learners with dropout, exported, and a CSV of held-out rows with their targets"
    _loopback_up()
    tmp = tmp_path_factory.mktemp('distributed')
    df = adult_census(1200, seed=1); a = df.attrs
    dls = TabularDataLoaders.from_df(df, procs=[Categorify, FillMissing, Normalize], cat_names=a['cat_names'],
                                     cont_names=a['cont_names'], y_names='loan', valid_idx=list(range(900, 1200)), bs=64, num_workers=0)
    for i in range(2):
        learn = tabular_learner(dls, layers=[32], config=tabular_config(ps=[0.3], embed_p=0.1))
        with no_random(i), learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 1e-2)
        learn.export(tmp/f'adult{i}.pkl')
    df.iloc[900:900+N_ROWS].drop(columns=['is_valid']).to_csv(tmp/'rows.csv', index=False)
    return tmp

WORKER = '''
import sys, torch
from fastai.tabular.all import *
from fastai_bayes.all import *
tmp = Path(sys.argv[1])
learn,other = load_learner(tmp/'adult0.pkl'), load_learner(tmp/'adult1.pkl')
dl = learn.dls.test_dl(pd.read_csv(tmp/'rows.csv'), bs=%d)
try: learn.mc_predict(dl, n=2)              # under the launcher, outside the distributed context
except RuntimeError as e: print('NOCTX', e)
out = {}
with learn.distrib_ctx(sync_bn=False, cpu=True), learn.no_bar():
    try: learn.mc_predict(dl.new(shuffle=True), n=2)
    except ValueError as e: print('SHUFFLED', e)
    for k in ('a', 'b'):                       # the same seed twice
        r = learn.mc_predict(dl, n=16, seed=3)
        out[k] = dict(mean=r.mean, se=r.se('mean'), mi=r.mutual_info, targs=r.targs)
    r = learn.mc_predict(dl, n=4, seed=5, with_samples=True)
    out['samples'],out['smean'] = r.samples,r.mean
    out['ens'] = Ensemble([learn, other]).mc_predict(dl).mean   # dropout off: every number fixed, the order checked exactly
    out['acq'] = learn.acquire(dl, k=10, n=16, seed=3)
    out['rank'] = rank_distrib()
torch.save(out, tmp/f'rank{rank_distrib()}.pt')
''' % BS

def test_mc_predict_two_processes(adult):
    "2 processes (torchrun) = 1 process: same items in the same order, means within MC error, same numbers on a rerun; errors name the fix"
    (adult/'worker.py').write_text(WORKER)
    r = run(torchrun(adult/'worker.py', adult))
    assert r.returncode == 0, r.stderr[-3000:]
    # errors that name the fix: outside the distributed context, and with a shuffled loader
    assert r.stdout.count('NOCTX') == 2 and 'learn.distrib_ctx(sync_bn=False, cpu=True)' in r.stdout
    assert r.stdout.count('SHUFFLED') == 2 and 'learn.dls.test_dl(items)' in r.stdout
    r0,r1 = [torch.load(adult/f'rank{i}.pt') for i in range(2)]
    for k in ('a', 'b'):
        for f in r0[k]: assert torch.equal(r0[k][f], r1[k][f]), f   # every process has the whole result
    assert r0['rank'] == 0 and r1['rank'] == 1
    a,b = r0['a'],r0['b']
    assert all(torch.equal(a[f], b[f]) for f in a)                 # rerun with the same seed: identical
    learn = load_learner(adult/'adult0.pkl')
    dl = learn.dls.test_dl(pd.read_csv(adult/'rows.csv'), bs=BS)
    with learn.no_bar():
        one = learn.mc_predict(dl, n=16, seed=11)
        ens = Ensemble([learn, load_learner(adult/'adult1.pkl')]).mc_predict(dl)
    assert a['mean'].shape == one.mean.shape == (N_ROWS, 2)         # the padded row is cut off
    assert torch.equal(a['targs'], one.targs)                       # same items, same order
    torch.testing.assert_close(r0['ens'], ens.mean, atol=1e-6, rtol=0)
    # MC: independent streams, so |difference| / its standard error behaves like |N(0,1)| for every item and class;
    # a result in another order or with the padding left in is off by many standard errors
    z = (a['mean'] - one.mean).abs() / (a['se']**2 + one.se('mean')**2).sqrt().clamp_min(1e-4)
    assert z.max() < 5.5 and z.mean() < 1.2, (z.max(), z.mean())
    # each process draws its own stream, seed + rank: rank r's first batch is the loader's batch r
    rows = pd.read_csv(adult/'rows.csv')
    for rank in (0, 1):
        first = learn.mc_predict(learn.dls.test_dl(rows.iloc[rank*BS:(rank+1)*BS], bs=BS), n=16, seed=3 + rank)
        torch.testing.assert_close(a['mean'][rank*BS:(rank+1)*BS], first.mean, atol=1e-6, rtol=0)
    s = r0['samples']
    assert s.shape == (4, N_ROWS, 2) and torch.allclose(s.mean(0), r0['smean'], atol=1e-6)
    # acquire on the distributed pool: the top 10 of the distributed result's mutual information
    assert torch.equal(r0['acq'], r1['acq']) and torch.equal(r0['acq'], top_k(a['mi'], 10))

def test_triage_command_under_accelerate(adult, tmp_path):
    "accelerate launch, 2 processes: one triage.csv and one report, by process 0, equal to one process's up to MC noise"
    out = tmp_path/'out'
    r = run(accelerate_launch('-m', 'fastai_bayes.cli', adult/'adult0.pkl', adult/'rows.csv', '--n', 16, '--refer', 0.1,
                              '--bs', BS, '--chunk', 100, '--out', out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('Triaged 203 inputs') == 1                  # one process speaks
    assert sorted(o.name for o in out.iterdir()) == ['predictions.png', 'report.html', 'triage.csv', 'uncertainty_scores.png']
    t = pd.read_csv(out/'triage.csv')
    one = triage(adult/'adult0.pkl', adult/'rows.csv', n=16, refer=0.1, bs=BS, chunk=100, out=tmp_path/'one', progress=False)
    o = pd.read_csv(tmp_path/'one'/'triage.csv')
    assert t['item'].tolist() == o['item'].tolist() == list(range(N_ROWS))
    cols = list(pd.read_csv(adult/'rows.csv').columns)
    pd.testing.assert_frame_equal(t[cols], o[cols])                 # the rows' own fields, in order
    assert t['refer'].sum() == o['refer'].sum() == math.ceil(0.1*N_ROWS)
    assert (t['prob'] - o['prob']).abs().mean() < 0.03 and (t['pred'] == o['pred']).mean() > 0.9

def _rss_run(out:Path, *args):
    "Run the command in a child that reports its peak resident memory (MB)"
    script = out.parent/'rss_triage.py'
    script.write_text("import resource, sys\nfrom fastai_bayes.cli import fastai_bayes_triage\n"
                      "try: fastai_bayes_triage()\nfinally: print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)")
    return subprocess.Popen([sys.executable, script, *map(str, args), '--out', out], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), cwd=out.parent)

def _wide_csv(src:Path, dst:Path, n:int, width:int=6000):
    "The rows of `src` repeated to `n`, each with a `notes` field of `width` characters the model does not read"
    d = pd.read_csv(src)
    d = pd.concat([d]*math.ceil(n/len(d)), ignore_index=True).iloc[:n]
    d['notes'] = [f'{i:08d} ' + 'x'*width for i in range(n)]
    d.to_csv(dst, index=False)

def _wait_for_chunks(out:Path, k:int, p, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if json.loads((out/'.triage_parts'/'state.json').read_text())['done'] >= k: return
        except (OSError, ValueError, KeyError): pass
        assert p.poll() is None, 'the run ended before it could be interrupted'
        time.sleep(0.02)
    raise TimeoutError

def test_streaming_memory_and_resume(adult, tmp_path):
    "A CSV of 8 chunks, killed after 3 and run again: it resumes with the memory of a run of one chunk, and writes the same triage.csv as one run"
    big,small = tmp_path/'big.csv',tmp_path/'small.csv'
    _wide_csv(adult/'rows.csv', big, 8000, width=9000); _wide_csv(adult/'rows.csv', small, 1000, width=9000)
    mb = big.stat().st_size / 2**20
    args = ('--n', 2, '--bs', 500, '--refer', 0.05, '--chunk', 1000)
    one = _rss_run(tmp_path/'s', adult/'adult0.pkl', small, *args)  # one chunk: the memory of reading, predicting, reporting
    p = _rss_run(tmp_path/'r', adult/'adult0.pkl', big, *args)
    _wait_for_chunks(tmp_path/'r', 3, p)
    p.kill(); p.communicate()                                        # interrupted (SIGKILL) after 3 finished chunks
    assert not (tmp_path/'r'/'triage.csv').exists()
    done = json.loads((tmp_path/'r'/'.triage_parts'/'state.json').read_text())['done']
    stamps = {f.name: f.stat().st_mtime_ns for f in (tmp_path/'r'/'.triage_parts').glob('part_*.csv')}
    assert 3 <= done < 8 and len(stamps) >= done
    p = _rss_run(tmp_path/'r', adult/'adult0.pkl', big, *args)      # the same command again
    _wait_for_chunks(tmp_path/'r', done + 1, p)                      # finished chunks are not redone
    assert {f.name: f.stat().st_mtime_ns for f in (tmp_path/'r'/'.triage_parts').glob('part_*.csv') if f.name in stamps} == stamps
    ref = triage(adult/'adult0.pkl', big, n=2, bs=500, refer=0.05, chunk=1000, out=tmp_path/'b', progress=False)  # never interrupted
    so,se = p.communicate(timeout=120)
    assert p.returncode == 0 and f'Resuming: {done} chunk(s)' in so, se[-3000:]
    assert (tmp_path/'r'/'triage.csv').read_bytes() == (tmp_path/'b'/'triage.csv').read_bytes()
    assert not (tmp_path/'r'/'.triage_parts').exists()
    # the resumed run predicted 5 chunks and joined all 8 (70 MB of rows), in the memory of a run of one chunk
    so1,se1 = one.communicate(timeout=120)
    assert one.returncode == 0, se1[-3000:]
    peak,base = float(so.split('MAXRSS')[-1]),float(so1.split('MAXRSS')[-1])
    assert mb > 60 and peak - base < mb/4, (base, peak, mb)
    b = pd.read_csv(tmp_path/'r'/'triage.csv')
    assert len(b) == len(ref) == 8000 and b['refer'].sum() == 400 and b['notes'].str[:8].astype(int).tolist() == list(range(8000))

def test_killed_process_fails_cleanly(adult, tmp_path):
    "One of 2 processes killed mid-run: the command fails, says so, and leaves no triage.csv, only the finished chunks"
    import psutil
    big,out = tmp_path/'big.csv',tmp_path/'out'
    _wide_csv(adult/'rows.csv', big, 6000, width=10)
    p = subprocess.Popen(torchrun('-m', 'fastai_bayes.cli', '--', adult/'adult0.pkl', big, '--n', 2, '--bs', 100, '--chunk', 200,
                                  '--out', out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    _wait_for_chunks(out, 2, p)
    victim = next(c for c in psutil.Process(p.pid).children(recursive=True) if c.environ().get('RANK') == '1')
    victim.send_signal(signal.SIGKILL)
    so,se = p.communicate(timeout=120)
    assert p.returncode != 0
    msg = so + se
    assert 'fastai_bayes_triage: error: process 0 of 2 stopped before the end' in msg, msg[-3000:]
    assert f'No {out}/triage.csv was written' in msg and 'run the same command again to resume' in msg
    assert not (out/'triage.csv').exists() and not list(out.glob('.triage.csv*'))
    assert json.loads((out/'.triage_parts'/'state.json').read_text())['done'] >= 2
