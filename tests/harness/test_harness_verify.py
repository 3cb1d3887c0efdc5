"""verify.check on hand-made step records: each failure is found and named, a clean run passes."""

from __future__ import annotations

from harness.scenario import VerifySpec
from harness.verify import check

SPEC = VerifySpec(loss_rtol=0.02, grad_norm_rtol=0.10, min_weights_changed=0.01)


def steps(losses, norms=None, label=None, real=None):
    norms = norms or [1.0] * len(losses)
    return [{"loss": x, "grad_norm": g, "label_tokens": label or 100, "real_tokens": real or 100}
            for x, g in zip(losses, norms)]


REF = {"loss": {0: 10.0, 1: 9.0, 2: 8.0}, "grad_norm": {0: 1.0, 1: 1.0, 2: 1.0}}


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
    failures = check(steps([10.0, 9.0, 8.0]), 0.5, 3, SPEC, {"loss": {0: 10.0}, "grad_norm": {0: 1.0}})
    assert any("the reference has no loss at this step" in f for f in failures)


def test_a_difference_just_beyond_the_tolerance_reads_as_beyond_it():
    ref = {"loss": {0: 6.25859}, "grad_norm": {0: 2.68566}}
    norm = 2.68566 * 1.1
    assert abs(norm - 2.68566) > 0.10 * 2.68566  # fails on its last bits
    [failure] = check(steps([6.25859], [norm]), 0.5, 1, SPEC, ref)
    assert "relative difference 0.1 >" not in failure, failure
    rel = float(failure.split("relative difference ")[1].split(" >")[0])
    assert rel > 0.10, failure


def test_training_fewer_parameters_than_the_reference_fails():
    clean = steps([10.0, 9.0, 8.0])
    assert check(clean, 0.5, 3, SPEC, REF, trainable_params=1000, reference_params=1000) == []
    assert check(clean, 0.5, 3, SPEC, REF, trainable_params=1200, reference_params=1000) == []  # an untied head: fine
    (failure,) = check(clean, 0.5, 3, SPEC, REF, trainable_params=900, reference_params=1000)
    assert "trains 900 parameters, the reference 1,000" in failure
    assert check(clean, 0.5, 3, SPEC, REF, trainable_params=900) == []  # a reference that did not record it
