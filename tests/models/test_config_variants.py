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
