"""Whole-fit wall time of `fastrec.FieldModel.fit` vs PyTorch 2.13 on the reference model (issue 17, float32).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_fit.py [--examples 409600] \
        [--rounds 3] [--threads 2] [--batches 256 1024] [--columns ids hashed] [--epochs 1]
    python benchmarks/bench_fit.py --what overhead --examples 1000000      # fit wall / sum of epochs only
    python benchmarks/bench_fit.py --what bf16 --threads 1 2 --batches 1024 --columns ids   # bf16 training

What a user waits for is the whole call, from raw columns to a trained model, so both sides are timed from
the same raw inputs: user ids (10^5 distinct raw ids spread over 0..10^9), item ids (zipf over 10^6 raw ids),
a multi-hot "tags" column (scipy CSR, 10^3 tags, 1-5 a row, mean pooling), 13 numeric columns (not
standardised) and 0/1 labels. The model is the recommender benchmark's reference model (bench_recsys.py):
user 32, item 32, tags 16 dims, MLP (93 ->) 256-128-64-1 ReLU, sigmoid + BCE, plain SGD (lr 0.05, no weight
decay) on every parameter, `--epochs` epochs in a shuffled order.

- "ids": categorical columns mapped to rows by their vocabularies. fastrec: `FieldModel.fit(X, y)`.
  PyTorch: `np.unique(..., return_inverse=True)` per id column, numeric columns standardised with NumPy,
  the CSR's rows as EmbeddingBag offsets, then per epoch a permutation and per batch the batch's tensors
  (ids, tag ids / offsets, numeric rows, labels) sliced out, zero_grad / forward / backward / SGD step.
- "hashed": user and item through `hash_buckets` (10^5 and 10^6 buckets). fastrec hashes the values' text
  (CRC-32, docs/DESIGN.md); PyTorch gets a cheaper multiplicative hash vectorised in NumPy (favours torch).

Rounds are interleaved (every configuration and implementation once, then again): median [min-max] of the
wall time per configuration, the ratio torch / fastrec per round (median [min-max]), and fastrec's fit wall /
its epochs' sum (history_["seconds"]). Beside it, the part of the fit spent mapping the embedding tables' fresh
memory (their initial draws in the fit minus the same draws repeated on the same arrays after it: page faults;
on a VM with free page reporting, where the host discards freed 2 MiB blocks, also the host's faults) and the
ratio without it. Bars (issue 17): ratio >= 1.8 at batch 256 and 1024 on 2 threads with
ids and with hashed columns; fit wall <= 1.15 x the sum of its epochs at 10^6 examples. Exits 1 on a miss
where the run measured what the bar defines.

--what bf16 (issue 17's bf16 bar): four implementations per configuration, interleaved: fastrec float32,
fastrec `precision="bf16"` (the MLP's products in bfloat16, float32 sums, weights and optimizer state),
PyTorch float32 and PyTorch under `torch.autocast("cpu", dtype=torch.bfloat16)` (forward and loss inside it,
as its documentation shows). Ratios per round on the epoch basis (history_ / the epochs' loop) and on the
whole fit; the FP32 FMA and VDPBF16PS peaks (fma_peak.cpp, bf16_peak.cpp) are measured in the same run.
Bars: fastrec bf16 epochs >= 3x PyTorch float32 and >= 1.5x PyTorch autocast, fit wall >= 2.5x PyTorch
float32, at batch 1024 on 1 and on 2 threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import TIMER, machine_info, settle, stats  # noqa: E402

import fastrec  # noqa: E402

try:
    import torch
    from torch import nn
except ImportError:
    torch = None

N_USERS, N_ITEMS, N_TAGS, N_NUMERIC = 100_000, 1_000_000, 1_000, 13
DIMS = {"user": 32, "item": 32, "tags": 16}
HIDDEN = (256, 128, 64)
LR = 0.05
BUCKETS = {"user": 100_000, "item": 1_000_000}


def make_data(n, seed=0):
    rng = np.random.default_rng(seed)
    user_ids = rng.choice(10**9, N_USERS, replace=False)
    users = user_ids[rng.integers(0, N_USERS, n)]
    items = (rng.zipf(1.2, n) - 1) % N_ITEMS + 7_000_000  # raw ids, not row numbers
    lens = rng.integers(1, 6, n)
    indptr = np.concatenate([[0], np.cumsum(lens)])
    tags = sp.csr_matrix((np.ones(indptr[-1], np.float32), rng.integers(0, N_TAGS, indptr[-1]), indptr),
                         shape=(n, N_TAGS))
    numeric = (rng.standard_normal((n, N_NUMERIC)) * 3 + 10).astype(np.float32)
    y = (rng.random(n) < 0.3).astype(np.float32)
    return {"user": users, "item": items, "tags": tags, "numeric": numeric}, y


class TableClock:
    """Times the initial values of the embedding tables inside a fit (fastrec._fieldnet.Float32Normals.normal)
    and, after it, the same draws again on the same, now mapped, arrays: the difference is what the fit paid
    for mapping fresh memory (page faults, and on a VM whose balloon reports free pages, the host's faults)."""

    def __init__(self):
        from fastrec import _fieldnet

        self._cls, self._orig, self.calls = _fieldnet.Float32Normals, _fieldnet.Float32Normals.normal, []
        clock = self

        def normal(rng, loc, scale, size):
            t = TIMER()
            out = clock._orig(rng, loc, scale, size)
            clock.calls.append((out, loc, scale, rng.n_threads, TIMER() - t))
            return out

        self._cls.normal = normal

    def excess(self):
        """Seconds the fit's draws took beyond the same draws on mapped memory; stops timing."""
        self._cls.normal = self._orig
        fresh = sum(c[-1] for c in self.calls)
        t = TIMER()
        for out, loc, scale, threads, _ in self.calls:  # overwrites the tables: the model is not used after this
            fastrec._core.fill_normal(out, 1, 0, float(loc), float(scale), threads)
        return max(fresh - (TIMER() - t), 0.0)


def fresh_memory_probe(mib=128, pauses=(0, 3, 0, 3)):
    """ms to first touch `mib` MiB of new memory after the last such block was freed `pause` s earlier: on a VM
    whose balloon reports free pages (the host discards freed 2 MiB blocks after about a second) the pause
    makes it several times slower; elsewhere the two agree."""
    out = []
    for pause in pauses:
        time.sleep(pause)
        block = np.empty(mib << 18, np.float32)
        t = TIMER()
        block.fill(1.0)
        out.append((pause, 1e3 * (TIMER() - t)))
        del block
    return out


def fit_fastrec(X, y, columns, batch, threads, epochs, precision="float32"):
    """(fit wall s, sum of its epochs s, last loss, s of the wall spent mapping the tables' fresh memory)."""
    fields = {name: {"dim": d} for name, d in DIMS.items()}
    if columns == "hashed":
        for name, b in BUCKETS.items():
            fields[name]["hash_buckets"] = b
    model = fastrec.FieldModel(fields=fields, hidden_layer_sizes=HIDDEN, optimizer="sgd", learning_rate=LR,
                               alpha=0.0, epochs=epochs, batch_size=batch, random_state=0, n_threads=threads,
                               precision=precision)
    clock = TableClock()
    t = TIMER()
    try:
        model.fit(X, y)
    finally:
        wall = TIMER() - t
        mapping = clock.excess()
    return wall, float(sum(model.history_["seconds"])), float(model.history_["loss"][-1]), mapping


if torch is not None:
    class TorchNet(nn.Module):
        def __init__(self, vocab_user, vocab_item):
            super().__init__()
            self.user = nn.EmbeddingBag(vocab_user, DIMS["user"], mode="sum", sparse=True)
            self.item = nn.EmbeddingBag(vocab_item, DIMS["item"], mode="sum", sparse=True)
            self.tags = nn.EmbeddingBag(N_TAGS, DIMS["tags"], mode="mean", sparse=True)
            for table in (self.user, self.item, self.tags):
                nn.init.normal_(table.weight, 0.0, 0.05)
            widths = [sum(DIMS.values()) + N_NUMERIC, *HIDDEN, 1]
            layers = []
            for a, b in zip(widths[:-1], widths[1:]):
                layers += [nn.Linear(a, b), nn.ReLU()]
            self.mlp = nn.Sequential(*layers[:-1])

        def forward(self, u, i, t, o, x):
            return self.mlp(torch.cat([self.user(u), self.item(i), self.tags(t, o), x], dim=1)).squeeze(1)


def torch_hash(values, buckets):
    """A vectorised multiplicative hash (cheaper than fastrec's CRC-32 of the text: favours torch)."""
    h = (values.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(20)
    return (h % np.uint64(buckets)).astype(np.int64)


def fit_torch(X, y, columns, batch, threads, epochs, autocast=False):
    t0 = TIMER()
    if columns == "hashed":
        u, i = torch_hash(X["user"], BUCKETS["user"]), torch_hash(X["item"], BUCKETS["item"])
        vu, vi = BUCKETS["user"], BUCKETS["item"]
    else:
        uniq_u, u = np.unique(X["user"], return_inverse=True)
        uniq_i, i = np.unique(X["item"], return_inverse=True)
        vu, vi = len(uniq_u), len(uniq_i)
    num = X["numeric"].astype(np.float64)
    num = ((num - num.mean(axis=0)) / num.std(axis=0)).astype(np.float32)
    tags = X["tags"]
    indptr, tag_ids = tags.indptr.astype(np.int64), tags.indices.astype(np.int64)
    u, i = torch.from_numpy(u.astype(np.int64)), torch.from_numpy(i.astype(np.int64))
    num_t, y_t, tag_t = torch.from_numpy(num), torch.from_numpy(y), torch.from_numpy(tag_ids)
    torch.manual_seed(0)
    net = TorchNet(vu, vi)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    loss_fn = nn.BCEWithLogitsLoss()
    rng = np.random.default_rng(0)
    n = len(y)
    epoch_s = 0.0
    for _ in range(epochs):
        te = TIMER()
        order = rng.permutation(n)
        for s in range(0, n, batch):
            rows = order[s:s + batch]
            lens = indptr[rows + 1] - indptr[rows]
            offs = np.zeros(len(rows), np.int64)
            np.cumsum(lens[:-1], out=offs[1:])
            tag_rows = np.repeat(indptr[rows] - offs, lens) + np.arange(lens.sum())
            r = torch.from_numpy(rows)
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = net(u[r].unsqueeze(1), i[r].unsqueeze(1), tag_t[torch.from_numpy(tag_rows)],
                          torch.from_numpy(offs), num_t[r])
                loss = loss_fn(out, y_t[r])
            loss.backward()
            opt.step()
        epoch_s += TIMER() - te
    return TIMER() - t0, epoch_s, float(loss.item())


def peak(name, threads):
    """{threads: GFLOP/s} of benchmarks/<name>.cpp (fma_peak, bf16_peak), built as its header says."""
    import shutil
    import subprocess
    import tempfile

    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        exe = str(Path(tmp) / name)
        src = str(Path(__file__).resolve().parent / f"{name}.cpp")
        if subprocess.run([compiler, "-O2", "-pthread", src, "-o", exe], capture_output=True).returncode:
            return {}
        out = subprocess.run([exe, str(threads)], capture_output=True, text=True).stdout.split()
    return {int(t): float(g) for isa, t, g in zip(out[0::3], out[1::3], out[2::3]) if isa != "none"}


BF16_IMPLS = ("fastrec", "fastrec_bf16", "torch", "torch_autocast")


def main_bf16(args, X, y):
    """--what bf16: see the module docstring."""
    configs = [(c, b, t) for t in args.threads for b in args.batches for c in args.columns]
    impls = BF16_IMPLS if torch is not None else BF16_IMPLS[:2]
    runs = {(cfg, impl): [] for cfg in configs for impl in impls}
    peaks = {"fma": [], "bf16": []}
    for rnd in range(args.rounds):
        for name in peaks:
            peaks[name].append(peak(f"{name}_peak", max(args.threads)))
        for cfg in configs:
            columns, batch, threads = cfg
            for impl in impls:
                settle(args.settle)
                if impl.startswith("torch"):
                    torch.set_num_threads(threads)
                    runs[(cfg, impl)].append(fit_torch(X, y, columns, batch, threads, args.epochs,
                                                       autocast=impl == "torch_autocast"))
                else:
                    runs[(cfg, impl)].append(fit_fastrec(X, y, columns, batch, threads, args.epochs,
                                                         "bf16" if impl == "fastrec_bf16" else "float32"))
            print(f"round {rnd + 1}: {cfg} " + "  ".join(
                f"{impl} {runs[(cfg, impl)][-1][0]:.3f} s (epochs {runs[(cfg, impl)][-1][1]:.3f}, loss "
                f"{runs[(cfg, impl)][-1][2]:.4f})" for impl in impls), flush=True)
    for name, values in peaks.items():
        for t in sorted({t for v in values for t in v}):
            s = stats([v[t] for v in values if t in v])
            print(f"{name} peak, {t} thread(s): {s['median']:.0f} [{s['min']:.0f}-{s['max']:.0f}] GFLOP/s")
    print(f"\n{args.examples} examples, {args.epochs} epoch(s), rounds {args.rounds}\n")
    print("| columns | batch | threads | impl | fit wall | epochs | torch f32 / it (epochs) | "
          "torch autocast / it (epochs) | torch f32 / it (wall) |")
    print("|---|---|---|---|---|---|---|---|---|")
    missed = []
    results = {"machine": machine_info(), "args": vars(args), "peaks": peaks, "rows": []}

    def rs(v):
        return f"{statistics.median(v):.2f} [{min(v):.2f}-{max(v):.2f}]"

    for cfg in configs:
        columns, batch, threads = cfg
        for impl in impls:
            f = runs[(cfg, impl)]
            wall, ep = stats([r[0] for r in f]), stats([r[1] for r in f])
            row = {"columns": columns, "batch": batch, "threads": threads, "impl": impl, "fit_s": wall,
                   "epochs_s": ep, "loss": [r[2] for r in f]}
            line = f"| {columns} | {batch} | {threads} | {impl} | {wall['median']:.3f} [{wall['min']:.3f}-" \
                   f"{wall['max']:.3f}] s | {ep['median']:.3f} [{ep['min']:.3f}-{ep['max']:.3f}] s "
            if "torch" in impls:
                t32, tac = runs[(cfg, "torch")], runs[(cfg, "torch_autocast")]
                r_ep = [a[1] / b[1] for a, b in zip(t32, f)]
                r_ac = [a[1] / b[1] for a, b in zip(tac, f)]
                r_wall = [a[0] / b[0] for a, b in zip(t32, f)]
                row.update(torch_over_epochs=stats(r_ep), autocast_over_epochs=stats(r_ac),
                           torch_over_wall=stats(r_wall))
                line += f"| {rs(r_ep)} | {rs(r_ac)} | {rs(r_wall)} |"
                if impl == "fastrec_bf16" and batch == 1024:
                    for v, bar, what in ((r_ep, 3.0, "epochs vs torch float32"), (r_ac, 1.5, "epochs vs autocast"),
                                         (r_wall, 2.5, "fit wall vs torch float32")):
                        if statistics.median(v) < bar:
                            missed.append(f"bf16 {what}, {threads} thread(s): {statistics.median(v):.2f} < {bar}")
            else:
                line += "| - | - | - |"
            results["rows"].append(row)
            print(line)
    finish(args, results, missed)


def finish(args, results, missed):
    """Writes --out and exits with status 1 when a bar was missed."""
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    if missed:
        print("MISSED: " + "; ".join(missed), file=sys.stderr)
        sys.exit(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", choices=["compare", "overhead", "bf16"], default="compare")
    ap.add_argument("--examples", type=int, default=409_600)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--batches", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--columns", nargs="+", choices=["ids", "hashed"], default=["ids", "hashed"])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--settle", type=float, default=0.5)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    impls = ["fastrec"] + (["torch"] if torch is not None and args.what == "compare" else [])
    X, y = make_data(args.examples)
    if args.what == "bf16":
        return main_bf16(args, X, y)
    configs = [(c, b, t) for t in args.threads for b in args.batches for c in args.columns]
    runs = {(cfg, impl): [] for cfg in configs for impl in impls}
    for rnd in range(args.rounds):
        for cfg in configs:
            columns, batch, threads = cfg
            for impl in impls:
                if impl == "torch":
                    torch.set_num_threads(threads)
                settle(args.settle)
                fn = fit_fastrec if impl == "fastrec" else fit_torch
                runs[(cfg, impl)].append(fn(X, y, columns, batch, threads, args.epochs))
            print(f"round {rnd + 1}: {cfg} " + "  ".join(f"{impl} {runs[(cfg, impl)][-1][0]:.3f} s" for impl in impls),
                  flush=True)
    missed = []
    probe = fresh_memory_probe()
    results = {"machine": machine_info(), "args": vars(args), "rows": [], "fresh_memory_probe_ms": probe}
    print(f"\n{args.examples} examples, {args.epochs} epoch(s), rounds {args.rounds}; first touch of 128 MiB of new "
          "memory, 1 thread: " + ", ".join(f"{ms:.0f} ms after {p} s free" for p, ms in probe) + "\n")
    print("| columns | batch | threads | fastrec fit | fastrec fit / epochs | of the fit: mapping fresh table memory "
          "| (fit - mapping) / epochs | torch fit | torch / fastrec |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cfg in configs:
        columns, batch, threads = cfg
        f = runs[(cfg, "fastrec")]
        fit_s = stats([r[0] for r in f])
        over = [r[0] / r[1] for r in f]
        mapping = [r[3] for r in f]
        mapped = [(r[0] - r[3]) / r[1] for r in f]
        row = {"columns": columns, "batch": batch, "threads": threads, "fastrec_fit_s": fit_s,
               "fit_over_epochs": stats(over), "mapping_s": stats(mapping), "fit_over_epochs_mapped": stats(mapped)}
        line = f"| {columns} | {batch} | {threads} | {fit_s['median']:.3f} [{fit_s['min']:.3f}-{fit_s['max']:.3f}] s " \
               f"| {statistics.median(over):.3f} [{min(over):.3f}-{max(over):.3f}] " \
               f"| {1e3 * statistics.median(mapping):.0f} [{1e3 * min(mapping):.0f}-{1e3 * max(mapping):.0f}] ms " \
               f"| {statistics.median(mapped):.3f} [{min(mapped):.3f}-{max(mapped):.3f}] "
        if "torch" in impls:
            tt = runs[(cfg, "torch")]
            ratio = [a[0] / b[0] for a, b in zip(tt, f)]
            ts = stats([r[0] for r in tt])
            row.update(torch_fit_s=ts, ratio=stats(ratio))
            line += f"| {ts['median']:.3f} [{ts['min']:.3f}-{ts['max']:.3f}] s " \
                    f"| {statistics.median(ratio):.2f} [{min(ratio):.2f}-{max(ratio):.2f}] |"
            if threads == 2 and args.examples >= 409_600 and statistics.median(ratio) < 1.8:
                missed.append(f"fit ratio {columns} batch {batch}: {statistics.median(ratio):.2f} < 1.8")
        else:
            line += "| - | - |"
        if args.examples >= 1_000_000 and statistics.median(over) > 1.15:
            missed.append(f"fit / epochs {columns} batch {batch} threads {threads}: {statistics.median(over):.3f} > 1.15")
        results["rows"].append(row)
        print(line)
    finish(args, results, missed)


if __name__ == "__main__":
    main()
