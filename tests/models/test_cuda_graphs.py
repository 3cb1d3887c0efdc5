"""`chronicals.apply(..., cuda_graphs=True)`: decoder layers replayed as CUDA graphs compute what the same patched
model computes without them (losses and every gradient over several optimizer steps, LoRA's frozen embeddings,
two forwards before one backward, eval forwards between steps, shapes that change), and everywhere a graph cannot
run (a CPU, no_grad) the layers run as before. The graph tests need CUDA (CHRONICALS_TEST_DEVICE=cuda)."""

import copy
import io
import pickle

import pytest
import torch

import chronicals
from chronicals.models import build_model
from chronicals.models.cuda_graphs import LayerGraphs
from tests.conftest import DEVICE

cuda = pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU (CHRONICALS_TEST_DEVICE=cuda)")


def models(name="tiny-qwen2", dtype=torch.float32):
    """Two copies of one patched model, the second with cuda_graphs."""
    plain = chronicals.apply(build_model(name, seed=0, dtype=dtype).to(DEVICE))
    graphed = chronicals.apply(build_model(name, seed=0, dtype=dtype).to(DEVICE), cuda_graphs=True)
    return plain, graphed


def ids_for(model, seed, shape=(2, 64)):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, shape, generator=gen).to(DEVICE)


def train(model, batches, lr=1e-3):
    """Losses and the final gradients of a few AdamW steps (the harness loop's step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return torch.stack(losses), grads


def assert_same_training(plain, graphed, batches, atol=0.0):
    losses_p, grads_p = train(plain, batches)
    losses_g, grads_g = train(graphed, batches)
    torch.testing.assert_close(losses_g, losses_p, rtol=0, atol=atol)
    assert grads_p.keys() == grads_g.keys()
    for name, g in grads_p.items():
        torch.testing.assert_close(grads_g[name], g, rtol=0, atol=atol, msg=name)


def test_off_the_gpu_the_layers_run_as_before():
    plain, graphed = models()
    batches = [ids_for(plain, s) for s in range(3)]
    assert_same_training(plain, graphed, batches, atol=1e-6)
    assert graphed.chronicals_cuda_graphs.graphed is None or DEVICE == "cuda"


def test_flag_is_checked_and_the_patched_forwards_stay_inside():
    with pytest.raises(TypeError, match="cuda_graphs must be True or False"):
        chronicals.apply(build_model("tiny-llama", seed=0), cuda_graphs=1)
    model = chronicals.apply(build_model("tiny-llama", seed=0), cuda_graphs=True)
    graphs = model.chronicals_cuda_graphs
    assert isinstance(graphs, LayerGraphs) and len(graphs.forwards) == model.config.num_hidden_layers
    # The wrapped forwards are the rms_norm flag's decoder-layer forward; applying again keeps one wrapper.
    assert all(f.func.__name__ == "decoder_layer_forward" for f in graphs.forwards)
    chronicals.apply(model)
    assert all(f.func.__name__ == "decoder_layer_forward" for f in model.chronicals_cuda_graphs.forwards)


def test_training_keeps_no_kv_cache_and_generation_still_works():
    reference = build_model("tiny-llama", seed=0).to(DEVICE)
    model = chronicals.apply(build_model("tiny-llama", seed=0).to(DEVICE), cuda_graphs=True)
    assert model.config.use_cache is False  # a forward that fills a cache could never be a graph
    ids = ids_for(model, 0, (1, 6))
    gen = dict(max_new_tokens=5, do_sample=False)
    assert torch.equal(model.eval().generate(ids, **gen), reference.eval().generate(ids, **gen))


def test_a_patched_model_still_pickles_and_copies():
    model = chronicals.apply(build_model("tiny-llama", seed=0), cuda_graphs=True)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    ids = ids_for(model, 0, (1, 8)).cpu()
    for other in (loaded, copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert other.chronicals_cuda_graphs.layers[0] is other.model.layers[0]
        torch.testing.assert_close(other(input_ids=ids, labels=ids).loss, model(input_ids=ids, labels=ids).loss)


def test_later_layers_take_the_shared_copy_only_of_what_layer_0_was_passed():
    from chronicals.models.cuda_graphs import _shared_in_place

    graphs = LayerGraphs([], [])
    cos, sin, positions, weights = torch.ones(3), torch.ones(3), torch.arange(3), torch.ones(3, requires_grad=True)
    graphs.shared = [torch.zeros(3) for _ in range(4)]
    graphs.passed = [cos, sin, positions, weights]
    other = torch.arange(3)
    got = _shared_in_place(graphs, [cos, sin, other, weights])
    # cos and sin: the copies layer 0's replay filled; a tensor layer 0 was not passed, and one whose gradient must
    # reach the caller, stay the caller's.
    assert got[0] is graphs.shared[0] and got[1] is graphs.shared[1]
    assert got[2] is other and got[3] is weights
    graphs.passed = None  # layer 0 ran eagerly in this forward: nothing was copied, nothing is replaced
    assert all(g is t for g, t in zip(_shared_in_place(graphs, [cos, sin, other, weights]), [cos, sin, other, weights]))


@cuda
@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama"])
def test_graphed_training_is_the_same_computation(name):
    plain, graphed = models(name)
    batches = [ids_for(plain, s) for s in range(5)]
    assert_same_training(plain, graphed, batches)
    assert graphed.chronicals_cuda_graphs.graphed is not None  # captured at the second step, replayed after


@cuda
def test_bf16_training_matches():
    plain, graphed = models("tiny-llama", torch.bfloat16)
    assert_same_training(plain, graphed, [ids_for(plain, s) for s in range(4)])


@cuda
def test_autocast_training_matches():
    # fp32 (master) weights under bf16 autocast, as the trainer runs: captured under autocast and replayed under it.
    plain, graphed = models("tiny-llama")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert_same_training(plain, graphed, [ids_for(plain, s) for s in range(4)])
    graphs = graphed.chronicals_cuda_graphs
    assert graphs.graphed is not None and graphs.keys[0][-1] == torch.bfloat16
    # Without autocast the signature differs: the layers run eagerly, as the plain model's do.
    assert_same_training(plain, graphed, [ids_for(plain, s) for s in range(4, 6)])


@cuda
def test_captures_at_qwen25_layer_shape_with_the_last_loss_alive():
    # The harness's step at Qwen2.5-0.5B's layer shape in bf16 (fused AdamW, clipping, the previous step's loss alive
    # through the next forward). Captured over the parameters themselves, this capture failed ("operation failed due
    # to a previous error during capture"): the live graph's AccumulateGrad nodes were on the default stream.
    model = chronicals.apply(build_model("qwen2.5-0.5b", seed=0, dtype=torch.bfloat16, num_hidden_layers=2).to(DEVICE),
                             cuda_graphs=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    for s in range(3):
        ids = ids_for(model, s, (4, 512))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    graphs = model.chronicals_cuda_graphs
    assert graphs.failed is None and graphs.graphed is not None


@cuda
def test_lora_with_frozen_embeddings():
    from chronicals.lora import LoRAConfig, apply_lora

    plain, graphed = models("tiny-llama")
    config = LoRAConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    for m in (plain, graphed):
        torch.manual_seed(0)
        apply_lora(m, config)
        for p in m.parameters():  # adapters start at B = 0: move them so every gradient is exercised
            if p.requires_grad:
                p.data.normal_(0, 0.02)
    assert_same_training(plain, graphed, [ids_for(plain, s) for s in range(4)])
    assert graphed.chronicals_cuda_graphs.graphed is not None


@cuda
def test_two_forwards_before_one_backward_and_eval_between_steps():
    plain, graphed = models()
    a, b = ids_for(plain, 0), ids_for(plain, 1)
    train(plain, [a, a])
    train(graphed, [a, a])  # captured
    results = []
    for model in (plain, graphed):
        model.train()
        loss = model(input_ids=a, labels=a).loss + 0.5 * model(input_ids=b, labels=b).loss
        with torch.no_grad():
            evaluated = model.eval()(input_ids=b, labels=b).loss
        model.train()
        loss.backward()
        results.append((loss.detach(), evaluated, {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=0)
    for name, g in results[0][2].items():
        torch.testing.assert_close(results[1][2][name], g, rtol=0, atol=0, msg=name)


@cuda
def test_changing_shapes_run_eagerly_then_recapture():
    plain, graphed = models()
    # Captured at the second 64 and replayed at the third; the fourth 48 drops the graphs, which then wait for eight
    # 48s in a row (the 4th to the 11th, captured at the 11th); the 12th is replayed; the 64s after it run eagerly.
    shapes = [(2, 64)] * 3 + [(2, 48)] * 12 + [(2, 64)] * 2
    batches = [ids_for(plain, s, shape) for s, shape in enumerate(shapes)]
    assert_same_training(plain, graphed, batches)
    graphs = graphed.chronicals_cuda_graphs
    assert graphs.graphed is not None and graphs.keys[0][1][0] == (2, 48, plain.config.hidden_size)


@cuda
def test_later_layers_read_the_shared_copies_and_the_callers_tensors_are_never_written():
    # position_ids passed by the caller, one tensor kept across steps (rows at an offset, one sequence each, so the
    # attention stays dense and capturable; this fp32 model's packed attention is a per-sequence loop that reads the
    # sequence boundaries on the host, which a capture cannot hold):
    # the positions, cos/sin and other per-forward tensors are copied into the graphs' own buffers once a forward (at
    # layer 0), and the caller's tensors, including the one passed at the capture, keep their values when a later
    # step passes others. (With the capture's own tensors as the graphs' inputs, as before, `first` was overwritten.)
    plain, graphed = models()
    first = (torch.arange(64) + 5).repeat(2, 1).to(DEVICE)
    second = (torch.arange(64) + 9).repeat(2, 1).to(DEVICE)  # same shape, other positions: other cos/sin
    kept = first.clone()
    steps = [(ids_for(plain, s), first if s < 3 else second) for s in range(5)]
    seen = []
    results = []
    for model in (plain, graphed):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)
        model.train()
        losses = []
        for s, (ids, positions) in enumerate(steps):
            graphs = getattr(model, "chronicals_cuda_graphs", None)
            if s == 3 and model is graphed:  # captured at step 1: record what each layer's graph is handed
                assert graphs.graphed is not None, graphs.failed
                graphs.graphed = [recording(i, g, len(graphs.shared), seen) for i, g in enumerate(graphs.graphed)]
            losses.append(model(input_ids=ids, labels=ids, position_ids=positions).loss)
            losses[-1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        results.append(torch.stack([loss.detach() for loss in losses]))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
    torch.testing.assert_close(first, kept, rtol=0, atol=0)
    graphs = graphed.chronicals_cuda_graphs
    assert graphs.failed is None, graphs.failed
    shared = graphs.shared
    assert shared and len(seen) == 2 * graphed.config.num_hidden_layers  # steps 3 and 4, every layer replayed
    for call in seen:
        if call["layer"] > 0:
            assert all(a is b for a, b in zip(call["others"], shared))
        else:
            assert not any(a is b for a, b in zip(call["others"], shared))


def recording(index, graphed_layer, n_shared, seen):
    def run(*inputs):  # (hidden states, the other tensors, the parameters)
        seen.append({"layer": index, "others": inputs[1:1 + n_shared]})
        return graphed_layer(*inputs)

    return run
