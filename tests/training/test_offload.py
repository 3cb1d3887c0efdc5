"""Gradient checkpointing with activations offloaded through saved-tensor hooks gives bit-identical results."""

import torch

from chronicals.training.offload import OffloadActivations

from .helpers import tiny_model


def _grads(offload: bool):
    model = tiny_model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(2, 96, (2, 19), generator=torch.Generator().manual_seed(0))
    ctx = OffloadActivations(model, device=torch.device("cpu")) if offload else None
    if ctx is not None:
        with ctx:
            loss = model(input_ids=ids, labels=ids).loss
    else:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, ctx


def test_offloaded_checkpointing_matches_plain_checkpointing():
    loss, grads, _ = _grads(False)
    loss_off, grads_off, ctx = _grads(True)
    assert ctx.offloaded_bytes > 0 and len(ctx.handles) > 0  # it did move activations
    assert torch.equal(loss, loss_off)
    for name, g in grads.items():
        assert torch.equal(g, grads_off[name]), name


def test_parameters_are_never_offloaded():
    model = tiny_model()
    ctx = OffloadActivations(model, device=torch.device("cpu"))
    weight = model.model.embed_tokens.weight
    assert not ctx._eligible(weight)
    assert not ctx._eligible(weight.t())  # a view of a parameter shares its storage
    assert ctx._eligible(torch.ones(3))


def test_a_saved_sparse_tensor_stays_where_it_is():
    # torch.sparse.mm saves its sparse operand for the backward. _eligible read the storage of every saved tensor
    # before its layout check, and a sparse one has none: the forward failed with "Cannot access storage of
    # SparseTensorImpl" instead of keeping the tensor in place, as meant for non-strided layouts.
    sparse = torch.eye(4).to_sparse()
    dense = torch.randn(4, 3, requires_grad=True)
    expected = torch.autograd.grad(torch.sparse.mm(sparse, dense * 2).square().sum(), dense)[0]
    ctx = OffloadActivations(tiny_model(), device=torch.device("cpu"))
    with ctx:
        loss = torch.sparse.mm(sparse, dense * 2).square().sum()
    assert not ctx._eligible(sparse)
    assert torch.equal(torch.autograd.grad(loss, dense)[0], expected)
