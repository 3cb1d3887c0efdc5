"""ChronicalsTrainer(None, None, config) builds the model and tokenizer from the config, as `chronicals train` does."""

from chronicals.training import ChronicalsTrainer
from chronicals.training.build import load_model, load_tokenizer

from .helpers import config

SHAPE = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
TEXTS = [f"a short line of plain text, number {i}" for i in range(8)]


def test_model_none_is_the_configs_preset_and_trains_as_one_built_by_hand(tmp_path):
    cfg_built = config(tmp_path / "built", model_kwargs=SHAPE, max_steps=2)
    built = ChronicalsTrainer(None, None, cfg_built)
    assert built.model.config.hidden_size == 32 and built.tokenizer is not None
    cfg_hand = config(tmp_path / "hand", model_kwargs=SHAPE, max_steps=2)
    tok = load_tokenizer(cfg_hand)
    by_hand = ChronicalsTrainer(load_model(cfg_hand, tok), tok, cfg_hand)
    losses = built.train(TEXTS).losses
    assert len(losses) == 2 and losses == by_hand.train(TEXTS).losses
