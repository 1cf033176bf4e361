"""``fastrec demo`` (or ``python -m fastrec.demo``): fastrec's main job on data it makes itself.

Generates implicit-feedback interactions with planted user tastes and item side features (no download),
trains a neural recommender with sampled negatives, evaluates it the usual way (each user's latest
interaction held out and ranked against 99 items the user never touched) next to a popularity baseline,
and prints a few recommendations. ``fastrec demo --save PATH`` also writes the model.
"""

import time

import numpy as np

import fastrec
from fastrec.datasets import make_interactions
from fastrec.evaluation import leave_last_out, sampled_ranking


class _Popularity:
    """Baseline: score = training interaction count of the item."""

    def __init__(self, items):
        ids, counts = np.unique(items, return_counts=True)
        self.count = dict(zip(ids.tolist(), counts.tolist()))

    def predict(self, users, items):
        return np.array([self.count.get(i, 0) for i in np.asarray(items).tolist()], dtype=np.float64)


def main(save=None):
    data = make_interactions(n_users=3000, n_items=1500, n_interactions=150_000, implicit=True, random_state=0)
    train, test = leave_last_out(data.users, data.timestamps, random_state=0)
    print(f"fastrec {fastrec.__version__}: {len(data.users):,} synthetic interactions, "
          f"{len(np.unique(data.users)):,} users x {len(np.unique(data.items)):,} items")

    model = fastrec.Recommender(embedding_dim=32, hidden_layer_sizes=(64, 32), epochs=8, negatives=4,
                                random_state=0)
    start = time.perf_counter()
    model.fit(data.users[train], data.items[train], item_features=data.item_features)
    seconds = time.perf_counter() - start
    epochs = len(model.history_["loss"])
    print(f"trained {epochs} epochs in {seconds:.1f} s, the whole fit (best epoch "
          f"{getattr(model, 'best_epoch_', epochs)} on {getattr(model, 'validation_size_', 0):,} held-out "
          "interactions)")

    for name, scorer in (("fastrec", model), ("popularity", _Popularity(data.items[train]))):
        result = sampled_ranking(scorer, data.users[test], data.items[test], seen_users=data.users,
                                 seen_items=data.items, n_negatives=99, k=10, random_state=0)
        print(f"{name:>10}: HR@10 {result['hr@10']:.3f}  NDCG@10 {result['ndcg@10']:.3f}")

    users = data.users[test][:3]
    items, scores = model.recommend(users, k=5)
    for user, row, row_scores in zip(users, items, scores):
        print(f"top-5 for user {user}: {row.tolist()} (scores {np.round(row_scores, 3).tolist()})")
    config = fastrec._core.show_config()
    print(f"core: {config['active_isa']} kernels, {config['max_threads']} OpenMP threads")
    if save is not None:
        model.save(save)
        print(f"saved the model to {save}; try: fastrec recommend {save} --users {users[0]},{users[1]}")


if __name__ == "__main__":
    main()
