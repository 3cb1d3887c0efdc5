"""ChronicalsTrainer: `ChronicalsTrainer(model, tokenizer, config).train(train_dataset)`.

The loop is nanoGPT-shaped: a plan of optimizer steps (batches.py), `_launch_step` and `_update` for one step and
`_finish_step` to read it, then logging and checkpointing around it. One optimizer step =
`gradient_accumulation_steps` micro-batches whose losses are each sum(token losses) / N, N = the valid label tokens
of the WHOLE step (all micro-batches, all ranks), so the summed gradients equal those of one big batch exactly; the
model computes that reduction when given `num_items_in_batch=N` (HF's loss and chronicals' fused loss both do).

GPU-friendliness: batches are collated on the host (the token counts come from there, with no device sync),
copied from pinned memory with non_blocking, and the only host sync per step is one read of (loss, grad norm). With
PyTorch's fused AdamW on one process and a CUDA device (the default optimizer) that read is one step late: a step
whose loss or gradient norm is not finite is skipped on the device (the optimizer's `found_inf`), and the host reads
step N's values after enqueueing step N+1's forward and backward, so it runs ahead of the GPU instead of waiting for
it (`_run_ahead`). A packed batch's layout then stays on the host, where the patched model validates it without a
device sync. Checkpoints, evaluations and the last step read their step's values first.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import shutil
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from chronicals.config import ChronicalsConfig

from . import checkpoint, dist_checkpoint, distributed, export, parallel
from .batches import StepPlan
from .build import (
    SetupError,
    autocast_dtype,
    build_optimizer,
    check_optional_packages,
    check_output_dir,
    load_model,
    load_tokenizer,
    prepare_model,
)
from .dataset import DataError, check_token_ids, prepare_training_data
from .flops import attention_flops, matmul_params, peak_flops
from .logger import MetricsLogger
from .offload import OffloadActivations
from .schedule import build_scheduler

_PACKED_LAYOUT = ("cu_seq_lens_q", "cu_seq_lens_k", "position_ids")


class NonFiniteError(RuntimeError):
    """A step produced a NaN or inf loss or gradient and the config says stop (on_nonfinite: stop)."""


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    interrupted: bool = False
    checkpoint: str | None = None
    final_model: str | None = None
    eval_metrics: dict[str, Any] | None = None  # the last evaluation's (eval_loss, eval_perplexity, eval_tokens...)


@dataclass
class _Launched:
    """An optimizer step whose work is enqueued: its (loss, grad norm) are read by `_finish_step`."""
    step: int
    epoch: int
    values: torch.Tensor  # [loss, grad norm]: on the host, or being copied there until `ready` has passed
    ready: Any  # a CUDA event recorded after that copy, or None when `values` can be read now
    skipped: bool | None  # decided at launch (values read then), or None: decided from the values on the device
    lr: float
    label_tokens: int
    seq_lens: list[int]  # real (non-padding) sequence lengths, for the attention FLOPs
    grad_scale: torch.Tensor | None = None  # the clipping, as fused Adam's divisor of the gradients (_clips_in_step)


class ChronicalsTrainer:
    """Trains `model` (a transformers causal LM) as `config` says. model None builds it from `config.model` as
    `chronicals train` does (a preset shape, randomly initialised, or a checkpoint), and tokenizer None with it loads
    `config.tokenizer` (for a preset, the embedded one)."""

    def __init__(self, model: nn.Module | None, tokenizer, config: ChronicalsConfig):
        if not isinstance(config, ChronicalsConfig):
            raise TypeError(f"config must be a chronicals.config.ChronicalsConfig, got {type(config).__name__}")
        if model is None:
            tokenizer = load_tokenizer(config) if tokenizer is None else tokenizer
            model = load_model(config, tokenizer)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (a transformers causal LM) or None (built from the "
                            f"config's 'model'), got {type(model).__name__}")
        self.config = config
        self.tokenizer = tokenizer
        check_optional_packages(config)
        check_output_dir(config)
        self.env = distributed.detect()
        self.device = distributed.device_for(self.env, config.device)
        if self.device.type == "cpu" and config.cpu_threads is not None:
            torch.set_num_threads(config.cpu_threads)
        distributed.setup(self.env, self.device)
        distributed.check_same_on_every_rank("the config (ChronicalsConfig)", _rank_config(config), self.env)
        self.amp_dtype = autocast_dtype(config, self.device)
        _seed_everything(config.seed)
        self.model = prepare_model(model, config, self.device)
        self.strategy = parallel.resolve_strategy(config, self.env)
        self.forward_model = parallel.wrap(self.model, self.strategy, self.device, self.amp_dtype)
        if config.use_torch_compile:
            self.forward_model = torch.compile(self.forward_model)
        self.optimizer = build_optimizer(self.model, config)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.scheduler = None
        self._learning_rate = config.learning_rate  # the base of the logged lr: a resumed run's is its checkpoint's
        self._kept_settings: dict[str, Any] = {}  # optimizer settings a resume keeps over this config's (saved too)
        self.last_checkpoint: Path | None = None
        self._stop_requested = False
        self._step_clock: float | None = None  # when the current step began, its batches' collation included
        self._run_ahead = False  # set by train(): read each step's (loss, grad norm) one step late (module docstring)
        self._flops_per_token = (4 if config.use_lora else 6) * matmul_params(self.model)
        mc = self.model.config
        self._layers = mc.num_hidden_layers
        head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
        self._attn_dim = mc.num_attention_heads * head_dim
        self._peak = peak_flops(self.device)

    # ---- the run ---------------------------------------------------------------------------------------------------
    def train(self, train_dataset, eval_dataset=None) -> TrainResult:
        """Train on `train_dataset`; `eval_dataset` (or the config's eval_dataset) is evaluated every eval_steps
        optimizer steps and at the end."""
        cfg = self.config
        data = self._prepare(train_dataset, "training data")
        eval_source = eval_dataset if eval_dataset is not None else cfg.eval_dataset
        if cfg.eval_steps and eval_source is None:
            raise SetupError(f"config field 'eval_steps' is {cfg.eval_steps} but there is no evaluation data; set "
                             "eval_dataset (or pass eval_dataset= to train), or eval_steps: 0")
        eval_data = self._prepare_eval(eval_source) if eval_source is not None else None
        batch_size = parallel.micro_batch_size(cfg, self.env)
        try:
            plan = StepPlan(data.rows, data.collator, batch_size=batch_size, seed=cfg.seed, env=self.env,
                            gradient_accumulation_steps=cfg.gradient_accumulation_steps)
        except ValueError as e:
            raise DataError(f"training data: {e}") from e
        total = cfg.max_steps if cfg.max_steps > 0 else plan.steps_per_epoch * cfg.epochs
        self.scheduler = build_scheduler(self.optimizer, warmup_steps=cfg.warmup_steps, total_steps=total,
                                         schedule=cfg.lr_schedule, min_lr_ratio=cfg.min_lr_ratio)
        state = {"step": 0, "epoch": 0, "step_in_epoch": 0}
        self._data_summary = _data_summary(data.rows, plan.steps_per_epoch)
        distributed.check_same_on_every_rank("the training data", self._data_summary, self.env)
        changed_data = kept_settings = None
        if cfg.resume_from_checkpoint:
            path = checkpoint.resolve(cfg.resume_from_checkpoint, cfg.output_dir)
            dist_checkpoint.check_resumable(path, self.env, self.strategy)
            # Before the load: 8-bit Adam's state is not AdamW's, and either way round it failed late, or deep inside
            # bitsandbytes at the first step, without naming the setting.
            changed_optimizer = _changed_optimizer(checkpoint.read_state(path).get("config") or {}, cfg)
            if changed_optimizer:
                raise SetupError(f"checkpoint {str(path)!r} was saved with {changed_optimizer}: its optimizer state "
                                 "is the other optimizer's (8-bit Adam keeps state1/state2, AdamW exp_avg/exp_avg_sq), "
                                 "which this run's cannot continue; resume with the value it was saved with")
            try:  # another model's or LoRA setup's checkpoint: a SetupError (the CLI's one-line error), no traceback
                if self.strategy == "fsdp2":
                    saved = dist_checkpoint.load_sharded(path, model=self.model, optimizer=self.optimizer,
                                                         scheduler=self.scheduler, rank=self.env.rank)
                else:
                    saved = checkpoint.load_checkpoint(path, model=self.model, optimizer=self.optimizer,
                                                       scheduler=self.scheduler, scaler=self.scaler,
                                                       rank=self.env.rank)
            except SetupError:
                raise
            except ValueError as e:
                raise SetupError(str(e)) from e
            rescaled = _changed_lora_scale(saved.get("config") or {}, cfg)
            if rescaled:
                raise SetupError(f"checkpoint {str(path)!r} trained its adapters with {rescaled}: the adapters' "
                                 "scale (alpha / rank, or alpha / sqrt(rank) under rsLoRA) would change, so the "
                                 "resumed model would not be the saved one; resume with the values it was saved with")
            state = {k: saved[k] for k in state}
            _check_position(path, saved, state, plan.steps_per_epoch, cfg)
            changed_data = _changed_data(saved.get("data"), self._data_summary)
            self._kept_settings = _kept_optimizer_settings(saved.get("config") or {}, cfg)
            kept_settings = _changed_settings(saved.get("config") or {}, cfg, self._kept_settings)
            self._learning_rate = self._kept_settings.get("learning_rate", cfg.learning_rate)
            self.last_checkpoint = path
        out = Path(cfg.output_dir)
        if self.env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(cfg.to_yaml())
        logger = MetricsLogger(out, total_steps=total, initial_step=state["step"], logging_steps=cfg.logging_steps,
                               progress_bar=cfg.progress_bar, tensorboard=cfg.tensorboard, enabled=self.env.is_main)
        where = f"{self.env.world_size} processes ({self.strategy}, {self.device.type})" if self.env.enabled \
            else str(self.device)
        stale = None if cfg.resume_from_checkpoint else checkpoint.find_latest(out)
        if stale is not None:
            # HF Trainer keeps quiet here; but a later resume_from_checkpoint=latest would pick the newest step, which
            # may be this earlier run's checkpoint rather than one of this run's.
            logger.message(f"warning: {out} already holds {stale.name} from an earlier run; this run starts at step 0 "
                           "and resume_from_checkpoint=latest picks the highest step there, so give this run its own "
                           "output_dir (or resume_from_checkpoint=latest to continue that run)")
        if changed_data:
            # Not an error: continuing on other data can be meant. But the position saved in the checkpoint then points
            # into other batches than the interrupted run would have trained next.
            logger.message(f"warning: {self.last_checkpoint} was saved with other training data or batch settings "
                           f"({changed_data}); the resumed run does not see the batches the interrupted one would have")
        if kept_settings:
            # HF Trainer's behaviour too (the optimizer's and scheduler's state carry these), but without a word the
            # new values look applied, and the logged lr was the new learning_rate's while the old one trained.
            logger.message(f"warning: {self.last_checkpoint} was saved with {kept_settings}; its optimizer state keeps "
                           "the saved values, so the resumed run trains with those (start a new run, without "
                           "resume_from_checkpoint, to change them)")
        if state["step"] >= total:
            logger.message(f"warning: {self.last_checkpoint} is at step {state['step']}, and this run trains {total} "
                           "steps (max_steps, or epochs x steps per epoch): there is nothing left to train; raise "
                           "max_steps or epochs to train on from it")
        logger.message(f"training {total} steps on {where} ({len(data.rows)} "
                       f"{'packed rows' if cfg.use_sequence_packing else 'sequences'}, "
                       f"{plan.steps_per_epoch} steps per epoch); outputs in {out}")
        result = TrainResult(steps=state["step"])
        self.model.train()
        self._run_ahead = self._can_run_ahead()
        pending = None  # a step enqueued whose values are not read yet (run-ahead only)
        try:
            self._step_clock = time.perf_counter()
            with self._ctrl_c_saves(logger):
                while state["step"] < total and not self._stop_requested:
                    for micro_batches in plan.epoch_steps(state["epoch"], start=state["step_in_epoch"]):
                        launched = self._launch_step(micro_batches, state["step"] + 1, state["epoch"])
                        if pending is not None:
                            # The step before is read while this one's backward runs on the GPU, and before this
                            # one's update: a stop at a non-finite step leaves the weights of the last good one.
                            self._log_step(self._finish_step(pending), logger, result)
                            # Logged: an exception in this step's update must not log it again (the handler below).
                            pending = None
                        self._update(launched)
                        pending = launched
                        state["step"] += 1
                        state["step_in_epoch"] += 1
                        if state["step_in_epoch"] == plan.steps_per_epoch:  # the position is the next step's
                            state["epoch"] += 1
                            state["step_in_epoch"] = 0
                        # Ctrl-C reaches the ranks at slightly different moments; all stop after the same step.
                        self._stop_requested = parallel.any_rank(self._stop_requested, self.env, self.device)
                        save = bool(cfg.save_steps) and state["step"] % cfg.save_steps == 0 and state["step"] < total
                        evaluate = eval_data is not None and bool(cfg.eval_steps) \
                            and state["step"] % cfg.eval_steps == 0 and state["step"] < total
                        last = state["step"] >= total or self._stop_requested
                        if save or evaluate or last or not self._run_ahead:
                            self._log_step(self._finish_step(pending), logger, result)
                            pending = None
                        if save:
                            self._save(state)
                        # After the checkpoint: an evaluation that fails (out of memory, bad data) loses no training.
                        if evaluate:
                            result.eval_metrics = self._log_evaluation(eval_data, state["step"], logger)
                        if last:
                            break
                        if save or evaluate:
                            self._step_clock = time.perf_counter()  # the next step's time leaves these out
                if pending is not None:
                    # A Ctrl-C after the step's stop check, as its epoch ran out, ends the loop on the flag with the
                    # step unread: it is read (and checked) before the checkpoint, as a stop inside the loop is.
                    self._log_step(self._finish_step(pending), logger, result)
                    pending = None
            result.steps = state["step"]
            result.checkpoint = str(self._save(state))
            if eval_data is not None and not self._stop_requested:
                result.eval_metrics = self._log_evaluation(eval_data, state["step"], logger)
            if self._stop_requested:
                result.interrupted = True
                logger.message(f"stopped by Ctrl-C after step {state['step']}; checkpoint saved to "
                               f"{result.checkpoint} (resume with resume_from_checkpoint={result.checkpoint})")
            elif cfg.save_final_model:
                result.final_model = str(self._export_final(out / "final"))
                logger.message(f"done: {state['step']} steps, final loss {result.losses[-1]:.4f}; model in "
                               f"{result.final_model}" if result.losses else f"done; model in {result.final_model}")
        except BaseException:
            if pending is not None:  # the step before the failing one trained: log it if its values can be read
                with contextlib.suppress(Exception):
                    self._log_step(self._finish_step(pending), logger, result)
            raise
        finally:
            logger.close()
        return result

    def evaluate(self, eval_dataset=None) -> dict[str, Any]:
        """Mean loss over the label tokens of `eval_dataset` (default: the config's eval_dataset), and its perplexity,
        with the model as it is now: {"eval_loss", "eval_perplexity", "eval_tokens", "eval_time_s"}. Under several
        processes every rank calls it and gets the same numbers (each evaluates its share of the rows)."""
        source = eval_dataset if eval_dataset is not None else self.config.eval_dataset
        if source is None:
            raise SetupError("evaluate() was given no data and config field 'eval_dataset' is null; pass the data "
                             "(evaluate(rows_or_path)) or set eval_dataset")
        return self._evaluate(self._prepare_eval(source))

    # ---- data and evaluation -----------------------------------------------------------------------------------------
    def _prepare(self, source, what: str):
        with parallel.main_first(self.env), warnings.catch_warnings():  # the others then read rank 0's token cache
            if not self.env.is_main:  # rank 0 warns about the data (truncated rows...) once; the others have the same
                warnings.simplefilter("ignore")
            data = prepare_training_data(source, self.tokenizer, self.config, what=what)
        check_token_ids(data.rows, self.model, self.tokenizer)
        return data

    def _prepare_eval(self, source):
        data = self._prepare(source, "evaluation data")
        if self.env.enabled:  # another count of rows on one rank would leave the others waiting in _evaluate's forwards
            distributed.check_same_on_every_rank("the evaluation data", _data_summary(data.rows, 0), self.env)
        return data

    def _log_evaluation(self, data, step: int, logger: MetricsLogger) -> dict[str, Any]:
        metrics = self._evaluate(data)
        logger.log_eval({"step": step, **metrics})
        return metrics

    @torch.no_grad()
    def _evaluate(self, data) -> dict[str, Any]:
        """Every row once, in micro-batches of the training's size (StepPlan's: each rank its share, and a rank left
        without rows runs a stand-in with no labels, since FSDP2's forward is a collective). Each forward is given
        num_items_in_batch=1, so its loss is the sum of its token losses; the sums and counts are added over ranks.
        The model runs unwrapped and uncompiled: no gradients to synchronise, and no recompilation for eval mode."""
        start = time.perf_counter()
        plan = StepPlan(data.rows, data.collator, batch_size=parallel.micro_batch_size(self.config, self.env),
                        gradient_accumulation_steps=1, seed=0, env=self.env)
        was_training = self.model.training
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        tokens = 0
        try:
            for (mb,) in plan.epoch_steps(0):
                tokens += int(mb.pop("num_label_tokens"))
                batch = {k: self._to_device(v) for k, v in mb.items()}
                with self._autocast():
                    loss_sum += self.model(**batch, use_cache=False, num_items_in_batch=1).loss.float()
        finally:
            self.model.train(was_training)
        distributed.all_reduce_sum(loss_sum, self.env)
        tokens = distributed.all_reduce_count(tokens, self.env, self.device)
        loss = loss_sum.item() / tokens  # prepare_training_data refuses data without a label token
        return {"eval_loss": loss, "eval_perplexity": math.exp(loss) if loss < 700 else math.inf,
                "eval_tokens": tokens, "eval_time_s": time.perf_counter() - start}

    # ---- one optimizer step ----------------------------------------------------------------------------------------
    def _can_run_ahead(self) -> bool:
        """Whether each step's values may be read one step late: on a CUDA device only (a CPU runs each op when it is
        called, so there is nothing to run ahead of, and the late read would only shift each logged step time onto
        the next step's work); the update of a non-finite step must then be skipped on the device, which PyTorch's
        fused Adam/AdamW do through `found_inf` (the foreach and 8-bit ones cannot); fp16's GradScaler reads its own
        flags, and several processes already meet in a collective every step."""
        return self.device.type == "cuda" and self._clips_in_step()

    def _clips_in_step(self) -> bool:
        """Whether the gradient clipping is left to the optimizer's step: PyTorch's fused Adam/AdamW divide each
        gradient by a `grad_scale` tensor as they read it (GradScaler's unscaling), so clipping by that divisor saves
        clip_grad_norm_'s own pass over every gradient (read and written: Qwen2.5-0.5B full fine-tuning, 494M bf16
        gradients, ~0.8 ms of a ~124 ms H100 step), and without max_grad_norm no pass is made at all (clip_grad_norm_
        multiplied by 1). Not under fp16's GradScaler (it sets grad_scale itself) or several processes (FSDP2's
        sharded norm), nor with an optimizer that has no fused kernel."""
        return (self.scaler is None and not self.env.enabled
                and isinstance(self.optimizer, (torch.optim.Adam, torch.optim.AdamW))
                and all(group.get("fused") for group in self.optimizer.param_groups))

    def _launch_step(self, micro_batches: list[dict[str, Any]], step: int, epoch: int) -> _Launched:
        """Forward, backward and clipping of one optimizer step, enqueued; `_update` applies it."""
        cfg = self.config
        local_tokens = sum(int(mb.pop("num_label_tokens")) for mb in micro_batches)
        # One unavoidable sync under several processes: every rank must divide by the same global count.
        label_tokens = distributed.all_reduce_count(local_tokens, self.env, self.device)
        if label_tokens == 0:
            raise DataError(f"step {step} has no label tokens on any rank; nothing to train on (check the masking)")
        seq_lens = [n for mb in micro_batches for n in _sequence_lengths(mb)]
        loss_sum = torch.zeros((), device=self.device)
        for i, mb in enumerate(micro_batches):
            batch = self._batch_to_device(mb)
            with self._autocast(), self._offload(), \
                    parallel.gradient_sync(self.forward_model, sync=i == len(micro_batches) - 1):
                loss = self.forward_model(**batch, use_cache=False, num_items_in_batch=label_tokens).loss
            scaled = loss * self.env.loss_scale
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += loss.detach().float()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_scale = None
        if self._clips_in_step():
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.trainable if p.grad is not None],
                                                      foreach=True)
            if cfg.max_grad_norm:  # clip_grad_norm_'s factor min(1, max_norm / (norm + 1e-6)), as a divisor
                grad_scale = ((grad_norm.float() + 1e-6) / cfg.max_grad_norm).clamp(min=1.0)
        else:
            grad_norm = parallel.clip_grad_norm(self.trainable, cfg.max_grad_norm or float("inf"))
        distributed.all_reduce_sum(loss_sum, self.env)
        values = torch.stack([loss_sum, grad_norm.float().to(loss_sum.device)])
        # The learning_rate as scheduled: the first group's may be LoRA+'s B matrices, at lora_plus_ratio times it.
        lr = self._learning_rate * self.scheduler.get_last_lr()[0] / self.scheduler.base_lrs[0]
        return _Launched(step=step, epoch=epoch, values=values, ready=None, skipped=None, lr=lr,
                         label_tokens=label_tokens, seq_lens=seq_lens, grad_scale=grad_scale)

    def _update(self, launched: _Launched) -> None:
        """The optimizer and scheduler step of a launched step. Without run-ahead its values are read here, first: a
        non-finite step is skipped or stops the run. With run-ahead they are only copied towards the host."""
        values = launched.values
        if self._run_ahead:
            # The fused kernel leaves the weights and moments alone, and takes its step count back, where found_inf
            # is 1: a non-finite step is skipped on the device, and _finish_step learns of it one step later.
            self._optimizer_step(found_inf=(~torch.isfinite(values).all()).float(), grad_scale=launched.grad_scale)
            if values.is_cuda:
                launched.values = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
                launched.values.copy_(values, non_blocking=True)
                launched.ready = torch.cuda.Event()
                launched.ready.record()
        else:
            loss_value, norm_value = values.tolist()
            launched.skipped = self._nonfinite(launched.step, loss_value, norm_value)
            if launched.skipped:
                self.optimizer.zero_grad(set_to_none=True)
            elif self.scaler is not None:
                scale = self.scaler.get_scale()
                self.scaler.step(self.optimizer)  # skips the update by itself when fp16 gradients overflowed
                self.scaler.update()
                # ... and then backs its scale off: the one sign of a skipped step (logged as skipped, not trained).
                launched.skipped = self.scaler.get_scale() < scale
            else:
                self._optimizer_step(grad_scale=launched.grad_scale)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _optimizer_step(self, **tensors) -> None:
        """optimizer.step() with the fused kernel's found_inf / grad_scale tensors (those not None) set for it alone."""
        tensors = {name: t for name, t in tensors.items() if t is not None}
        vars(self.optimizer).update(tensors)
        try:
            self.optimizer.step()
        finally:
            for name in tensors:
                delattr(self.optimizer, name)

    def _nonfinite(self, step: int, loss_value: float, norm_value: float) -> bool:
        """True when step `step` is to be skipped (NaN or inf loss or gradient norm, on_nonfinite: skip); raises
        NonFiniteError under on_nonfinite: stop. GradScaler handles a non-finite fp16 gradient norm itself."""
        if math.isfinite(loss_value) and (math.isfinite(norm_value) or self.scaler is not None):
            return False
        if self.config.on_nonfinite == "stop":
            self.optimizer.zero_grad(set_to_none=True)  # the gradients of the step that will not be applied
            kept = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else
                    "no checkpoint was saved before it (set save_steps to keep one)")
            raise NonFiniteError(
                f"step {step}: loss {loss_value}, gradient norm {norm_value} (not finite); stopping, and {kept}. "
                "Lower learning_rate, check the data, or set on_nonfinite: skip to skip such steps"
            )
        return True

    def _finish_step(self, launched: _Launched) -> dict[str, Any]:
        """The step's metrics, its values read from the device (waiting for them if they are not there yet)."""
        if launched.ready is not None:
            launched.ready.synchronize()
        loss_value, norm_value = launched.values.tolist()
        skipped = launched.skipped
        if skipped is None:
            skipped = self._nonfinite(launched.step, loss_value, norm_value)
        now = time.perf_counter()
        # From the previous step's read (or the loop's start, a checkpoint, an evaluation) to this one's: back to back,
        # one step's share of the time, whether the host or the GPU was the slower.
        elapsed = now - self._step_clock
        self._step_clock = now
        cuda = self.device.type == "cuda"
        flops = self._flops_per_token * sum(launched.seq_lens) + attention_flops(
            launched.seq_lens, layers=self._layers, attn_dim=self._attn_dim)
        return {
            "step": launched.step, "loss": loss_value, "lr": launched.lr, "grad_norm": norm_value,
            "label_tokens": launched.label_tokens, "tokens_per_s": launched.label_tokens / elapsed,
            "step_time_s": elapsed, "skipped": skipped,
            "mfu": flops / (elapsed * self._peak) if self._peak else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated(self.device) / 2**30 if cuda else None,
            "epoch": launched.epoch,
        }

    @staticmethod
    def _log_step(metrics: dict[str, Any], logger: MetricsLogger, result: TrainResult) -> None:
        logger.log(metrics)
        result.losses.append(metrics["loss"])

    # ---- helpers ---------------------------------------------------------------------------------------------------
    def _batch_to_device(self, mb: dict[str, Any]) -> dict[str, Any]:
        """A training micro-batch on the device. Under run-ahead a packed batch's layout (cu_seq_lens_q/k,
        position_ids) stays on the host: the patched model validates it there and copies it over, where on the device
        the validation would read values back, a sync per forward that stops the host from running ahead."""
        host = _PACKED_LAYOUT if self._run_ahead and not self.config.use_torch_compile and "cu_seq_lens_q" in mb \
            else ()
        # One copy of a tensor given under two keys (the collator's cu_seq_lens_q and _k): the model then sees one
        # tensor, where two equal copies on the device cost a sync to compare (prepare_packed_batch).
        moved: dict[int, Any] = {}
        for k, v in mb.items():
            if k not in host and id(v) not in moved:
                moved[id(v)] = self._to_device(v)
        return {k: v if k in host else moved[id(v)] for k, v in mb.items()}

    def _to_device(self, v):
        if not torch.is_tensor(v):
            return v
        if self.device.type == "cuda":
            return v.pin_memory().to(self.device, non_blocking=True)
        return v.to(self.device)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _offload(self):
        if not self.config.activation_offload:
            return contextlib.nullcontext()
        return OffloadActivations(self.model, device=self.device)

    def _save(self, state: dict[str, Any]) -> Path:
        path = Path(self.config.output_dir) / f"checkpoint-{state['step']}"
        # The settings the optimizer state holds are recorded as trained: a later resume compares with those.
        trainer_state = {**state, "world_size": self.env.world_size,
                         "config": {**self.config.to_dict(), **self._kept_settings}, "data": self._data_summary}
        # Each rank's generators have moved on by its own batches (dropout), so each rank's are kept.
        rng_states = distributed.gather_object(checkpoint._rng_state(), self.env)
        if self.strategy == "fsdp2":  # every rank writes its shards
            path = dist_checkpoint.save_sharded(
                self.config.output_dir, state["step"], model=self.model, optimizer=self.optimizer,
                scheduler=self.scheduler, trainer_state=trainer_state, env=self.env,
                keep=self.config.save_total_limit, rng_states=rng_states,
            )
        elif self.env.is_main:
            path = checkpoint.save_checkpoint(
                self.config.output_dir, state["step"], model=self.model, optimizer=self.optimizer,
                scheduler=self.scheduler, scaler=self.scaler, export_model=self._export_files,
                trainer_state=trainer_state, keep=self.config.save_total_limit, rng_states=rng_states,
            )
        distributed.barrier(self.env)
        self.last_checkpoint = path
        return path

    def _export_files(self, directory: Path) -> None:
        """The user-facing files beside the weights: a PEFT adapter, or the model's config (the checkpoint's
        model.safetensors then loads with from_pretrained)."""
        if self.config.use_lora:
            from chronicals.lora import save_lora

            save_lora(self.model, directory)
        elif all(p.requires_grad for p in self.model.parameters()):
            self.model.config.save_pretrained(directory)  # beside model.safetensors, which holds every weight
        else:
            # Some weights frozen (not LoRA): resuming reads trainable.safetensors, which from_pretrained cannot load
            # alone, so the whole model goes beside it (model.safetensors and config.json).
            self.model.save_pretrained(directory, safe_serialization=True)
        if hasattr(self.tokenizer, "save_pretrained"):  # as HF Trainer's checkpoints: a checkpoint loads on its own
            self.tokenizer.save_pretrained(directory)

    def _export_final(self, directory: Path) -> Path:
        # Written into a hidden directory that then replaces `directory`: saved into an earlier run's final/, the files
        # this run does not write stayed there (a LoRA run's adapter_config.json, which from_pretrained then applied
        # to this full fine-tune's weights).
        tmp = directory.with_name(f".{directory.name}.tmp")
        if self.env.is_main and tmp.exists():
            shutil.rmtree(tmp)
        distributed.barrier(self.env)
        if self.strategy == "fsdp2":  # the shards are gathered into one model (a collective)
            export.export_sharded(self.model, tmp, env=self.env, lora=self.config.use_lora, tokenizer=self.tokenizer)
        elif self.env.is_main:
            tmp.mkdir(parents=True)
            if self.config.use_lora:
                from chronicals.lora import save_lora

                save_lora(self.model, tmp)
            else:
                self.model.save_pretrained(tmp, safe_serialization=True)
            if hasattr(self.tokenizer, "save_pretrained"):
                self.tokenizer.save_pretrained(tmp)
        if self.env.is_main:
            if directory.is_dir():
                shutil.rmtree(directory)
            elif directory.exists():
                directory.unlink()
            os.replace(tmp, directory)
        distributed.barrier(self.env)
        return directory

    @contextlib.contextmanager
    def _ctrl_c_saves(self, logger: MetricsLogger):
        """The first Ctrl-C lets the current step finish, then the loop saves a checkpoint and stops; a second one
        aborts at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_sigint(signum, frame):
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            logger.message("Ctrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to abort)")

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


# The fields that decide the rows and their order, hence what a saved position in an epoch means.
_ORDER_FIELDS = ("dataset", "dataset_format", "dataset_split", "text_column", "prompt_column", "completion_column",
                 "messages_column", "max_seq_length", "overflow", "use_sequence_packing", "batch_size",
                 "gradient_accumulation_steps", "global_batch_size", "seed")


def _check_position(path: Path, saved: dict[str, Any], state: dict[str, Any], steps_per_epoch: int,
                    cfg: ChronicalsConfig) -> None:
    """A checkpoint's position within its epoch must exist in this run's epochs: past their end, the loop would find
    no step to run and go round forever."""
    if state["step_in_epoch"] < steps_per_epoch:
        return
    before = saved.get("config") or {}
    changed = [f"{name}: {before[name]!r} -> {getattr(cfg, name)!r}" for name in _ORDER_FIELDS
               if name in before and before[name] != getattr(cfg, name)]
    raise SetupError(
        f"checkpoint {str(path)!r} stopped after step {state['step_in_epoch']} of epoch {state['epoch']}, but with "
        f"this run's data and batch settings an epoch has only {steps_per_epoch} steps"
        + (f" (changed since it was saved: {', '.join(changed)})" if changed else "")
        + "; resume with the data and batch settings it was saved with"
    )


# Settings that a checkpoint's optimizer and scheduler state hold (the groups' lr, weight_decay, betas, eps; the
# scheduler's base learning rates), so a resume keeps the saved ones whatever the config now says.
_OPTIMIZER_FIELDS = ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "lora_plus_ratio")


def _changed_settings(before: dict[str, Any], cfg: ChronicalsConfig, names) -> str | None:
    """'name saved (this config: new)' for each of `names` the checkpoint's config (`before`) has with another value
    than this one; None when none differs."""
    changed = [f"{name} {before[name]!r} (this config: {getattr(cfg, name)!r})" for name in names
               if name in before and before[name] != getattr(cfg, name)]
    return ", ".join(changed) or None


def _kept_optimizer_settings(before: dict[str, Any], cfg: ChronicalsConfig) -> dict[str, Any]:
    """{name: saved value} of the optimizer settings that the resumed config changes: the run trains with the saved."""
    lora_plus = cfg.use_lora_plus and before.get("use_lora_plus")  # lora_plus_ratio matters only under LoRA+
    return {n: before[n] for n in _OPTIMIZER_FIELDS if (n != "lora_plus_ratio" or lora_plus) and n in before
            and before[n] != getattr(cfg, n)}


def _changed_lora_scale(before: dict[str, Any], cfg: ChronicalsConfig) -> str | None:
    """lora_alpha / use_rslora when a LoRA checkpoint's differ from this config's (_changed_settings). Other LoRA
    changes already fail the weights' names or shapes (rank, targets, DoRA); these two load silently."""
    if not (cfg.use_lora and before.get("use_lora")):
        return None
    return _changed_settings(before, cfg, ("lora_alpha", "use_rslora"))


def _changed_optimizer(before: dict[str, Any], cfg: ChronicalsConfig) -> str | None:
    """use_8bit_optimizer when the checkpoint's differs from this config's (_changed_settings): the saved optimizer
    state is then another optimizer's."""
    return _changed_settings(before, cfg, ("use_8bit_optimizer",))


# Fields that may differ between ranks: paths (a node's own copy of the model or data: the data's contents are
# compared, and FSDP2 takes rank 0's weights, as DDP does) and what only rank 0 or each process alone uses.
_PER_RANK_FIELDS = ("model", "tokenizer", "dataset", "eval_dataset", "output_dir", "device", "cpu_threads",
                    "logging_steps", "progress_bar", "tensorboard")


def _rank_config(cfg: ChronicalsConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.to_dict().items() if k not in _PER_RANK_FIELDS}


def _data_summary(rows, steps_per_epoch: int) -> dict[str, Any]:
    """Counts and a digest of the rows, which a resumed run compares with its checkpoint's and the processes with each
    other's, to tell whether they train on the same batches (the label count assumes ignore_index -100, which is what
    every collator writes). The digest catches data of the same size but other tokens or order: one pass of blake2b
    over the token ids and labels as int32, at start-up only (~40 ns a token from Python lists, most of it the
    conversion: 4 s for 100M tokens)."""
    digest = hashlib.blake2b(digest_size=8)
    tokens = label_tokens = 0
    for r in rows:  # each row converted once, for the digest and the counts
        ids, labels = np.asarray(r["input_ids"], dtype=np.int32), np.asarray(r["labels"], dtype=np.int32)
        digest.update(ids.tobytes())
        digest.update(labels.tobytes())
        tokens += ids.size
        label_tokens += int(np.count_nonzero(labels != -100))
    return {"rows": len(rows), "tokens": tokens, "label_tokens": label_tokens, "steps_per_epoch": steps_per_epoch,
            "digest": digest.hexdigest()}


def _changed_data(saved: dict[str, Any] | None, now: dict[str, Any]) -> str | None:
    """'name: saved -> now' for each count (or the digest) that differs; None when they agree or the checkpoint has
    none (older; one without a digest is compared by its counts)."""
    if not saved:
        return None
    changed = [f"{k}: {saved[k]} -> {now[k]}" for k in now if k in saved and saved[k] != now[k]]
    return ", ".join(changed) or None


def _sequence_lengths(batch: dict[str, Any]) -> list[int]:
    """Real (non-padding) sequence lengths of a collated batch, for the attention FLOPs."""
    if "cu_seq_lens_q" in batch:
        return torch.diff(batch["cu_seq_lens_q"]).tolist()
    if "attention_mask" in batch:
        return batch["attention_mask"].sum(dim=1).tolist()
    return [batch["input_ids"].shape[-1]] * batch["input_ids"].shape[0]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


