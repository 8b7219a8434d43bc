"""Dask: influences at scale from zarr to zarr, fits by map-reduce, and the cost of a round trip.

Three tables, skinfl only, on a synthetic problem: 20 standard normal
features, 10 classes (the argmax of a fixed random linear map of the
features plus unit Gaussian noise), float32, and an MLP 20 -> 32 (tanh) ->
10 (1,002 parameters) trained briefly by Adam (2 epochs, batches of 1,024,
lr 1e-2) on the first ``--n-fit`` training points. The data are written
once to zarr stores in ``benchmarks/.work/dask/`` (not tracked), chunk by
chunk from seeded generators. The cluster is always
``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)``, its
workers started with ``OMP_NUM_THREADS=1`` and given
``torch.set_num_threads(1)``.

1. **Influences at scale** (``scale``): 1,000 queries against the
   2,000,000 training points of a zarr store, written into a zarr array of
   shape (1,000, 2,000,000) float32 with chunks (1,000, 4,096). The
   estimator: ``EkfacInfluence`` (exact Gauss-Newton expectation,
   ``regularization=1e-3``, ``batch_size=4096``) fitted once on the first
   ``--n-fit`` points in memory, saved with ``skinfl.save`` and loaded by
   every configuration. (a) one process, 2 torch threads (and (a1), 1),
   ``est.influences(X_test, y_test, X=zarr_X, y=zarr_y, out=zarr_out)``
   (no dask); (b) the cluster, ``da.from_zarr`` training data in row chunks
   of ``--cluster-chunks``, ``out=`` another zarr array, with distributed's
   default worker environment (``MALLOC_TRIM_THRESHOLD_=65536`` from
   ``distributed.nanny.pre-spawn-environ``); (b') ``MALLOC_TRIM_THRESHOLD_``
   given as ``LocalCluster(env=...)`` only, which the worker sets once it
   runs, too late for glibc; (b'') the default plus a fixed
   ``MALLOC_MMAP_THRESHOLD_`` (16 MiB). Time of the ``influences`` call,
   peak RSS of the process (a) or of the driver and of each worker (b).
   Then a sample (4 rows x 256 columns across chunk boundaries) of each
   output is compared with the first and with ``est.influences`` in memory,
   every output chunk is checked to be written, and the outputs are deleted
   (``--keep-outputs`` keeps them). ``writes``: the single process of (a)
   on ``--probe`` training points with the default ``batch_size=512``
   against ``batch_size`` = the output's chunk width (zarr rewrites a whole
   chunk for every partial write).
2. **Fit by map-reduce** (``fit``): ``EkfacInfluence`` and
   ``NystroemInfluence`` (rank 50, ``random_state=0``), both of the
   Gauss-Newton matrix, fitted on the first ``--n-fit`` points as numpy
   arrays (one process, 2 threads, and 1) and as dask arrays of 8 row
   chunks read from zarr (the cluster, with distributed's default worker
   environment and with a fixed ``MALLOC_MMAP_THRESHOLD_``); influences of
   100 queries on 1,000 training points from the fits compared, and for
   EK-FAC with a float64 fit.
3. **CG round trip** (``cg``): ``CgInfluence`` (plain CG on the
   Gauss-Newton matrix, ``preconditioner=None``, ``rtol=1e-4``; 1e-2 with
   ``--quick``) fitted on
   2,000 points as numpy arrays (2 threads, and 1), as dask arrays of 8
   chunks read from zarr, and as dask arrays of 8 chunks persisted in the
   workers' memory. Each CG iteration is one curvature product, one round
   trip to the cluster for a sharded fit: ``transform`` of 10 queries
   divided by the products it made, and ``_curvature().matmat`` of 10
   vectors timed alone (median of 20); and the same graph with empty tasks
   (dask's floor).

Every measurement runs in a fresh process (``_harness.launch``); the other
jobs' CPU use during it (busy CPU time of the machine minus that of the
measurement's processes, ``/proc/stat``) is recorded and flagged above 0.3
cores. Results: ``results/dask.{md,json}`` (``dask_quick``, ``dask_<only>``).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402

N_FEATURES, N_CLASSES, HIDDEN, SEED = 20, 10, 32, 0
REGULARIZATION, RANK, N_SHARDS = 1e-3, 50, 8
EPOCHS, TRAIN_BATCH, LR = 2, 1024, 1e-2
FIT_QUERIES, FIT_TRAIN = 100, 1000  # table 2's comparison
CG_QUERIES, MATMAT_REPEAT = 10, 20
TRIM, MMAP = "65536", str(16 * 2**20)  # distributed's MALLOC_TRIM_THRESHOLD_; a fixed MALLOC_MMAP_THRESHOLD_
OTHER_CPU_FLAG = 0.3  # cores used by other jobs during a measurement above which it is flagged
TABLES = ("scale", "writes", "fit", "cg")
SIZES = {  # full, quick
    "n_train": (2_000_000, 65_536), "n_test": (1000, 200), "train_chunk": (32_768, 32_768),
    "out_chunk": (4096, 4096), "n_fit": (200_000, 20_000), "probe": (65_536, 16_384), "n_cg": (2000, 2000),
}


# ------------------------------------------------------------------ shared
def build_model():
    from torch import nn

    return nn.Sequential(nn.Linear(N_FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, N_CLASSES))


def work_dir(spec):
    return Path(spec["work_dir"])


def load_model(spec):
    import torch

    model = build_model()
    model.load_state_dict(torch.load(work_dir(spec) / "model.pt", weights_only=True))
    return model.eval()


def open_store(spec, name):
    import zarr

    return zarr.open_array(str(work_dir(spec) / f"{name}.zarr"), mode="r")


def test_points(spec):
    import numpy as np

    data = np.load(work_dir(spec) / "test.npz")
    return data["X"], data["y"]


def _chunk_data(rng, rows, weights):
    import numpy as np

    X = rng.standard_normal((rows, N_FEATURES), dtype=np.float32)
    noise = rng.standard_normal((rows, N_CLASSES), dtype=np.float32)
    return X, np.argmax(X @ weights + noise, axis=1).astype(np.int64)


def _write_store(directory, name, X, y, chunk):
    """``<name>_X.zarr`` and ``<name>_y.zarr`` in ``directory``, in row chunks of ``chunk``."""
    import zarr

    for suffix, array, chunks in (("X", X, (chunk, N_FEATURES)), ("y", y, (chunk,))):
        store = zarr.create_array(str(directory / f"{name}_{suffix}.zarr"), shape=array.shape, dtype=array.dtype,
                                  chunks=chunks, overwrite=True)
        store[...] = array


def count_passes():
    """Counts, in this process, the passes over training data (``sum_over_shards``) and dask computations."""
    from skinfl import _curvature, _dask, _shards

    counts = {"passes": 0, "computes": 0}

    def counting(owner, name, key):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            counts[key] += 1
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)

    counting(_curvature.CurvatureOperator, "sum_over_shards", "passes")
    counting(_shards.ShardedCurvature, "sum_over_shards", "passes")
    counting(_shards, "compute", "computes")
    counting(_dask, "compute", "computes")
    return counts


def worker_state():
    """Runs on a dask worker: its peak RSS, torch threads and glibc malloc variables (at start and now)."""
    import torch

    with open("/proc/self/environ", "rb") as handle:  # the environment the process was started with
        initial = dict(item.split(b"=", 1) for item in handle.read().split(b"\0") if b"=" in item)
    malloc = {key.decode(): value.decode() for key, value in initial.items() if key.startswith(b"MALLOC_")}
    return {"pid": os.getpid(), "peak_mb": H.maxrss_mb(), "torch_threads": torch.get_num_threads(),
            "malloc_at_start": malloc, "trim_at_start": malloc.get("MALLOC_TRIM_THRESHOLD_"),
            "trim_in_environ": os.environ.get("MALLOC_TRIM_THRESHOLD_")}


def start_cluster(trim="pre-spawn"):
    """A LocalCluster of 2 worker processes with 1 thread each, and its client.

    ``trim="pre-spawn"``: ``MALLOC_TRIM_THRESHOLD_`` through
    ``distributed.nanny.pre-spawn-environ`` (distributed's default), set before
    the worker process starts. ``"env"``: removed there and given as
    ``LocalCluster(env=...)``, which the worker applies once it runs.
    ``"pre-spawn+mmap"``: as ``"pre-spawn"``, with ``MALLOC_MMAP_THRESHOLD_``
    too (a fixed threshold: setting the trim threshold alone turns glibc's
    dynamic mmap threshold off, and every temporary above 128 KiB is then
    mapped and unmapped).
    """
    import dask
    import distributed
    import torch

    # pre-spawn-environ takes a variable from this process's environment before its own value: the harness
    # gives this process its torch threads there.
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                      PYTHONPATH=os.pathsep.join([str(H.REPO_ROOT), str(H.HERE)]))  # worker_state on the workers
    for key in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"):
        os.environ.pop(key, None)
    extra = {}
    if trim == "env":
        dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})
        extra["env"] = {"MALLOC_TRIM_THRESHOLD_": TRIM}
    elif trim == "pre-spawn+mmap":
        dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_": MMAP})
    elif trim != "pre-spawn":
        raise ValueError(trim)
    start = time.perf_counter()
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                       worker_dashboard_address=None, silence_logs=40, **extra)
    client = distributed.Client(cluster)
    client.run(torch.set_num_threads, 1)
    return cluster, client, time.perf_counter() - start


def stop_cluster(cluster, client):
    client.close()
    cluster.close()


def workers_summary(client):
    states = list(client.run(worker_state).values())
    return {"workers": states, "worker_peak_mb": [s["peak_mb"] for s in states]}


# ---------------------------------------------------------- worker entries
def prepare(spec):
    """Data in zarr (training, fit subset, probe subset, CG subset), test points, the trained model, the
    fitted EK-FAC: each made once."""
    import numpy as np
    import torch

    import skinfl

    directory = work_dir(spec)
    directory.mkdir(parents=True, exist_ok=True)
    n_train, chunk = spec["n_train"], spec["train_chunk"]
    weights = np.random.default_rng(SEED).standard_normal((N_FEATURES, N_CLASSES)).astype(np.float32)
    out = {}
    if not (directory / "done_data").exists():
        import zarr

        start = time.perf_counter()
        zx = zarr.create_array(str(directory / "train_X.zarr"), shape=(n_train, N_FEATURES), dtype="float32",
                               chunks=(chunk, N_FEATURES), overwrite=True)
        zy = zarr.create_array(str(directory / "train_y.zarr"), shape=(n_train,), dtype="int64", chunks=(chunk,),
                               overwrite=True)
        for index, first in enumerate(range(0, n_train, chunk)):
            rows = min(chunk, n_train - first)
            X, y = _chunk_data(np.random.default_rng([SEED, index]), rows, weights)
            zx[first:first + rows], zy[first:first + rows] = X, y
        X_test, y_test = _chunk_data(np.random.default_rng([SEED, 10**6]), spec["n_test"], weights)
        np.savez(directory / "test.npz", X=X_test, y=y_test)
        for name, rows, store_chunk in (("fit", spec["n_fit"], -(-spec["n_fit"] // N_SHARDS)),
                                        ("probe", spec["probe"], chunk),
                                        ("cg", spec["n_cg"], -(-spec["n_cg"] // N_SHARDS))):
            _write_store(directory, name, zx[:rows], zy[:rows], store_chunk)
        (directory / "done_data").write_text("")
        out["data_s"] = time.perf_counter() - start
    if not (directory / "model.pt").exists():
        zx, zy = open_store(spec, "fit_X"), open_store(spec, "fit_y")
        X, y = torch.from_numpy(zx[...]), torch.from_numpy(zy[...])
        torch.manual_seed(SEED)
        model = build_model()
        optimizer = torch.optim.Adam(model.parameters(), lr=LR)
        start = time.perf_counter()
        for _ in range(EPOCHS):
            for batch in torch.randperm(len(X)).split(TRAIN_BATCH):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(X[batch]), y[batch]).backward()
                optimizer.step()
        out["train_s"] = time.perf_counter() - start
        torch.save(model.state_dict(), directory / "model.pt")
    if not (directory / f"ekfac_b{spec['batch_size']}.skinfl").exists():
        zx, zy = open_store(spec, "fit_X"), open_store(spec, "fit_y")
        start = time.perf_counter()
        est = skinfl.EkfacInfluence(load_model(spec), regularization=REGULARIZATION, batch_size=spec["batch_size"],
                                    random_state=SEED).fit(zx[...], zy[...])
        out["ekfac_fit_s"] = time.perf_counter() - start
        skinfl.save(est, directory / f"ekfac_b{spec['batch_size']}.skinfl", include_data=False)
    model = load_model(spec)
    X_test, y_test = test_points(spec)
    with torch.no_grad():
        out["test_accuracy"] = float((model(torch.from_numpy(X_test)).argmax(1).numpy() == y_test).mean())
    out["n_params"] = sum(p.numel() for p in model.parameters())
    return out


def _loaded_estimator(spec):
    import skinfl

    return skinfl.load(work_dir(spec) / f"ekfac_b{spec['batch_size']}.skinfl", load_model(spec))


class CountingArray:
    """A zarr array whose writes are counted (``out=`` takes any array with shape, dtype and __setitem__)."""

    def __init__(self, array):
        self.array, self.writes = array, 0
        self.shape, self.dtype = array.shape, array.dtype

    def __setitem__(self, key, value):
        self.writes += 1
        self.array[key] = value


def _output(spec, name):
    import zarr

    return zarr.create_array(str(work_dir(spec) / f"{name}.zarr"), shape=(spec["n_test"], spec["n_columns"]),
                             dtype="float32", chunks=(spec["n_test"], spec["out_chunk"]), overwrite=True)


def scale_local(spec):
    """(a): one process, zarr in and out, no dask."""
    est = _loaded_estimator(spec)
    est.set_params(batch_size=spec["run_batch_size"])
    X_test, y_test = test_points(spec)
    zx, zy = open_store(spec, spec["train"] + "_X"), open_store(spec, spec["train"] + "_y")
    est.influences(X_test[:8], y_test[:8], X=zx[:64], y=zy[:64])  # warm-up
    rss_warm_mb = H.maxrss_mb()
    out = CountingArray(_output(spec, spec["output"]))
    start = time.perf_counter()
    returned = est.influences(X_test, y_test, X=zx, y=zy, out=out)
    total_s = time.perf_counter() - start
    assert returned is out
    return {"total_s": total_s, "rss_warm_mb": rss_warm_mb, "writes": out.writes,
            "chunks_written": out.array.nchunks_initialized, "n_chunks": out.array.nchunks}


def scale_cluster(spec):
    """(b): a LocalCluster of 2 processes x 1 thread, da.from_zarr training data, zarr out written by the workers."""
    import dask.array as da

    est = _loaded_estimator(spec)
    X_test, y_test = test_points(spec)
    zx, zy = open_store(spec, "train_X"), open_store(spec, "train_y")
    cluster, client, start_s = start_cluster(spec["trim"])
    try:
        small = da.from_array(zx[:64], chunks=32), da.from_array(zy[:64], chunks=32)
        est.influences(X_test[:8], y_test[:8], X=small[0], y=small[1]).compute()  # warm-up: imports on the workers
        warm = workers_summary(client)
        rss_warm_mb = H.maxrss_mb()
        out = _output(spec, spec["output"])
        rows = spec["dask_chunk"]  # a divisor of the zarr chunks: each task reads part of one
        Xd, yd = da.from_zarr(zx, chunks=(rows, N_FEATURES)), da.from_zarr(zy, chunks=(rows,))
        start = time.perf_counter()
        returned = est.influences(X_test, y_test, X=Xd, y=yd, out=out)
        total_s = time.perf_counter() - start
        assert returned is out
        after = workers_summary(client)
    finally:
        stop_cluster(cluster, client)
    return {"total_s": total_s, "cluster_start_s": start_s, "rss_warm_mb": rss_warm_mb,
            "worker_warm_mb": warm["worker_peak_mb"], **after, "training_chunks": len(Xd.chunks[0]),
            "chunks_written": out.nchunks_initialized, "n_chunks": out.nchunks}


def verify(spec):
    """A sample of every output against the others and against ``est.influences`` in memory; all chunks written."""
    import numpy as np
    import zarr

    n_test, n_train, chunk = spec["n_test"], spec["n_columns"], spec["train_chunk"]
    rows = np.array(sorted({0, 1, n_test // 2, n_test - 1}))
    starts = [0, chunk - 32, n_train // 2, n_train - 64]  # the start, a block boundary, the middle, the end
    columns = np.unique(np.concatenate([np.arange(s, s + 64) for s in starts]))
    columns = columns[(columns >= 0) & (columns < n_train)]
    est = _loaded_estimator(spec)
    X_test, y_test = test_points(spec)
    zx, zy = open_store(spec, spec["train"] + "_X"), open_store(spec, spec["train"] + "_y")
    reference = est.influences(X_test[rows], y_test[rows], X=zx.oindex[columns], y=zy.oindex[columns])
    scale = float(np.abs(reference).max())
    samples, out = {}, {}
    for name in spec["outputs"]:
        array = zarr.open_array(str(work_dir(spec) / f"{name}.zarr"), mode="r")
        samples[name] = array.oindex[rows, columns]
        out[name] = {"complete": array.nchunks_initialized == array.nchunks,
                     "vs_memory": float(np.abs(samples[name] - reference).max() / scale),
                     "allclose_memory": bool(np.allclose(samples[name], reference, rtol=1e-4, atol=1e-5 * scale))}
    first = spec["outputs"][0]
    for name in spec["outputs"][1:]:
        out[name]["vs_" + first] = float(np.abs(samples[name] - samples[first]).max() / scale)
        out[name]["allclose_" + first] = bool(np.allclose(samples[name], samples[first], rtol=1e-5,
                                                          atol=1e-6 * scale))
    return {"outputs": out, "sample": [len(rows), len(columns)], "max_abs_reference": scale}


def fit_compare(spec):
    """One estimator fitted on numpy arrays (this process) and on dask arrays of 8 chunks (the cluster)."""
    import copy

    import dask.array as da
    import numpy as np

    import skinfl

    model = load_model(spec)
    zx, zy = open_store(spec, "fit_X"), open_store(spec, "fit_y")
    X, y = zx[...], zy[...]
    X_test, y_test = test_points(spec)
    queries = X_test[:FIT_QUERIES], y_test[:FIT_QUERIES]
    settings = {"regularization": REGULARIZATION, "random_state": SEED, "second_order": "gauss_newton",
                **({"rank": spec["rank"]} if spec["estimator"] == "NystroemInfluence" else {})}

    def make(on=model):
        return getattr(skinfl, spec["estimator"])(on, **settings)

    import torch

    make().fit(X[:256], y[:256])  # warm-up
    counts = count_passes()
    start = time.perf_counter()
    plain = make().fit(X, y)
    plain_s = time.perf_counter() - start
    plain_passes = dict(counts)
    torch.set_num_threads(1)
    start = time.perf_counter()
    single = make().fit(X, y)
    single_s = time.perf_counter() - start
    torch.set_num_threads(spec["threads"])
    sharded_runs = {}
    for trim in ("pre-spawn", "pre-spawn+mmap"):
        cluster, client, start_s = start_cluster(trim)
        try:
            make().fit(da.from_array(X[:256], chunks=64), da.from_array(y[:256], chunks=64))  # warm-up
            counts.update(passes=0, computes=0)
            Xd, yd = da.from_zarr(zx), da.from_zarr(zy)
            start = time.perf_counter()
            sharded_runs[trim] = make().fit(Xd, yd), time.perf_counter() - start, dict(counts), \
                workers_summary(client)
        finally:
            stop_cluster(cluster, client)
    sharded, sharded_s, sharded_passes, states = sharded_runs["pre-spawn"]
    mmap_s, mmap_states = sharded_runs["pre-spawn+mmap"][1], sharded_runs["pre-spawn+mmap"][3]
    A, B, C = (est.influences(*queries, X=X[:FIT_TRAIN], y=y[:FIT_TRAIN]) for est in (plain, sharded, single))
    scale, out = float(np.abs(A).max()), {}
    if spec["estimator"] == "EkfacInfluence":  # Nystroem draws its sketch in the model's dtype: another one
        # The same fit in float64: how far each float32 fit is from exact arithmetic.
        exact = make(copy.deepcopy(model).double()).fit(X.astype(np.float64), y)
        R = exact.influences(queries[0].astype(np.float64), queries[1], X=X[:FIT_TRAIN].astype(np.float64),
                             y=y[:FIT_TRAIN])
        scale64 = float(np.abs(R).max())
        out = {"plain_vs_float64": float(np.abs(A - R).max() / scale64),
               "sharded_vs_float64": float(np.abs(B - R).max() / scale64)}
    return {"plain_s": plain_s, "single_s": single_s, "sharded_s": sharded_s, "total_s": sharded_s,
            "mmap_s": mmap_s, "mmap_worker_peak_mb": mmap_states["worker_peak_mb"], "mmap_workers": mmap_states["workers"],
            "cluster_start_s": start_s, "threads_rel_diff": float(np.abs(A - C).max() / scale), **out,
            "n_shards": sharded._curvature().n_shards, "plain_passes": plain_passes, "sharded_passes": sharded_passes,
            "max_rel_diff": float(np.abs(A - B).max() / scale), "max_abs": scale, **states}


def cg_overhead(spec):
    """CgInfluence fitted on numpy, on dask from zarr and on dask persisted: time per curvature product."""
    import dask.array as da
    import numpy as np
    import torch

    from skinfl import CgInfluence

    model = load_model(spec)
    zx, zy = open_store(spec, "cg_X"), open_store(spec, "cg_y")
    X, y = zx[...], zy[...]
    X_test, y_test = test_points(spec)
    queries = X_test[:CG_QUERIES], y_test[:CG_QUERIES]

    def make():
        return CgInfluence(model, regularization=REGULARIZATION, second_order="gauss_newton", preconditioner=None,
                           rtol=spec["cg_rtol"], random_state=SEED)

    counts = count_passes()

    def measure(est, label):
        est.transform(queries[0][:2], queries[1][:2])  # warm-up
        counts.update(passes=0)
        start = time.perf_counter()
        solved = est.transform(*queries)
        transform_s = time.perf_counter() - start
        products, n_iter = counts["passes"], est.n_iter_
        curvature = est._curvature()
        vectors = torch.randn(CG_QUERIES, est.n_params_, generator=torch.Generator().manual_seed(SEED))
        curvature.matmat(vectors)  # warm-up
        times = []
        for _ in range(spec["repeat"]):
            start = time.perf_counter()
            curvature.matmat(vectors)
            times.append(time.perf_counter() - start)
        return {"label": label, "transform_s": transform_s, "n_iter": n_iter, "products": products,
                "ms_per_product": 1e3 * transform_s / products, "matmat_ms": 1e3 * statistics.median(times),
                "matmat_ms_all": [1e3 * t for t in times], "solved": np.asarray(solved)}

    rows = [measure(make().fit(X, y), f"numpy, {spec['threads']} threads")]
    torch.set_num_threads(1)
    rows.append(measure(make().fit(X, y), "numpy, 1 thread"))
    torch.set_num_threads(spec["threads"])
    cluster, client, start_s = start_cluster()
    try:
        rows += dask_floor(spec["repeat"])
        make().fit(da.from_array(X[:256], chunks=64), da.from_array(y[:256], chunks=64)).transform(*queries)
        rows.append(measure(make().fit(da.from_zarr(zx), da.from_zarr(zy)), "dask, from zarr"))
        chunks = -(-len(X) // N_SHARDS)
        Xd, yd = client.persist([da.from_array(X, chunks=(chunks, -1)), da.from_array(y, chunks=chunks)])
        rows.append(measure(make().fit(Xd, yd), "dask, persisted in the workers"))
        states = workers_summary(client)
    finally:
        stop_cluster(cluster, client)
    reference = rows[0].pop("solved")
    for row in rows[1:]:
        if "solved" not in row:
            continue
        solved = row.pop("solved")
        row["max_rel_diff"] = float(np.abs(solved - reference).max() / np.abs(reference).max())
    return {"rows": rows, "total_s": sum(r.get("transform_s", 0) for r in rows), "cluster_start_s": start_s, **states}


def dask_floor(repeat):
    """The round trip of a graph shaped like a sharded pass, with nothing to compute: N_SHARDS tasks returning
    a (10, n_params) tensor each, added by skinfl's tree of additions, or by one task."""
    import functools

    import dask
    import torch

    from skinfl._dask import add_sums, tree_reduce

    def part(index):
        return torch.zeros(CG_QUERIES, 1002)

    def one_sum(*parts):
        return functools.reduce(add_sums, parts)

    def graph(tree):
        parts = [dask.delayed(part, pure=False)(index) for index in range(N_SHARDS)]
        return dask.compute(tree_reduce(parts, add_sums) if tree else dask.delayed(one_sum, pure=False)(*parts))

    rows = []
    for tree, label in ((True, "dask floor: empty tasks, skinfl's tree of additions"),
                        (False, "dask floor: empty tasks, one addition task")):
        graph(tree)
        times = []
        for _ in range(2 * repeat):
            start = time.perf_counter()
            graph(tree)
            times.append(time.perf_counter() - start)
        rows.append({"label": label, "matmat_ms": 1e3 * statistics.median(times),
                     "matmat_ms_all": [1e3 * t for t in times]})
    return rows


# -------------------------------------------------------------- host side
def _cpu_now():
    """CPU seconds: busy at normal priority and niced on the machine, and of this process's waited-for
    descendants (the measurement's processes)."""
    with open("/proc/stat") as handle:
        fields = [int(v) / os.sysconf("SC_CLK_TCK") for v in handle.readline().split()[1:]]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    # user system irq softirq (not idle, iowait, steal); nice: user time of niced processes
    return sum(fields[i] for i in (0, 2, 5, 6)), fields[1], children.ru_utime + children.ru_stime


def wait_quiet(args):
    """Wait (up to ``--max-wait`` seconds) until other jobs use under half the flag, sampled over 3 s."""
    start = time.perf_counter()
    while args.max_wait > 0:
        busy0, _, own0 = _cpu_now()
        time.sleep(3.0)
        busy1, _, own1 = _cpu_now()
        other = ((busy1 - busy0) - (own1 - own0)) / 3.0
        waited = time.perf_counter() - start
        if other < OTHER_CPU_FLAG / 2 or waited >= args.max_wait:
            return waited
    return 0.0


def run_measured(spec, args, label, threads=None, timed=True):
    """``H.launch`` with the machine's load around it: the other jobs' CPU use in cores during the run.

    Waits for a quiet machine first; a run that other jobs disturbed (above ``OTHER_CPU_FLAG``) is run
    again, up to ``--retries`` times, and the least disturbed record kept (the others' summaries in
    ``attempts``).
    """
    if threads is not None:
        args = argparse.Namespace(**{**vars(args), "threads": threads})
    records = []
    for _ in range(1 + max(args.retries, 0) * timed):
        waited = wait_quiet(args) if timed else 0.0
        load_start = os.getloadavg()[0]
        busy0, niced0, own0 = _cpu_now()
        start = time.perf_counter()
        record = H.launch(spec, "skinfl", args)
        wall = time.perf_counter() - start
        busy1, niced1, own1 = _cpu_now()
        record.update(label=label, load_start=load_start, load_end=os.getloadavg()[0], waited_s=waited,
                      other_cpu_cores=max(0.0, ((busy1 - busy0) - (own1 - own0)) / wall),
                      niced_cpu_cores=(niced1 - niced0) / wall)
        H.say(record, label)
        print(f"      other jobs: {_other(record)} cores (waited {waited:.0f} s for a quiet machine)", flush=True)
        records.append(record)
        if record["status"] != "ok" or record["other_cpu_cores"] <= OTHER_CPU_FLAG:
            break
    best = min(records, key=lambda r: (r["status"] != "ok", r["other_cpu_cores"]))
    best["attempts"] = [{key: r.get(key) for key in ("status", "total_s", "other_cpu_cores", "waited_s")}
                        for r in records]
    return best


def _other(r):
    """Cores used by other jobs at normal priority (flagged), and by niced ones."""
    flag = " (!)" if r.get("other_cpu_cores", 0) > OTHER_CPU_FLAG else ""
    return f"{r.get('other_cpu_cores', 0):.2f}{flag} + {r.get('niced_cpu_cores', 0):.2f} niced"


def _malloc(worker):
    """The glibc malloc variables a worker started with, short."""
    found = worker.get("malloc_at_start", {})
    return ", ".join(f"{key[len('MALLOC_'):-1]}={value}" for key, value in sorted(found.items())) or "none"


def _mb(values):
    return " / ".join(f"{v:.0f}" for v in values)


def scale_table(args, sizes, base):
    n_test, n_train = sizes["n_test"], sizes["n_train"]
    common = {**base, "train": "train", "n_columns": n_train, "run_batch_size": sizes["batch_size"]}
    local = "bench_dask:scale_local"
    configs = [(f"(a) one process, {args.threads} threads", local, {"output": "out_local"}, args.threads)]
    if args.threads != 1:
        configs.append(("(a1) one process, 1 thread", local, {"output": "out_local_1"}, 1))
    for rows in args.cluster_chunks:
        configs.append((f"(b) cluster, chunks of {rows:,} rows", "bench_dask:scale_cluster",
                        {"output": f"out_cluster_{rows}", "trim": "pre-spawn", "dask_chunk": rows}, None))
    if args.malloc_variants:
        rows = args.cluster_chunks[-1]
        configs.append((f"(b') cluster, chunks of {rows:,} rows, MALLOC_TRIM_THRESHOLD_ by env= only",
                        "bench_dask:scale_cluster", {"output": f"out_cluster_{rows}_env", "trim": "env",
                                                     "dask_chunk": rows}, None))
        configs.append((f"(b'') cluster, chunks of {rows:,} rows, + MALLOC_MMAP_THRESHOLD_={MMAP}",
                        "bench_dask:scale_cluster", {"output": f"out_cluster_{rows}_mmap", "trim": "pre-spawn+mmap",
                                                     "dask_chunk": rows}, None))
    records = []
    for label, entry, more, threads in configs:
        records.append(run_measured({**common, **more, "entry": entry}, args, label, threads))
        records[-1].update(config=label, output=more["output"], dask_chunk=more.get("dask_chunk"))
    outputs = [r["output"] for r in records if r["status"] == "ok"]
    check = run_measured({**common, "entry": "bench_dask:verify", "outputs": outputs}, args, "verify", timed=False) \
        if outputs else {"status": "skipped"}
    if not args.keep_outputs:
        for r in records:
            shutil.rmtree(Path(base["work_dir"]) / f"{r['output']}.zarr", ignore_errors=True)
    checks, first = check.get("outputs", {}), (outputs or [None])[0]
    rows = []
    for r in records:
        if r["status"] != "ok":
            rows.append([r["config"]] + ["-"] * 9 + [r["status"]])
            continue
        c = checks.get(r["output"], {})
        cluster = "workers" in r
        threads = "2 workers x 1" if cluster else f"1 process x {r['threads']}"
        trim = "-" if not cluster else " / ".join(sorted({_malloc(w) for w in r["workers"]}))
        vs_a = c.get("vs_" + first) if first else None
        rows.append([r["config"], threads, f"{r['total_s']:.1f}", f"{n_train * n_test / r['total_s'] / 1e6:.1f}",
                     f"{r['peak_mb']:.0f}", _mb(r["worker_peak_mb"]) if cluster else "-", trim,
                     "-" if vs_a is None else f"{vs_a:.1e}", H.fmt(c.get("vs_memory"), ".1e"),
                     "yes" if c.get("complete") else "no", _other(r)])
    header = ["configuration", "torch threads", "influences s", "M entries/s", "peak RSS MB (process or driver)",
              "peak RSS MB per worker", "malloc variables at worker start", "sample max rel diff vs (a)",
              "sample max rel diff vs in memory", "every chunk written", "other jobs (cores)"]
    return records + [check], H.table(header, rows, n_left=2)


def writes_table(args, sizes, base):
    common = {**base, "train": "probe", "n_columns": sizes["probe"], "entry": "bench_dask:scale_local"}
    records = []
    for batch_size in (512, sizes["out_chunk"]):
        label = f"batch_size={batch_size}"
        records.append(run_measured({**common, "output": f"out_probe_{batch_size}", "run_batch_size": batch_size},
                                    args, label))
        records[-1].update(batch_size=batch_size)
        shutil.rmtree(Path(base["work_dir"]) / f"out_probe_{batch_size}.zarr", ignore_errors=True)
    rows = [[r["batch_size"], f"{r['total_s']:.1f}", r.get("writes", "-"), r.get("n_chunks", "-"),
             f"{r['peak_mb']:.0f}", _other(r)] if r["status"] == "ok" else [r["batch_size"]] + ["-"] * 5
            for r in records]
    header = ["batch_size", "influences s", "writes into out", "output chunks", "peak RSS MB", "other jobs (cores)"]
    return records, H.table(header, rows, n_left=1)


def fit_table(args, sizes, base):
    records = []
    for name in ("EkfacInfluence", "NystroemInfluence"):
        records.append(run_measured({**base, "entry": "bench_dask:fit_compare", "estimator": name, "rank": args.rank},
                                    args, name))
        records[-1].update(estimator=name)
    rows = []
    for r in records:
        if r["status"] != "ok":
            rows.append([r["estimator"]] + ["-"] * 11 + [r["status"]])
            continue
        label = r["estimator"] + (f" (rank {args.rank})" if "Nystroem" in r["estimator"] else " (exact targets)")
        passes = f"{r['plain_passes']['passes']} / {r['sharded_passes']['passes']} ({r['sharded_passes']['computes']})"
        best = min(r["plain_s"], r["single_s"])
        rows.append([label, f"{r['plain_s']:.2f}", f"{r['single_s']:.2f}", f"{r['sharded_s']:.2f}",
                     f"{r['mmap_s']:.2f}", f"{r['sharded_s'] / best:.2f} / {r['mmap_s'] / best:.2f}", passes,
                     f"{r['max_rel_diff']:.1e}", f"{r['threads_rel_diff']:.1e}",
                     f"{r['plain_vs_float64']:.1e} / {r['sharded_vs_float64']:.1e}" if "plain_vs_float64" in r
                     else "-",
                     f"{_mb(r['worker_peak_mb'])}; {_mb(r['mmap_worker_peak_mb'])}", f"{r['peak_mb']:.0f}", _other(r)])
    header = ["estimator", f"numpy s ({args.threads} threads)", "numpy s (1 thread)",
              f"dask s ({N_SHARDS} chunks, 2 workers x 1 thread)",
              "dask s, MALLOC_MMAP_THRESHOLD_ fixed", "dask / faster numpy", "passes numpy / dask (dask computations)",
              f"max rel diff of influences ({FIT_QUERIES} x {FIT_TRAIN}), dask vs numpy",
              f"same, numpy 1 vs {args.threads} threads", "numpy / dask vs a float64 numpy fit",
              "peak RSS MB per worker (default; mmap fixed)", "peak RSS MB driver", "other jobs (cores)"]
    return records, H.table(header, rows, n_left=1)


def cg_table(args, sizes, base):
    record = run_measured({**base, "entry": "bench_dask:cg_overhead"}, args, "CgInfluence")
    if record["status"] != "ok":
        return [record], H.table(["fitted on", "status"], [["-", record["status"]]], n_left=2)
    rows, numpy_row = [], min(record["rows"][:2], key=lambda r: r["matmat_ms"])
    for r in record["rows"]:
        dask = r["label"].startswith("dask")
        if "transform_s" not in r:  # the floor: matmat only
            rows.append([r["label"]] + ["-"] * 4 + [f"{r['matmat_ms']:.1f}", "-",
                                                    f"{r['matmat_ms'] - numpy_row['matmat_ms']:.1f}", "-", _other(record)])
            continue
        rows.append([r["label"], r["n_iter"], r["products"], f"{r['transform_s']:.2f}", f"{r['ms_per_product']:.1f}",
                     f"{r['matmat_ms']:.1f}",
                     f"{r['ms_per_product'] - numpy_row['ms_per_product']:.1f}" if dask else "-",
                     f"{r['matmat_ms'] - numpy_row['matmat_ms']:.1f}" if dask else "-",
                     H.fmt(r.get("max_rel_diff"), ".1e"), _other(record)])
    header = ["fitted on", "CG iterations", "curvature products", f"transform of {CG_QUERIES} s",
              "ms per product (transform)", f"matmat of {CG_QUERIES} ms (median of {base['repeat']})",
              "overhead per round trip ms (transform)", "overhead per round trip ms (matmat)",
              "max rel diff vs numpy", "other jobs (cores)"]
    return [record], H.table(header, rows, n_left=1)


def main(argv=None):
    p = H.parser(__doc__, "65,536 training points, 200 queries, fits on 20,000 points (about 2 minutes)")
    p.add_argument("--only", help=f"comma-separated among {','.join(TABLES)} (default all)")
    for key, (full, _) in SIZES.items():
        p.add_argument("--" + key.replace("_", "-"), type=int, help=f"default {full:,} (--quick: smaller)")
    p.add_argument("--batch-size", type=int, help="batch_size of table 1 (default: --out-chunk)")
    p.add_argument("--rank", type=int, default=RANK, help=f"Nystroem rank of table 2 (default {RANK})")
    p.add_argument("--cluster-chunks", default="32768,16384",
                   help="row chunks of the training data on the cluster in table 1, one row each (default 32768,16384; "
                        "divisors of --train-chunk)")
    p.add_argument("--no-malloc-variants", dest="malloc_variants", action="store_false",
                   help="skip (b') and (b''), the cluster with MALLOC_TRIM_THRESHOLD_ given as env= only and with "
                        "MALLOC_MMAP_THRESHOLD_ too")
    p.add_argument("--retries", type=int,
                   help="runs again a measurement that other jobs disturbed, up to this many times (default 2; "
                        "--quick: 0)")
    p.add_argument("--max-wait", type=float,
                   help="seconds to wait for a quiet machine before each measurement (default 300; --quick: 0)")
    p.add_argument("--keep-outputs", action="store_true", help="keep the zarr outputs of table 1 in .work/dask/")
    args = p.parse_args(argv)
    only = args.only.split(",") if args.only else list(TABLES)
    if set(only) - set(TABLES):
        p.error(f"--only among {TABLES}")
    sizes = {key: getattr(args, key) or values[args.quick] for key, values in SIZES.items()}
    args.retries = (0 if args.quick else 2) if args.retries is None else args.retries
    args.max_wait = (0.0 if args.quick else 300.0) if args.max_wait is None else args.max_wait
    sizes["batch_size"] = args.batch_size or sizes["out_chunk"]
    sizes.update(cg_rtol=1e-2 if args.quick else 1e-4, repeat=5 if args.quick else MATMAT_REPEAT)
    args.cluster_chunks = [int(rows) for rows in args.cluster_chunks.split(",")]
    if any(sizes["train_chunk"] % rows for rows in args.cluster_chunks):
        p.error(f"--cluster-chunks must divide --train-chunk ({sizes['train_chunk']})")
    name = args.output or "dask" + "_quick" * args.quick + ("" if args.only is None else "_" + "-".join(only))
    run = H.Run(args, argv)
    directory = H.WORK_DIR / "dask" / f"n{sizes['n_train']}_t{sizes['n_test']}_c{sizes['train_chunk']}_f{sizes['n_fit']}"
    base = {"work_dir": str(directory), **sizes}
    prepared = H.launch({**base, "entry": "bench_dask:prepare"}, "skinfl", args)
    H.say(prepared, "prepare (data, model, EK-FAC fit; cached)")
    if prepared["status"] != "ok":
        return 1
    records, sections = [prepared], []
    n_params = prepared["n_params"]
    if "scale" in only:
        found, text = scale_table(args, sizes, base)
        records += found
        sections.append((f"1. Influences at scale: {sizes['n_test']:,} queries x {sizes['n_train']:,} training "
                         "points, zarr to zarr", None, text))
    if "writes" in only:
        found, text = writes_table(args, sizes, base)
        records += found
        sections.append((f"1b. One process, out= zarr with chunks ({sizes['n_test']}, {sizes['out_chunk']}): "
                         f"batch_size ({sizes['probe']:,} training points)", None, text))
    if "fit" in only:
        found, text = fit_table(args, sizes, base)
        records += found
        sections.append((f"2. Fit by map-reduce: {sizes['n_fit']:,} points, numpy vs dask ({N_SHARDS} chunks)",
                         None, text))
    if "cg" in only:
        found, text = cg_table(args, sizes, base)
        records += found
        sections.append((f"3. CG round trip: {sizes['n_cg']:,} points, {N_SHARDS} chunks", None, text))
    chunks = " and ".join(f"{rows:,}" for rows in args.cluster_chunks)
    notes = [
        f"Problem: {N_FEATURES} standard normal float32 features, {N_CLASSES} classes (argmax of a fixed random "
        f"linear map plus unit Gaussian noise); MLP {N_FEATURES}-{HIDDEN}-{N_CLASSES} (tanh), {n_params:,} "
        f"parameters, trained by Adam ({EPOCHS} epochs, batches of {TRAIN_BATCH}, lr {LR:g}) on the first "
        f"{sizes['n_fit']:,} training points, test accuracy {prepared['test_accuracy']:.3f}; eval mode. "
        "Data in zarr 3 stores (default zstd compression) in benchmarks/.work/dask/.",
        f"Table 1: EkfacInfluence(regularization={REGULARIZATION:g}, random_state={SEED}, batch_size="
        f"{sizes['batch_size']}) (exact Gauss-Newton expectation: n_target_draws='auto' resolves to None for "
        f"{N_CLASSES} classes), fitted on the first {sizes['n_fit']:,} training points in memory, saved with "
        "skinfl.save(include_data=False) and loaded in each configuration. Training data: zarr chunks of "
        f"{sizes['train_chunk']:,} rows; on the cluster, da.from_zarr with row chunks of {chunks} (one task per "
        f"{sizes['n_test']:,} x chunk block of influences); output: zarr float32 chunks ({sizes['n_test']}, "
        f"{sizes['out_chunk']}), which batch_size matches so that the single process writes whole chunks "
        "(table 1b). Time: the influences call alone, after a warm-up call on a few rows (and after the cluster "
        "started: its start time is in the JSON). Peak RSS: ru_maxrss of the process (a), of the driver (which "
        "also runs the scheduler and the nannies) and of each worker process (b); a worker holds about 465 MB "
        "after the warm-up (torch, scikit-learn, distributed).",
        "Cluster: LocalCluster(n_workers=2, threads_per_worker=1, processes=True); OMP_NUM_THREADS=1 in the "
        "driver's environment before the workers start and torch.set_num_threads(1) on them (client.run). "
        "MALLOC_TRIM_THRESHOLD_: distributed 2026.8.0 sets it to 65536 by default through "
        "distributed.nanny.pre-spawn-environ, in the nanny's environment before it spawns the worker (a variable "
        "already in the driver's environment wins over that config: the harness's OMP_NUM_THREADS=2 would). "
        "LocalCluster(env=...) (b') is applied by the worker process once it runs: os.environ has it, but glibc "
        "reads its tunables at process start (the column shows the MALLOC_* values in /proc/<pid>/environ, the "
        "environment at exec). Setting MALLOC_TRIM_THRESHOLD_ (to any value) also turns off glibc's dynamic mmap "
        "threshold: every allocation above 128 KiB is then a fresh mmap, page-faulted and unmapped when freed; "
        f"(b'') fixes MALLOC_MMAP_THRESHOLD_={MMAP} (16 MiB) as well, through the same config.",
        "Sample: 4 query rows x 256 columns (the first, 64 around the first zarr chunk boundary, the middle, the "
        "last); max |A - R| / max |R|, R = est.influences of those rows and columns in memory; every chunk "
        "written: nchunks_initialized == nchunks. The outputs are deleted after the check.",
        "Table 1b: the single process of (a) on the first training points only, batch_size 512 (the default) "
        "against the output's chunk width: zarr reads, decompresses, updates, compresses and writes a whole chunk "
        "for each write into part of it.",
        f"Table 2: regularization={REGULARIZATION:g}, random_state={SEED}, batch_size 512 (default); "
        f"EkfacInfluence with n_target_draws='auto' (exact targets, no draws), NystroemInfluence with rank "
        f"{args.rank}; both of the Gauss-Newton matrix (second_order='gauss_newton': the briefly trained model is "
        f"not at a minimum, its Hessian is indefinite). Dask: da.from_zarr of a store of {N_SHARDS} row chunks, "
        "fitted on a fresh cluster as in table 1 (started before the timer, warmed up by a small fit). Passes: "
        "calls of sum_over_shards (each a pass over the data; on dask, one computation); dask computations: all "
        "of them (the values are checked block by block in one more). Max rel diff: max |A - B| / max |A| of "
        f"influences of {FIT_QUERIES} queries on the first {FIT_TRAIN} training points in memory, A from the "
        f"numpy fit with {args.threads} threads, B from the dask fit or from the numpy fit with 1 thread (a "
        "change of summation order alone); against a float64 fit (model, data and influences in float64, same "
        "settings; EK-FAC only: Nystroem's random sketch is drawn in the model's dtype, so a float64 fit is "
        "another approximation): max |A - R| / max |R|.",
        f"Table 3: CgInfluence(regularization={REGULARIZATION:g}, second_order='gauss_newton', preconditioner=None, "
        f"rtol={sizes['cg_rtol']:g}, block CG); transform of {CG_QUERIES} queries (numpy); products: curvature products it made "
        f"(CG iterations plus the final residual check); matmat: est._curvature().matmat of a ({CG_QUERIES}, "
        "n_params) matrix, alone. 'from zarr': da.from_zarr, each product reads the chunks again; 'persisted': "
        "client.persist of da.from_array (the chunks stay in the workers' memory); the driver does the CG "
        f"updates with {args.threads} torch threads. Dask floor: the same graph (a task per chunk returning a "
        f"({CG_QUERIES}, n_params) tensor, added by skinfl's tree of additions, or by one task) with nothing to "
        "compute. Overhead: minus the faster numpy row.",
        f"Other jobs (cores): busy CPU time of the machine during the measurement minus that of its own "
        f"processes, per second of wall time, at normal priority ((!) above {OTHER_CPU_FLAG}; it includes the "
        "system time of niced jobs) and niced (user time). Before each measurement the script waits (up to "
        f"--max-wait={args.max_wait:g} s) for other jobs to use under {OTHER_CPU_FLAG / 2:g} cores, and runs a "
        f"disturbed measurement again (up to --retries={args.retries}), keeping the least disturbed (every "
        "attempt is in the JSON). The harness's 'busy' flag in the header reads the 1-minute load average once, "
        "at the start; this column is the measure of each measurement's disturbance.",
    ]
    run.write(name, "Dask: influences at scale, fits by map-reduce, CG round trips", sections, records=records,
              notes=notes, settings={"sizes": sizes, "rank": args.rank, "malloc_variants": args.malloc_variants,
                        "cluster_chunks": args.cluster_chunks})
    return 0 if all(r.get("status") in H.OK for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
