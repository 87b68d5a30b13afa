"""Tests of the data-term kernels (kernels/).

The Numba CUDA kernels run here under the Numba CUDA simulator, in a subprocess (the simulator must be
switched on before numba is first imported, and other tests may import numba themselves). A second
subprocess, without the simulator, type-checks and compiles every kernel to PTX for cc 8.0 with NVVM,
which needs no GPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from kernels import dispatch
from kernels.reference import downsampled_mse_ref, masked_mse_ref
from kernels.lanczos import lanczos2_downsample, lanczos2_upsample_adjoint

ROOT = Path(__file__).resolve().parents[1]


class _Proc:
    """A python -c subprocess started now and read later (the slow ones run side by side)."""

    def __init__(self, code: str, sim: bool):
        env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
        if sim:
            env["NUMBA_ENABLE_CUDASIM"] = "1"
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._res = None

    def result(self, timeout: float = 300) -> dict:
        if self._res is None:
            try:
                out, err = self.p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                out, err = self.p.communicate()
                raise AssertionError(f"subprocess timed out:\n{out[-4000:]}\n{err[-4000:]}")
            lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
            if self.p.returncode != 0 or not lines:
                raise AssertionError(f"subprocess failed (rc {self.p.returncode}):\n{out[-4000:]}\n{err[-6000:]}")
            self._res = json.loads(lines[-1][len("RESULT "):])
        return self._res


def _run(code: str, sim: bool) -> dict:
    return _Proc(code, sim).result()


# --------------------------------------------------------------------------------------------------
# The kernels under the simulator: one subprocess, many checks.
# --------------------------------------------------------------------------------------------------

SIM_SCRIPT = r"""
import json, sys
import numpy as np, torch
from numba import config
assert config.ENABLE_CUDASIM, "the simulator is not on"
from kernels.autograd import MaskedMSE, DownsampledMSE
from kernels.reference import masked_mse_ref, downsampled_mse_ref
from kernels import dispatch
from kernels.lanczos import lanczos2_downsample

g = torch.Generator().manual_seed(1234)
def rand(*s):
    return torch.rand(*s, generator=g)

def masks(B, h, w):
    binary = (rand(B, 1, h, w) > 0.4).float()
    frac = rand(B, 1, h, w)
    zero = binary.clone(); zero[0] = 0          # image 0 has no known value
    shared = (rand(1, 1, h, w) > 0.5).float()   # one mask for the whole batch
    return {"binary": binary, "fractional": frac, "zero": zero, "none": None, "shared": shared}

def compare(kfn, rfn, out, weights):
    x1 = out.clone().requires_grad_(True)
    a = kfn(x1)
    (ga,) = torch.autograd.grad((a * weights).sum(), x1)
    x2 = out.clone().requires_grad_(True)
    b = rfn(x2)
    (gb,) = torch.autograd.grad((b * weights).sum(), x2)
    rel = ((a.detach() - b.detach()).abs() / b.detach().abs().clamp_min(1e-30)).max().item()
    return {"loss_k": a.detach().tolist(), "loss_r": b.detach().tolist(), "loss_rel": rel,
            "loss_abs": (a.detach() - b.detach()).abs().max().item(),
            "grad_abs": (ga - gb).abs().max().item(), "grad_scale": gb.abs().max().item(),
            "shape": list(a.shape)}

res = {"masked": {}, "down": {}}
for (B, C, H, W) in [(2, 3, 8, 8), (2, 3, 16, 16), (1, 3, 8, 16)]:
    out, tgt = rand(B, C, H, W), rand(B, C, H, W)
    wts = torch.arange(1, B + 1, dtype=torch.float32)  # distinct incoming grads per image
    ms = masks(B, H, W)
    if (B, H, W) != (2, 8, 8):  # keep the run short: all mask kinds on the first shape only
        ms = {k: ms[k] for k in ("fractional", "none")}
    for name, m in ms.items():
        # the reference needs a (B, 1, h, w) mask: give it the shared one expanded
        mr = m.expand(B, -1, -1, -1) if m is not None else None
        res["masked"][f"{B}x{C}x{H}x{W}/{name}"] = compare(
            lambda x: MaskedMSE.apply(x, tgt, m), lambda x: masked_mse_ref(x, tgt, mr), out, wts)
for (B, C, H, W, f) in [(2, 3, 8, 8, 2), (2, 3, 16, 16, 4), (2, 3, 16, 16, 2), (1, 3, 8, 16, 2)]:
    h, w = H // f, W // f
    out, tlr = rand(B, C, H, W), rand(B, C, h, w)
    wts = torch.arange(1, B + 1, dtype=torch.float32)
    ms = masks(B, h, w)
    if (H, f) != (8, 2):  # keep the run short: all mask kinds on the first shape only
        ms = {k: ms[k] for k in ("fractional", "none")}
    for name, m in ms.items():
        mr = m.expand(B, -1, -1, -1) if m is not None else None
        res["down"][f"{B}x{C}x{H}x{W}/f{f}/{name}"] = compare(
            lambda x: DownsampledMSE.apply(x, tlr, f, m), lambda x: downsampled_mse_ref(x, tlr, f, mr), out, wts)

# adjoint of the kernel's backward: with out = 0, mask = None and unit incoming grads,
# grad_out = D^T(2 (0 - y)) / (C h w), so D^T y = -grad_out * C h w / 2.
adj = {}
for (B, C, H, W, f) in [(2, 3, 16, 16, 4), (1, 2, 8, 16, 2)]:
    h, w = H // f, W // f
    x = torch.randn(B, C, H, W, generator=g)
    y = torch.randn(B, C, h, w, generator=g)
    z = torch.zeros(B, C, H, W, requires_grad=True)
    loss = DownsampledMSE.apply(z, y, f, None)
    (gz,) = torch.autograd.grad(loss.sum(), z)
    dty = -gz * (C * h * w) / 2
    lhs = (lanczos2_downsample(x.double(), f) * y.double()).sum().item()
    rhs = (x.double() * dty.double()).sum().item()
    adj[f"{B}x{C}x{H}x{W}/f{f}"] = {"lhs": lhs, "rhs": rhs, "rel": abs(lhs - rhs) / abs(lhs)}
res["adjoint"] = adj

# dispatch: True runs the kernels on CPU tensors under the simulator; None keeps the reference on CPU
out = rand(2, 3, 8, 8).requires_grad_(True); tgt = rand(2, 3, 8, 8); m = (rand(2, 1, 8, 8) > 0.5).float()
tlr = rand(2, 3, 4, 4)
res["dispatch"] = {
    "true_masked": type(dispatch.data_term(out, tgt, m, 1, use_kernels=True).grad_fn).__name__,
    "true_down": type(dispatch.data_term(out, tlr, None, 2, use_kernels=True).grad_fn).__name__,
    "none_cpu": type(dispatch.data_term(out, tgt, m, 1, use_kernels=None).grad_fn).__name__,
    "false": type(dispatch.data_term(out, tgt, m, 1, use_kernels=False).grad_fn).__name__,
    "available": list(dispatch.kernels_available("cpu")),
}
print("RESULT " + json.dumps(res))
"""


@pytest.fixture(scope="module")
def procs():
    """Start the simulator run and the PTX compile together; each test waits for its own."""
    ps = {"sim": _Proc(SIM_SCRIPT, sim=True), "ptx": _Proc(PTX_SCRIPT, sim=False)}
    yield ps
    for p in ps.values():
        if p.p.poll() is None:
            p.p.kill()
            p.p.communicate()


@pytest.fixture(scope="module")
def sim(procs):
    return procs["sim"].result()


def _cases(sim, kind):
    assert sim[kind], "no cases ran"
    return sim[kind].items()


@pytest.mark.parametrize("kind", ["masked", "down"])
def test_kernels_match_reference(sim, kind):
    for name, r in _cases(sim, kind):
        assert r["shape"] == [len(r["loss_r"])], name
        # an image with no known value has loss 0 in both
        assert r["loss_rel"] <= 1e-6 or r["loss_abs"] <= 1e-12, (name, r)
        assert r["grad_abs"] <= 1e-6, (name, r)


def test_per_image_losses_and_zero_mask(sim):
    for kind in ("masked", "down"):
        for name, r in _cases(sim, kind):
            if name.endswith("/zero") and len(r["loss_r"]) == 2:
                assert r["loss_k"][0] == 0.0 and r["loss_r"][0] == 0.0, (name, r)
                assert r["loss_k"][1] > 0, (name, r)
            if len(r["loss_r"]) == 2 and not name.endswith("/zero"):
                assert r["loss_k"][0] != r["loss_k"][1], (name, r)  # per image, not a batch mean
    assert any(n.endswith("/none") for n, _ in _cases(sim, "masked"))
    assert any(n.endswith("/none") for n, _ in _cases(sim, "down"))
    assert any(n.endswith("/fractional") for n, _ in _cases(sim, "down"))


def test_kernel_backward_is_the_adjoint(sim):
    for name, r in sim["adjoint"].items():
        assert r["rel"] <= 1e-5, (name, r)


def test_dispatch_under_simulator(sim):
    d = sim["dispatch"]
    assert d["true_masked"] == "MaskedMSEBackward", d
    assert d["true_down"] == "DownsampledMSEBackward", d
    assert "MSE" not in d["none_cpu"] and "MSE" not in d["false"], d
    assert d["available"][0] is True, d


# --------------------------------------------------------------------------------------------------
# PTX compile check (no simulator, no GPU): NVVM type-checks and compiles every kernel for cc 8.0.
# --------------------------------------------------------------------------------------------------

PTX_SCRIPT = r"""
import json, os
os.environ.setdefault("NUMBA_FORCE_CUDA_CC", "8.0")  # do not ask NVRTC (absent here) for its arch list
if os.path.isdir("/usr/local/cuda"):
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
res = {"skip": "", "nvrtc_patched": False, "kernels": {}}
try:
    from numba.cuda import cuda_paths
    _orig = cuda_paths._get_nvrtc_path
    def _nvrtc_path():
        # numba-cuda resolves NVRTC eagerly with NVVM and libdevice although compile_ptx only needs NVVM;
        # when the NVRTC library is missing, record it as absent instead of failing.
        try:
            return _orig()
        except Exception:
            res["nvrtc_patched"] = True
            return ("<absent>", None)
    cuda_paths._get_nvrtc_path = _nvrtc_path
    from numba import cuda
    from kernels import masked, downsample
    for mod in (masked, downsample):
        ks = mod.get_kernels()
        for name, sig in mod.SIGNATURES.items():
            ptx, _ = cuda.compile_ptx(ks[name].py_func, sig, cc=(8, 0))
            res["kernels"][name] = {"ptx_chars": len(ptx), "f64_ops": ptx.count(".f64"),
                                    "atomics": ptx.count("atom.global.add.f32"), "target": ".target sm_80" in ptx}
except Exception as e:
    msg = f"{type(e).__name__}: {e}"
    low = msg.lower()
    if any(s in low for s in ("nvvm", "libdevice", "cuda_home", "not found", "no such file", "cannot open")):
        res["skip"] = "CUDA compiler libraries not found: " + msg.splitlines()[0][:300]
    else:
        raise
print("RESULT " + json.dumps(res))
"""


def test_kernels_compile_to_ptx(procs):
    r = procs["ptx"].result()
    if r["skip"]:
        pytest.skip(r["skip"])
    ks = r["kernels"]
    assert set(ks) == {"masked_fwd", "ds_fwd", "ds_bwd"}, ks
    for name, k in ks.items():
        assert k["target"] and k["ptx_chars"] > 0, (name, k)
        assert k["f64_ops"] == 0, f"{name} does double-precision arithmetic: {k}"
    # one atomic per accumulator per block in the reductions; none in the gather
    assert ks["masked_fwd"]["atomics"] == 2 and ks["ds_fwd"]["atomics"] == 2 and ks["ds_bwd"]["atomics"] == 0, ks


# --------------------------------------------------------------------------------------------------
# In-process checks that need no numba.
# --------------------------------------------------------------------------------------------------

def test_importing_kernels_does_not_import_numba():
    r = _run("import sys, json, kernels, kernels.dispatch, kernels.autograd, kernels.masked, "
             "kernels.downsample, kernels.lanczos, pipeline.bench.kernels\n"
             "print('RESULT ' + json.dumps('numba' in sys.modules))", sim=False)
    assert r is False


def test_reference_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    out = torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    tgt = torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64)
    m = torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: masked_mse_ref(x, tgt, m), (out,))
    assert torch.autograd.gradcheck(lambda x: masked_mse_ref(x, tgt, None), (out,))
    for f in (2, 4):
        tlr = torch.rand(2, 1, 8 // f, 8 // f, generator=g, dtype=torch.float64)
        mlr = torch.rand(2, 1, 8 // f, 8 // f, generator=g, dtype=torch.float64)
        assert torch.autograd.gradcheck(lambda x: downsampled_mse_ref(x, tlr, f, mlr), (out,))


@pytest.mark.parametrize("f,H,W", [(2, 8, 8), (4, 16, 16), (2, 8, 16), (8, 16, 32)])
def test_operator_adjoint(f, H, W):
    g = torch.Generator().manual_seed(f)
    x = torch.randn(2, 3, H, W, generator=g, dtype=torch.float64)
    y = torch.randn(2, 3, H // f, W // f, generator=g, dtype=torch.float64)
    lhs = (lanczos2_downsample(x, f) * y).sum()
    rhs = (x * lanczos2_upsample_adjoint(y, f)).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("f,H,W", [(2, 8, 8), (4, 16, 16), (2, 8, 16), (4, 64, 32), (8, 16, 32)])
def test_band_tables_are_the_adjoint(f, H, W):
    """The kernel's banded gather (numpy emulation) equals lanczos2_upsample_adjoint."""
    from kernels.downsample import band_tables, lanczos2_matrix
    x = torch.randn(1, 1, H, W, dtype=torch.float64)
    Ay, Ax = lanczos2_matrix(H, f), lanczos2_matrix(W, f)
    assert np.allclose(Ay @ x[0, 0].numpy() @ Ax.T, lanczos2_downsample(x, f)[0, 0].numpy(), atol=1e-12)
    y = np.random.default_rng(f).standard_normal((H // f, W // f))
    by, iy = band_tables(H, f)
    bx, ix = band_tables(W, f)
    yp = np.pad(y, ((0, by.shape[1]), (0, bx.shape[1])))  # the kernel bounds-checks; zero-padding is equivalent
    got = np.zeros((H, W))
    for r in range(H):
        for c in range(W):
            got[r, c] = by[r] @ yp[iy[r]:iy[r] + by.shape[1], ix[c]:ix[c] + bx.shape[1]] @ bx[c]
    want = lanczos2_upsample_adjoint(torch.from_numpy(y)[None, None], f)[0, 0].numpy()
    assert np.allclose(got, want, atol=1e-6)


def test_dispatch_cpu_paths():
    if dispatch.simulator_enabled():
        pytest.skip("this process runs with the simulator on")
    g = torch.Generator().manual_seed(0)
    out = torch.rand(2, 3, 8, 8, generator=g, requires_grad=True)
    tgt = torch.rand(2, 3, 8, 8, generator=g)
    m = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    for uk in (None, False):
        a = dispatch.data_term(out, tgt, m, 1, use_kernels=uk)
        assert torch.equal(a, masked_mse_ref(out, tgt, m))
        b = dispatch.data_term(out, tgt, None, 1, use_kernels=uk)
        assert torch.allclose(b, ((out - tgt) ** 2).flatten(1).mean(1))
        c = dispatch.data_term(out, tgt[:, :, :4, :4], None, 2, use_kernels=uk)
        assert c.shape == (2,)
    with pytest.raises(RuntimeError, match="CUDA"):
        dispatch.data_term(out, tgt, m, 1, use_kernels=True)
    with pytest.raises(ValueError, match="mask"):
        dispatch.data_term(out, tgt, torch.ones(2, 3, 8, 8), 1, use_kernels=True)
