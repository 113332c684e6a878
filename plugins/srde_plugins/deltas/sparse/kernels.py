"""Sparse routed delta kernels: per-expert CSR products for the ``sparse`` delta type.

For one projection with a bank of ``E`` sparse deltas ``A_e`` (``(out, in)``, ``P`` non-zeros each),
:func:`routed_sparse_delta` computes, for every token ``t`` routed to experts ``e_tk`` with gate
weights ``w_tk``::

    y[t] = sum_k w_tk * A_{e_tk} @ x[t]

Tokens are grouped by expert (:meth:`srde_core.model.routing.Routing.groups`) and each expert
multiplies its tokens with one CSR sparse-dense product, so the work is ``O(k * T * P)`` and no
``[tokens, positions]`` tensor is ever built. Backward computes the input gradient with the CSR
structure of ``A_e^T`` (built once, with the permutation that maps ``A_e``'s values to it) and the
value gradient with a sampled dense-dense product (SDDMM), which yields exactly the ``P`` needed
entries per expert, in CSR order. The gate weight scales the product's input (or output, whichever
side is smaller), so its gradient ``<x_t, A_e^T g_t>`` is a by-product of the input gradient and
no ``[n, out]`` tensor per expert has to be kept for backward.

Layout: the CSR kernels are fastest on feature-major dense operands (``[features, n]``, tokens
contiguous): the sparse-dense product vectorises over tokens and the SDDMM takes dot products over
tokens (MKL's product with a column-major operand is about 4x slower). Each expert's rows of the
token-major input (and, in backward, of the output gradient) are gathered with one contiguous row
gather and the small ``[n, features]`` block transposed; its product is transposed back and added
into token-major rows. No whole ``[T, features]`` matrix is transposed or zero-filled twice. With
``cache_inputs`` the transposed input from forward is kept for the SDDMM in backward.

The CSR structures depend only on the positions, so they are built once
(:func:`build_csr_structure`) and reused every step; only the values change. Everything here is
plain torch: MKL on CPU, cuSPARSE on CUDA.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable


@dataclass(frozen=True)
class CSRStructure:
    """Index structure of ``E`` sparse ``(out, in)`` matrices with ``P`` non-zeros each.

    Row ``e`` of each tensor belongs to expert ``e``. ``values[e]`` (in row-major position order)
    are the non-zeros of ``A_e`` in CSR order; ``values[e][transpose_order[e]]`` are those of
    ``A_e^T`` in its CSR order.
    """

    crow: torch.Tensor  # [E, out + 1]
    col: torch.Tensor  # [E, P]
    crow_t: torch.Tensor  # [E, in + 1]
    col_t: torch.Tensor  # [E, P]
    transpose_order: torch.Tensor  # [E, P]
    out_features: int
    in_features: int

    #: The index tensors, each ``[E, ...]``: int32 where the weight's size allows, else int64. When
    #: every expert owns the same positions they are views of one row (stored once).
    INDEX_FIELDS = ("crow", "col", "crow_t", "col_t", "transpose_order")

    @property
    def num_experts(self) -> int:
        return self.col.shape[0]


def build_csr_structure(positions: torch.Tensor, out_features: int, in_features: int) -> CSRStructure:
    """The CSR structures of ``A_e`` and ``A_e^T`` for flat positions ``[E, P]`` sorted per row."""
    if positions.dim() != 2:
        raise ValueError(f"positions must be [experts, count], got shape {tuple(positions.shape)}")
    positions = positions.long()
    num_experts = positions.shape[0]
    # int32 indices: MKL's int32 kernels are measurably faster; int64 only if a count could overflow.
    index_dtype = torch.int32 if out_features * in_features < 2**31 else torch.int64
    if positions.is_meta:  # a model built to be measured: the structures' shapes, no content
        rows = 1 if positions.stride(0) == 0 else num_experts  # positions shared by every expert

        def empty(*shape, dtype=index_dtype):
            return torch.empty(rows, *shape[1:], dtype=dtype, device="meta").expand(*shape)

        return CSRStructure(
            crow=empty(num_experts, out_features + 1), col=empty(*positions.shape),
            crow_t=empty(num_experts, in_features + 1), col_t=empty(*positions.shape),
            transpose_order=empty(*positions.shape),
            out_features=out_features, in_features=in_features,
        )
    if positions.numel() and (positions.min() < 0 or positions.max() >= out_features * in_features):
        raise ValueError(f"positions must lie in [0, {out_features * in_features})")
    if positions.shape[1] > 1 and bool((positions[:, 1:] <= positions[:, :-1]).any()):
        raise ValueError("positions must be unique and sorted per expert")
    if num_experts > 1 and bool((positions == positions[:1]).all()):
        # Experts that share their positions share one structure: [E, ...] views of one row.
        one = build_csr_structure(positions[:1], out_features, in_features)
        return CSRStructure(
            **{name: getattr(one, name).expand(num_experts, -1) for name in CSRStructure.INDEX_FIELDS},
            out_features=out_features, in_features=in_features,
        )
    rows = torch.div(positions, in_features, rounding_mode="floor")
    cols = positions - rows * in_features
    crow = torch.zeros(num_experts, out_features + 1, dtype=torch.long, device=positions.device)
    crow_t = torch.zeros(num_experts, in_features + 1, dtype=torch.long, device=positions.device)
    for e in range(num_experts):
        crow[e, 1:] = torch.bincount(rows[e], minlength=out_features).cumsum(0)
        crow_t[e, 1:] = torch.bincount(cols[e], minlength=in_features).cumsum(0)
    # A^T in CSR order: sort by (column, row); a stable sort of the row-major order keeps rows ascending.
    transpose_order = torch.argsort(cols, dim=1, stable=True)
    col_t = torch.gather(rows, 1, transpose_order)
    return CSRStructure(
        crow=crow.to(index_dtype),
        col=cols.to(index_dtype),
        crow_t=crow_t.to(index_dtype),
        col_t=col_t.to(index_dtype),
        transpose_order=transpose_order.to(index_dtype),
        out_features=out_features,
        in_features=in_features,
    )


def compute_dtype(x: torch.Tensor, values: torch.Tensor) -> torch.dtype:
    """float32, or float64 when an operand is float64.

    The sparse kernels do not support reduced precision everywhere ("addmm_out_sparse_csr_impl_mkl
    not implemented for BFloat16"), so half types are upcast and the result cast back."""
    return torch.promote_types(torch.promote_types(x.dtype, values.dtype), torch.float32)


@contextmanager
def _quiet_sparse():
    """Silence torch's "sparse CSR support is in beta" notices for the calls in this block only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        warnings.filterwarnings("ignore", message="Sparse invariant checks", category=UserWarning)
        yield


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def _spmm(sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``sparse @ dense`` for a CSR ``sparse`` and a row-major ``dense``.

    ``torch.sparse.mm`` zero-fills a result and copies it before the product; an in-place
    ``addmm_`` with ``beta=0`` into an uninitialised buffer writes the product once."""
    result = torch.empty(sparse.shape[0], dense.shape[1], dtype=dense.dtype, device=dense.device)
    return result.addmm_(sparse, dense, beta=0.0)


def gather_feature_major(rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``rows[tokens]`` feature-major, ``[features, n]``: a contiguous row gather, then a transpose
    of the small per-expert block (cheaper than transposing the whole ``[T, features]`` matrix and
    gathering strided columns from it)."""
    return rows.index_select(0, tokens).t().contiguous()


def sampled_gradient(
    x: torch.Tensor, grad_out: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor, offsets: list[int],
    structure: CSRStructure,
) -> torch.Tensor:
    """``[E, M]``: ``sum over e's tokens t of w_t g_t[i] x_t[j]`` at each of expert ``e``'s ``M``
    positions ``(i, j)`` in ``structure`` (CSR order), i.e. the gradient a delta entry there would
    get, without the dense ``[out, in]`` product (one sampled product per expert, as the kernel's
    values gradient). Float32 (float64 for float64 inputs); no autograd."""
    s = structure
    dtype = compute_dtype(x, grad_out)
    out = torch.zeros(s.num_experts, s.col.shape[1], dtype=dtype, device=x.device)
    xs, g, w_all = x.detach().to(dtype), grad_out.detach().to(dtype), weights.detach().to(dtype)
    with _quiet_sparse():
        for e in range(s.num_experts):
            lo, hi = offsets[e], offsets[e + 1]
            if hi == lo:
                continue
            tok = tokens[lo:hi]
            mask = _csr(s.crow[e], s.col[e], out.new_zeros(s.col.shape[1]), (s.out_features, s.in_features))
            out[e] = torch.sparse.sampled_addmm(
                mask, gather_feature_major(g, tok) * w_all[lo:hi], gather_feature_major(xs, tok).t(), beta=0.0
            ).values()
    return out


class _RoutedSparseDelta(torch.autograd.Function):
    """All experts of one projection in one autograd node (see :func:`routed_sparse_delta`)."""

    @staticmethod
    def forward(ctx, x, values, tokens, weights, structure, offsets, cache_inputs, shared):
        s = structure
        size = (s.out_features, s.in_features)
        dtype = compute_dtype(x, values)
        a = values.to(dtype)
        w_all = weights.to(dtype)
        scale_input = s.in_features <= s.out_features  # the gate weight scales the smaller side
        cache = cache_inputs and any(ctx.needs_input_grad[:4])
        # Projections with the same input and routing (gate_proj, up_proj) share the gathered
        # inputs through `shared`: gathered once, saved for backward once.
        key = ("sparse-delta-gathered", dtype)
        gathered = shared.get(key) if shared is not None else None
        if gathered is None:
            xs = x.to(dtype)
            gathered = [
                gather_feature_major(xs, tokens[offsets[e] : offsets[e + 1]]) if offsets[e + 1] > offsets[e] else None
                for e in range(s.num_experts)
            ]
            if shared is not None:
                shared[key] = gathered
        reusable = shared is not None or cache  # gathered inputs must then stay unscaled
        out = torch.zeros(x.shape[0], s.out_features, dtype=dtype, device=x.device)
        cached = []
        with _quiet_sparse():
            for e in range(s.num_experts):
                lo, hi = offsets[e], offsets[e + 1]
                if hi == lo:
                    continue
                tok, w = tokens[lo:hi], w_all[lo:hi]
                xt = gathered[e]  # [in, n], unscaled
                if cache:
                    cached.append(xt)
                a_e = _csr(s.crow[e], s.col[e], a[e], size)
                if scale_input:
                    y = _spmm(a_e, xt * w if reusable else xt.mul_(w))
                else:
                    y = _spmm(a_e, xt).mul_(w)
                out.index_add_(0, tok, y.t().contiguous())  # y: [out, n]
        ctx.save_for_backward(x, values, tokens, weights, *cached)
        ctx.structure, ctx.offsets, ctx.cached = structure, offsets, cache
        return out.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, values, tokens, weights, *cached = ctx.saved_tensors
        s: CSRStructure = ctx.structure
        offsets = ctx.offsets
        size, size_t = (s.out_features, s.in_features), (s.in_features, s.out_features)
        need_x, need_values, _, need_weights = ctx.needs_input_grad[:4]
        dtype = compute_dtype(x, values)
        a = values.to(dtype)
        w_all = weights.to(dtype)
        scale_input = s.in_features <= s.out_features
        grad_x = torch.zeros(x.shape, dtype=dtype, device=x.device) if need_x else None
        g = grad_out.to(dtype)
        grad_values = torch.zeros_like(a) if need_values else None
        grad_weights = torch.zeros(weights.shape, dtype=dtype, device=x.device) if need_weights else None
        inputs = iter(cached)
        with _quiet_sparse():
            for e in range(s.num_experts):
                lo, hi = offsets[e], offsets[e + 1]
                if hi == lo:
                    continue
                tok, w = tokens[lo:hi], w_all[lo:hi]
                xt = next(inputs) if ctx.cached else None  # [in, n], unscaled
                if xt is None and (need_values or need_weights):
                    xt = gather_feature_major(x.to(dtype), tok)
                gt = gather_feature_major(g, tok)  # [out, n]
                if need_values:
                    # dL/dA_e = sum_n w_n g_n x_n^T at the expert's positions, in CSR order
                    g_op, x_op = (gt, xt * w) if scale_input else (gt * w, xt)
                    a_e = _csr(s.crow[e], s.col[e], a[e], size)
                    grad_values[e] = torch.sparse.sampled_addmm(a_e, g_op, x_op.t(), beta=0.0).values()
                if need_x or need_weights:
                    a_t = _csr(s.crow_t[e], s.col_t[e], a[e].index_select(0, s.transpose_order[e]), size_t)
                    g_in = _spmm(a_t, gt)  # dL/d(w_n x_n) = A_e^T g_n, [in, n]
                    if need_weights:
                        grad_weights[lo:hi] = torch.linalg.vecdot(xt, g_in, dim=0)
                    if need_x:
                        grad_x.index_add_(0, tok, g_in.mul_(w).t().contiguous())
        return (
            grad_x.to(x.dtype) if need_x else None,
            grad_values.to(values.dtype) if need_values else None,
            None,
            grad_weights.to(weights.dtype) if need_weights else None,
            None,
            None,
            None,
            None,
        )


def routed_sparse_delta(
    x: torch.Tensor,
    values: torch.Tensor,
    structure: CSRStructure,
    tokens: torch.Tensor,
    weights: torch.Tensor,
    offsets: list[int],
    *,
    cache_inputs: bool = True,
    shared: dict | None = None,
) -> torch.Tensor:
    """``[T, in] -> [T, out]``: the routed sparse delta term of one projection.

    :param x: the projection input, ``[T, in]``.
    :param values: the effective non-zeros ``[E, P]`` of every expert, in row-major position order
        (differentiable).
    :param structure: from :func:`build_csr_structure` for the same positions.
    :param tokens: token indices grouped by expert, ``[S]`` (``ExpertGroups.tokens``).
    :param weights: the matching gate weights, ``[S]`` (differentiable).
    :param offsets: ``tokens[offsets[e]:offsets[e + 1]]`` are expert ``e``'s tokens.
    :param cache_inputs: keep each expert's transposed input from forward for backward instead of
        gathering it again (``S * in`` saved elements, i.e. ``top_k`` copies of ``x``).
    :param shared: a dict shared by the projections that take this same ``x`` with this same
        routing in one forward of one layer (``BankCall.cache``): they gather (and save) the input
        once. None: no sharing.

    Products run in float32 (float64 for float64 operands); the result has ``x``'s dtype.
    Gradients flow to ``x``, ``values`` and ``weights``.
    """
    return _RoutedSparseDelta.apply(x, values, tokens, weights, structure, offsets, cache_inputs, shared)
