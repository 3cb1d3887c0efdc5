"""Bad data and models fail with clear errors before the first training step."""

import json
import math

import pytest

from chronicals.config import ChronicalsConfig
from chronicals.data import default_tokenizer
from chronicals.models import build_model
from chronicals.training import ChronicalsTrainer, DataError, SetupError
from chronicals.training.build import load_model, load_tokenizer, prepare_model

from .helpers import config, rows, tiny_model, tokenizer


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


def _fails_before_training(tmp_path, data, tok, match, **changes):
    trainer = ChronicalsTrainer(tiny_model(), tok, config(tmp_path, **changes))
    with pytest.raises(DataError, match=match):
        trainer.train(data)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing ran


@pytest.mark.parametrize(
    "data, match",
    [
        ([], "is empty"),
        ([{"question": "a", "answer": "b"}], r"cannot tell the row format from the columns \['answer', 'question'\]"),
        ([{"text": 17}], "row 0"),
        ([{"messages": "hello"}], "row 0"),
        ([{"input_ids": ["a", "b"]}], "example 0 input_ids must hold non-negative int token ids"),
        ([{"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}], "none of the 1 sequences has a label token"),
    ],
    ids=["empty", "missing-columns", "text-not-a-string", "messages-not-a-list", "ids-not-ints", "no-labels"],
)
def test_bad_rows(tmp_path, tok, data, match):
    _fails_before_training(tmp_path, data, tok, match)


def test_every_sequence_over_the_limit(tmp_path, tok):
    data = [{"input_ids": list(range(2, 60))} for _ in range(3)]
    _fails_before_training(tmp_path, data, tok, "every one of the 3 sequences is longer than max_seq_length=32")


def test_format_named_in_config_needs_its_columns(tmp_path, tok):
    _fails_before_training(tmp_path, [{"text": "hello there"}], tok, r"needs column\(s\) \['prompt', 'completion'\]",
                           dataset_format="prompt_completion")


def test_missing_file(tmp_path, tok):
    _fails_before_training(tmp_path, str(tmp_path / "none.jsonl"), tok, "none.jsonl")


def test_fewer_rows_than_one_full_step_make_one_shorter_step(tmp_path):
    # 8 rows are 2 micro-batches of 4, fewer than gradient_accumulation_steps=4: one step on both (as HF Trainer
    # takes it), not an error (nor, with more data, a tail of untrained rows each epoch).
    trainer = ChronicalsTrainer(tiny_model(), tokenizer(), config(tmp_path, batch_size=4, max_steps=-1, epochs=1,
                                                                  gradient_accumulation_steps=4))
    data = rows(8)
    assert trainer.train(data).steps == 1
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert metrics["label_tokens"] == sum(sum(t != -100 for t in r["labels"][1:]) for r in data)


def test_unknown_model_type(tmp_path):
    bad = tmp_path / "weird-model"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    cfg = ChronicalsConfig(model=str(bad), tokenizer="default", device="cpu")
    with pytest.raises(SetupError, match="config field 'model'.*no-such-arch"):
        load_model(cfg, load_tokenizer(cfg))


def test_a_gated_activation_other_than_silu_keeps_hf_mlp_and_the_other_kernels(tmp_path):
    # The SwiGLU kernel is silu's only. The trainer passed swiglu=True whatever the activation, so a gelu model was
    # refused with a hint (pass swiglu=False) that its config cannot follow; it now keeps HF's MLP and the rest.
    import torch

    from chronicals.models.swiglu import swiglu_mlp_forward

    model = build_model("tiny-llama", seed=0, hidden_act="gelu_pytorch_tanh")
    prepare_model(model, config(tmp_path, use_fused_kernels=True), torch.device("cpu"))
    layer = model.model.layers[0]
    assert getattr(layer.mlp.forward, "func", None) is not swiglu_mlp_forward
    assert getattr(layer.self_attn.forward, "func", None) is not None  # the fused RoPE attention


def test_model_kwargs_that_do_not_fit_the_preset():
    cfg = ChronicalsConfig(model="tiny-llama", tokenizer="default", model_kwargs={"num_attention_heads": 3})
    with pytest.raises(SetupError, match="model_kwargs"):
        load_model(cfg, load_tokenizer(cfg))


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen3"])
def test_a_misspelt_model_kwargs_key_is_an_error_not_ignored(model):
    # transformers' configs keep any unknown keyword as an attribute, so the typo built the preset's default depth.
    cfg = ChronicalsConfig(model=model, tokenizer="default", model_kwargs={"num_hidden_layerz": 3})
    with pytest.raises(SetupError, match="'num_hidden_layerz'.*did you mean 'num_hidden_layers'"):
        load_model(cfg, load_tokenizer(cfg))
    # A key the config class takes under another name (rope_theta, folded into rope_parameters) still works.
    ok = ChronicalsConfig(model=model, tokenizer="default", model_kwargs={"num_hidden_layers": 1, "rope_theta": 5e5})
    assert load_model(ok, load_tokenizer(ok)).config.num_hidden_layers == 1


@pytest.mark.parametrize("where", ["", "sub"], ids=["is-a-file", "under-a-file"])
def test_an_output_dir_that_is_a_file_is_a_setup_error(tmp_path, where):
    # It was a FileExistsError / NotADirectoryError traceback from the first write, after the data was tokenized.
    (tmp_path / "taken").write_text("")
    out = tmp_path / "taken" / where if where else tmp_path / "taken"
    with pytest.raises(SetupError, match="output_dir.*is a file"):
        ChronicalsTrainer(tiny_model(), tokenizer(), config(tmp_path, output_dir=str(out)))


def test_an_output_dir_this_user_cannot_write_is_a_setup_error(tmp_path, monkeypatch):
    # A PermissionError traceback from the first write, after the data was tokenized. This machine's tests may run as
    # root, who may write anywhere, so the permission is refused through os.access for the parent directory.
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real(p, mode))
    with pytest.raises(SetupError, match="output_dir.*is not writable"):
        ChronicalsTrainer(tiny_model(), tokenizer(), config(tmp_path, output_dir=str(locked / "run")))


def test_trainer_rejects_wrong_argument_types(tmp_path):
    with pytest.raises(TypeError, match="config must be a chronicals.config.ChronicalsConfig"):
        ChronicalsTrainer(tiny_model(), tokenizer(), {"learning_rate": 1})
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        ChronicalsTrainer("tiny-llama", tokenizer(), config(tmp_path))


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"use_fp8": True}, "'use_fp8' needs a GPU with FP8 tensor cores"),
        ({"use_8bit_optimizer": True}, r"'use_8bit_optimizer' is true but 8-bit Adam cannot run here .*; set "
                                       "use_8bit_optimizer: false"),
        ({"mixed_precision": "fp16"}, "'mixed_precision' is 'fp16', which needs a CUDA GPU"),
        ({"param_dtype": "bfloat16", "mixed_precision": "auto"}, "'param_dtype' is 'bfloat16' but this device"),
    ],
)
def test_gpu_only_features_are_refused_clearly_on_cpu(tmp_path, changes, match):
    with pytest.raises(SetupError, match=match):
        ChronicalsTrainer(tiny_model(), tokenizer(), config(tmp_path, **changes))


@pytest.mark.parametrize("targets", [[""], ["all-linear", "q_proj"], ["qkv"]])
def test_lora_targets_that_cannot_work_are_a_setup_error(tmp_path, targets):
    # A SetupError (the CLI's exit 2 with the message), never a bare ValueError from inside LoRAConfig.
    with pytest.raises(SetupError, match="lora_target_modules"):
        ChronicalsTrainer(tiny_model(), tokenizer(), config(tmp_path, use_lora=True, lora_target_modules=targets))


def test_token_ids_beyond_the_models_embedding(tmp_path, tok):
    vocab = tiny_model().get_input_embeddings().num_embeddings
    data = [{"input_ids": [3, 4, vocab, 5]}, {"input_ids": [3, 4, 5]}]
    _fails_before_training(tmp_path, data, tok, f"token id {vocab} but the model's embedding has only {vocab} rows")


@pytest.mark.parametrize("packing", [True, False])
def test_label_ids_beyond_the_models_vocabulary(tmp_path, tok, packing):
    # Without the check: an IndexError deep in the loss, or (fused loss) a NaN blamed on the learning rate.
    vocab = tiny_model().get_input_embeddings().num_embeddings
    data = [{"input_ids": [3, 4, 5, 6], "labels": [-100, 4, vocab, 6]}, {"input_ids": [3, 4, 5]}]
    _fails_before_training(tmp_path, data, tok, f"token id {vocab} but the model's embedding has only {vocab} rows",
                           use_sequence_packing=packing)


@pytest.mark.parametrize("packing", [True, False])
def test_tokenized_rows_train_with_a_tokenizer_that_has_no_pad_token(tmp_path, packing):
    # Base models' tokenizers often have no pad token: padding labels are ignored, so eos pads, as for text rows.
    no_pad = type(tokenizer())(pad_token_id=None, eos_token_id=1)
    trainer = ChronicalsTrainer(tiny_model(), no_pad, config(tmp_path, max_steps=1, use_sequence_packing=packing))
    trainer.train(rows())
    assert (tmp_path / "run" / "metrics.jsonl").exists()


def test_attention_dropout_trains_packed_and_padded(tmp_path):
    # Packed (varlen) attention had no dropout, so a model configured with attention_dropout was refused with
    # packing on; it now applies the dropout per sequence (chronicals.attention), as padded batches do.
    def model():
        return build_model("tiny-llama", seed=0, vocab_size=96, hidden_size=32, intermediate_size=64,
                           num_attention_heads=2, num_key_value_heads=1, attention_dropout=0.1)

    for packing in (True, False):
        trainer = ChronicalsTrainer(model(), tokenizer(), config(tmp_path / str(packing), use_sequence_packing=packing,
                                                                 max_steps=2))
        result = trainer.train(rows(8))
        assert result.steps == 2 and all(math.isfinite(x) for x in result.losses)
