"""Verification of every run, before any of its speed is reported. A run passes when, at every step, the gradient
norm is finite and nonzero, the loss is finite, and the loss is taken over exactly the real tokens of the batch;
when training changed the model's weights; and, for every run but the reference's, when it trains no fewer
parameters than the reference, its loss and gradient norm stay within the scenario's stated relative tolerances
of the reference run's on the same data, step by step, and it learnt its first batch about as well as the
reference did."""

from __future__ import annotations

import math

from .results import Reference
from .scenario import VerifySpec

# The reference's fall on its first batch is compared with only when it is at least this fraction of that batch's
# loss: below it, rounding noise could decide the check.
_MIN_REFERENCE_FALL = 1e-3
# A packed row's last sequence may change its loss by at most this fraction when the sequences before it change: with
# its sequences kept apart the row's last sequence sees the same values through the same kernels (only a reduction's
# order could differ); one attending across sequences moves it by far more (tests' tiny-llama, fp32, after 3 steps:
# 0.47% with the boundaries left out, 0.0 with Chronicals' packed attention).
_MAX_PACKED_LEAK = 1e-4


def check(steps: list[dict], weights_changed: float | None, expected_steps: int, spec: VerifySpec,
          reference: Reference | None = None, trainable_params: int | None = None,
          first_batch_after: float | None = None, packed_leak: float | None = None) -> list[str]:
    """The failures found (empty: verified). `reference`: the reference run's results (None: this is the reference,
    or it failed); `trainable_params` counts the parameter elements this run trains; `first_batch_after` is its loss
    on the first step's batch, evaluated again after the last step; `packed_leak` how much a packed row's last
    sequence's loss moved when the sequences before it changed (loop.packed_leak; None: not packed)."""
    failures: list[str] = []
    if len(steps) != expected_steps:
        failures.append(f"ran {len(steps)} of {expected_steps} steps")

    def first(bad: list[int], what):
        if bad:
            more = f" (and {len(bad) - 1} more steps)" if len(bad) > 1 else ""
            failures.append(f"step {bad[0]}: {what(bad[0])}{more}")

    first([i for i, r in enumerate(steps) if not math.isfinite(r["grad_norm"])],
          lambda i: f"gradient norm is {steps[i]['grad_norm']}")
    first([i for i, r in enumerate(steps) if r["grad_norm"] == 0.0],
          lambda i: "gradient norm is 0: no gradient reaches the trained weights")
    first([i for i, r in enumerate(steps) if not math.isfinite(r["loss"])], lambda i: f"loss is {steps[i]['loss']}")
    first([i for i, r in enumerate(steps) if r["label_tokens"] != r["real_tokens"]],
          lambda i: f"the loss is taken over {steps[i]['label_tokens']} label tokens but the batch has "
                    f"{steps[i]['real_tokens']} real tokens (padding or sequence starts counted as tokens)")
    if weights_changed is None:
        failures.append("the weight change was not measured")
    elif weights_changed < spec.min_weights_changed:
        failures.append(f"weights did not change: {100 * weights_changed:.2f}% of sampled trainable weights moved "
                        f"(at least {100 * spec.min_weights_changed:g}% required)")
    if first_batch_after is not None and not math.isfinite(first_batch_after):
        failures.append(f"the loss on the first batch after training is {first_batch_after}")
    if packed_leak is not None and not packed_leak <= _MAX_PACKED_LEAK:
        failures.append(f"packed sequences are not kept apart: the loss of a packed row's last sequence changed by "
                        f"{100 * packed_leak:.3g}% when the sequences before it changed (at most "
                        f"{100 * _MAX_PACKED_LEAK:g}% allowed)")
    if reference is None:
        return failures
    if trainable_params is not None and reference.params is not None and trainable_params < reference.params:
        # A frozen layer or one left out of the optimizer can stay within the loss and gradient-norm tolerances of
        # a short run (one layer of many moves the gradient norm by a few %), so count what is trained.
        failures.append(f"trains {trainable_params:,} parameters, the reference {reference.params:,}: some "
                        "weights the reference trains are frozen or not given to the optimizer")
    for metric, rtol in (("loss", spec.loss_rtol), ("grad_norm", spec.grad_norm_rtol)):
        ref = reference.curves.get(metric, {})
        bad = [i for i, r in enumerate(steps)
               if i not in ref or not abs(r[metric] - ref[i]) <= rtol * abs(ref[i])]
        first(bad, lambda i, m=metric, t=rtol, ref=ref: _off(m, steps[i][m], ref.get(i), t))
    failures.extend(_learnt(steps, first_batch_after, reference, spec.min_learnt_fraction))
    return failures


def _learnt(steps: list[dict], after: float | None, reference: Reference, min_fraction: float) -> list[str]:
    """On random tokens a short run's loss on new batches hardly moves, so an update that does not train (gradient
    ascent, noise of the gradient's size) stays within the per-step tolerances; the batch it trained on first shows
    it: the reference's loss on that batch falls by far more than rounding noise, and a run must match a fraction of
    that fall. Skipped when the reference's fall is too small to tell from noise."""
    ref_before, ref_after = reference.curves.get("loss", {}).get(0), reference.first_batch_after
    if not steps or after is None or ref_before is None or ref_after is None or min_fraction == 0:
        return []
    # Both falls from the reference's first loss (the same weights and batch, before any step): this run's own first
    # loss is on whatever targets its loss took, and may be up to loss_rtol away.
    ref_fall, fall = ref_before - ref_after, ref_before - after
    if ref_fall < _MIN_REFERENCE_FALL * abs(ref_before) or fall >= min_fraction * ref_fall:
        return []
    return [f"the loss on the first batch went from {ref_before:.6g} to {after:.6g} after training, a fall "
            f"of {fall:.4g} against the reference's {ref_fall:.4g} (at least {min_fraction:g} of it required): the "
            "updates do not train the model as the reference's do"]


def _off(metric: str, value: float, ref: float | None, rtol: float) -> str:
    if ref is None:
        return f"the reference has no {metric} at this step"
    rel = abs(value - ref) / abs(ref) if ref else math.inf
    return f"{metric} {value:.6g} vs reference {ref:.6g}: relative difference {_beyond(rel, rtol)} > tolerance {rtol:g}"


def _beyond(rel: float, rtol: float) -> str:
    """`rel` with enough digits to read as more than the tolerance it exceeds: a value 1.1x the reference against a
    10% tolerance fails on its last bits, and "0.1 > tolerance 0.1" reads as a verification bug."""
    for digits in (3, 6, 9, 17):
        text = f"{rel:.{digits}g}"
        if float(text) > rtol or not math.isfinite(rel):
            return text
    return text
