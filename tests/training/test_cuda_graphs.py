"""use_cuda_graphs in the trainer: the decoder layers replayed as CUDA graphs under the run's autocast train exactly
as without them; off the GPU the switch changes nothing."""

import pytest
import torch

from chronicals.training import ChronicalsTrainer

from .helpers import config, rows, tiny_model, tokenizer


def _train(tmp_path, graphs: bool, **changes):
    cfg = config(tmp_path / f"graphs-{graphs}", use_fused_kernels=True, use_cuda_graphs=graphs, max_steps=6,
                 **changes)
    trainer = ChronicalsTrainer(tiny_model(), tokenizer(), cfg)
    # Rows of one length: every padded batch has the same shape, so the graphs are captured at the second step.
    result = trainer.train(rows(24, min_len=23, max_len=23))
    return result.losses, trainer.model


def test_off_the_gpu_the_switch_changes_nothing(tmp_path):
    plain, _ = _train(tmp_path, False)
    graphed, model = _train(tmp_path, True)
    assert graphed == plain
    assert model.chronicals_cuda_graphs.graphed is None  # installed, never captured on the CPU


@pytest.mark.gpu
def test_graphed_bf16_autocast_training_is_the_same(tmp_path):
    plain, _ = _train(tmp_path, False, device="cuda", mixed_precision="bf16")
    graphed, model = _train(tmp_path, True, device="cuda", mixed_precision="bf16")
    assert graphed == plain
    graphs = model.chronicals_cuda_graphs
    assert graphs.failed is None and graphs.graphed is not None and graphs.keys[0][-1] == torch.bfloat16


def test_a_model_without_decoder_layers_to_graph_names_the_config_field(tmp_path):
    # GPT-2 keeps its blocks at .h: the graphs' refusal names use_cuda_graphs, not packing (which is off here).
    from chronicals.training import SetupError
    from tests.models.test_other_architectures import other_model

    with pytest.raises(SetupError, match="no decoder layers at .layers.*in the config, use_cuda_graphs: false$"):
        ChronicalsTrainer(other_model("gpt2").train(), tokenizer(), config(tmp_path, use_cuda_graphs=True))
