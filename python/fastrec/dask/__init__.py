"""Data-parallel training and cluster scoring of fastrec models on Dask (docs/DESIGN.md "Scale-out on Dask").

Install with ``pip install 'fastrec[dask]'``. ``DaskRecommender``, ``DaskTwoTower`` and ``DaskFieldModel`` take
the local estimators' parameters plus ``client``, ``sync_every`` and ``timeout``, and fit on dask collections
partitioned by rows: each worker trains the C++ core on the partitions it holds, the replicas are combined
every ``sync_every`` batches by exchanging the embedding rows they touched (fastrec.dask._engine). A worker
lost during a fit raises ``WorkerLostError`` within the timeout, never a hang; ``to_local()`` is the ordinary
fastrec model, and ``from_local`` wraps one to score on the cluster.
"""

from fastrec.dask._engine import (_LEAN_CLUSTER_CONFIG, _REPLICAS, WorkerLostError, _build, _combine, _counts,
                                  _direct, _drop, _local_cluster, _round, _start, _worker_addresses)
from fastrec.dask._fields import DaskFieldModel
from fastrec.dask._recommenders import DaskRecommender, DaskTwoTower, _part

__all__ = ["DaskFieldModel", "DaskRecommender", "DaskTwoTower", "WorkerLostError"]
