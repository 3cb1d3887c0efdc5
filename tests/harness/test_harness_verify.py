"""verify.check on hand-made step records: each failure is found and named, a clean run passes."""

from __future__ import annotations

from dataclasses import replace

from harness.results import Reference
from harness.scenario import VerifySpec
from harness.verify import check

SPEC = VerifySpec(loss_rtol=0.02, grad_norm_rtol=0.10, min_weights_changed=0.01)


def steps(losses, norms=None, label=None, real=None):
    norms = norms or [1.0] * len(losses)
    return [{"loss": x, "grad_norm": g, "label_tokens": label or 100, "real_tokens": real or 100}
            for x, g in zip(losses, norms)]


CURVES = {"loss": {0: 10.0, 1: 9.0, 2: 8.0}, "grad_norm": {0: 1.0, 1: 1.0, 2: 1.0}}
REF = Reference(CURVES, params=None, first_batch_after=None)


def test_clean_run_passes_within_tolerance():
    assert check(steps([10.1, 8.95, 8.1], [1.05, 0.95, 1.0]), 0.5, 3, SPEC, REF) == []
    assert check(steps([10.0, 9.0, 8.0]), 0.5, 3, SPEC) == []  # the reference itself: no comparison


def test_each_failure_is_named():
    cases = [
        (steps([10.0, 9.0, 8.0], [1.0, 0.0, 1.0]), 0.5, "step 1: gradient norm is 0"),
        (steps([10.0, 9.0, 8.0], [1.0, float("nan"), 1.0]), 0.5, "step 1: gradient norm is nan"),
        (steps([10.0, float("inf"), 8.0]), 0.5, "step 1: loss is inf"),
        (steps([10.0, 9.0, 8.0], label=130, real=100), 0.5, "130 label tokens but the batch has 100 real tokens"),
        (steps([10.0, 9.0, 8.0]), 0.0, "weights did not change: 0.00%"),
        (steps([10.0, 9.0, 8.5]), 0.5, "step 2: loss 8.5 vs reference 8"),
        (steps([10.0, 9.0, 8.0], [1.0, 1.0, 1.2]), 0.5, "step 2: grad_norm 1.2 vs reference 1"),
        (steps([10.0, 9.0]), 0.5, "ran 2 of 3 steps"),
    ]
    for records, moved, words in cases:
        failures = check(records, moved, 3, SPEC, REF)
        assert any(words in f for f in failures), (words, failures)


def test_tolerance_is_relative_and_inclusive_at_the_bound():
    assert check(steps([10.2, 9.0, 8.0]), 0.5, 3, SPEC, REF) == []
    assert check(steps([10.21, 9.0, 8.0]), 0.5, 3, SPEC, REF) != []


def test_a_reference_missing_steps_fails():
    failures = check(steps([10.0, 9.0, 8.0]), 0.5, 3, SPEC, Reference({"loss": {0: 10.0}, "grad_norm": {0: 1.0}},
                                                                      None, None))
    assert any("the reference has no loss at this step" in f for f in failures)


def test_a_difference_just_beyond_the_tolerance_reads_as_beyond_it():
    ref = Reference({"loss": {0: 6.25859}, "grad_norm": {0: 2.68566}}, None, None)
    norm = 2.68566 * 1.1
    assert abs(norm - 2.68566) > 0.10 * 2.68566  # fails on its last bits
    [failure] = check(steps([6.25859], [norm]), 0.5, 1, SPEC, ref)
    assert "relative difference 0.1 >" not in failure, failure
    rel = float(failure.split("relative difference ")[1].split(" >")[0])
    assert rel > 0.10, failure


def test_training_fewer_parameters_than_the_reference_fails():
    clean = steps([10.0, 9.0, 8.0])
    counted = REF._replace(params=1000)
    assert check(clean, 0.5, 3, SPEC, counted, trainable_params=1000) == []
    assert check(clean, 0.5, 3, SPEC, counted, trainable_params=1200) == []  # an untied head: fine
    (failure,) = check(clean, 0.5, 3, SPEC, counted, trainable_params=900)
    assert "trains 900 parameters, the reference 1,000" in failure
    assert check(clean, 0.5, 3, SPEC, REF, trainable_params=900) == []  # a reference that did not record it


def test_a_run_that_does_not_learn_its_first_batch_as_the_reference_did_fails():
    clean = steps([10.0, 9.0, 8.0])
    learnt = REF._replace(first_batch_after=7.0)  # the reference's loss on batch 0 fell from 10 to 7
    assert check(clean, 0.5, 3, SPEC, learnt, first_batch_after=7.1) == []
    assert check(clean, 0.5, 3, SPEC, learnt, first_batch_after=8.5) == []  # half the fall: the bound, inclusive
    (failure,) = check(clean, 0.5, 3, SPEC, learnt, first_batch_after=10.2)  # ascent: it rose
    assert "went from 10 to 10.2 after training, a fall of -0.2 against the reference's 3" in failure
    assert check(clean, 0.5, 3, SPEC, learnt, first_batch_after=8.51) != []
    # The fall is from the reference's first loss: a run's own first loss (here 1.9% higher, on whatever targets its
    # loss took) lends it no extra fall.
    assert check(steps([10.19, 9.0, 8.0]), 0.5, 3, SPEC, learnt, first_batch_after=8.6) != []
    assert check(clean, 0.5, 3, replace(SPEC, min_learnt_fraction=0.0), learnt, first_batch_after=10.2) == []  # off
    # A reference whose fall is within noise (here 1e-4 of 10) is not compared with; nor one that did not record it.
    assert check(clean, 0.5, 3, SPEC, REF._replace(first_batch_after=9.999), first_batch_after=10.5) == []
    assert check(clean, 0.5, 3, SPEC, REF, first_batch_after=10.5) == []
    (failure,) = check(clean, 0.5, 3, SPEC, first_batch_after=float("nan"))  # the reference's own run
    assert "the loss on the first batch after training is nan" in failure
