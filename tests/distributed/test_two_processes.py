"""Two gloo processes on CPU train the tiny model as one process does with the same global batch (FSDP2 for the
full fine-tune, DDP for LoRA), the fused loss sees the whole lm_head, a 2-rank checkpoint resumes, and the
gathered export loads with from_pretrained.

Tolerance: losses and gradient norms within 1e-4 relative. Both runs are fp32 and compute the same sums; they
differ only in summation order (two half-batches reduced over ranks vs one batch), a ~1e-7 effect.
"""

import json
from pathlib import Path

import dist_worker
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def test_two_gloo_processes(tmp_path):
    # One test, so that the processes start once even when pytest-xdist spreads tests over workers; each check
    # below is a function of its own and names what failed.
    ranks = dist_worker.spawn(2, tmp_path / "two")
    (one,) = dist_worker.spawn(1, tmp_path / "one")
    runs = ranks, one, tmp_path
    check_fsdp2_losses_match_one_process(runs)
    check_fused_loss_sees_the_whole_lm_head_under_fsdp2(runs)
    check_two_rank_checkpoint_resumes_to_the_same_loss(runs)
    check_export_gathers_one_loadable_model(runs)
    check_ddp_lora_with_accumulation_matches_one_process(runs)
    check_fsdp2_lora_matches_and_exports_a_peft_adapter(runs)
    check_resuming_a_two_rank_checkpoint_with_one_process_is_refused(runs, tmp_path / "refused")
    check_ctrl_c_on_one_rank_stops_every_rank_after_the_same_step(runs)
    check_a_short_last_batch_is_split_over_the_ranks_as_one_process_trains_it(runs)
    check_every_rank_resumes_its_own_random_state(runs)
    check_activation_offload_under_fsdp2_matches_one_process(runs)
    check_ranks_whose_models_differ_train_rank_0s_model(runs)
    check_ranks_with_other_configs_or_data_are_refused_naming_what_differs(runs)
    check_a_data_warning_is_printed_once_not_once_per_rank(runs)
    check_evaluation_over_two_ranks_matches_one_process(runs)


def test_a_process_group_started_by_the_caller_is_used(tmp_path):
    # torch.multiprocessing + init_process_group sets no RANK / WORLD_SIZE: the trainer read only those, so each
    # process trained alone (strategy "none", world size 1) on the whole data, both writing one output_dir.
    ranks = dist_worker.spawn_own_group(2, tmp_path)
    assert [r["env"] for r in ranks] == [[0, 2], [1, 2]]
    assert [r["strategy"] for r in ranks] == ["fsdp2", "fsdp2"]
    assert ranks[0]["losses"] == ranks[1]["losses"]  # one training, its loss reduced over the ranks


def check_fsdp2_losses_match_one_process(runs):
    ranks, one, _ = runs
    for run in ("full", "untied"):
        two = ranks[0][run]
        assert two["strategy"] == "fsdp2" and one[run]["strategy"] == "none"
        assert two["label_tokens"] == one[run]["label_tokens"]  # the same global batches, split in two
        assert two["losses"] == pytest.approx(one[run]["losses"], rel=1e-4), run
        assert two["grad_norms"] == pytest.approx(one[run]["grad_norms"], rel=1e-4), run
        assert ranks[1][run]["losses"] == two["losses"]  # logged values are reduced, so every rank agrees
    assert one["full"]["losses"][0] != pytest.approx(one["full"]["losses"][-1], rel=1e-3)  # it did train


def check_fused_loss_sees_the_whole_lm_head_under_fsdp2(runs):
    ranks, _, _ = runs
    for rank in ranks:
        for run in ("full", "untied"):
            seen = rank[run]["lm_head_seen"]
            assert seen, "the fused loss path never ran"
            # [V, d] as a plain tensor: FSDP2 gathered the root unit holding the lm_head, not a [V/2, d] shard.
            assert all(kind != "DTensor" and shape == [dist_worker.VOCAB, 32] for kind, shape in seen), (run, seen)
            assert rank[run]["sharded_in_forward"] == [], run


def check_two_rank_checkpoint_resumes_to_the_same_loss(runs):
    ranks, _, _ = runs
    full, resumed = ranks[0]["full"], ranks[0]["resume"]
    assert len(resumed["losses"]) == 1  # only step 3 runs after checkpoint-2
    assert resumed["losses"][0] == pytest.approx(full["losses"][2], rel=1e-5)


def check_export_gathers_one_loadable_model(runs):
    from transformers import AutoModelForCausalLM

    ranks, one, root = runs
    gathered, alone = Path(ranks[0]["full"]["final_model"]), Path(one["full"]["final_model"])
    # What save_pretrained writes for one process: config.json naming the model class (serving stacks pick the
    # class from it) and generation_config.json (eos tokens and sampling defaults of generate).
    assert sorted(p.name for p in gathered.iterdir()) == sorted(p.name for p in alone.iterdir())
    for name in ("config.json", "generation_config.json"):
        assert json.loads((gathered / name).read_text()) == json.loads((alone / name).read_text()), name
    # Weights held in bf16: config.json said float32 (the dtype the model was built in), so from_pretrained's
    # dtype="auto" loaded the gathered bf16 weights as fp32, where one process's export loads as bf16.
    gathered, alone = Path(ranks[0]["bf16_export"]["final_model"]), Path(one["bf16_export"]["final_model"])
    assert json.loads((alone / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((gathered / "config.json").read_text()) == json.loads((alone / "config.json").read_text())
    exported = AutoModelForCausalLM.from_pretrained(ranks[0]["full"]["final_model"])
    reference = AutoModelForCausalLM.from_pretrained(one["full"]["final_model"])
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()  # re-tied
    ref = reference.state_dict()
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(value, ref[name], rtol=1e-3, atol=1e-5, msg=name)


def check_ddp_lora_with_accumulation_matches_one_process(runs):
    ranks, one, _ = runs
    assert ranks[0]["lora"]["strategy"] == "ddp"
    assert ranks[0]["lora"]["losses"] == pytest.approx(one["lora"]["losses"], rel=1e-4)
    assert ranks[0]["lora"]["grad_norms"] == pytest.approx(one["lora"]["grad_norms"], rel=1e-4)


def check_fsdp2_lora_matches_and_exports_a_peft_adapter(runs):
    from peft import PeftModel

    ranks, one, _ = runs
    two = ranks[0]["lora_fsdp2"]
    assert two["strategy"] == "fsdp2"
    assert two["losses"] == pytest.approx(one["lora_fsdp2"]["losses"], rel=1e-4)
    loaded = PeftModel.from_pretrained(dist_worker.model(), two["final_model"])
    reference = PeftModel.from_pretrained(dist_worker.model(), one["lora_fsdp2"]["final_model"])
    adapters = {n: p for n, p in reference.named_parameters() if "lora_" in n}
    assert adapters
    for name, value in loaded.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(value, adapters[name], rtol=1e-3, atol=1e-5, msg=name)
    assert any(v.abs().sum() > 0 for n, v in adapters.items() if "lora_B" in n)  # training moved the adapters


def check_resuming_a_two_rank_checkpoint_with_one_process_is_refused(runs, tmp_path):
    from chronicals.training import ChronicalsTrainer, SetupError

    ranks, _, root = runs
    checkpoint = root / "two" / "runs" / "full" / "checkpoint-2"
    trainer = ChronicalsTrainer(dist_worker.model(), dist_worker.tokenizer(),
                                dist_worker.config(tmp_path, resume_from_checkpoint=str(checkpoint)))
    with pytest.raises(SetupError, match=r"saved by 2 process\(es\) but this run has 1.*nproc_per_node=2"):
        trainer.train(dist_worker.rows())


def check_ctrl_c_on_one_rank_stops_every_rank_after_the_same_step(runs):
    ranks, _, _ = runs
    for rank in ranks:
        assert rank["stop"]["steps"] == 1 and rank["stop"]["interrupted"], rank["stop"]
        assert rank["stop"]["checkpoint"].endswith("checkpoint-1")


def check_a_short_last_batch_is_split_over_the_ranks_as_one_process_trains_it(runs):
    # Dropping it gave the two ranks 2 steps per epoch where one process has 3 (another epoch boundary, other losses).
    # A last step of one row left one rank without a row: the ranks dropped it. That rank now runs a stand-in row
    # with no label, and FSDP2's collectives see every rank.
    ranks, one, _ = runs
    for run in ("short_last_batch", "one_row_last_batch"):
        two, alone = ranks[0][run], one[run]
        assert two["label_tokens"] == alone["label_tokens"] and len(alone["losses"]) == 3, run
        assert two["losses"] == pytest.approx(alone["losses"], rel=1e-4), run
        assert two["grad_norms"] == pytest.approx(alone["grad_norms"], rel=1e-4), run


def check_every_rank_resumes_its_own_random_state(runs):
    # Only rank 0's generators were saved and every rank was given them: rank 1's dropout masks then differed from
    # the uninterrupted run's, and so did the loss of step 3.
    ranks, _, _ = runs
    for run in ("dropout_ddp", "dropout_fsdp2"):
        uninterrupted, resumed = ranks[0][run]["losses"], ranks[0][run]["resumed"]
        assert len(resumed) == 1 and resumed[0] == pytest.approx(uninterrupted[2], rel=1e-6), run


def check_activation_offload_under_fsdp2_matches_one_process(runs):
    # OffloadActivations read every parameter's storage, which FSDP2's DTensor shards do not have: a RuntimeError
    # ("invalid python storage") in the first forward.
    ranks, one, _ = runs
    two = ranks[0]["offload"]
    assert two["strategy"] == "fsdp2"
    assert two["losses"] == pytest.approx(one["offload"]["losses"], rel=1e-4)
    assert two["grad_norms"] == pytest.approx(one["offload"]["grad_norms"], rel=1e-4)


def check_ranks_whose_models_differ_train_rank_0s_model(runs):
    # Each rank built its model with its own seed. DDP broadcasts rank 0's weights; fully_shard kept each rank's slice
    # of its own copy, so FSDP2 trained a patchwork of both models, silently (other losses than one process given
    # rank 0's model).
    ranks, one, _ = runs
    for run in ("rank_models_fsdp2", "rank_models_ddp"):
        two = ranks[0][run]
        assert two["strategy"] == run.rsplit("_", 1)[1], run
        assert two["losses"] == pytest.approx(one[run]["losses"], rel=1e-4), run
        assert two["grad_norms"] == pytest.approx(one[run]["grad_norms"], rel=1e-4), run


def check_ranks_with_other_configs_or_data_are_refused_naming_what_differs(runs):
    # Nothing compared them: ranks with another seed drew other data orders (rows trained twice or never), another
    # learning_rate updated each shard at its own rate, other data gave each rank its own batches, all silently; other
    # max_steps or gradient_accumulation_steps waited in a collective until the timeout (a bare gloo/NCCL error).
    ranks, one, _ = runs
    assert one["rank_settings"] == {"config": None, "data": None, "eval": None}
    for rank in ranks:
        errors = rank["rank_settings"]
        assert "the config (ChronicalsConfig) differs between the processes: 'seed' is 0 on rank 0, 1 on rank 1." \
            in errors["config"], errors
        assert "'learning_rate'" not in errors["config"]  # only what differs is named
        assert "the training data differs between the processes: 'rows' is 32 on rank 0, 31 on rank 1" \
            in errors["data"], errors
        assert "the evaluation data differs between the processes: 'rows' is 8 on rank 0, 7 on rank 1" \
            in errors["eval"], errors


def check_a_data_warning_is_printed_once_not_once_per_rank(runs):
    # Every rank prepares the data (the others from rank 0's cache) and every rank printed its warnings: on 8 GPUs
    # the same "sequence(s) longer than max_seq_length" eight times, where the metrics and messages come from rank 0.
    ranks, one, _ = runs
    assert len(one["data_warnings"]) == 1, one["data_warnings"]
    assert ranks[0]["data_warnings"] == one["data_warnings"]
    assert ranks[1]["data_warnings"] == []


def check_evaluation_over_two_ranks_matches_one_process(runs):
    # Each rank scores its share of the rows and the sums are reduced: every rank reports the loss one process does,
    # also when one rank has no row of its own (it runs a stand-in without labels, or FSDP2's gathers would hang).
    ranks, one, _ = runs
    for run in ("eval_fsdp2", "eval_ddp"):
        two, alone = ranks[0][run], one[run]
        assert two["strategy"] == run.split("_")[1], run
        assert [e[0] for e in two["evals"]] == [2, 3] and [e[2] for e in two["evals"]] == [e[2] for e in alone["evals"]]
        assert [e[1] for e in two["evals"]] == pytest.approx([e[1] for e in alone["evals"]], rel=1e-4), run
        assert two["one_row"] == pytest.approx(alone["one_row"], rel=1e-4), run
        assert ranks[1][run]["one_row"] == two["one_row"], run
