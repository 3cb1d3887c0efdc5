"""Config variants that real checkpoints use, beyond the tiny presets' defaults: the patched model agrees with HF
where HF runs, and refuses clearly (naming the config field) what it cannot compute the same way."""

import pytest

import chronicals
from chronicals.models import build_model
from chronicals.models.patch import FLAGS
from tests.conftest import DEVICE
from tests.models.test_patch import batch, needs_kernels

ALL_OFF = {flag: False for flag in FLAGS}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_a_partial_rotary_factor_is_refused_naming_the_field(name):
    # rope_parameters' partial_rotary_factor = 0.5 makes HF's cos/sin head_dim / 2 wide. These families' attention
    # rotates the whole head, so HF's forward fails on it; the fused RoPE took the narrow table for a half table and
    # silently rotated every dimension with the wrong frequencies.
    needs_kernels()
    rope = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0, "partial_rotary_factor": 0.5}
    model = chronicals.apply(build_model(name, seed=0, rope_parameters=rope).to(DEVICE), **{**ALL_OFF, "rope": True})
    ids, labels = batch(model.config.vocab_size, shape=(1, 7))
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        model(input_ids=ids, labels=labels)


@pytest.mark.parametrize("name, window", [("tiny-mistral", dict(sliding_window=4)),
                                          ("tiny-qwen2", dict(sliding_window=4, use_sliding_window=True,
                                                              max_window_layers=1))])
def test_attention_dropout_with_a_window_shorter_than_an_unpacked_row_trains_as_hf(name, window):
    # A row longer than the window, no padding, no packing: the patched attention took it for a one-sequence packed
    # batch and refused attention_dropout > 0 ('packed attention has no attention dropout'), where HF trains. It now
    # runs HF's SDPA with dropout over the banded mask: the same loss and gradients under the same seed.
    import torch

    from tests.models.test_patch import assert_same_training_step

    class Seeded(torch.nn.Module):  # the same dropout masks in both models: reseed before each forward
        def __init__(self, model):
            super().__init__()
            self.model, self.config = model, model.config

        def forward(self, **kwargs):
            torch.manual_seed(1234)
            return self.model(**kwargs)

    reference = build_model(name, seed=0, attention_dropout=0.2, **window).to(DEVICE)
    patched = chronicals.apply(build_model(name, seed=0, attention_dropout=0.2, **window).to(DEVICE),
                               **{**ALL_OFF, "packed_attention": True})
    assert_same_training_step(Seeded(reference), Seeded(patched), shape=(2, 11), use_cache=False)
    ids, labels = batch(patched.config.vocab_size, shape=(2, 11))
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]] * 2, device=DEVICE)
    # A packed batch (positions restart) takes the dropout inside packed attention, per sequence.
    loss = patched.train()(input_ids=ids, labels=labels, position_ids=positions, use_cache=False).loss
    assert torch.isfinite(loss)
