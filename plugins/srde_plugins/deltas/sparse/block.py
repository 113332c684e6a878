"""Block positions of the ``sparse`` delta: experts own dense ``bh x bw`` blocks of the weight.

``delta = { name = "sparse", density = 0.02, block = [16, 16] }``. The ``(out, in)`` weight is cut
into a grid of ``(out / bh) x (in / bw)`` blocks; the selector ranks the grid of block Frobenius
norms ``||W_block||_F`` (:func:`block_norms`) exactly as it ranks ``|W|`` for single entries, so
every selector picks blocks unchanged (``magnitude``: the blocks of largest norm; ``random``:
uniform blocks). Expert ``e`` owns ``nb = round(density * out * in / (bh * bw))`` blocks
``blocks[e]`` (flat grid indices, sorted), and learned ``values`` and ``importance`` of shape
``[E, nb, bh, bw]``; its delta is

    dW_e[block b] = values[e, b] * sigmoid(importance[e, b])        and 0 outside its blocks.

Density counts entries, so equal density means equal trainable parameters.

The kernel (:func:`routed_block_delta`) works on dense blocks, token-major: per expert, one gather
takes the ``bw``-wide slabs of its tokens' inputs at its blocks' columns, one batched GEMM (``bmm``
over the blocks, tokens as the long dimension) gives every block's product, and one ``index_add``
puts the ``bh``-wide results into their tokens' block rows; only the blocks' slabs move. Backward
uses the same gathers and ``bmm`` s (one autograd node per projection, like the CSR kernel), so
forward and all gradients are dense products without sparse tensors. Each expert's gathered slabs
(``nb * bw`` values per token) are kept for backward (``cache_inputs`` does not apply).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from srde_core.errors import SRDEError
from srde_core.model.components import BankCall, DeltaBank, Remap, Selector
from srde_plugins.deltas.sparse.kernels import compute_dtype, gather_feature_major
from srde_plugins.deltas.sparse.moves import keep_active, move_index, move_parameters, moved, keep_selector, resize_parameters, scaled_entries, stored_rows


def block_norms(weight: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``(..., out / bh, in / bw)``: the Frobenius norm of each ``bh x bw`` block of ``weight``
    (``(..., out, in)``)."""
    bh, bw = block
    *lead, out_features, in_features = weight.shape
    grid = weight.detach().float().reshape(*lead, out_features // bh, bh, in_features // bw, bw)
    return grid.pow(2).sum(dim=(-3, -1)).sqrt()


def check_block(block: tuple[int, int], out_features: int, in_features: int) -> None:
    """One clear error (naming the recipe key) when the weight does not tile into blocks."""
    bh, bw = block
    if out_features % bh or in_features % bw:
        raise SRDEError(
            f"block {list(block)} does not tile a ({out_features}, {in_features}) weight: "
            f"out must be a multiple of {bh} and in of {bw}",
            key="srde.delta.block",
        )


#: Blocks of at least this many entries move as ``(token, block)`` slabs; smaller ones through whole
#: gathered rows (:class:`_RoutedBlockDeltaRows`), where one index operation per tiny slab would cost
#: more than moving the rows (``benchmarks/layer_speed.py``: 4x4 blocks 1.2-1.4x LoRA by rows,
#: 2.1-3.4x by slabs; 16x16 blocks about 1.0x by slabs).
TOKEN_MAJOR_MIN_BLOCK = 64


def routed_block_delta(
    x: torch.Tensor,
    values: torch.Tensor,
    block_rows: torch.Tensor,
    block_cols: torch.Tensor,
    out_features: int,
    tokens: torch.Tensor,
    weights: torch.Tensor,
    offsets: list[int],
) -> torch.Tensor:
    """``[T, in] -> [T, out]``: ``y[t] = sum_k w_tk dW_{e_tk} @ x[t]`` for block deltas.

    :param values: the effective blocks ``[E, nb, bh, bw]`` (differentiable).
    :param block_rows: block-row index of each block, ``[E, nb]`` or ``[1, nb]`` (shared by all
        experts); ``block_cols`` the same for block columns.
    :param tokens: token indices grouped by expert; ``weights`` their gate weights (differentiable);
        ``tokens[offsets[e]:offsets[e + 1]]`` are expert ``e``'s.

    Per expert with ``n`` tokens, with ``x`` seen as ``[T, in / bw, bw]`` slabs and the output as
    ``[T, out / bh, bh]``: one gather takes the ``(token, block column)`` slabs ``X`` (``[nb, n, bw]``),
    one ``bmm`` over the blocks gives ``Y_b = X_b V_b^T`` (``[nb, n, bh]``, tokens as the long
    dimension), and one ``index_add`` adds ``w_n Y_b[n]`` into slab ``(token n, block row r_b)``:
    only the blocks' slabs move, never a whole row of the input or output. Blocks smaller than
    :data:`TOKEN_MAJOR_MIN_BLOCK` entries take whole gathered rows instead. Products run in float32
    (float64 for float64 operands); the result has ``x``'s dtype.
    """
    _, _, bh, bw = values.shape
    kernel = _RoutedBlockDelta if bh * bw >= TOKEN_MAJOR_MIN_BLOCK else _RoutedBlockDeltaRows
    return kernel.apply(x, values, tokens, weights, block_rows, block_cols, out_features, offsets)



def expert_blocks(block_rows: torch.Tensor, block_cols: torch.Tensor, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ``e``'s block rows and columns (one stored row when every expert has the same blocks)."""
    row = e if block_rows.shape[0] > 1 else 0
    return block_rows[row], block_cols[row]


def _slab_index(tok: torch.Tensor, blocks: torch.Tensor, per_row: int) -> torch.Tensor:
    """Flat slab indices ``[nb * n]`` (block-major) of ``(token, block)`` in a ``[T * per_row, b]`` view."""
    return (blocks[:, None] + tok[None, :] * per_row).reshape(-1)


class _RoutedBlockDelta(torch.autograd.Function):
    """All experts of one projection in one autograd node (see :func:`routed_block_delta`).

    Backward, per expert, with ``G`` the output gradient's ``(token, block row)`` slabs
    (``[nb, n, bh]``): ``dV_b = (w G_b)^T X_b``, ``dX_b = G_b V_b`` added (times ``w``) into the
    input gradient's ``(token, block column)`` slabs, and ``dw_n = sum_b <X_b[n], dX_b[n]>``.
    """

    @staticmethod
    def forward(ctx, x, values, tokens, weights, block_rows, block_cols, out_features, offsets):
        num_experts, nb, bh, bw = values.shape
        in_features = x.shape[1]
        dtype = compute_dtype(x, values)
        a = values.to(dtype)
        w_all = weights.to(dtype)
        slabs_in = x.to(dtype).reshape(-1, bw)  # [T * in / bw, bw]
        out = torch.zeros(x.shape[0] * (out_features // bh), bh, dtype=dtype, device=x.device)
        kept = []
        for e in range(num_experts):
            lo, hi = offsets[e], offsets[e + 1]
            if hi == lo:
                continue
            tok = tokens[lo:hi]
            rows, cols = expert_blocks(block_rows, block_cols, e)
            xg = slabs_in.index_select(0, _slab_index(tok, cols, in_features // bw)).view(nb, hi - lo, bw)
            yb = torch.bmm(xg, a[e].transpose(1, 2)).mul_(w_all[lo:hi, None])  # [nb, n, bh]
            out.index_add_(0, _slab_index(tok, rows, out_features // bh), yb.view(-1, bh))
            kept.append(xg)
        ctx.save_for_backward(x, values, tokens, weights, block_rows, block_cols, *kept)
        ctx.offsets, ctx.out_features = offsets, out_features
        return out.view(x.shape[0], out_features).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, values, tokens, weights, block_rows, block_cols, *kept = ctx.saved_tensors
        offsets, out_features = ctx.offsets, ctx.out_features
        need_x, need_values, _, need_weights = ctx.needs_input_grad[:4]
        num_experts, nb, bh, bw = values.shape
        in_features = x.shape[1]
        dtype = compute_dtype(x, values)
        a = values.to(dtype)
        w_all = weights.to(dtype)
        slabs_out = grad_out.to(dtype).reshape(-1, bh)  # [T * out / bh, bh]
        grad_x = torch.zeros(x.shape[0] * (in_features // bw), bw, dtype=dtype, device=x.device) if need_x else None
        grad_values = torch.zeros_like(a) if need_values else None
        grad_weights = torch.zeros(weights.shape, dtype=dtype, device=x.device) if need_weights else None
        inputs = iter(kept)
        for e in range(num_experts):
            lo, hi = offsets[e], offsets[e + 1]
            if hi == lo:
                continue
            n, tok, w = hi - lo, tokens[lo:hi], w_all[lo:hi, None]
            rows, cols = expert_blocks(block_rows, block_cols, e)
            xg = next(inputs)  # [nb, n, bw]
            gb = slabs_out.index_select(0, _slab_index(tok, rows, out_features // bh)).view(nb, n, bh)
            if need_values:
                grad_values[e] = torch.bmm((gb * w).transpose(1, 2), xg)  # [nb, bh, bw]
            if need_x or need_weights:
                g_in = torch.bmm(gb, a[e])  # [nb, n, bw]: V_b^T applied to each token's slab
                if need_weights:
                    grad_weights[lo:hi] = (g_in * xg).sum(dim=(0, 2))
                if need_x:
                    grad_x.index_add_(0, _slab_index(tok, cols, in_features // bw), g_in.mul_(w).view(-1, bw))
        return (
            grad_x.view(x.shape).to(x.dtype) if need_x else None,
            grad_values.to(values.dtype) if need_values else None,
            None,
            grad_weights.to(weights.dtype) if need_weights else None,
            None, None, None, None,
        )


class _RoutedBlockDeltaRows(torch.autograd.Function):
    """The feature-major variant for small blocks (see :func:`routed_block_delta`): each expert's
    tokens' whole input rows are gathered once, transposed, and the blocks' ``bw``-row slabs taken
    from them; the results are added into a feature-major output of the expert's tokens.

    Backward, per expert, with ``G_b`` the output gradient's rows of block row ``r_b``
    (``[nb, bh, n]``): ``dV_b = (G_b * w) X_b^T``, ``dX_b = V_b^T G_b`` added into block column
    ``c_b`` of the input gradient (then times ``w``), and ``dw_n = <x_n, sum_b dX_b[:, n]>``.
    """

    @staticmethod
    def forward(ctx, x, values, tokens, weights, block_rows, block_cols, out_features, offsets):
        num_experts, _, bh, bw = values.shape
        in_features = x.shape[1]
        dtype = compute_dtype(x, values)
        a = values.to(dtype)
        w_all = weights.to(dtype)
        xs = x.to(dtype)
        gathered = [
            gather_feature_major(xs, tokens[offsets[e] : offsets[e + 1]]) if offsets[e + 1] > offsets[e] else None
            for e in range(num_experts)
        ]
        out = torch.zeros(x.shape[0], out_features, dtype=dtype, device=x.device)
        for e in range(num_experts):
            lo, hi = offsets[e], offsets[e + 1]
            if hi == lo:
                continue
            n = hi - lo
            rows, cols = expert_blocks(block_rows, block_cols, e)
            xg = gathered[e].view(in_features // bw, bw, n).index_select(0, cols)  # [nb, bw, n]
            yb = torch.bmm(a[e], xg).mul_(w_all[lo:hi])  # [nb, bh, n]
            ye = yb.new_zeros(out_features // bh, bh, n).index_add_(0, rows, yb)
            out.index_add_(0, tokens[lo:hi], ye.view(out_features, n).t().contiguous())
        kept = [t for t in gathered if t is not None]
        ctx.save_for_backward(x, values, tokens, weights, block_rows, block_cols, *kept)
        ctx.offsets, ctx.out_features = offsets, out_features
        return out.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, values, tokens, weights, block_rows, block_cols, *kept = ctx.saved_tensors
        offsets, out_features = ctx.offsets, ctx.out_features
        need_x, need_values, _, need_weights = ctx.needs_input_grad[:4]
        num_experts, _, bh, bw = values.shape
        in_features = x.shape[1]
        dtype = compute_dtype(x, values)
        a = values.to(dtype)
        w_all = weights.to(dtype)
        g = grad_out.to(dtype)
        grad_x = torch.zeros(x.shape, dtype=dtype, device=x.device) if need_x else None
        grad_values = torch.zeros_like(a) if need_values else None
        grad_weights = torch.zeros(weights.shape, dtype=dtype, device=x.device) if need_weights else None
        inputs = iter(kept)
        for e in range(num_experts):
            lo, hi = offsets[e], offsets[e + 1]
            if hi == lo:
                continue
            n = hi - lo
            tok, w = tokens[lo:hi], w_all[lo:hi]
            rows, cols = expert_blocks(block_rows, block_cols, e)
            xt = next(inputs)  # [in, n]
            gb = gather_feature_major(g, tok).view(out_features // bh, bh, n).index_select(0, rows)  # [nb, bh, n]
            if need_values:
                xg = xt.view(in_features // bw, bw, n).index_select(0, cols)
                grad_values[e] = torch.bmm(gb * w, xg.transpose(1, 2))
            if need_x or need_weights:
                g_in = torch.bmm(a[e].transpose(1, 2), gb)  # [nb, bw, n]
                g_in = g_in.new_zeros(in_features // bw, bw, n).index_add_(0, cols, g_in).view(in_features, n)
                if need_weights:
                    grad_weights[lo:hi] = torch.linalg.vecdot(xt, g_in, dim=0)
                if need_x:
                    grad_x.index_add_(0, tok, g_in.mul_(w).t().contiguous())
        return (
            grad_x.to(x.dtype) if need_x else None,
            grad_values.to(values.dtype) if need_values else None,
            None,
            grad_weights.to(weights.dtype) if need_weights else None,
            None, None, None, None,
        )


def add_importance(bank: nn.Module, mode: str, shape: tuple[int, ...], init: float, device) -> None:
    """The bank's ``importance`` parameter for ``mode``: ``entry``, the shape of ``values``;
    ``expert``, one logit per expert (``[E, 1, ...]``, broadcast over its entries); ``none``, no
    parameter (``bank.importance`` is None). Only per-entry importance moves and resizes with the
    entries (``resizable_state``)."""
    if mode not in ("entry", "expert", "none"):
        raise ValueError(f"importance must be 'entry', 'expert' or 'none', got {mode!r}")
    bank.importance_mode = mode
    if mode == "none":
        bank.register_parameter("importance", None)
    else:
        size = shape if mode == "entry" else (shape[0],) + (1,) * (len(shape) - 1)
        bank.importance = nn.Parameter(torch.full(size, float(init), dtype=torch.float32, device=device))
    if mode != "entry":
        bank.resizable_state = tuple(n for n in type(bank).resizable_state if n != "importance")


def drop_missing_importance(bank: nn.Module) -> None:
    """Without importance, ``importance`` is not among the bank's trainable names."""
    if bank.importance is None:
        bank.trainable_names = tuple(n for n in bank.trainable_names if n != "importance")


def per_entry_importance(bank: nn.Module) -> dict[str, float]:
    """``{"importance": init}`` when the importance is per entry (it moves with the entries), else ``{}``."""
    return {"importance": bank.init_importance} if bank.importance_mode == "entry" else {}


class BlockSparseDeltaBank(DeltaBank):
    """``E`` block-sparse deltas of one ``(out, in)`` weight (see the module docstring).

    Buffers: ``blocks`` (flat indices into the block grid, sorted per expert; ``[1, nb]`` when
    every expert has the same blocks, else ``[E, nb]``; saved with the adapter), ``active``
    ``[E, nb]`` (bool: the blocks in use, see :meth:`set_active_fraction`; saved) and the derived
    block rows and columns (not saved). Parameters: ``values`` and ``importance``
    ``[E, nb, bh, bw]``. Blocks move as the entry bank's positions do (:meth:`set_positions`,
    :meth:`prune`, a learned selector kept as the submodule ``selector``), a whole block at a time:
    the selector's grid is the grid of blocks (:meth:`selection_positions`,
    :meth:`selection_scores`).
    """

    #: ``blocks`` is saved as ``[1, nb]`` (shared) or ``[E, nb]``: either loads into either, and a
    #: state with another number of blocks (pruned, hardened) resizes the bank.
    resizable_state = ("blocks", "active", "values", "importance")

    def __init__(
        self,
        out_features: int,
        in_features: int,
        blocks: torch.Tensor,
        block: tuple[int, int],
        *,
        num_experts: int,
        init_importance: float = 0.0,
        selector: Selector | None = None,
        importance: str = "entry",
        built_count: int | None = None,
    ):
        super().__init__()
        bh, bw = block
        check_block(block, out_features, in_features)
        self.num_experts = num_experts
        self.out_features = out_features
        self.in_features = in_features
        self.block = (bh, bw)
        self.init_importance = init_importance
        if blocks.dim() != 2 or blocks.shape[0] not in (1, num_experts) or blocks.shape[1] < 1:
            raise ValueError(f"blocks must be [{num_experts} or 1, count], got {tuple(blocks.shape)}")
        blocks = self._checked(blocks)
        #: blocks per expert as built (a learned selector may start with more candidates)
        self.built_count = int(built_count if built_count is not None else blocks.shape[1])
        self.register_buffer("blocks", stored_rows(blocks).contiguous())
        shape = (num_experts, blocks.shape[1], bh, bw)
        self.register_buffer("active", torch.ones(shape[:2], dtype=torch.bool, device=blocks.device))
        self.values = nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=blocks.device))
        add_importance(self, importance, shape, init_importance, blocks.device)
        keep_selector(self, selector)
        drop_missing_importance(self)
        self._masked = False
        self._register_grid()
        if self.selector is not None:
            self.selector.bind(self)

    @property
    def grid_shape(self) -> tuple[int, int]:
        """``(out / bh, in / bw)``: the grid of blocks the selector ranks."""
        return self.out_features // self.block[0], self.in_features // self.block[1]

    def _checked(self, blocks: torch.Tensor) -> torch.Tensor:
        blocks = blocks.long()
        grid = self.grid_shape[0] * self.grid_shape[1]
        if not blocks.is_meta:
            if blocks.min() < 0 or blocks.max() >= grid:
                raise ValueError(f"blocks must lie in [0, {grid})")
            if blocks.shape[1] > 1 and bool((blocks[:, 1:] <= blocks[:, :-1]).any()):
                raise ValueError("blocks must be unique and sorted per expert")
        return blocks

    @property
    def count(self) -> int:
        """Blocks per expert (``nb``)."""
        return self.blocks.shape[1]

    def _register_grid(self) -> None:
        grid_cols = self.grid_shape[1]
        self.register_buffer("block_rows", torch.div(self.blocks, grid_cols, rounding_mode="floor"), persistent=False)
        self.register_buffer("block_cols", self.blocks % grid_cols, persistent=False)

    def effective_values(self) -> torch.Tensor:
        """``values * sigmoid(importance)`` times the selector's block scale, if any (0 in inactive
        blocks), ``[E, nb, bh, bw]``."""
        values = self.values if self.importance is None else self.values * torch.sigmoid(self.importance)
        scale = self.selector.entry_scale(self) if self.selector is not None else None
        if scale is not None:
            values = scaled_entries(values, scale, self.selector)
        return values * self.active[..., None, None] if self._masked else values

    def entry_positions(self) -> torch.Tensor:
        """Flat row-major positions ``[E, nb * bh * bw]`` of every entry, in the order of
        ``values.view(E, -1)`` (block by block, row-major inside a block)."""
        return self.selection_entries(self.blocks).reshape(self.blocks.shape[0], -1).expand(self.num_experts, -1)

    def selection_entries(self, cells: torch.Tensor) -> torch.Tensor:
        """``[..., n] -> [..., n, bh * bw]``: the flat positions of each block's entries (row-major)."""
        bh, bw = self.block
        grid_cols = self.grid_shape[1]
        rows = torch.div(cells, grid_cols, rounding_mode="floor")[..., None, None] * bh
        cols = (cells % grid_cols)[..., None, None] * bw
        rows = rows + torch.arange(bh, device=cells.device).view(bh, 1)
        cols = cols + torch.arange(bw, device=cells.device).view(1, bw)
        return (rows * self.in_features + cols).flatten(-2)

    def selection_positions(self) -> torch.Tensor:
        """``[E, nb]``: the experts' blocks (flat indices into the block grid)."""
        return self.blocks.expand(self.num_experts, -1)

    def selection_scores(self, dense: torch.Tensor) -> torch.Tensor:
        """``[E, out, in] -> [E, n_blocks]``: the Frobenius norm of each block of each expert's ``dense``."""
        return block_norms(dense, self.block).reshape(dense.shape[0], -1)

    def gram(self) -> torch.Tensor:
        """``<dW_a, dW_b>`` over the experts' entries (one product when they share the blocks)."""
        values = self.effective_values().reshape(self.num_experts, -1)
        if self.blocks.shape[0] == 1:
            return values @ values.T
        union, inverse = torch.unique(self.entry_positions(), return_inverse=True)
        dense = values.new_zeros(self.num_experts, union.numel()).scatter(1, inverse, values)
        return dense @ dense.T

    def forward(self, x: torch.Tensor, call: BankCall) -> torch.Tensor:
        groups = call.routing.groups()
        return routed_block_delta(
            x, self.effective_values(), self.block_rows, self.block_cols, self.out_features,
            groups.tokens, groups.weights, groups.offsets,
        )

    def delta_weight(self, expert: int) -> torch.Tensor:
        bh, bw = self.block
        grid_rows, grid_cols = self.grid_shape
        blocks = self.blocks[expert if self.blocks.shape[0] > 1 else 0]
        values = self.effective_values()[expert]
        dense = values.new_zeros(grid_rows * grid_cols, bh, bw).index_copy(0, blocks, values)
        return dense.view(grid_rows, grid_cols, bh, bw).transpose(1, 2).reshape(self.out_features, self.in_features)

    # -- moving blocks ---------------------------------------------------------------------------

    @property
    def active_fraction(self) -> float:
        return float(self.active.float().mean()) if self._masked else 1.0

    def density(self) -> float:
        return self.built_count * self.block[0] * self.block[1] / (self.out_features * self.in_features)

    def active_entries(self) -> int:
        blocks = int(self.active.sum()) if self._masked else self.num_experts * self.count
        return blocks * self.block[0] * self.block[1]

    def active_mask(self) -> torch.Tensor | None:
        return self.active if self._masked else None

    def activation_bytes(self, tokens: int, top_k: int, cache: dict) -> int:
        """Each expert's gathered fp32 input slabs, ``[blocks, tokens, bw]``, kept for the backward."""
        return 4 * top_k * tokens * self.count * self.block[1]

    @torch.no_grad()
    def set_active_fraction(self, fraction: float) -> None:
        """Keep, per expert, the ``round(fraction * nb)`` blocks of largest
        ``||sigmoid(importance) * values||_F`` (at least one) and mask the others to zero (they
        keep their parameters and get no gradient). 1.0 removes the mask."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if fraction >= 1.0:
            self.active.fill_(True)
            self._masked = False
            return
        keep = max(1, round(fraction * self.count))
        weighted = self.values if self.importance is None else torch.sigmoid(self.importance) * self.values
        score = weighted.flatten(2).norm(dim=2)
        self.active.zero_().scatter_(1, torch.topk(score, keep, dim=1).indices, True)
        self._masked = True

    @torch.no_grad()
    def prune(self) -> list[Remap]:
        """Keep only the active blocks (after :meth:`set_active_fraction`)."""
        if not self._masked:
            return []
        return self.set_positions(keep_active(self.active, self.selection_positions()))

    @torch.no_grad()
    def set_positions(self, positions: torch.Tensor) -> list[Remap]:
        """Move the experts to the blocks ``positions`` (``[E, nb']`` flat block-grid indices, unique
        and sorted per expert; ``nb'`` may differ from the current count). A block an expert keeps
        keeps its values, importance and active flag; a new block starts at value 0 (so the delta
        loses only the dropped blocks); the remaps (also sent to the listeners) move the optimiser
        state block by block."""
        positions = self._checked(positions.to(self.blocks.device))
        if positions.dim() != 2 or positions.shape[0] != self.num_experts:
            raise ValueError(f"positions must be [{self.num_experts}, count] blocks, got {tuple(positions.shape)}")
        index = move_index(self.selection_positions(), positions)
        new_active = moved(self.active, index, True)
        remaps = move_parameters(self, index, {"values": 0.0} | per_entry_importance(self))
        self.blocks = stored_rows(positions).contiguous()
        self.active = new_active
        self._masked = not bool(new_active.all())
        self._register_grid()
        return self.notify_remap(remaps)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "blocks")
        if saved is not None:
            if saved.shape[-1] != self.count:
                # a pruned or hardened bank: take the saved size first; optimiser state follows via remap
                remaps = resize_parameters(self, saved.shape[-1], ("values", *per_entry_importance(self)))
                self.active = torch.ones(self.num_experts, saved.shape[-1], dtype=torch.bool, device=self.blocks.device)
                self.notify_remap(remaps)
            if saved.shape != self.blocks.shape:
                # experts with the same blocks are stored once: take the saved form (shared or not)
                self.blocks = torch.empty(saved.shape, dtype=torch.long, device=self.blocks.device)
            # adapters saved before blocks could move have no ``active``: every block is in use
            state_dict.setdefault(prefix + "active", torch.ones(self.active.shape, dtype=torch.bool))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._masked = not bool(self.active.all())
        self._register_grid()

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, out={self.out_features}, in={self.in_features}, "
            f"block={list(self.block)}, blocks={self.count}"
        )


def make_block_bank(params, selector: Selector, weight: torch.Tensor, num_experts: int, generator) -> BlockSparseDeltaBank:
    """The block bank of ``weight``: ``selector`` picks blocks on the grid of block norms."""
    from srde_plugins.deltas.sparse.bank import position_count

    block = tuple(params.block)
    out_features, in_features = weight.shape
    check_block(block, out_features, in_features)
    grid_shape = (out_features // block[0], in_features // block[1])
    count = selector.plan_count(position_count(params.density, *grid_shape), grid_shape[0] * grid_shape[1])
    if weight.is_meta:
        if selector.moves_entries:
            selector.select(block_norms(weight, block), num_experts, count, generator)  # a learned selector's state
        shared = getattr(selector, "assignment", None) == "shared"  # as in select_positions
        blocks = torch.empty(1 if shared else num_experts, count, dtype=torch.long, device="meta").expand(num_experts, count)
    else:
        blocks = selector.select(block_norms(weight, block), num_experts, count, generator)
    if tuple(blocks.shape) != (num_experts, count):
        raise ValueError(
            f"selector {type(selector).__name__} returned shape {tuple(blocks.shape)}, expected {(num_experts, count)}"
        )
    return BlockSparseDeltaBank(
        out_features, in_features, blocks.to(weight.device), block,
        num_experts=num_experts, init_importance=params.init_importance, selector=selector,
        importance=params.importance, built_count=position_count(params.density, *grid_shape),
    )
