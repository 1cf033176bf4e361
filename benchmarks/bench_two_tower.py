#!/usr/bin/env python
"""Two-tower training throughput, fastrec vs PyTorch (issue 12's bar: at least 2x PyTorch 2.13 on CPU, 1 and 2
threads), measured side by side in one run; prints markdown tables.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_two_tower.py            # ~11 min on 2 cores
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_two_tower.py --quick    # smoke run
    python benchmarks/bench_two_tower.py --help

torch is an optional benchmark-only dependency (``pip install torch==2.13.0``); without it the script exits
with a note.

The model (both implementations). Per side (users, items): an id embedding (vocabulary x 64) -> Linear(64, 128)
-> ReLU -> Linear(128, 64) -> L2 normalisation. Loss: in-batch sampled softmax, logits = U Vᵀ / temperature -
log(n q_j) (the log-Q correction: n = rows of the batch, q_j = the share of item j in the training pairs),
accidental hits (column c != r holding row r's positive item) set to -inf, cross-entropy averaged over the
batch. normalize and temperature are fastrec's defaults for loss="softmax" (read from ``fastrec.two_tower``'s
table of "auto" settings), and so is the learning rate. fastrec runs with ``alpha=0`` and ``id_dropout=0`` so
that the two compute the same function (fastrec's defaults add an L2 penalty and replace 5% of the ids by the
"unknown" row; PyTorch's sparse optimizers have no weight decay).

Optimizers, as fastrec defines them:
  sgd:  plain SGD on the embedding rows a batch touches (torch: ``nn.Embedding(sparse=True)`` +
        ``torch.optim.SGD``, which takes sparse gradients), SGD with Nesterov momentum 0.9 on the MLPs (torch:
        a second ``torch.optim.SGD(momentum=0.9, nesterov=True)``: the same update as fastrec's
        scikit-learn-style velocity, v <- m v - lr g, w <- w + m v - lr g).
  adam: lazy Adam on the touched embedding rows (torch: ``torch.optim.SparseAdam``), Adam on the MLPs (torch:
        ``torch.optim.Adam``); beta 0.9 / 0.999, epsilon 1e-8.
Initialisation is the same distribution in both (embeddings N(0, 0.05), scikit-learn's Glorot-uniform
weights and biases), not the same numbers: losses are comparable, not identical.

Data: --pairs (user, item) pairs (default 409,600 = 400 batches of 1024), users and items each drawn from a
Zipf law over --users / --items ids (p_k proportional to k^-s, s = --zipf, default 0.8: the most popular item
is about 2% of the pairs, 1 in 50), the ranks shuffled to random ids; seeded.

What is timed (wall clock):
  whole fit: what the user waits for. fastrec: ``fastrec.TwoTower(...).fit(users, items)`` (id mapping,
        parameter initialisation, seen-item lists, every epoch). torch: the whole training function, from the
        NumPy arrays: tensors, item frequencies, model and optimizer construction, every epoch (the
        data's ids are already 0..N-1, so torch needs no id mapping: a head start fastrec does not take).
  epochs only: fastrec: the sum of ``history_["seconds"]``; torch: the sum of the epoch loops (permutation +
        batches).
Throughput = pairs x epochs / seconds (examples/s).

Method. Each measurement runs in a fresh worker process (``--worker``), so the two libraries' OpenMP
runtimes and allocators never share a process, and each worker first trains once untimed on a small slice of
the data (the thread pools start, the code is paged in). Rounds are interleaved: every round measures each
thread count and optimizer for both implementations, the order of the two rotating from round to round, with a
--settle pause before each worker. The ratio of a round is fastrec's throughput over torch's in that round
(adjacent measurements share the machine's load); tables give median and [min - max] over the rounds.
``uptime`` is recorded at the start and the end (the development machine has 2 cores and is shared), and
each sample records the cores other processes kept busy while its worker ran (all cores' busy time from
/proc/stat minus the worker's own CPU time): the "other load" column. Before each worker the script waits up
to --wait-idle seconds for the other processes to go quiet. Read 2-thread rows only where that load is near
0: with another process on a core, every parallel region waits for a descheduled thread, and both libraries
slow down by an order of magnitude at 2 threads (fastrec: 266 s instead of 7 s for this fit).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TIMER = time.perf_counter  # wall clock: both implementations are multithreaded
HERE = Path(__file__).resolve().parent
EMBEDDING_DIM, HIDDEN, OUTPUT_DIM, BATCH = 64, 128, 64, 1024
INIT_SCALE = 0.05  # fastrec's embedding initialisation (TowerNet init_scale)


# ------------------------------------------------------------------------------------------------- data
def make_pairs(n_pairs, n_users, n_items, zipf, seed):
    """(users, items) int64 arrays of raw ids, each side Zipf(zipf) over its ids with the ranks shuffled."""
    rng = np.random.default_rng(seed)

    def side(n_ids):
        p = 1.0 / np.arange(1, n_ids + 1, dtype=np.float64) ** zipf
        p /= p.sum()
        rank = rng.choice(n_ids, size=n_pairs, p=p)
        return rng.permutation(n_ids)[rank].astype(np.int64)

    return side(n_users), side(n_items)


def softmax_defaults():
    """fastrec's "auto" normalize / temperature / learning_rate for loss="softmax"."""
    from fastrec import two_tower

    auto = two_tower._AUTO["softmax"]
    return bool(auto["normalize"]), float(auto["temperature"]), float(auto["learning_rate"])


# ------------------------------------------------------------------------------------------------- fastrec
def fastrec_fit(users, items, epochs, n_threads, optimizer, seed):
    import fastrec

    model = fastrec.TwoTower(output_dim=OUTPUT_DIM, embedding_dim=EMBEDDING_DIM, hidden_layer_sizes=(HIDDEN,),
                             loss="softmax", batch_size=BATCH, optimizer=optimizer, early_stopping=False,
                             epochs=epochs, alpha=0.0, id_dropout=0.0, random_state=seed, n_threads=n_threads)
    start = TIMER()
    model.fit(users, items)
    whole = TIMER() - start
    return {"whole": whole, "epoch_seconds": list(model.history_["seconds"]), "loss": list(model.history_["loss"])}


# ------------------------------------------------------------------------------------------------- torch
def torch_fit(users, items, epochs, n_threads, optimizer, seed):
    import torch
    from torch import nn
    import torch.nn.functional as F

    torch.set_num_threads(n_threads)
    torch.manual_seed(seed)
    normalize, temperature, lr = softmax_defaults()

    def glorot(linear):  # scikit-learn's (and fastrec's) Glorot-uniform weights and biases
        bound = (6.0 / (linear.in_features + linear.out_features)) ** 0.5
        with torch.no_grad():
            linear.weight.uniform_(-bound, bound)
            linear.bias.uniform_(-bound, bound)
        return linear

    class Tower(nn.Module):
        def __init__(self, vocab):
            super().__init__()
            self.embedding = nn.Embedding(vocab, EMBEDDING_DIM, sparse=True)
            with torch.no_grad():
                self.embedding.weight.normal_(0.0, INIT_SCALE)
            self.mlp = nn.Sequential(glorot(nn.Linear(EMBEDDING_DIM, HIDDEN)), nn.ReLU(),
                                     glorot(nn.Linear(HIDDEN, OUTPUT_DIM)))

        def forward(self, ids):
            out = self.mlp(self.embedding(ids))
            return F.normalize(out, dim=1, eps=1e-12) if normalize else out

    start = TIMER()
    u_all, i_all = torch.from_numpy(users), torch.from_numpy(items)
    n = len(u_all)
    n_users, n_items = int(u_all.max()) + 1, int(i_all.max()) + 1
    counts = torch.bincount(i_all, minlength=n_items).to(torch.float32)
    log_q = torch.log(counts / counts.sum())  # -inf for items never trained on: never in a batch
    user_tower, item_tower = Tower(n_users), Tower(n_items)
    sparse = [user_tower.embedding.weight, item_tower.embedding.weight]
    dense = [*user_tower.mlp.parameters(), *item_tower.mlp.parameters()]
    if optimizer == "sgd":
        optimizers = [torch.optim.SGD(sparse, lr=lr),
                      torch.optim.SGD(dense, lr=lr, momentum=0.9, nesterov=True)]
    else:
        optimizers = [torch.optim.SparseAdam(sparse, lr=lr, betas=(0.9, 0.999), eps=1e-8),
                      torch.optim.Adam(dense, lr=lr, betas=(0.9, 0.999), eps=1e-8)]
    epoch_seconds, losses = [], []
    for _ in range(epochs):
        epoch_start = TIMER()
        order = torch.randperm(n)
        loss_sum = 0.0
        for begin in range(0, n, BATCH):
            rows = order[begin:begin + BATCH]
            ub, ib = u_all[rows], i_all[rows]
            b = len(rows)
            u = user_tower(ub)
            v = item_tower(ib)
            logits = (u @ v.T) / temperature - (log_q[ib] + np.log(b))  # - log(b q_j)
            hits = ib[None, :] == ib[:, None]
            hits.fill_diagonal_(False)  # a row's own positive stays
            logits = logits.masked_fill(hits, float("-inf"))
            loss = F.cross_entropy(logits, torch.arange(b))
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in optimizers:
                opt.step()
            loss_sum += float(loss) * b
        losses.append(loss_sum / n)
        epoch_seconds.append(TIMER() - epoch_start)
    whole = TIMER() - start
    return {"whole": whole, "epoch_seconds": epoch_seconds, "loss": losses}


# ------------------------------------------------------------------------------------------------- worker
def worker(args):
    """One measurement in this process: an untimed warm-up fit on a slice, then the timed fit; JSON on stdout."""
    from threadpoolctl import threadpool_limits

    users, items = make_pairs(args.pairs, args.users, args.items, args.zipf, args.seed)
    fit = fastrec_fit if args.worker == "fastrec" else torch_fit
    (threads,) = args.threads
    with threadpool_limits(limits=threads):  # NumPy's BLAS too, where either touches it
        warm = min(len(users), 16 * BATCH)
        fit(users[:warm], items[:warm], 1, threads, args.optimizer, args.seed + 1)
        result = fit(users, items, args.epochs, threads, args.optimizer, args.seed)
    result["pairs"] = len(users)
    result["epochs"] = args.epochs
    print(json.dumps(result))


def cpu_ticks():
    """(total, idle) jiffies of all cores from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    return sum(fields), fields[3] + fields[4]  # idle + iowait


def busy_cores(before, after, own_cpu_seconds=0.0, wall=1.0):
    """Cores busy between two cpu_ticks() minus own_cpu_seconds of our own work over `wall` seconds."""
    if before is None or after is None:
        return float("nan")
    cores = os.cpu_count() or 1
    total = max(after[0] - before[0], 1)
    busy_fraction = 1.0 - (after[1] - before[1]) / total
    return max(cores * busy_fraction - own_cpu_seconds / max(wall, 1e-9), 0.0)


def cpu_busy(seconds):
    """Cores kept busy by other processes over `seconds` (this script sleeps meanwhile)."""
    before = cpu_ticks()
    time.sleep(seconds)
    return busy_cores(before, cpu_ticks())


def quiet_cpu(settle, wait, threshold=0.25):
    """Pause `settle` seconds, then up to `wait` more while other processes keep more than `threshold` of a
    core busy; returns the busy cores measured last (recorded with each sample)."""
    busy = cpu_busy(settle)
    deadline = TIMER() + wait
    while busy > threshold and TIMER() < deadline:
        busy = cpu_busy(2.0)
    return busy


def run_worker(impl, threads, optimizer, args):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", impl, "--threads", str(threads),
           "--optimizer", optimizer, "--epochs", str(args.epochs), "--pairs", str(args.pairs), "--users",
           str(args.users), "--items", str(args.items), "--zipf", str(args.zipf), "--seed", str(args.seed)]
    ticks, usage, start = cpu_ticks(), resource.getrusage(resource.RUSAGE_CHILDREN), TIMER()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall, after = TIMER() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    if out.returncode != 0:
        sys.exit(f"worker {impl} T={threads} {optimizer} failed:\n{out.stderr}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # Other processes' load while the worker ran: all cores' busy time minus the worker's own CPU time.
    result["busy_during"] = busy_cores(ticks, cpu_ticks(), own, wall)
    return result


# ------------------------------------------------------------------------------------------------- report
def uptime():
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "n/a"


def spread(values, fmt):
    return f"{fmt(statistics.median(values))} [{fmt(min(values))} – {fmt(max(values))}]"


def kex(x):
    return f"{x / 1e3:,.0f}k"


def ratio(x):
    return f"{x:.2f}"


def machine():
    """benchmarks/timing.py's description of the machine and of the extension measured, plus torch."""
    sys.path.insert(0, str(HERE))
    from timing import machine_info

    info = machine_info()
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads_default"] = torch.get_num_threads()
    except ImportError:
        info["torch"] = None
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=3, help="epochs per fit (default 3)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--optimizers", nargs="+", default=["sgd", "adam"], choices=["sgd", "adam"])
    ap.add_argument("--pairs", type=int, default=409_600)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--zipf", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--settle", type=float, default=1.0, help="pause before each worker, seconds")
    ap.add_argument("--wait-idle", type=float, default=60.0,
                    help="before each worker, wait up to this many seconds for other processes to leave the "
                         "cores idle (the machine is shared); the busy cores seen are recorded per sample")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, 1 epoch, 40,960 pairs")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "two_tower.json")
    ap.add_argument("--worker", choices=["fastrec", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--optimizer", default="sgd", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit("torch is not installed: pip install torch==2.13.0 (the version of issue 12's bar)")
    if args.quick:
        args.rounds, args.epochs, args.pairs = 2, 1, 40_960
    info = machine()
    info["uptime_start"] = uptime()
    normalize, temperature, lr = softmax_defaults()
    print(f"# two-tower training, fastrec {info['fastrec']} vs torch {info['torch']}, {info['cpu']}, "
          f"{info['cores']} cores", file=sys.stderr)
    print(f"# start: {info['uptime_start']}", file=sys.stderr)
    samples = []  # one dict per (round, threads, optimizer, impl)
    for rnd in range(args.rounds):
        for threads in args.threads:
            for optimizer in args.optimizers:
                impls = ["fastrec", "torch"] if rnd % 2 == 0 else ["torch", "fastrec"]
                for impl in impls:
                    busy = quiet_cpu(args.settle, args.wait_idle)
                    r = run_worker(impl, threads, optimizer, args)
                    r["busy_before"] = busy
                    examples = r["pairs"] * r["epochs"]
                    r.update(round=rnd, threads=threads, optimizer=optimizer, impl=impl,
                             whole_eps=examples / r["whole"], epoch_eps=examples / sum(r["epoch_seconds"]))
                    samples.append(r)
                    print(f"round {rnd} T={threads} {optimizer:4s} {impl:7s} whole {r['whole']:6.2f} s "
                          f"({kex(r['whole_eps'])}/s)  epochs {sum(r['epoch_seconds']):6.2f} s "
                          f"({kex(r['epoch_eps'])}/s)  loss {' '.join(f'{x:.4f}' for x in r['loss'])}  "
                          f"others busy: before {busy:.2f}, during {r['busy_during']:.2f} cores",
                          file=sys.stderr, flush=True)
    info["uptime_end"] = uptime()
    print(f"# end: {info['uptime_end']}", file=sys.stderr)

    lines = [f"fastrec {info['fastrec']} (commit {info['commit']}, _core sha256 {info['core_so']['sha256']} built "
             f"{info['core_so']['mtime']}), torch {info['torch']}, NumPy {info['numpy']}, Python {info['python']}; "
             f"{info['cpu']}, {info['cores']} cores; {info['date']}.",
             f"Load: start `{info['uptime_start']}`; end `{info['uptime_end']}`.",
             f"Data: {args.pairs:,} pairs, {args.users:,} users x {args.items:,} items, Zipf s={args.zipf}, "
             f"seed {args.seed}; {args.epochs} epochs per fit, batch {BATCH}, normalize={normalize}, "
             f"temperature={temperature}, learning_rate={lr}; {args.rounds} rounds.", ""]
    lines += ["| threads | optimizer | timed | fastrec examples/s | torch examples/s | fastrec / torch per round |"
              " ≥ 2x | other load (cores) |", "|---|---|---|---|---|---|---|---|"]
    summary = {}
    for threads in args.threads:
        for optimizer in args.optimizers:
            for key, label in (("whole_eps", "whole fit"), ("epoch_eps", "epochs only")):
                f = {s["round"]: s[key] for s in samples if s["threads"] == threads and s["optimizer"] == optimizer
                     and s["impl"] == "fastrec"}
                t = {s["round"]: s[key] for s in samples if s["threads"] == threads and s["optimizer"] == optimizer
                     and s["impl"] == "torch"}
                ratios = [f[r] / t[r] for r in sorted(f)]
                med = statistics.median(ratios)
                summary[f"T{threads}_{optimizer}_{key}"] = {"fastrec": statistics.median(f.values()),
                                                             "torch": statistics.median(t.values()),
                                                             "ratio": med, "ratios": ratios}
                load = [s["busy_during"] for s in samples if s["threads"] == threads
                         and s["optimizer"] == optimizer]
                lines.append(f"| {threads} | {optimizer} | {label} | {spread(list(f.values()), kex)} | "
                             f"{spread(list(t.values()), kex)} | {spread(ratios, ratio)} | "
                             f"{'yes' if med >= 2 else 'no'} | {spread(load, lambda x: f'{x:.2f}')} |")
    lines += ["", "Mean training loss per epoch (median over rounds; same function, different random "
              "initialisation and shuffles):", "",
              "| threads | optimizer | fastrec | torch |", "|---|---|---|---|"]
    for threads in args.threads:
        for optimizer in args.optimizers:
            cell = {}
            for impl in ("fastrec", "torch"):
                curves = [s["loss"] for s in samples if s["threads"] == threads and s["optimizer"] == optimizer
                          and s["impl"] == impl]
                cell[impl] = " → ".join(f"{statistics.median(c[e] for c in curves):.4f}"
                                        for e in range(args.epochs))
            lines.append(f"| {threads} | {optimizer} | {cell['fastrec']} | {cell['torch']} |")
    lines += ["", "Seconds not in epochs (whole fit - epochs; median over rounds):", "",
              "| threads | optimizer | fastrec | torch |", "|---|---|---|---|"]
    for threads in args.threads:
        for optimizer in args.optimizers:
            cell = {impl: statistics.median(s["whole"] - sum(s["epoch_seconds"]) for s in samples
                                            if s["threads"] == threads and s["optimizer"] == optimizer
                                            and s["impl"] == impl) for impl in ("fastrec", "torch")}
            lines.append(f"| {threads} | {optimizer} | {cell['fastrec']:.3f} s | {cell['torch']:.3f} s |")
    print("\n".join(lines))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": info, "args": {k: (str(v) if isinstance(v, Path) else v)
                                                               for k, v in vars(args).items()},
                                     "summary": summary, "samples": samples}, indent=1))
    print(f"\n(JSON: {args.json})", file=sys.stderr)


if __name__ == "__main__":
    main()
