"""The parameters of a two-tower model and the calls into `fastrec._core.TwoTowerHandle` (docs/DESIGN.md).

`TowerNet` owns two `FieldNet`s (loss "tower": each MLP ends in an `output_dim` vector), one per side, and
trains them together; it has the interface `_fieldnet.run_epochs` drives (train_epoch, snapshot, restore).
"""

from __future__ import annotations

import numpy as np

from fastrec import _core
from fastrec._fieldnet import FieldNet, Float32Normals
from fastrec._registry import persistable


@persistable
class TowerNet:
    """A user tower and an item tower. side_fields[s]: (fields, dense) of side s (0 users, 1 items), each
    read through key column 0 of its tower."""

    def __init__(self, user_inputs, item_inputs, hidden_layer_sizes, output_dim, activation, normalize,
                 temperature, rng, init_scale=0.05):
        draws = Float32Normals.of(rng)
        self.towers = [FieldNet(fields, dense, hidden_layer_sizes, activation, "tower", 1, draws,
                                init_scale=init_scale, output_dim=output_dim)
                       for fields, dense in (user_inputs, item_inputs)]
        self.output_dim = int(output_dim)
        self.normalize = bool(normalize)
        self.temperature = float(temperature)
        self.adam_t = 0

    def reset_optimizer(self, optimizer: str):
        for t in self.towers:
            t.reset_optimizer(optimizer)
        self.adam_t = 0

    def handle(self, user_data, item_data, *, training=False):
        """A validated core object; *_data = (bags, dense_tables) of that side."""
        specs = [t.spec(*data, training=training) for t, data in zip(self.towers, (user_data, item_data))]
        return _core.TwoTowerHandle(specs[0], specs[1], self.normalize, self.temperature, training)

    def train_epoch(self, handle, keys, y, weight, order, *, batch_size, alpha, learning_rate, momentum, nesterov,
                    beta_1, beta_2, epsilon, sampler, epoch, n_threads, progress=None):
        """One epoch in the core (keys = [user rows, item rows]; sampler = the training dict)."""
        u, i = self.towers
        loss_sum, self.adam_t, rows, diverged, error = handle.train_epoch(
            u.state1, u.state2, i.state1, i.state2, keys[0], keys[1], y, weight, order, batch_size, alpha,
            u.optimizer, learning_rate, momentum, nesterov, beta_1, beta_2, epsilon, self.adam_t, sampler, epoch,
            n_threads, "auto", progress)
        return loss_sum, rows, diverged, error

    def snapshot(self):
        return [t.snapshot() for t in self.towers], self.adam_t

    def restore(self, snapshot):
        """Back to a snapshot, in place (handles over these arrays stay valid)."""
        towers, self.adam_t = snapshot
        for t, s in zip(self.towers, towers):
            t.restore(s)

    def arrays(self):
        return [a for t in self.towers for a in t._arrays()]


def vectors(handle, user_side: bool, rows, scale=1.0, n_threads=0) -> np.ndarray:
    """float32 (n, dim) tower vectors of entity rows (normalised when the model normalises) times scale."""
    return handle.vectors(bool(user_side), np.ascontiguousarray(rows, dtype=np.int32), float(scale), n_threads)
