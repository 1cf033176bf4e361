"""Differentially private training (DP-SGD) of the field-model estimators: `DPConfig` and the accounting.

`Recommender(privacy=DPConfig(...))` trains with DP-SGD in the core (cpp/private.h; docs/DESIGN.md,
"Differential privacy (issue 16)"): each step trains on a Poisson sample of the interactions (each one with
probability q = batch_size / n), clips each interaction's gradient (its sampled negatives included) to
`max_grad_norm`, adds Gaussian noise of standard deviation noise_multiplier * max_grad_norm and divides by
the expected batch. The privacy loss is counted by Google's `dp-accounting` (RDP accountant; install the
extra: ``pip install fastrec[privacy]``).
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

import numpy as np

from fastrec._registry import persistable

__all__ = ["DPConfig", "effective_noise", "epsilon_spent", "noise_for_epsilon", "user_units"]

MECHANISMS = ("sparse", "dense")
UNITS = ("example", "user")
# A row outside the batch passes the sparse mechanism's threshold with this probability per step by default:
# 10 rows per step in a table of 10^6 (the step cost stays that of the batch's rows).
DEFAULT_FALSE_POSITIVE_RATE = 1e-5


def _accounting():
    try:
        import dp_accounting
        from dp_accounting import rdp
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("private training needs Google's dp-accounting: pip install 'fastrec[privacy]'") from e
    return dp_accounting, rdp


@persistable
@dataclass
class DPConfig:
    """Differential privacy settings of a training run.

    Parameters
    ----------
    noise_multiplier : float, optional
        sigma: the noise added to the sum of clipped gradients has standard deviation sigma * max_grad_norm.
        Give this or target_epsilon (or both: sigma is then fixed and target_epsilon is only the budget).
    target_epsilon : float, optional
        The privacy budget epsilon. Without noise_multiplier, fit chooses the smallest noise multiplier that
        keeps epsilon <= target_epsilon after all its epochs; a fit or partial_fit that would spend more than
        target_epsilon in total is refused before it trains.
    delta : float, optional
        The delta of (epsilon, delta)-DP; default 1 / n (n interactions), and a warning when set above 1 / n.
    max_grad_norm : float, default=1.0
        C: the bound on one interaction's gradient (its sampled negatives included).
    unit : {"example", "user"}
        What is protected. "example": one interaction (add or remove one). "user": all of one user's
        interactions (add or remove one user): a step samples users (each with probability q), takes at most
        `max_examples_per_user` interactions of each sampled user (a random choice when it has more), and
        clips each user's summed gradient to `max_grad_norm`; q, delta's default and the accounting count
        users.
    max_examples_per_user : int, default=8
        The unit "user": the most interactions of one user a step trains on (the cost of a step and the
        dilution of each interaction's gradient in its user's clipped sum grow with it).
    embedding_mechanism : {"sparse", "dense"}
        "sparse" (DP-AdaFEST, Zhang et al., NeurIPS 2023): a step updates only the embedding rows whose noisy
        contribution count passes `threshold`, so its cost does not grow with the tables. "dense": noise on
        every row of every table at every step (the textbook mechanism; cost grows with the tables).
    count_noise_multiplier : float, optional
        sigma1 of the sparse mechanism's counts (each interaction adds at most 1 to a table's count vector in
        L2 norm). Default: 2 * noise_multiplier.
    threshold : float, optional
        tau of the sparse mechanism: rows whose noisy count exceeds it are updated. Default: the value at which
        a row outside the batch passes with probability 1e-5.
    """

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float | None = None
    max_grad_norm: float = 1.0
    unit: str = "example"
    max_examples_per_user: int = 8
    embedding_mechanism: str = "sparse"
    count_noise_multiplier: float | None = None
    threshold: float | None = None

    def check(self):
        """Raise ValueError naming the first invalid setting."""
        def positive(name, value, allow_none=True, zero=False):
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or (
                    value < 0 if zero else value <= 0):
                raise ValueError(f"DPConfig.{name} must be a {'non-negative' if zero else 'positive'} finite "
                                 f"number, got {value!r}")
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("DPConfig needs noise_multiplier or target_epsilon")
        positive("noise_multiplier", self.noise_multiplier, zero=True)
        positive("target_epsilon", self.target_epsilon)
        positive("max_grad_norm", self.max_grad_norm, allow_none=False)
        positive("count_noise_multiplier", self.count_noise_multiplier)
        if self.delta is not None:
            positive("delta", self.delta)
            if self.delta >= 1:
                raise ValueError(f"DPConfig.delta must lie in (0, 1), got {self.delta!r}")
        if self.threshold is not None and not (isinstance(self.threshold, numbers.Real) and
                                               math.isfinite(self.threshold)):
            raise ValueError(f"DPConfig.threshold must be a finite number, got {self.threshold!r}")
        if self.unit not in UNITS:
            raise ValueError(f"DPConfig.unit must be one of {UNITS}, got {self.unit!r}")
        cap = self.max_examples_per_user
        if isinstance(cap, bool) or not isinstance(cap, numbers.Integral) or cap < 1:
            raise ValueError(f"DPConfig.max_examples_per_user must be an int >= 1, got {cap!r}")
        if self.embedding_mechanism not in MECHANISMS:
            raise ValueError(f"DPConfig.embedding_mechanism must be one of {MECHANISMS}, got "
                             f"{self.embedding_mechanism!r}")
        if self.noise_multiplier == 0 and self.target_epsilon is not None:
            raise ValueError("DPConfig.noise_multiplier=0 gives no privacy: no target_epsilon can be met")


# ------------------------------------------------------------------------------------------- accounting
def effective_noise(sigma, count_sigma=None, n_counts=0):
    """The noise multiplier of one Gaussian mechanism equivalent to releasing, on the same sample, the noised
    gradient (multiplier sigma) and n_counts noised count vectors (multiplier count_sigma, sensitivity 1):
    the joint release is a Gaussian mechanism whose squared sensitivity-to-noise ratio is the sum of theirs,
    sigma_eff^-2 = sigma^-2 + n_counts * count_sigma^-2 (docs/DESIGN.md)."""
    if sigma == 0 or (n_counts and count_sigma == 0):
        return 0.0
    inverse = sigma ** -2 + (n_counts * count_sigma ** -2 if count_sigma and n_counts else 0.0)
    return inverse ** -0.5


def _step_event(q, sigma, count_sigma, n_counts):
    """One step: the Poisson-sampled (rate q) release of the noised gradient and, with the sparse mechanism,
    of n_counts noised contribution-count vectors, all computed on the same sample (as one Gaussian of the
    effective multiplier: dp-accounting's RDP of the composed event is the same number, tests/test_privacy.py,
    and is slower)."""
    dp, _ = _accounting()
    return dp.PoissonSampledDpEvent(q, dp.GaussianDpEvent(effective_noise(sigma, count_sigma, n_counts)))


def epsilon_spent(segments, delta):
    """epsilon after training segments [(q, sigma, count_sigma or None, n_counts, steps), ...] at this delta
    (RDP accountant, add-or-remove-one neighbouring)."""
    dp, rdp = _accounting()
    events = [dp.SelfComposedDpEvent(_step_event(q, s, cs, k), int(steps)) for q, s, cs, k, steps in segments
              if steps > 0]
    if not events:
        return 0.0
    if any(effective_noise(s, cs, k) == 0 for _, s, cs, k, steps in segments if steps > 0):
        return math.inf
    accountant = rdp.RdpAccountant()
    accountant.compose(dp.ComposedDpEvent(events))
    return float(accountant.get_epsilon(delta))


def noise_for_epsilon(target_epsilon, delta, q, steps, count_ratio=None, n_counts=0, previous=(), tol=1e-3):
    """The smallest noise multiplier sigma (count noise count_ratio * sigma when given) for which `steps` more
    steps at rate q after `previous` segments spend at most target_epsilon (bisection on the accountant)."""
    def eps(sigma):
        cs = None if count_ratio is None else count_ratio * sigma
        return epsilon_spent(list(previous) + [(q, sigma, cs, n_counts, steps)], delta)

    if epsilon_spent(list(previous), delta) >= target_epsilon:
        raise ValueError(f"the privacy budget target_epsilon={target_epsilon} is already spent")
    low, high = 0.0, 1.0
    while eps(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e6:
            raise ValueError(f"no noise multiplier reaches epsilon {target_epsilon} in {steps} steps at sampling "
                             f"rate {q:.4g}: use fewer epochs or a smaller batch_size")
    while high - low > tol * high:
        mid = 0.5 * (low + high)
        low, high = (mid, high) if eps(mid) > target_epsilon else (low, mid)
    return high


def _threshold(config, count_sigma):
    if config.threshold is not None:
        return float(config.threshold)
    return count_sigma * _normal_quantile(1.0 - DEFAULT_FALSE_POSITIVE_RATE)


def _normal_quantile(p):
    """Phi^-1(p) by bisection on erfc (no scipy needed here)."""
    low, high = -40.0, 40.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if 0.5 * math.erfc(-mid / math.sqrt(2)) < p:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


# ------------------------------------------------------------------------------------------- training
@persistable
class PrivateRun:
    """The privacy state of one estimator's training: segments for the accountant, the step counter, the
    noise multiplier chosen at fit. Stored on the estimator as ``_privacy_run`` (saved with the model)."""

    def __init__(self, config: DPConfig, seed: int = 0):
        config.check()
        self.config = config
        self.seed = int(seed)  # keys every noise stream with the step number
        self.segments = []  # [q, sigma, count_sigma, n_counts, steps]
        self.steps = 0
        self.sigma = None
        self.delta = None

    # The settings of the next epochs over n examples. The unit "user": units = (indptr, rows) of
    # user_units (each user's examples), q such that a step trains on batch_size examples in expectation.
    def plan(self, n, batch_size, epochs, n_counts, negatives, units=None):
        c = self.config
        if n < 1:
            raise ValueError("private training needs at least one interaction")
        what = "interactions"
        if units is not None:  # n: the examples a pass over every user would take (capped), n_units: users
            n_units = len(units[0]) - 1
            n = int(np.minimum(np.diff(units[0]), int(c.max_examples_per_user)).sum())
            what = "users"
        q = min(1.0, batch_size / n)
        steps_per_epoch = max(1, round(1.0 / q))
        steps = steps_per_epoch * epochs
        if self.delta is None:
            count = n if units is None else n_units
            self.delta = float(c.delta) if c.delta is not None else 1.0 / count
            if self.delta > 1.0 / count:
                warnings.warn(f"DPConfig.delta={self.delta:g} is above 1/n = {1.0 / count:g} (n = {count} {what}): "
                              f"a delta that large allows releasing some {what} outright", stacklevel=4)
        sparse = c.embedding_mechanism == "sparse" and n_counts > 0
        ratio = (c.count_noise_multiplier / c.noise_multiplier if c.count_noise_multiplier and c.noise_multiplier
                 else 2.0) if sparse else None
        if self.sigma is None:
            if c.noise_multiplier is not None:
                self.sigma = float(c.noise_multiplier)
            else:
                self.sigma = noise_for_epsilon(c.target_epsilon, self.delta, q, steps, ratio, n_counts,
                                               self._segments())
        sigma = self.sigma
        count_sigma = (float(c.count_noise_multiplier) if c.count_noise_multiplier else 2.0 * sigma) if sparse \
            else None
        after = epsilon_spent(self._segments() + [(q, sigma, count_sigma, n_counts, steps)], self.delta)
        if c.target_epsilon is not None and after > c.target_epsilon * (1 + 1e-9):
            spent = epsilon_spent(self._segments(), self.delta)
            raise ValueError(f"training refused: {epochs} more epochs would bring epsilon to {after:.4g}, above the "
                             f"budget target_epsilon={c.target_epsilon} (spent so far: {spent:.4g}, delta "
                             f"{self.delta:g})")
        return {"q": q, "steps_per_epoch": steps_per_epoch, "sigma": sigma, "count_sigma": count_sigma,
                "n_counts": n_counts, "sparse": sparse,
                "threshold": _threshold(c, count_sigma) if sparse else 0.0,
                "denominator": q * n * (1 + negatives)}

    def _segments(self):
        return [tuple(s) for s in self.segments]

    def record(self, plan, steps):
        last = self.segments[-1] if self.segments else None
        key = [plan["q"], plan["sigma"], plan["count_sigma"], plan["n_counts"]]
        if last is not None and last[:4] == key:
            last[4] += steps
        else:
            self.segments.append(key + [steps])
        self.steps += steps

    def spent(self):
        return (epsilon_spent(self._segments(), self.delta), self.delta)


def count_groups(fields):
    """Per field, the field whose bag table it reads (its row selection group), and the number of groups."""
    groups = [f.source if f.source is not None else i for i, f in enumerate(fields)]
    return groups, len(set(groups))


def user_units(user_rows):
    """The unit "user": (indptr, rows) with rows[indptr[u]:indptr[u + 1]] the example indices of the u-th user
    that has examples, in example order."""
    user_rows = np.asarray(user_rows)
    if user_rows.ndim != 1 or not np.issubdtype(user_rows.dtype, np.integer):
        raise ValueError(f"user_rows must be a 1-D array of integer user numbers, got shape {user_rows.shape} and "
                         f"dtype {user_rows.dtype}")
    order = np.argsort(user_rows, kind="stable").astype(np.int64)
    sorted_users = user_rows[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]]) if len(order) else np.zeros(0, int)
    indptr = np.r_[starts, len(order)].astype(np.int64)
    return indptr, order


def private_epoch_runner(est, run: PrivateRun, plan, units=None):
    """A replacement for FieldNet.train_epoch: one epoch = plan['steps_per_epoch'] private steps."""
    net = est.net_
    groups, _ = count_groups(net.fields)
    privacy = {"noise_multiplier": plan["sigma"], "max_grad_norm": float(run.config.max_grad_norm),
               "sampling_rate": plan["q"], "sparse": plan["sparse"],
               "count_noise": plan["count_sigma"] or 0.0, "threshold": plan["threshold"], "seed": run.seed,
               "count_group": groups}
    if units is not None:
        privacy.update(unit_indptr=units[0], unit_rows=units[1], unit_cap=int(run.config.max_examples_per_user))

    def train_epoch(handle, keys, y, weight, order, *, batch_size, alpha, learning_rate, momentum, nesterov,
                    beta_1, beta_2, epsilon, sampler, epoch, n_threads, progress=None):
        loss_sum, net.adam_t, rows, diverged, error = handle.train_private(
            net.state1, net.state2, keys, y, weight, privacy, alpha, plan["denominator"], net.optimizer,
            learning_rate, momentum, nesterov, beta_1, beta_2, epsilon, net.adam_t, sampler, run.steps,
            plan["steps_per_epoch"], n_threads, "auto", progress)
        run.record(plan, plan["steps_per_epoch"])
        est.privacy_spent_ = run.spent()
        return loss_sum, rows, diverged, error

    return train_epoch
