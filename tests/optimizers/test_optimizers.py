"""FusedAdamW and Adam8bit: same updates as the reference, state dict round trip, clear errors."""

import io

import pytest
import torch

from chronicals.optimizers import Adam8bit, FusedAdamW, create_lora_plus_optimizer, create_optimizer


def _params(device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device).requires_grad_(True) for s in ((7, 5), (5,), (3, 11))]


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.device)


def _saved_and_loaded(state_dict):
    """The state dict after a trip through torch.save / torch.load, as a checkpoint takes it (a plain
    load_state_dict of the live dict would share the moment tensors between the two optimizers)."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _run(opt, params, steps, start=0):
    for i in range(start, start + steps):
        _grads(params, i)
        opt.step()


def test_fused_adamw_uses_the_fused_kernel_and_matches_adamw():
    ours, ref = _params(), _params()
    opt = FusedAdamW(ours, lr=1e-2, weight_decay=0.1)
    assert opt.defaults["fused"] is True  # PyTorch has a fused AdamW for CPU tensors too
    _run(opt, ours, 5)
    _run(torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, foreach=False), ref, 5)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_amsgrad_and_maximize_are_taken_as_torch_adamw_takes_them():
    # FusedAdamW(params, amsgrad=True) failed with "unexpected keyword argument 'amsgrad'"
    for fused in (None, False):
        ours, ref = _params(), _params()
        opt = FusedAdamW(ours, 1e-2, (0.9, 0.99), 1e-8, 0.1, True, maximize=True, fused=fused)
        assert (opt.defaults["amsgrad"], opt.defaults["maximize"]) == (True, True)
        _run(opt, ours, 4)
        _run(torch.optim.AdamW(ref, 1e-2, (0.9, 0.99), 1e-8, 0.1, True, maximize=True, foreach=False), ref, 4)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_group_dicts_holding_generators_keep_their_parameters():
    # {"params": model.parameters()} is a generator: the device check must not use it up before torch.optim does.
    model = torch.nn.Linear(4, 3)
    opt = FusedAdamW([{"params": model.parameters(), "lr": 0.5}])
    assert [len(g["params"]) for g in opt.param_groups] == [2] and opt.param_groups[0]["lr"] == 0.5
    opt = create_optimizer("adamw_fused", [{"params": model.weight}, {"params": iter([model.bias])}], lr=1e-2)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1]
    before = model.weight.detach().clone()
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    assert not torch.equal(model.weight, before)
    with pytest.raises(TypeError, match="got a single tensor; wrap it in a list"):
        FusedAdamW(model.weight)


def test_group_dicts_of_named_parameters_are_accepted_as_torch_adamw_accepts_them():
    # torch.optim takes {"params": model.named_parameters()}; the device check must read the tensors inside the
    # (name, tensor) pairs (it raised AttributeError: 'tuple' object has no attribute 'device').
    model = torch.nn.Linear(4, 3)
    opt = FusedAdamW([{"params": model.named_parameters(), "lr": 0.5}])
    assert opt.defaults["fused"] is True and opt.param_groups[0]["param_names"] == ["weight", "bias"]
    ref_model = torch.nn.Linear(4, 3)
    ref_model.load_state_dict(model.state_dict())
    ref = torch.optim.AdamW([{"params": ref_model.named_parameters(), "lr": 0.5}], foreach=False)
    for m, o in ((model, opt), (ref_model, ref)):
        m(torch.ones(2, 4)).sum().backward()
        o.step()
    torch.testing.assert_close(model.weight, ref_model.weight)


@pytest.mark.parametrize("make", [
    lambda ps: FusedAdamW(ps, lr=1e-2, weight_decay=0.01),
    lambda ps: create_optimizer("adamw", ps, lr=1e-2, weight_decay=0.01),
])
def test_state_dict_round_trip_continues_identically(make):
    params = _params()
    opt = make(params)
    _run(opt, params, 3)
    state = _saved_and_loaded(opt.state_dict())
    twin = [p.detach().clone().requires_grad_(True) for p in params]
    opt_twin = make(twin)
    opt_twin.load_state_dict(state)
    _run(opt, params, 3, start=3)
    _run(opt_twin, twin, 3, start=3)
    for a, b in zip(params, twin):
        assert torch.equal(a, b)


def test_a_torch_adamw_state_dict_keeps_the_fused_kernel_and_steps_under_grad_scaler():
    # A state dict saved by torch.optim.AdamW (e.g. HF Trainer's adamw_torch, resumed with FusedAdamW) carries
    # fused=None, which load_state_dict copied into our groups: the kernel was silently dropped, and GradScaler,
    # which hands a fused optimizer its scale, ended in "AssertionError: Expected grad_scale and found_inf to be None".
    params, twin = _params(), _params()
    source = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    _run(source, params, 3)
    state = _saved_and_loaded(source.state_dict())
    for p, t in zip(params, twin):
        t.data.copy_(p.data)
    opt = FusedAdamW(twin, lr=1.0)
    opt.load_state_dict(state)
    assert [(g["fused"], g["foreach"], g["lr"]) for g in opt.param_groups] == [(True, None, 1e-2)]
    assert state["param_groups"][0]["fused"] is None  # the caller's dict is left as it was
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    for step in (3, 4):
        _grads(twin, step)
        wanted = [t.grad for t in twin]
        opt.zero_grad()
        scaler.scale(sum((t * g).sum() for t, g in zip(twin, wanted))).backward()  # grads: 4 x wanted
        scaler.step(opt)
        scaler.update()
    _run(source, params, 2, start=3)
    for a, b in zip(params, twin):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # and the other way: fused=False stays on foreach after loading a fused optimizer's state
    opt = FusedAdamW(_params(), fused=False)
    opt.load_state_dict(FusedAdamW(_params()).state_dict())
    assert [(g["fused"], g["foreach"]) for g in opt.param_groups] == [(None, True)]


def test_a_tensor_learning_rate_works_without_the_fused_kernel():
    # torch.optim.AdamW takes a tensor lr (or betas) and runs its single-tensor loop; the forced foreach fallback
    # (fused=False, or parameters with no fused kernel) raised "lr as a Tensor is not supported for
    # capturable=False and foreach=True".
    for lr, betas, group_lr in ((torch.tensor(1e-2), (0.9, 0.999), None),
                                (1e-2, (torch.tensor(0.9), torch.tensor(0.99)), None),
                                (1e-3, (0.9, 0.999), torch.tensor(1e-2))):
        ours, ref = _params(), _params()
        extra = {} if group_lr is None else {"lr": group_lr}
        opt = FusedAdamW([{"params": ours, **extra}], lr=lr, betas=betas, fused=False)
        ref_opt = torch.optim.AdamW([{"params": ref, **extra}], lr=lr, betas=betas, foreach=False)
        _run(opt, ours, 5)
        _run(ref_opt, ref, 5)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b)


def test_lora_plus_state_dict_round_trip_keeps_group_learning_rates():
    from chronicals.lora import LoRAConfig, apply_lora
    from chronicals.models import build_model

    def make():
        return apply_lora(build_model("tiny-llama", dtype=torch.float32, seed=0), LoRAConfig(rank=2, alpha=4))

    model, twin = make(), make()
    opt = create_lora_plus_optimizer(model, base_lr=1e-3, lr_ratio=16)
    ids = torch.randint(0, 512, (1, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    twin.load_state_dict(model.state_dict())
    opt_twin = create_lora_plus_optimizer(twin, base_lr=5.0, lr_ratio=2)  # overwritten by the load
    opt_twin.load_state_dict(_saved_and_loaded(opt.state_dict()))
    assert [g["lr"] for g in opt_twin.param_groups] == [g["lr"] for g in opt.param_groups]
    for m in (model, twin):
        m.zero_grad()
        m(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt_twin.step()
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), n


def test_bad_optimizer_inputs_fail_clearly():
    with pytest.raises(ValueError, match="no fused AdamW for parameters on \\['meta'\\]"):
        FusedAdamW([torch.zeros(2, device="meta", requires_grad=True)], fused=True)
    with pytest.raises(ValueError, match="parameters of dtype \\['torch.complex64'\\]"):  # not "on ['cpu']"
        FusedAdamW([torch.zeros(2, dtype=torch.complex64, requires_grad=True)], fused=True)
    with pytest.raises(ValueError, match="got no parameters"):
        FusedAdamW([])
    with pytest.raises(ValueError, match="unknown optimizer 'lion'.*adamw_fused"):
        create_optimizer("lion", _params(), lr=1e-3)
    # A module (nn.Sequential iterates its layers) or a dict of named parameters: torch.optim's TypeError, not an
    # AttributeError from reading .device off a Linear or a str.
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="got a Linear; pass model.parameters\\(\\), not the module"):
        FusedAdamW(model)
    with pytest.raises(TypeError, match="got a Linear; pass model.parameters"):
        create_optimizer("adamw_fused", [{"params": model}], lr=1e-3)
    with pytest.raises(TypeError, match="or parameter-group dicts, got a str"):
        FusedAdamW(dict(model.named_parameters()))
    # torch.optim refuses a group's set (its order, which a saved state maps onto, changes between runs); the
    # group copy made for the device check turned it into a list and let it through.
    with pytest.raises(TypeError, match="ordered collection \\(a list\\), not a set"):
        FusedAdamW([{"params": set(model.parameters())}])


def test_create_optimizer_names_the_bad_hyper_parameter():
    # torch.optim takes an infinite lr or weight_decay (the first step made the weights NaN), and a string, None or a
    # bare beta failed with "'<=' not supported between instances of 'float' and 'str'" or "Value after * must be an
    # iterable, not float", naming no field.
    for kwargs, message in (
        ({"lr": float("inf")}, "optimizer lr must be a number in \\[0, inf\\); got inf"),
        ({"lr": "1e-3"}, "optimizer lr must be a number in \\[0, inf\\); got '1e-3'"),
        ({"lr": 1e-3, "weight_decay": float("inf")}, "optimizer weight_decay must be a number"),
        ({"lr": 1e-3, "weight_decay": None}, "optimizer weight_decay must be a number .*got None"),
        ({"lr": 1e-3, "eps": float("nan")}, "optimizer eps must be a number"),
        ({"lr": 1e-3, "betas": 0.9}, "optimizer betas must be a pair \\(beta1, beta2\\)"),
        ({"lr": 1e-3, "betas": (0.9, 1.0)}, "optimizer betas\\[1\\] must be a number in \\[0, 1.0\\); got 1.0"),
    ):
        for name in ("adamw_fused", "adamw"):
            with pytest.raises(ValueError, match=message):
                create_optimizer(name, _params(), **kwargs)
    # what torch.optim takes still goes through: 0, numpy scalars, tensors, a list of betas
    import numpy as np

    opt = create_optimizer("adamw_fused", _params(), lr=np.float32(0.0), weight_decay=np.float64(0.1),
                           betas=[torch.tensor(0.9), torch.tensor(0.99)])
    assert opt.param_groups[0]["weight_decay"] == 0.1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where no GPU is present")
def test_adam8bit_without_a_gpu_says_so():
    with pytest.raises(RuntimeError, match="Adam8bit needs a CUDA GPU"):
        Adam8bit(_params(), lr=1e-3)


@pytest.mark.gpu
def test_adam8bit_on_gpu_steps_and_round_trips():
    pytest.importorskip("bitsandbytes")
    params = [torch.randn(256, 512, device="cuda", requires_grad=True)]
    opt = create_optimizer("adam8bit", params, lr=1e-3, weight_decay=0.01)
    before = params[0].detach().clone()
    _run(opt, params, 3)
    assert not torch.equal(before, params[0])
    twin = [params[0].detach().clone().requires_grad_(True)]
    opt_twin = Adam8bit(twin, lr=1e-3, weight_decay=0.01)
    opt_twin.load_state_dict(_saved_and_loaded(opt.state_dict()))
    _run(opt, params, 2, start=3)
    _run(opt_twin, twin, 2, start=3)
    torch.testing.assert_close(params[0], twin[0])
    with pytest.raises(ValueError, match="move the model to CUDA"):
        Adam8bit(_params(), lr=1e-3)


def test_fused_adamw_pairs_each_element_with_its_own_grad_and_moments_whatever_the_strides():
    # PyTorch's CPU fused kernel walks raw memory: a grad with other strides than its parameter (assigned by hand,
    # or made by torch.compile), or moments loaded with other strides, were paired with the wrong elements, silently
    # (0.2 off after 20 steps); and a strided-view parameter had the elements between its own overwritten.
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(5, 9, generator=g)
    grads = [torch.randn(5, 9, generator=g) for _ in range(6)]
    ref = w0.clone().requires_grad_(True)
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, foreach=False)
    for grad in grads:
        ref.grad = grad.clone()
        ref_opt.step()
    column_major = w0.t().contiguous().t().requires_grad_(True)
    for p, grad_of in ((w0.clone().requires_grad_(True), lambda x: x.t().contiguous().t()),
                       (column_major, lambda x: x.clone())):
        opt = FusedAdamW([p], lr=1e-2)
        assert opt.defaults["fused"] is True
        for grad in grads:
            p.grad = grad_of(grad)
            opt.step()
        torch.testing.assert_close(p, ref)
    # moments saved contiguous, loaded for a column-major parameter
    p = w0.clone().requires_grad_(True)
    opt = FusedAdamW([p], lr=1e-2)
    for grad in grads[:3]:
        p.grad = grad.clone()
        opt.step()
    state = _saved_and_loaded(opt.state_dict())
    assert state["state"][0]["exp_avg"].is_contiguous()
    twin = p.detach().t().contiguous().t().requires_grad_(True)
    opt = FusedAdamW([twin], lr=1e-2)
    opt.load_state_dict(state)
    for grad in grads[3:]:
        twin.grad = grad.t().contiguous().t()
        opt.step()
    torch.testing.assert_close(twin, ref)
    # a strided view: not fused, and the elements between its own are left alone
    buffer = torch.zeros(6, 8)
    view = buffer[:, ::2].requires_grad_(True)
    opt = FusedAdamW([view], lr=1.0, weight_decay=0.0)
    assert opt.defaults["fused"] is None
    view.grad = torch.ones(6, 4)
    opt.step()
    torch.testing.assert_close(buffer[:, ::2], torch.full((6, 4), -1.0))
    assert (buffer[:, 1::2] == 0).all()
    with pytest.raises(ValueError, match="strided views \\(strides \\(8, 2\\)"):
        FusedAdamW([view], fused=True)


def test_groups_added_after_construction_step_as_torch_adamw_steps_them():
    # A group with a tensor lr added to a foreach FusedAdamW failed its first step ("lr as a Tensor is not supported
    # for capturable=False and foreach=True"; torch.optim.AdamW runs it), and one the fused kernel cannot take
    # failed at step with "`fused=True` requires ...", an option the caller never set.
    for fused in (None, False):
        ours, ref = _params(), _params()
        opt = FusedAdamW(ours[:1], lr=1e-2, fused=fused)
        ref_opt = torch.optim.AdamW(ref[:1], lr=1e-2, foreach=False)
        _run(opt, ours, 2)
        _run(ref_opt, ref, 2)
        for o, ps in ((opt, ours), (ref_opt, ref)):
            o.add_param_group({"params": iter(ps[1:]), "lr": torch.tensor(3e-2), "betas": (0.5, 0.9)})
        _run(opt, ours, 3, start=2)
        _run(ref_opt, ref, 3, start=2)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b)
    opt = FusedAdamW(_params())
    with pytest.raises(ValueError, match="add_param_group: .*parameters of dtype \\['torch.complex64'\\].*fused=False"):
        opt.add_param_group({"params": [torch.zeros(2, dtype=torch.complex64, requires_grad=True)]})


@pytest.mark.parametrize("fused", [None, False])
def test_a_state_saved_for_other_parameters_is_refused_with_the_shapes(fused):
    # torch.optim maps a saved state onto the parameters by position and loads moments of any shape: the fused
    # kernel then read and wrote past the smaller ones (NaN weights, then "free(): invalid size" aborting Python),
    # and foreach said "output with shape [5] doesn't match the broadcast shape [7, 5]".
    params = _params()
    opt = FusedAdamW(params, fused=fused)
    _run(opt, params, 1)
    state = _saved_and_loaded(opt.state_dict())
    swapped = [params[1].detach().clone().requires_grad_(True), params[0].detach().clone().requires_grad_(True),
               params[2].detach().clone().requires_grad_(True)]
    other = FusedAdamW(swapped, fused=fused)
    with pytest.raises(ValueError, match="its 'exp_avg' for parameter 0 of group 0 has shape \\(7, 5\\), the "
                                         "parameter \\(5,\\); it was saved for another model, or with the parameters"):
        other.load_state_dict(state)
    assert not other.state  # nothing was loaded
    transposed = [torch.zeros(5, 7, requires_grad=True), *swapped[:1], swapped[2]]  # same numel, other shape
    with pytest.raises(ValueError, match="has shape \\(7, 5\\), the parameter \\(5, 7\\)"):
        FusedAdamW(transposed, fused=fused).load_state_dict(state)


def test_the_state_of_another_optimizer_is_refused_on_load():
    # An 8-bit Adam checkpoint (state1/state2) resumed with AdamW loaded, then failed the first step with
    # KeyError: 'exp_avg'.
    params = [torch.zeros(4, 3, requires_grad=True)]
    bnb_like = {"state": {0: {"step": 3, "state1": torch.zeros(4, 3), "state2": torch.zeros(4, 3)}},
                "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "params": [0]}]}
    sgd = torch.optim.SGD(_params(), lr=0.1, momentum=0.9)
    _run(sgd, sgd.param_groups[0]["params"], 1)
    for state, held in ((bnb_like, "\\['state1', 'state2', 'step'\\]"), (sgd.state_dict(), "\\['momentum_buffer'\\]")):
        opt = FusedAdamW(params if state is bnb_like else _params())
        with pytest.raises(ValueError, match=f"not AdamW's: parameter 0 of group 0 holds {held}, not exp_avg"):
            opt.load_state_dict(state)
