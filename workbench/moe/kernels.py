"""Which library runs an fp32 matmul on the CPU: ``blas`` (torch's own choice, MKL in the x86 wheels) or ``onednn``.

On a CPU that MKL does not give its AVX-512 kernels (measured on an AMD EPYC with AVX-512), oneDNN's fp32 matmul
runs the same product in about half the time, forward and backward (``python -m workbench bench matmul`` and
``bench train --cpu-matmul blas onednn`` measure it).  The
two agree to fp32 rounding, not bit for bit (they sum in another order), so ``blas`` stays the default and every
recorded run regenerates unchanged; ``onednn`` is a speed switch a user turns on (``train --cpu-matmul onednn``,
``set_cpu_matmul``), recorded with the run.

Three products cover a linear layer forward and backward, in the layouts the callers hold:
``x_w`` (x @ w + b, w stored (in, out) as the experts' ``w1``/``w2``), ``a_tb`` (a^T @ b: a weight gradient) and
``a_bt`` (a @ b^T: an input gradient), each with an optional ``out`` to write into; they are autograd-free (for use
inside an ``autograd.Function`` such as the grouped experts').  :class:`OneDNNLinear` is
``nn.Linear`` with the same parameters whose CPU fp32 forward and backward run on oneDNN.

Imports: torch only.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

CPU_MATMULS = ("blas", "onednn")
# Below this many rows a product stays on BLAS even under ``onednn``: oneDNN's fixed cost per call outweighs its faster
# kernel until about 8 rows (``bench matmul``'s ``onednn (raw)`` column times oneDNN at every row count).
ONEDNN_MIN_ROWS = 8


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's linear op (``torch.ops.mkldnn._linear_pointwise``)."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def check_cpu_matmul(name: str) -> str:
    """``name`` if it is a known backend usable here; a one-line ValueError naming the fix otherwise."""
    if name not in CPU_MATMULS:
        raise ValueError(f"cpu_matmul={name!r} is invalid: use one of {CPU_MATMULS}")
    if name == "onednn" and not onednn_available():
        raise ValueError("cpu_matmul='onednn' needs a torch build with oneDNN (torch.backends.mkldnn); "
                         "use cpu_matmul='blas'")
    return name


def _dnn(a: torch.Tensor, b_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """a @ b_t^T + bias on oneDNN (``b_t`` in ``nn.Linear``'s (out, in) layout; any strides)."""
    return torch.ops.mkldnn._linear_pointwise(a, b_t, bias, "none", [], "")


def _into(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return result if out is None else out.copy_(result)


def x_w(x, w, b=None, out=None, backend: str = "blas"):
    """x (M, in) @ w (in, out) + b (few rows stay on BLAS: ``ONEDNN_MIN_ROWS``)."""
    if backend == "onednn" and x.shape[0] >= ONEDNN_MIN_ROWS:
        return _into(_dnn(x, w.t(), b), out)
    if b is None:
        return torch.mm(x, w, out=out)
    return torch.addmm(b, x, w, out=out)


def a_tb(a, b, out=None, backend: str = "blas"):
    """a (M, p)^T @ b (M, q) -> (p, q): a weight's gradient."""
    if backend == "onednn" and a.shape[0] >= ONEDNN_MIN_ROWS:
        return _into(_dnn(a.t(), b.t(), None), out)
    return torch.mm(a.t(), b, out=out)


def a_bt(a, b, out=None, backend: str = "blas"):
    """a (M, q) @ b (p, q)^T -> (M, p): an input's gradient through w = b."""
    if backend == "onednn" and a.shape[0] >= ONEDNN_MIN_ROWS:
        return _into(_dnn(a, b, None), out)
    return torch.mm(a, b.t(), out=out)


def usable(x: torch.Tensor, backend: str) -> bool:
    """Whether ``backend`` applies to a product with ``x``: oneDNN here serves fp32 on the CPU outside autocast
    (under autocast torch already routes the low-precision matmuls to oneDNN)."""
    return (backend == "onednn" and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu"))


class _OneDNNLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _dnn(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative raises instead of coming out wrong
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _dnn(grad, weight.t(), None)
        if ctx.needs_input_grad[1]:
            gw = _dnn(grad.t(), x.t(), None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum(0)
        return gx, gw, gb


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` on oneDNN, forward and backward, for fp32 CPU tensors (others take ``F.linear``)."""
    flat = x.reshape(-1, x.shape[-1])
    if (not usable(x, "onednn") or weight.dtype != torch.float32 or flat.shape[0] < ONEDNN_MIN_ROWS
            or (bias is not None and bias.dtype != torch.float32)):
        return F.linear(x, weight, bias)
    return _OneDNNLinearFn.apply(flat, weight, bias).view(*x.shape[:-1], weight.shape[0])


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` whose fp32 CPU forward and backward run on oneDNN; the same parameters and state dict (a
    model switches by changing each layer's class: :func:`workbench.moe.set_cpu_matmul`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return onednn_linear(x, self.weight, self.bias)
