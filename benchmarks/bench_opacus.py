#!/usr/bin/env python
"""Issue 16's Opacus bar: private training of the reference model (bench_privacy.py: user 100k x 32, item 10^6
x 32, tags 1k x 16 mean-pooled, 13 dense features, MLP 93-256-128-64-1 ReLU, BCE, plain SGD lr 0.01; DP-SGD with
Poisson sampling at q = 1024 / n, noise multiplier 1, clipping norm 1), 2 threads: fastrec (sparse and dense
embedding mechanisms) against Opacus on PyTorch 2.13 CPU, throughput and peak memory.

    flock -x /work/bench.lock env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \\
        python benchmarks/bench_opacus.py --items 1000000 --users 100000 [--rounds 5]   # the reference size
    ... python benchmarks/bench_opacus.py --items 10000 --users 10000                     # a size Opacus's
                                                                                         # per-sample modes fit

Each implementation runs in its own subprocess (a worker that builds its model once, then runs one timed pass
per request), so that its peak memory is its own: "setup RSS" is VmRSS once the model and data are built,
"peak RSS" is VmHWM over the timed passes (the high-water mark is reset with /proc/self/clear_refs after
setup). Opacus workers run under an address-space limit (--mem-limit-gb, default 10: the machine has 23 GB
shared by several people), so that a mode that needs more fails with PyTorch's allocation error, which names
the bytes it asked for; that failure is reported instead of a figure.

fastrec: `FieldHandle.train_private` (as bench_privacy.py) for --fastrec-steps / --dense-steps Poisson steps a
pass; sparse mechanism = DP-AdaFEST (count noise 2, threshold at a false-positive rate 1e-5 per row and step),
dense = noise on every row of every table each step. Opacus 1.6 (PrivacyEngine.make_private, accountant
"rdp", loss_reduction "mean" so that the noised sum is divided by the expected batch q n = 1024, as fastrec
does): the model written with nn.Embedding (user and item: one id per example, the same as a one-id sum bag;
tags: the example's ids padded to 5 with weights 1/len and 0 for padding, the same as mean pooling), because
Opacus's grad samplers for nn.Embedding are vectorised (its nn.EmbeddingBag sampler loops over the examples
in Python) and its ghost-clipping mode has a norm sampler for nn.Embedding only; dense gradients (Opacus
noises every row). Modes: "hooks" (per-sample gradients from module hooks, the default), "functorch"
(vmap), "ew" (torch expanded weights), "ghost" (ghost clipping: norms from a first backward pass, a second
pass with the clipped weights). Opacus's Poisson batches are drawn and turned into tensors BEFORE timing
(its timed loop is zero_grad / forward / loss / backward / step), whereas fastrec samples inside its timed
call: the comparison favours Opacus. Same initial parameters for all. Rounds interleave the workers (order
rotated), each timed pass after a --settle pause; examples/s = expected examples (steps x 1024) / seconds,
median [min - max]; speed-up = fastrec / the fastest Opacus mode, per round.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

BATCH, THREADS, LR = 1024, 2, 0.01
SIGMA, C, COUNT_SIGMA = 1.0, 1.0, 2.0
MAX_TAGS = 5  # bench_recsys.random_bags draws 1-5 tags per example
OPACUS_MODES = ("hooks", "functorch", "ew", "ghost")


def proc_status():
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS", "VmHWM")):
                key, val = line.split(":")
                out[key] = int(val.split()[0]) * 1024
    return out


def reset_peak():
    with open("/proc/self/clear_refs", "w") as fh:  # "5": reset the peak RSS (VmHWM) to the current RSS
        fh.write("5")


def build_data(args):
    import bench_recsys

    bench_recsys.N_USERS = args.users  # Model, Data and fastrec_spec read the module constant at call time
    model = bench_recsys.Model(args.items, seed=10)
    data = bench_recsys.Data(args.examples, args.items, seed=11)
    return bench_recsys, model, data


# ------------------------------------------------------------------------------------------------ workers
class FastrecWorker:
    def __init__(self, args, mechanism):
        from fastrec import _core
        from fastrec.privacy import _normal_quantile

        br, model, data = build_data(args)
        self.spec = br.fastrec_spec(model, data.tags, data.dense, copy=False)
        del model
        self.handle = _core.FieldHandle(self.spec, True)
        self.keys = [data.users, data.items, data.rows]
        self.y = data.y
        self.privacy = {"noise_multiplier": SIGMA, "max_grad_norm": C, "sampling_rate": BATCH / data.n,
                        "sparse": mechanism == "sparse", "count_noise": COUNT_SIGMA,
                        "threshold": COUNT_SIGMA * _normal_quantile(1 - 1e-5), "seed": 3}
        self.steps = args.fastrec_steps if mechanism == "sparse" else args.dense_steps
        self.step = 0

    def run(self):
        self.handle.train_private(state1=self.spec["state1"], state2=self.spec["state2"], keys=self.keys, y=self.y,
                                  weight=None, privacy=self.privacy, alpha=0.0, denominator=float(BATCH),
                                  optimizer="sgd", learning_rate=LR, momentum=0.0, nesterov=False, beta_1=0.9,
                                  beta_2=0.999, epsilon=1e-8, adam_t=0, sampler=None, first_step=self.step,
                                  n_steps=self.steps, n_threads=THREADS)
        self.step += self.steps
        return self.steps * BATCH


class OpacusWorker:
    def __init__(self, args, mode):
        import torch
        from torch import nn
        from opacus import PrivacyEngine

        torch.set_num_threads(THREADS)
        torch.manual_seed(0)
        br, model, data = build_data(args)

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.user = nn.Embedding(model.user.shape[0], model.user.shape[1])
                self.item = nn.Embedding(model.item.shape[0], model.item.shape[1])
                self.tag = nn.Embedding(model.tag.shape[0], model.tag.shape[1])
                with torch.no_grad():
                    for emb, table in ((self.user, model.user), (self.item, model.item), (self.tag, model.tag)):
                        emb.weight.copy_(torch.from_numpy(table))
                layers = []
                for w, b in zip(model.coefs, model.intercepts):
                    lin = nn.Linear(w.shape[0], w.shape[1])
                    with torch.no_grad():
                        lin.weight.copy_(torch.from_numpy(w.T.copy()))
                        lin.bias.copy_(torch.from_numpy(b))
                    layers += [lin, nn.ReLU()]
                self.mlp = nn.Sequential(*layers[:-1])

            def forward(self, users, items, tag_ids, tag_weights, dense):
                tags = (self.tag(tag_ids) * tag_weights.unsqueeze(-1)).sum(1)
                x = torch.cat([self.user(users).squeeze(1), self.item(items).squeeze(1), tags, dense], dim=1)
                return self.mlp(x).squeeze(1)

        net = Net()
        # per-example tensors: tags padded to MAX_TAGS (id 0, weight 0)
        indptr, ids, weights = data.tags
        n = data.n
        lens = np.diff(indptr)
        tag_ids = np.zeros((n, MAX_TAGS), np.int64)
        tag_w = np.zeros((n, MAX_TAGS), np.float32)
        pos = np.arange(len(ids)) - np.repeat(indptr[:-1], lens)
        rows = np.repeat(np.arange(n), lens)
        tag_ids[rows, pos] = ids
        tag_w[rows, pos] = weights
        # ids as (n, 1): "ew" (expanded weights) needs every input batched
        cols = [torch.from_numpy(data.users.astype(np.int64)[:, None]),
                torch.from_numpy(data.items.astype(np.int64)[:, None]),
                torch.from_numpy(tag_ids), torch.from_numpy(tag_w), torch.from_numpy(data.dense),
                torch.from_numpy(data.y)]
        del model
        dataset = torch.utils.data.TensorDataset(*cols)
        loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH)  # sample rate 1024 / n for make_private
        opt = torch.optim.SGD(net.parameters(), lr=LR)
        crit = nn.BCEWithLogitsLoss()
        engine = PrivacyEngine(accountant="rdp")
        out = engine.make_private(module=net, optimizer=opt, criterion=crit, data_loader=loader,
                                  noise_multiplier=SIGMA, max_grad_norm=C, poisson_sampling=True,
                                  grad_sample_mode=mode)
        if mode == "ghost":
            self.net, self.opt, self.crit, _ = out
        else:
            (self.net, self.opt, _), self.crit = out, crit
        # Poisson batches drawn before timing (a pool cycled over)
        rng = np.random.default_rng(5)
        q = BATCH / n
        self.batches = []
        for _ in range(args.batch_pool):
            idx = torch.from_numpy(np.flatnonzero(rng.random(n) < q))
            self.batches.append([c[idx] for c in cols])
        self.steps = args.opacus_steps
        self.next = 0

    def run(self):
        for _ in range(self.steps):
            u, i, t, w, x, y = self.batches[self.next % len(self.batches)]
            self.next += 1
            self.opt.zero_grad(set_to_none=True)
            loss = self.crit(self.net(u, i, t, w, x), y)
            loss.backward()
            self.opt.step()
        return self.steps * BATCH


def worker_main(args):
    """Build, then answer one line per request on stdin: "run" -> {"seconds", "examples"}; "end" -> peak."""
    def reply(obj):
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    kind, _, variant = args.worker.partition(":")
    warnings.filterwarnings("ignore")  # Opacus: secure RNG off (its faster setting), full-backward-hook notes
    try:
        if kind == "opacus":
            limit = int(args.mem_limit_gb * (1 << 30))
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            w = OpacusWorker(args, variant)
        else:
            w = FastrecWorker(args, variant)
        gc.collect()
        setup_rss = proc_status()["VmRSS"]
        reset_peak()
        t0 = time.perf_counter()
        w.run()  # warm-up pass (untimed)
        reply({"ready": True, "setup_rss": setup_rss, "warmup_s": time.perf_counter() - t0})
    except Exception as e:  # noqa: BLE001 (reported, not hidden: the figure is the failure)
        reply({"ready": False, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        return 0
    for line in sys.stdin:
        if line.strip() == "run":
            t0 = time.perf_counter()
            ex = w.run()
            reply({"seconds": time.perf_counter() - t0, "examples": ex})
        else:
            reply({"peak_rss": proc_status()["VmHWM"]})
            return 0
    return 0


# ------------------------------------------------------------------------------------------------ the driver
def stats(v):
    s = sorted(v)
    return s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2]), s[0], s[-1]


def fmt(v, scale=1.0, spec=",.4g"):
    med, lo, hi = stats(v)
    return f"{med * scale:{spec}} [{lo * scale:{spec}} - {hi * scale:{spec}}]"


def gb(b):
    return f"{b / 2**30:.2f} GB"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--examples", type=int, default=65536)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--settle", type=float, default=0.3)
    ap.add_argument("--fastrec-steps", type=int, default=64, help="sparse mechanism: steps per timed pass")
    ap.add_argument("--dense-steps", type=int, default=16, help="dense mechanism: steps per timed pass")
    ap.add_argument("--opacus-steps", type=int, default=4, help="Opacus: steps per timed pass")
    ap.add_argument("--batch-pool", type=int, default=16, help="Opacus: Poisson batches drawn before timing")
    ap.add_argument("--modes", nargs="+", default=list(OPACUS_MODES), choices=OPACUS_MODES)
    ap.add_argument("--mem-limit-gb", type=float, default=10.0, help="address-space limit of the Opacus workers")
    ap.add_argument("--max-warmup-s", type=float, default=60.0, help="drop a worker whose warm-up pass is slower")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker_main(args)

    import torch
    import opacus

    print(f"# DP-SGD, reference model with user {args.users:,} x 32, item {args.items:,} x 32, batch {BATCH} "
          f"(Poisson, q = {BATCH}/{args.examples}), sigma {SIGMA}, C {C}, {THREADS} threads, {args.rounds} rounds; "
          f"torch {torch.__version__}, opacus {opacus.__version__}", flush=True)
    names = ["fastrec:sparse", "fastrec:dense"] + [f"opacus:{m}" for m in args.modes]
    base = [sys.executable, __file__, "--items", str(args.items), "--users", str(args.users), "--examples",
            str(args.examples), "--fastrec-steps", str(args.fastrec_steps), "--dense-steps", str(args.dense_steps),
            "--opacus-steps", str(args.opacus_steps), "--batch-pool", str(args.batch_pool), "--mem-limit-gb",
            str(args.mem_limit_gb)]
    workers, info, failed = {}, {}, {}
    for name in names:  # one at a time: a failing build does not overlap another's
        p = subprocess.Popen(base + ["--worker", name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = p.stdout.readline()
        msg = json.loads(line) if line else {"ready": False, "error": f"worker died (exit {p.wait()})"}
        if not msg["ready"]:
            failed[name] = msg["error"]
            p.wait()
            print(f"  {name}: FAILED: {msg['error']}", flush=True)
            continue
        if msg["warmup_s"] > args.max_warmup_s:
            failed[name] = f"warm-up pass {msg['warmup_s']:.1f} s > --max-warmup-s"
            p.stdin.close()
            p.wait()
            print(f"  {name}: dropped: {failed[name]}", flush=True)
            continue
        workers[name], info[name] = p, msg
        print(f"  {name}: setup RSS {gb(msg['setup_rss'])}, warm-up {msg['warmup_s']:.2f} s", flush=True)

    rates = {n: [] for n in workers}
    live = list(workers)
    for r in range(args.rounds):
        order = live[r % len(live):] + live[:r % len(live)]
        for name in order:
            time.sleep(args.settle)
            p = workers[name]
            p.stdin.write("run\n")
            p.stdin.flush()
            msg = json.loads(p.stdout.readline())
            rates[name].append(msg["examples"] / msg["seconds"])
    for name, p in workers.items():
        p.stdin.write("end\n")
        p.stdin.flush()
        info[name]["peak_rss"] = json.loads(p.stdout.readline())["peak_rss"]
        p.stdin.close()
        p.wait()

    print(f"\n| implementation | examples/s, median [min - max] | setup RSS | peak RSS in training |\n|---|---|---|---|")
    for name in names:
        if name in failed:
            print(f"| {name} | failed: {failed[name]} | - | - |")
        else:
            print(f"| {name} | {fmt(rates[name])} | {gb(info[name]['setup_rss'])} | {gb(info[name]['peak_rss'])} |")
    opacus_live = [n for n in rates if n.startswith("opacus")]
    if opacus_live:
        best = [max(rates[n][r] for n in opacus_live) for r in range(args.rounds)]
        fastest = max(opacus_live, key=lambda n: stats(rates[n])[0])
        for name in ("fastrec:sparse", "fastrec:dense"):
            if name in rates:
                ratio = [a / b for a, b in zip(rates[name], best)]
                print(f"| speed-up {name} / fastest Opacus mode per round ({fastest} by median) | "
                      f"{fmt(ratio, spec='.3g')} | | |")
        ok = stats([a / b for a, b in zip(rates["fastrec:sparse"], best)])[0] >= 10
        print(f"\nbar (sparse >= 10x Opacus at this size): {'met' if ok else 'MISSED'}")
    else:
        print("\nno Opacus mode ran at this size")
    return 0


if __name__ == "__main__":
    sys.exit(main())
