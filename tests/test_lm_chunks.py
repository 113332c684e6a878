"""The LM loss in chunks: the same loss and gradients as one cross-entropy over every labelled
position (float64), with no more than ``chunk_tokens`` rows through the head at once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from srde_core.train.losses import LossInputs
from srde_plugins.losses import LMParams
from srde_plugins.losses.lm import causal_lm


class CountingHead(torch.nn.Linear):
    """An LM head that remembers the most rows it was applied to at once (forward or recompute)."""

    most_rows = 0

    def forward(self, x):
        self.most_rows = max(self.most_rows, x.shape[0])
        return super().forward(x)


def case(hidden_size=6, vocab=13, batch=3, seq=9):
    torch.manual_seed(0)
    head = CountingHead(hidden_size, vocab, bias=True).double()
    hidden = torch.randn(batch, seq, hidden_size, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq))
    labels[0, 5:] = -100
    labels[2, :3] = -100
    return head, hidden, labels


def reference(head, hidden, labels, smoothing):
    logits = F.linear(hidden, head.weight, head.bias)[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100, label_smoothing=smoothing)


@pytest.mark.parametrize("chunk", [1, 4, 7, 100])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_chunked_loss_and_gradients_equal_the_unchunked_cross_entropy(chunk, smoothing):
    head, hidden, labels = case()
    labelled = int((labels[:, 1:] != -100).sum())
    loss = causal_lm(LMParams(chunk_tokens=chunk, label_smoothing=smoothing))(
        LossInputs(hidden=hidden, lm_head=head, labels=labels, batch={}))
    grads = torch.autograd.grad(loss, [hidden, head.weight, head.bias])
    assert head.most_rows == min(chunk, labelled)  # the head never saw more rows than a chunk
    expected = reference(head, hidden, labels, smoothing)
    want = torch.autograd.grad(expected, [hidden, head.weight, head.bias])
    assert torch.allclose(loss, expected, rtol=0, atol=1e-12)
    for got, ref in zip(grads, want):
        assert torch.allclose(got, ref, rtol=0, atol=1e-12)


def test_chunked_loss_without_gradients_is_the_same_number():
    head, hidden, labels = case()
    inputs = LossInputs(hidden=hidden.detach(), lm_head=head, labels=labels, batch={})
    with torch.no_grad():
        chunked = causal_lm(LMParams(chunk_tokens=3))(inputs)
    assert torch.allclose(chunked, reference(head, hidden, labels, 0.0).detach(), rtol=0, atol=1e-12)
