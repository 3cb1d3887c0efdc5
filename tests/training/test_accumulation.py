"""Gradient accumulation is normalised by the step's total label tokens: 4 micro-batches of 2 give the gradients
of one batch of 8, in padded and in packed batches."""

import pytest
import torch

from chronicals.training import ChronicalsTrainer

from .helpers import config, rows, tiny_model, tokenizer


def _first_step_grads(tmp_path, **changes):
    trainer = ChronicalsTrainer(tiny_model(), tokenizer(), config(tmp_path, max_steps=1, max_seq_length=23, **changes))
    captured = {}

    def capture(optimizer, args, kwargs):  # the gradients the optimizer is about to apply
        captured.update({n: p.grad.clone() for n, p in trainer.model.named_parameters()})

    trainer.optimizer.register_step_pre_hook(capture)
    result = trainer.train(rows(8, min_len=12))  # no two fit in one packed row: 8 rows either way
    return captured, result.losses[0]


@pytest.mark.parametrize("packing, fused", [(False, False), (True, False), (True, True)],
                         ids=["padded", "packed", "packed-fused-kernels"])
def test_four_micro_batches_of_two_equal_one_batch_of_eight(tmp_path, packing, fused):
    flags = dict(use_sequence_packing=packing, use_fused_kernels=fused)
    big, big_loss = _first_step_grads(tmp_path / "a", batch_size=8, gradient_accumulation_steps=1, **flags)
    small, small_loss = _first_step_grads(tmp_path / "b", batch_size=2, gradient_accumulation_steps=4, **flags)
    assert small_loss == pytest.approx(big_loss, rel=1e-5)
    for name, g in big.items():
        torch.testing.assert_close(small[name], g, rtol=1e-4, atol=1e-7, msg=name)


def test_per_micro_batch_means_would_differ():
    # The control that makes the test above able to fail: averaging each micro-batch's own mean (the naive way)
    # does not reproduce the big batch's gradient on these rows.
    from chronicals.data import PaddedCollator

    model = tiny_model()
    data = rows(8)
    collate = PaddedCollator(0)

    def grads(batches, normalise):
        model.zero_grad()
        for b in batches:
            n = b.pop("num_label_tokens")
            loss = model(**b).loss
            (loss * normalise(n)).backward()
        return model.model.embed_tokens.weight.grad.clone()

    total = sum(sum(t != -100 for t in r["labels"][1:]) for r in data)
    exact = grads([collate(data[i:i + 2]) for i in range(0, 8, 2)], lambda n: n / total)
    naive = grads([collate(data[i:i + 2]) for i in range(0, 8, 2)], lambda n: 0.25)
    whole = grads([collate(data)], lambda n: 1.0)
    torch.testing.assert_close(exact, whole, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(naive, whole, rtol=1e-3, atol=1e-6)


def test_an_epoch_trains_every_row_when_accumulation_does_not_divide_it(tmp_path):
    # 20 rows: batch_size 8 gives micro-batches of 8, 8 and 4 rows, three steps an epoch. batch_size 4 x 2 micro-batches
    # gave two steps and left the fifth micro-batch (4 rows, a fifth of the data, other rows each epoch) untrained;
    # HF Trainer's last step takes the leftover micro-batches, which the token-count normalisation makes exact.
    data = rows(20)
    whole = ChronicalsTrainer(tiny_model(), tokenizer(), config(tmp_path / "a", max_steps=-1, epochs=2, batch_size=8))
    split = ChronicalsTrainer(tiny_model(), tokenizer(), config(tmp_path / "b", max_steps=-1, epochs=2, batch_size=4,
                                                                gradient_accumulation_steps=2))
    big, small = whole.train(data), split.train(data)
    assert len(big.losses) == len(small.losses) == 6
    assert small.losses == pytest.approx(big.losses, rel=1e-5)
    for a, b in zip(whole.model.parameters(), split.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
