#!/usr/bin/env python
"""Distributed `mc_predict` benchmark: items per second of `learn.mc_predict(dl, n)` on one process with 2 threads
against 2 processes with 1 thread each (torchrun, gloo, the pool sharded by `DistributedPredictDL`), on a small Adult
learner trained on the offline data. The distribution itself should cost little: the floor is a ratio of 0.9.
  python bench/distributed.py [--rows 20000] [--passes 20] [--bs 1024] [--runs 3]
Prints both rates and their ratio, measured in one run (absolute rates depend on the machine), and the command that
measures the same on a machine with GPUs (1 GPU against all of them)."""
import argparse, json, os, socket, statistics, subprocess, sys, tempfile, time, warnings
from pathlib import Path
warnings.filterwarnings('ignore')
ROOT = Path(__file__).resolve().parent.parent
FLOOR = 0.9

def worker(a):
    "One process of a measurement: time `mc_predict` over the pool (after a warm-up); rank 0 writes the rates"
    import torch
    from fastai.tabular.all import load_learner, pd, rank_distrib, num_distrib
    import fastai_bayes.all   # noqa: F401 (patches Learner)
    if a.threads: torch.set_num_threads(a.threads)
    learn = load_learner(Path(a.dir)/'adult.pkl', cpu=a.device == 'cpu')
    if a.device == 'cuda':
        dev = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0))); torch.cuda.set_device(dev)
        learn.dls.to(dev); learn.model.to(dev)
    dl = learn.dls.test_dl(pd.read_csv(Path(a.dir)/'pool.csv'), bs=a.bs)
    rates = []
    with learn.distrib_predict_ctx(), learn.no_bar():
        learn.mc_predict(dl.new(n=min(len(dl.dataset), 4*a.bs)), n=a.n, seed=0)   # warm-up
        for r in range(a.runs):
            if num_distrib() > 1: torch.distributed.barrier()
            if a.device == 'cuda': torch.cuda.synchronize()
            t = time.perf_counter()
            res = learn.mc_predict(dl, n=a.n, seed=r)
            if a.device == 'cuda': torch.cuda.synchronize()
            rates.append(len(res) / (time.perf_counter() - t))   # every process ends with the whole result
    if rank_distrib() == 0:
        Path(a.out).write_text(json.dumps(dict(rate=statistics.median(rates), items=len(res), procs=max(num_distrib(), 1))))

def prepare(d:Path, rows:int):
    "A small Adult learner with dropout, exported, and a pool CSV of `rows` rows"
    from fastai.tabular.all import TabularDataLoaders, tabular_learner, tabular_config, Categorify, FillMissing, Normalize, no_random, pd
    from fastai_bayes.datasets import adult_census
    df = adult_census(4000, seed=0)
    dls = TabularDataLoaders.from_df(df, y_names='loan', cat_names=df.attrs['cat_names'], cont_names=df.attrs['cont_names'],
                                     procs=[Categorify, FillMissing, Normalize], valid_idx=list(range(3200, 4000)), bs=256, num_workers=0)
    learn = tabular_learner(dls, layers=[200, 100], config=tabular_config(ps=[0.2, 0.2], embed_p=0.1))
    with no_random(0), learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 1e-2)
    learn.export(d/'adult.pkl')
    pool = adult_census(None, seed=1).drop(columns=['loan', 'is_valid'])
    pd.concat([pool]*(rows//len(pool) + 1), ignore_index=True).iloc[:rows].to_csv(d/'pool.csv', index=False)

def _free_port() -> int:
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def measure(a, d:Path, procs:int, threads:int) -> dict:
    out = d/f'rate_{procs}x{threads}.json'
    args = [__file__, '--worker', '--dir', str(d), '--out', str(out), '--passes', str(a.n), '--bs', str(a.bs), '--runs', str(a.runs),
            '--threads', str(threads)]
    env = {**os.environ, 'OMP_NUM_THREADS': str(threads), 'GLOO_SOCKET_IFNAME': 'lo', 'PYTHONWARNINGS': 'ignore'}
    cmd = ([sys.executable, *args] if procs == 1 else
           [str(Path(sys.executable).parent/'torchrun'), '--nproc_per_node', str(procs), '--master_addr', '127.0.0.1',
            '--master_port', str(_free_port()), *args])
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode: sys.exit(f"bench: {procs} process(es) failed:\n{r.stderr[-3000:]}")
    return json.loads(out.read_text())

def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--rows', type=int, default=20000, help='items in the pool')
    p.add_argument('--passes', dest='n', type=int, default=20, help='Monte Carlo passes (not --n: torchrun would take it for its own)')
    p.add_argument('--bs', type=int, default=1024, help='batch size')
    p.add_argument('--runs', type=int, default=3, help='timed runs per setting (median)')
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--dir', help=argparse.SUPPRESS); p.add_argument('--out', help=argparse.SUPPRESS)
    p.add_argument('--threads', type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument('--device', default='cpu', choices=['cpu', 'cuda'], help='cuda: with the GPU commands printed below')
    p.add_argument('--prepare', metavar='DIR', help='only write the learner and the pool into DIR (for the GPU commands)')
    a = p.parse_args()
    if a.worker: return worker(a)
    if a.prepare: Path(a.prepare).mkdir(parents=True, exist_ok=True); return prepare(Path(a.prepare), a.rows)
    sys.path.insert(0, str(ROOT/'tools'))
    from docs import loopback_up
    loopback_up()   # under `unshare -n` the loopback that gloo talks over starts down
    with tempfile.TemporaryDirectory() as t:
        d = Path(t); prepare(d, a.rows)
        one = measure(a, d, 1, 2)
        two = measure(a, d, 2, 1)
    ratio = two['rate'] / one['rate']
    print(f"mc_predict, n={a.n}, {one['items']} Adult rows, batch size {a.bs}, median of {a.runs} runs "
          f"(torch {__import__('torch').__version__}, {os.cpu_count()} CPUs)")
    print(f"{'setting':<28}{'items/s':>10}{'ratio':>8}")
    print(f"{'1 process  x 2 threads':<28}{one['rate']:>10.0f}{1:>8.2f}")
    print(f"{'2 processes x 1 thread':<28}{two['rate']:>10.0f}{ratio:>8.2f}")
    print(f"floor: 2 processes keep >= {FLOOR}x the items/s of 1 process with the same cores: "
          f"{'met' if ratio >= FLOOR else 'NOT met'} ({ratio:.2f})")
    print("On a machine with W GPUs (1 GPU, then all W; items/s in one.json and all.json, expect a ratio near W):\n"
          "  python bench/distributed.py --prepare DIR --rows 1000000\n"
          "  python bench/distributed.py --worker --device cuda --dir DIR --out one.json --passes 20 --bs 4096\n"
          "  torchrun --nproc_per_node W bench/distributed.py --worker --device cuda --dir DIR --out all.json --passes 20 --bs 4096")
    if ratio < FLOOR: sys.exit(1)

if __name__ == '__main__': main()
