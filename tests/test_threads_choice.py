"""The automatic thread count (n_threads=None) on a busy machine: the choice itself, replayed on given batch
times (`_core._thread_choice_trace`, cpp/parallel.h ThreadChoice), and the results it gives, which must be
those of any fixed thread count bit for bit (the choice switches thread counts between batches and calls).

Expected behaviour (docs/DESIGN.md "Busy machines"): probes alternate 1 and all threads; a setting 1.5x slower
per row after one batch of each loses at once; a confirmed choice is probed again after 64, 128, ... up to
1024 batches; a second batch of the chosen setting slower than the rejected one was, within 8 batches of
the first, starts a probe at once.
"""

import time

import numpy as np
import pytest

import fastrec
from fastrec import _core
from fastrec.datasets import make_interactions

QUIET = (2.0, 1.0)  # seconds per batch on (1 thread, 2 threads): two cores free
BUSY = (1.0, 5.0)  # another process spins on one core: two threads wait for each other (measured: ~5x)


def trace(phases):
    """Thread counts chosen over consecutive phases [(batches, (one, all)), ...]."""
    one = [t[0] for n, t in phases for _ in range(n)]
    all_ = [t[1] for n, t in phases for _ in range(n)]
    return np.array(_core._thread_choice_trace(one, all_))


def test_quiet_machine_uses_all_threads_nearly_always():
    used = trace([(2000, QUIET)])
    assert set(used) <= {1, 2}
    # Probes after 0, 128, 384, 896, 1920 batches (periods 128, 256, 512, 1024): one 1-thread batch each, as a
    # 1-thread batch twice as slow decides at once (factor 1.5).
    assert (used == 1).sum() <= 6
    assert used[0] == 2  # the first batch (unmeasured) runs on all threads


def test_busy_machine_uses_one_thread_after_two_batches():
    used = trace([(2000, BUSY)])
    assert used[1] == 1 and used[2] == 2  # the probe: one batch of each
    assert (used[3:67] == 1).all()  # decided: 1 thread for the next period
    # All-thread batches: the first (unmeasured), then one per probe (periods 64, 128, 256, 512, 1024).
    assert (used == 2).sum() <= 7


def test_a_slowdown_switches_at_once_and_a_quiet_machine_is_found_again():
    used = trace([(500, QUIET), (500, BUSY), (1200, QUIET)])
    # Busy from batch 500: the second slow batch on 2 threads (within 8 of the first) starts a probe as its
    # first sample, the next runs on 1 thread and decides.
    assert used[500] == 2 and used[501] == 2 and (used[502:560] == 1).all()
    assert (used[500:1000] == 2).sum() <= 5
    # Quiet again from batch 1000: the next periodic probe (at most 1024 batches later) goes back to 2 threads.
    back = 1000 + int(np.argmax(used[1000:] == 2))
    assert back <= 1000 + 1024 + 2 and (used[back + 1:back + 60] == 2).all()


def test_noisy_batches_keep_the_right_choice():
    rng = np.random.default_rng(0)
    n = 3000
    noise = rng.uniform(0.8, 1.25, (2, n))  # +-25% per batch, less than the factor between the settings
    one = 2.0 * noise[0]
    all_quiet = 1.0 * noise[1]
    used = np.array(_core._thread_choice_trace(list(one), list(all_quiet)))
    assert (used == 2).mean() > 0.95
    used = np.array(_core._thread_choice_trace(list(noise[0]), list(5.0 * noise[1])))
    assert (used == 1).mean() > 0.97


def test_one_slow_batch_does_not_move_a_period_to_one_thread():
    # Quiet (1 thread 2x slower), but batch 300 on 2 threads took 4x its time (an interrupt, a VM exit): one
    # slow batch is not a slowdown, and the choice stays on 2 threads.
    n = 1000
    one, all_ = [2.0] * n, [1.0] * n
    used = np.array(_core._thread_choice_trace(one, all_))
    slow = list(all_)
    slow[int(np.flatnonzero(used == 2)[300])] = 4.0  # the 300th batch that ran on 2 threads
    used_slow = np.array(_core._thread_choice_trace(one, slow))
    assert np.array_equal(used_slow, used)


def test_a_core_busy_every_few_batches_is_a_slowdown():
    # What a process spinning on the other core does (measured on this VM): every third or fourth 2-thread
    # batch 5-30x slower, the others normal, never two slow ones in a row. Here every fourth is 9x: 2 threads
    # average 3.0 per batch against 1 thread's 2.0. Two slow batches within 8 start a probe whose first sample
    # is the slow one, so the choice spends its time on 1 thread: within 10% of always running the faster one.
    n = 2000
    one, all_ = [2.0] * n, [9.0 if k % 4 == 3 else 1.0 for k in range(n)]
    used = np.array(_core._thread_choice_trace(one, all_))
    cost = np.where(used == 1, one, all_).sum()
    assert cost <= 1.1 * min(sum(one), sum(all_))


def test_a_loop_after_one_that_chose_one_thread_starts_there():
    # Each epoch call is a new loop. After a loop chose 1 thread, the next skips the warm-up batch and the probe
    # on all threads (15x a 1-thread batch with a core busy) and probes only at the period's end.
    busy = np.array(_core._thread_choice_trace([1.0] * 300, [5.0] * 300, resume=1))
    fresh = trace([(300, BUSY)])
    assert (busy[:64] == 1).all() and (busy == 2).sum() < (fresh == 2).sum()
    # The machine became quiet meanwhile: the period's end finds it and goes back to all threads.
    quiet = np.array(_core._thread_choice_trace([2.0] * 300, [1.0] * 300, resume=1))
    assert (quiet[:64] == 1).all() and (quiet[70:128] == 2).all()  # (then the next periodic probe)


def test_an_automatic_training_loop_records_its_choice():
    if _core.show_config()["max_threads"] < 2:
        pytest.skip("one core: there is no choice to make")
    rng = np.random.default_rng(2)
    n = 4096
    X = {"user": rng.integers(0, 500, n), "item": rng.integers(0, 300, n)}
    y = (rng.random(n) < 0.4).astype(np.float32)
    started = time.monotonic()
    fastrec.FieldModel(hidden_layer_sizes=(32,), epochs=1, batch_size=64, random_state=0, n_threads=None).fit(X, y)
    threads, age = _core._last_training_choice()
    # Recorded by this fit (64 batches: the first probe decides after three), not by an earlier one.
    assert threads in (1, _core.show_config()["max_threads"]) and 0 <= age <= time.monotonic() - started


def test_fixed_thread_counts_are_not_chosen():
    with pytest.raises(ValueError, match="threads >= 2"):
        _core._thread_choice_trace([1.0], [1.0], 1)


# Results: the automatic choice switches between 1 and all threads in every fit (its probes), and between calls
# of predict / recommend; each must equal a fixed thread count's bit for bit.

def _data():
    return make_interactions(n_users=300, n_items=200, n_interactions=6000, implicit=True, random_state=0)


def _recommender(n_threads, **kw):
    args = dict(embedding_dim=16, hidden_layer_sizes=(64, 32), epochs=2, batch_size=64, negatives=2,
                early_stopping=False, random_state=0, n_threads=n_threads)
    args.update(kw)
    return fastrec.Recommender(**args)


def test_auto_threads_train_predict_and_recommend_like_one_thread():
    d = _data()
    fits = {n: _recommender(n).fit(d.users, d.items) for n in (1, None)}
    users = np.unique(d.users)[:100]
    for n, m in fits.items():
        assert m.n_threads == n
    assert np.array_equal(fits[1].predict(d.users, d.items), fits[None].predict(d.users, d.items))
    # Repeated calls cross the shared choice's probes (1 and all threads alternate there); the item list is
    # long enough (200 items x 100 users) for the call to take part in the choice.
    ref_items, ref_scores = fits[1].recommend(users, k=5)
    for _ in range(6):
        items, scores = fits[None].recommend(users, k=5)
        assert np.array_equal(items, ref_items) and np.array_equal(scores, ref_scores)
    for u in users[:8]:
        for _ in range(3):
            a, b = fits[None].recommend([u], k=5), fits[1].recommend([u], k=5)
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_auto_threads_field_model_like_one_thread():
    rng = np.random.default_rng(1)
    n = 4096
    X = {"user": rng.integers(0, 500, n), "item": rng.integers(0, 300, n),
         "x": rng.standard_normal((n, 4)).astype(np.float32)}
    y = (rng.random(n) < 0.4).astype(np.float32)
    preds = []
    for threads in (1, None, 2):
        model = fastrec.FieldModel(fields={"user": {"dim": 16}, "item": {"dim": 16}}, hidden_layer_sizes=(128, 64),
                                   epochs=2, batch_size=128, random_state=0, n_threads=threads)
        model.fit(X, y)
        preds.append(model.predict_proba(X))
    assert np.array_equal(preds[0], preds[1]) and np.array_equal(preds[0], preds[2])


def test_auto_threads_private_fit_like_one_thread():
    pytest.importorskip("dp_accounting")
    from fastrec.privacy import DPConfig

    d = _data()
    preds = []
    for threads in (1, None):
        m = _recommender(threads, privacy=DPConfig(noise_multiplier=0.8), epochs=3, batch_size=100)
        m.fit(d.users, d.items)
        preds.append(m.predict(d.users[:200], d.items[:200]))
    assert np.array_equal(preds[0], preds[1])
