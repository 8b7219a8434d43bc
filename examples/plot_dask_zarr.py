"""
Influences on a Dask cluster, from zarr to zarr
===============================================

Data that outgrow one machine, or take too long on it, run on a Dask
cluster: give an estimator dask arrays, and every pass over them runs as
tasks on the workers, next to the data. Here a local cluster stands in for a
real one: the training data are written to a zarr store, the estimator is
fitted on them by map-reduce over their chunks, and the influence matrix is
written into another zarr store by the workers. The same code runs on a
Slurm or Kubernetes cluster: only the ``Client`` changes (see the user
guide, :ref:`scaling_out`).
"""

# %%
# Training data in a zarr store
# -----------------------------
# scikit-learn's digits, each training image repeated with small noise to
# about 29,000 points, written to a zarr store in chunks of 4,096 images: the
# shape of a data set kept on disk or in an object store. A small network is
# trained on the original images.

import tempfile
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import torch
import zarr
from distributed import Client, LocalCluster
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import skinfl

start = time.perf_counter()
torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = (X / 16.0).astype(np.float32)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.2, random_state=0, stratify=y)

model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
inputs, targets = torch.from_numpy(X_train), torch.from_numpy(y_train)
for _ in range(300):
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(inputs), targets).backward()
    optimizer.step()
model.eval()

rng = np.random.default_rng(0)
copies = 20
big_X = np.concatenate([X_train + rng.normal(0, 0.02, X_train.shape).astype(np.float32) for _ in range(copies)])
big_y = np.tile(y_train, copies)

folder = tempfile.TemporaryDirectory()
directory = Path(folder.name)
stored_X = zarr.create_array(str(directory / "X.zarr"), shape=big_X.shape, chunks=(4096, 64), dtype="float32")
stored_X[...] = big_X
stored_y = zarr.create_array(str(directory / "y.zarr"), shape=big_y.shape, chunks=(4096,), dtype="int64")
stored_y[...] = big_y
print(f"training data: {stored_X.shape[0]} images in {stored_X.nchunks} chunks of {stored_X.chunks[0]}")

# %%
# A cluster
# ---------
# Two workers with one thread each. On a real cluster the workers are
# processes (``LocalCluster(processes=True)``, or ``dask-jobqueue``'s
# ``SLURMCluster``); here they are threads of this process, so that the
# example needs no ``if __name__ == "__main__"`` guard. Each thread computes
# on its own copy of the model.

cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0")
client = Client(cluster)

# %%
# Fitting by map-reduce
# ---------------------
# ``fit`` on dask arrays: EK-FAC's two passes over the data (the Kronecker
# covariances, then the corrected eigenvalues) run as one task per chunk, and
# the partial sums are added on the workers. The factors equal those of a fit
# in one process up to the order of summation.

X_lazy, y_lazy = da.from_zarr(stored_X), da.from_zarr(stored_y)
estimator = skinfl.EkfacInfluence(model, regularization=1e-3, random_state=0).fit(X_lazy, y_lazy)
in_one_process = skinfl.EkfacInfluence(model, regularization=1e-3, random_state=0).fit(big_X, big_y)
difference = max(float((estimator._factors[name] - in_one_process._factors[name]).abs().max())
                 for name in estimator._factors if name.endswith("eigenvalues"))
print(f"fitted on {len(X_lazy)} points; largest difference of the eigenvalues to one process: {difference:.1e}")

# %%
# Influences into zarr
# --------------------
# The influence matrix of 360 test images on 28,740 training images is
# written into a zarr store by the workers: one task per block of test images
# solves their inverse-curvature gradients, then one task per chunk of
# training images computes its gradients once and multiplies.

out = zarr.create_array(str(directory / "influences.zarr"), shape=(len(X_test), len(X_lazy)),
                        chunks=(len(X_test), 4096), dtype="float32")
X_test_lazy, y_test_lazy = da.from_array(X_test, chunks=128), da.from_array(y_test, chunks=128)
estimator.influences(X_test_lazy, y_test_lazy, out=out)
expected = in_one_process.influences(X_test[:8], y_test[:8], big_X[:5000], big_y[:5000])
same = np.allclose(out[:8, :5000], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
print(f"influences written to zarr: {out.shape}, {out.nchunks} chunks; equal to one process: {same}")

# %%
# Lazy results
# ------------
# Without ``out=``, results are lazy dask arrays, computed when asked.
# ``top_influences`` keeps each chunk's best training points and merges them
# in a tree of tasks. Each training image appears 20 times, with noise: the
# most helpful points of a test image are copies of the same few images.

indices, values = estimator.top_influences(X_test_lazy, y_test_lazy, k=5)
print(f"top_influences is lazy: {type(indices).__name__} of shape {indices.shape}")
indices, values = dask.compute(indices, values)
original = indices % len(X_train)
print(f"test image 0 (a {y_test[0]}): its 5 most helpful training points are copies of images "
      f"{sorted(set(original[0].tolist()))}, labelled {y_train[original[0]].tolist()}")

client.close()
cluster.close()
folder.cleanup()
print(f"finished in {time.perf_counter() - start:.1f} s")
