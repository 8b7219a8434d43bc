"""Throwaway smoke test of pyDVL 0.10.0 influence (torch) APIs.

Run with:  benchmarks/.venv-pydvl/bin/python benchmarks/_pydvl_smoke.py
"""

import inspect
import logging
import time
import warnings

warnings.simplefilter("default")  # show every warning once
logging.basicConfig(level=logging.WARNING, format="LOG %(levelname)s %(name)s: %(message)s")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

with warnings.catch_warnings(record=True) as w_import:
    warnings.simplefilter("always")
    from pydvl.influence.torch import CgInfluence, DirectInfluence  # noqa: E402
print(f"[import] {len(w_import)} warnings while importing pydvl.influence.torch:")
for w in w_import:
    print(f"   {w.category.__name__}: {str(w.message)[:140]}  ({w.filename.split('site-packages/')[-1]}:{w.lineno})")

import pydvl  # noqa: E402

print("pydvl", pydvl.__version__, "torch", torch.__version__)
print("DirectInfluence", inspect.signature(DirectInfluence.__init__))
print("CgInfluence", inspect.signature(CgInfluence.__init__))
print("influences", inspect.signature(DirectInfluence.influences))
print("fit", inspect.signature(DirectInfluence.fit))

torch.manual_seed(0)
torch.set_num_threads(2)
N_TRAIN, N_TEST, D, C = 200, 20, 64, 10
x_train = torch.randn(N_TRAIN, D)
y_train = torch.randint(0, C, (N_TRAIN,))
x_test = torch.randn(N_TEST, D)
y_test = torch.randint(0, C, (N_TEST,))

model = nn.Sequential(nn.Linear(D, 32), nn.Tanh(), nn.Linear(32, C))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(200):
    opt.zero_grad()
    F.cross_entropy(model(x_train), y_train).backward()
    opt.step()
model.eval()
n_params = sum(p.numel() for p in model.parameters())
print(f"model params: {n_params}")
loss = F.cross_entropy
REG = 0.01


def timed(label, fn):
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
    print(f"  {label:55s} {dt * 1e3:9.1f} ms")
    for w in ws:
        print(f"    WARNING {w.category.__name__}: {str(w.message)[:200]!r}")
    return out


# ---------------------------------------------------------------- reference
def flat_params(m):
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def per_sample_grads(m, x, y):
    params = {k: v.detach() for k, v in m.named_parameters()}

    def l(p, xi, yi):
        return loss(torch.func.functional_call(m, p, (xi[None],)), yi[None])

    g = torch.func.vmap(torch.func.grad(l), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g[k].reshape(x.shape[0], -1) for k in params], dim=1)


def full_hessian(m, x, y):
    names = [k for k, _ in m.named_parameters()]
    shapes = [p.shape for p in m.parameters()]
    sizes = [p.numel() for p in m.parameters()]

    def f(theta):
        ps = dict(zip(names, [t.reshape(s) for t, s in zip(torch.split(theta, sizes), shapes)]))
        return loss(torch.func.functional_call(m, ps, (x,)), y)

    return torch.func.hessian(f)(flat_params(m))


H_mean = full_hessian(model, x_train, y_train)  # mean over all 200 samples
g_tr = per_sample_grads(model, x_train, y_train)
g_te = per_sample_grads(model, x_test, y_test)
eye = torch.eye(n_params)
ref = g_te @ torch.linalg.solve(H_mean + REG * eye, g_tr.T)  # (n_test, n_train)
print(f"reference |ref| max {ref.abs().max():.4g}")


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


for bs in (200, 50, 64):  # 64 -> batches 64,64,64,8 (uneven last batch)
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=bs)
    chunks = [full_hessian(model, xb, yb) for xb, yb in loader]
    H_chunk = sum(chunks) / len(chunks)  # unweighted mean of per-batch means
    ref_chunk = g_te @ torch.linalg.solve(H_chunk + REG * eye, g_tr.T)
    print(f"\n=== batch_size={bs}  (||H_chunk-H_mean||/||H_mean|| = {rel(H_chunk, H_mean):.2e})")

    di = DirectInfluence(model, loss, regularization=REG)
    timed("DirectInfluence.fit", lambda: di.fit(loader))
    inf_d = timed("DirectInfluence.influences(xt,yt,x,y)", lambda: di.influences(x_test, y_test, x_train, y_train))
    print(f"    shape {tuple(inf_d.shape)}  rel.err vs ref(H_mean) {rel(inf_d, ref):.2e}"
          f"  vs ref(H_chunk) {rel(inf_d, ref_chunk):.2e}")
    inf_self = timed("DirectInfluence.influences(xt,yt) [no x,y]", lambda: di.influences(x_test, y_test))
    print(f"    shape {tuple(inf_self.shape)}  == g_te H^-1 g_te^T ? rel.err "
          f"{rel(inf_self, g_te @ torch.linalg.solve(H_mean + REG * eye, g_te.T)):.2e}")

    for simul in (False, True):
        for rtol, atol, maxiter in ((1e-4, 1e-6, None), (1e-2, 1e-4, 100), (1e-8, 1e-10, 1000)):
            cg = CgInfluence(model, loss, regularization=REG, rtol=rtol, atol=atol,
                             maxiter=maxiter, solve_simultaneously=simul)
            timed(f"CgInfluence(simul={simul}, rtol={rtol}, atol={atol}, maxiter={maxiter}).fit",
                  lambda: cg.fit(loader))
            inf_c = timed("  .influences(xt,yt,x,y)", lambda: cg.influences(x_test, y_test, x_train, y_train))
            print(f"    shape {tuple(inf_c.shape)}  rel.err vs ref(H_mean) {rel(inf_c, ref):.2e}"
                  f"  vs ref(H_chunk) {rel(inf_c, ref_chunk):.2e}")

# ---------------------------------------------------------------- misc checks
loader = DataLoader(TensorDataset(x_train, y_train), batch_size=50)
print("\n=== progress=True (non-block CG), tqdm goes to stderr:")
cg = CgInfluence(model, loss, regularization=REG, progress=True).fit(loader)
timed("CgInfluence(progress=True).influences", lambda: cg.influences(x_test, y_test, x_train, y_train))
print("=== progress=True with solve_simultaneously=True:")
cg = CgInfluence(model, loss, regularization=REG, progress=True, solve_simultaneously=True).fit(loader)
timed("CgInfluence(progress=True, simul).influences", lambda: cg.influences(x_test, y_test, x_train, y_train))

print("\n=== precompute_grad=True vs False (stored but unused?)")
for pg in (False, True):
    cg = CgInfluence(model, loss, regularization=REG, precompute_grad=pg).fit(loader)
    timed(f"precompute_grad={pg} influences", lambda: cg.influences(x_test, y_test, x_train, y_train))

print("\n=== tiny maxiter -> warning?")
cg = CgInfluence(model, loss, regularization=REG, maxiter=3).fit(loader)
timed("non-block maxiter=3", lambda: cg.influences(x_test, y_test, x_train, y_train))
cg = CgInfluence(model, loss, regularization=REG, maxiter=3, solve_simultaneously=True).fit(loader)
timed("block maxiter=3", lambda: cg.influences(x_test, y_test, x_train, y_train))

print("\n=== influences with only x (no y):")
try:
    di = DirectInfluence(model, loss, regularization=REG).fit(loader)
    di.influences(x_test, y_test, x_train)
except Exception as e:  # noqa: BLE001
    print("   ", type(e).__name__, e)

print("\n=== sign: influence = +<H^-1 g_test, g_train> (no minus), checked above via ref")
print("done")
