"""Scenarios: a TOML file describing one benchmark matrix (model, mode, batch, data, steps, backends and their
variants), parsed into frozen dataclasses. Every field is checked here, before anything runs: a bad field gets an
error naming the file, the field and the valid choices."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DTYPES = ("bfloat16", "float16", "float32")
DEVICES = ("cuda", "cpu")
MODES = ("full", "lora")
DATA_KINDS = ("fixed", "varlen", "text")
# What the harness reads from a checkpoint's config.json (its text_config for a multimodal one): the model type, the
# vocabulary the data is drawn from, and the shape the FLOPs are counted on (metrics.Shape).
CHECKPOINT_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads")
SEED_MAX = 2**64 - 1  # torch's generators take unsigned 64-bit seeds
DEFAULT_VARIANT = "default"


class ScenarioError(ValueError):
    """A scenario file that cannot be run; the message names the file and the field."""


@dataclass(frozen=True)
class ModelSpec:
    preset: str | None  # a name from chronicals.models.PRESETS, or None when `path` is given
    path: str | None  # a local checkpoint directory
    dtype: str = "bfloat16"

    @property
    def label(self) -> str:
        return self.preset or str(self.path)


@dataclass(frozen=True)
class TrainSpec:
    mode: str = "full"
    lora_rank: int = 16
    lora_alpha: int = 32
    batch_size: int = 8
    seq_len: int = 2048
    steps: int = 20
    warmup: int = 5
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class DataSpec:
    kind: str = "fixed"  # fixed-length random tokens | variable-length random tokens | variable-length real text
    min_len: int = 32  # shortest sequence of the variable-length kinds; the longest is train.seq_len


@dataclass(frozen=True)
class VerifySpec:
    loss_rtol: float = 0.02  # |loss - reference| <= loss_rtol * reference, at every step
    grad_norm_rtol: float = 0.10  # |grad_norm - reference| <= grad_norm_rtol * reference, at every step
    min_weights_changed: float = 0.01  # fraction of sampled trainable weights that must differ after training
    # The loss on the first batch, re-evaluated after training, must have fallen by at least this fraction of the
    # reference's fall (when the reference's is clearly above noise; see verify.check).
    min_learnt_fraction: float = 0.5


@dataclass(frozen=True)
class Run:
    """One cell of the matrix: a backend with one set of optimization flags and one batch layout."""

    backend: str
    variant: str = DEFAULT_VARIANT
    flags: dict[str, bool] = field(default_factory=dict)
    layout: str = "padded"


@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    description: str
    device: str
    seed: int
    reference: str
    timeout_s: float
    model: ModelSpec
    train: TrainSpec
    data: DataSpec
    verify: VerifySpec
    runs: tuple[Run, ...]

    @property
    def reference_run(self) -> Run:
        return next(r for r in self.runs if r.backend == self.reference)

    def ordered_runs(self) -> list[Run]:
        """The reference's first run, then every other run in file order: the others are compared with it."""
        ref = self.reference_run
        return [ref] + [r for r in self.runs if r is not ref]


TOP_FIELDS = ("name", "description", "device", "seed", "reference", "timeout_s", "backends", "model", "train", "data",
              "verify", "variants")
MODEL_FIELDS = ("preset", "path", "dtype")
VARIANT_FIELDS = ("backend", "name", "flags", "layout")


def load(path: str | Path) -> Scenario:
    """Read and validate a scenario file."""
    path = Path(path)
    if not path.is_file():
        available = sorted(p.name for p in Path("scenarios").glob("*.toml")) if Path("scenarios").is_dir() else []
        hint = f"; scenarios here: {', '.join(available)}" if available else ""
        raise ScenarioError(f"{path}: no such scenario file{hint}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(f"{path}: not valid TOML ({e})") from None
    return parse(raw, str(path))


def parse(raw: dict[str, Any], source: str = "<scenario>") -> Scenario:
    """Validate a scenario given as a dict (the parsed TOML)."""
    from chronicals.models.presets import PRESETS

    from .backends import backend_class, backend_names

    c = _Checker(source)
    c.known(raw, TOP_FIELDS, "")
    name = c.string(raw, "name", default=Path(source).stem)
    if not name.strip() or name in (".", "..") or any(sep in name for sep in ("/", "\\")):
        c.fail("name", f"is {name!r}; it names the results file (<name>.jsonl) and the golden losses, so it must be "
                       "a non-empty file name without '/' or '\\'")
    device = c.choice(raw, "device", DEVICES, default="cuda")

    m = c.table(raw, "model")
    c.known(m, MODEL_FIELDS, "model.")
    preset, ckpt = m.get("preset"), m.get("path")
    if (preset is None) == (ckpt is None):
        raise ScenarioError(f"{source}: [model] needs exactly one of 'preset' (a built-in shape: "
                            f"{', '.join(sorted(PRESETS))}) or 'path' (a local checkpoint directory)")
    if preset is not None:
        preset = c.choice(m, "preset", tuple(sorted(PRESETS)), prefix="model.")
        vocab_size = PRESETS[preset]["vocab_size"]
    else:
        ckpt = c.string(m, "path", prefix="model.")
        if not Path(ckpt).is_dir():
            raise ScenarioError(f"{source}: field 'model.path' is {ckpt!r}, which is not a directory; give a local "
                                "checkpoint saved with save_pretrained, or use 'preset'")
        if not (Path(ckpt) / "config.json").is_file():
            raise ScenarioError(f"{source}: field 'model.path' is {ckpt!r}, which has no config.json; give a local "
                                "checkpoint saved with save_pretrained, or use 'preset'")
        vocab_size = _checkpoint_config(source, ckpt)["vocab_size"]
    model = ModelSpec(preset=preset, path=ckpt, dtype=c.choice(m, "dtype", DTYPES, prefix="model.",
                                                               default="bfloat16"))

    t = c.table(raw, "train")
    defaults = TrainSpec()
    c.known(t, tuple(TrainSpec.__dataclass_fields__), "train.")
    train = TrainSpec(
        mode=c.choice(t, "mode", MODES, prefix="train.", default=defaults.mode),
        lora_rank=c.integer(t, "lora_rank", 1, prefix="train.", default=defaults.lora_rank),
        lora_alpha=c.integer(t, "lora_alpha", 1, prefix="train.", default=defaults.lora_alpha),
        batch_size=c.integer(t, "batch_size", 1, prefix="train.", default=defaults.batch_size),
        seq_len=c.integer(t, "seq_len", 2, prefix="train.", default=defaults.seq_len),
        steps=c.integer(t, "steps", 1, prefix="train.", default=defaults.steps),
        warmup=c.integer(t, "warmup", 0, prefix="train.", default=defaults.warmup),
        lr=c.number(t, "lr", prefix="train.", default=defaults.lr, positive=True),
        weight_decay=c.number(t, "weight_decay", prefix="train.", default=defaults.weight_decay),
        max_grad_norm=c.number(t, "max_grad_norm", prefix="train.", default=defaults.max_grad_norm, positive=True),
    )
    if train.warmup >= train.steps:
        raise ScenarioError(f"{source}: field 'train.warmup' ({train.warmup}) must be less than 'train.steps' "
                            f"({train.steps}): at least one step must be timed")

    d = c.table(raw, "data", required=False)
    c.known(d, tuple(DataSpec.__dataclass_fields__), "data.")
    data = DataSpec(kind=c.choice(d, "kind", DATA_KINDS, prefix="data.", default="fixed"),
                    min_len=c.integer(d, "min_len", 2, prefix="data.", default=DataSpec.min_len))
    if data.kind != "fixed" and data.min_len > train.seq_len:
        raise ScenarioError(f"{source}: field 'data.min_len' ({data.min_len}) exceeds 'train.seq_len' "
                            f"({train.seq_len})")
    if data.kind == "text":  # harness.data draws its tokens from the default tokenizer's ids
        from chronicals.data import default_tokenizer

        needed = len(default_tokenizer())
        if vocab_size < needed:
            c.fail("data.kind", f"is 'text', which feeds the default tokenizer's {needed} token ids, but the "
                                f"model's vocab_size is {vocab_size}; use data.kind 'varlen' or a model with a "
                                f"vocabulary of at least {needed}")

    v = c.table(raw, "verify", required=False)
    c.known(v, tuple(VerifySpec.__dataclass_fields__), "verify.")
    vd = VerifySpec()
    verify = VerifySpec(
        loss_rtol=c.number(v, "loss_rtol", prefix="verify.", default=vd.loss_rtol, positive=True),
        grad_norm_rtol=c.number(v, "grad_norm_rtol", prefix="verify.", default=vd.grad_norm_rtol, positive=True),
        min_weights_changed=c.number(v, "min_weights_changed", prefix="verify.", default=vd.min_weights_changed),
        min_learnt_fraction=c.number(v, "min_learnt_fraction", prefix="verify.", default=vd.min_learnt_fraction),
    )
    if verify.min_weights_changed > 1:
        c.fail("verify.min_weights_changed", f"is {verify.min_weights_changed:g}; it is a fraction of the sampled "
                                             "weights, between 0 and 1 (e.g. 0.01)")
    if verify.min_learnt_fraction > 1:
        c.fail("verify.min_learnt_fraction", f"is {verify.min_learnt_fraction:g}; it is a fraction of the "
                                             "reference's fall in loss, between 0 and 1 (e.g. 0.5)")

    names = backend_names()
    backends = raw.get("backends")
    if not isinstance(backends, list) or not backends or not all(isinstance(b, str) for b in backends):
        raise ScenarioError(f"{source}: field 'backends' must be a non-empty list of backend names from: "
                            f"{', '.join(names)}")
    for b in backends:
        if b not in names:
            raise ScenarioError(f"{source}: field 'backends' names unknown backend {b!r}; choose from: "
                                f"{', '.join(names)}")
    if len(set(backends)) != len(backends):
        raise ScenarioError(f"{source}: field 'backends' lists a backend twice: {backends}")

    variants = raw.get("variants", [])
    if not isinstance(variants, list) or not all(isinstance(x, dict) for x in variants):
        raise ScenarioError(f"{source}: field 'variants' must be an array of tables ([[variants]])")
    runs: list[Run] = []
    for b in backends:
        cls = backend_class(b)
        mine = [x for x in variants if x.get("backend") == b]
        for i, x in enumerate(mine or [{"backend": b}]):
            where = f"variants[{variants.index(x)}]." if mine else ""
            c.known(x, VARIANT_FIELDS, where)
            flags = x.get("flags", {})
            if not isinstance(flags, dict):
                raise ScenarioError(f"{source}: field '{where}flags' must be a table of booleans")
            for k, val in flags.items():
                if k not in cls.FLAGS:
                    valid = ", ".join(cls.FLAGS) or "none (this backend has no switchable optimizations)"
                    raise ScenarioError(f"{source}: field '{where}flags' has unknown flag {k!r} for backend {b!r}; "
                                        f"valid flags: {valid}")
                if not isinstance(val, bool):
                    raise ScenarioError(f"{source}: field '{where}flags.{k}' must be true or false, not {val!r}")
            layout = c.choice(x, "layout", cls.LAYOUTS, prefix=where, default="padded")
            if layout == "packed" and data.kind == "fixed":
                raise ScenarioError(f"{source}: field '{where}layout' is 'packed' but data.kind is 'fixed' (every "
                                    "sequence is seq_len long, nothing to pack); use data.kind 'varlen' or 'text'")
            name_default = DEFAULT_VARIANT if not mine else f"variant{i}"
            variant = c.string(x, "name", prefix=where, default=name_default)
            if not variant.strip() or variant in (".", "..") or any(sep in variant for sep in ("/", "\\")):
                # it names the run's log file (<results stem>-logs/NN-<backend>-<name>.log): a '/' there stopped the
                # bench with FileNotFoundError after the reference had run; an empty name reads back as 'default'
                c.fail(f"{where}name", f"is {variant!r}; it names the run's log file and its rows, so it must be a "
                                       "non-empty name without '/' or '\\'")
            runs.append(Run(backend=b, variant=variant, flags={**cls.FLAGS, **flags}, layout=layout))
    for i, x in enumerate(variants):
        if "backend" not in x:
            c.fail(f"variants[{i}].backend", f"is missing; name one of 'backends' ({', '.join(backends)})")
        if x.get("backend") not in backends:
            raise ScenarioError(f"{source}: field 'variants[{i}].backend' is {x.get('backend')!r}, which is not in "
                                f"'backends' ({', '.join(backends)})")
    seen = set()
    for r in runs:
        if (r.backend, r.variant) in seen:
            raise ScenarioError(f"{source}: backend {r.backend!r} has two variants named {r.variant!r}")
        seen.add((r.backend, r.variant))

    reference = c.string(raw, "reference", default="torch")
    if reference not in backends:
        raise ScenarioError(f"{source}: field 'reference' is {reference!r}, which is not in 'backends' "
                            f"({', '.join(backends)}); every run is verified against the reference's run")
    return Scenario(
        name=name, path=source, description=c.string(raw, "description", default=""), device=device,
        seed=c.integer(raw, "seed", 0, default=0, maximum=SEED_MAX), reference=reference,
        timeout_s=c.number(raw, "timeout_s", default=600.0, positive=True),
        model=model, train=train, data=data, verify=verify, runs=tuple(runs),
    )


class _Checker:
    """Field readers that raise ScenarioError naming the source file and the dotted field."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, name: str, message: str):
        raise ScenarioError(f"{self.source}: field '{name}' {message}")

    def known(self, table: dict, fields: tuple[str, ...], prefix: str):
        for k in table:
            if k not in fields:
                self.fail(prefix + k, f"is not a scenario field; valid fields here: {', '.join(fields)}")

    def table(self, raw: dict, name: str, required: bool = True) -> dict:
        if name not in raw:
            if required:
                self.fail(name, f"is missing; add a [{name}] table")
            return {}
        if not isinstance(raw[name], dict):
            self.fail(name, f"must be a table ([{name}])")
        return raw[name]

    def _get(self, t: dict, name: str, prefix: str, default: Any):
        if name in t:
            return t[name]
        if default is _REQUIRED:
            self.fail(prefix + name, "is missing")
        return default

    def string(self, t: dict, name: str, prefix: str = "", default: Any = None) -> str:
        default = _REQUIRED if default is None else default
        x = self._get(t, name, prefix, default)
        if not isinstance(x, str):
            self.fail(prefix + name, f"must be a string, not {x!r}")
        return x

    def choice(self, t: dict, name: str, choices: tuple[str, ...], prefix: str = "", default: Any = None) -> str:
        x = self.string(t, name, prefix, default)
        if x not in choices:
            self.fail(prefix + name, f"is {x!r}; choose one of: {', '.join(choices)}")
        return x

    def integer(self, t: dict, name: str, minimum: int, prefix: str = "", default: Any = None,
                maximum: int | None = None) -> int:
        x = self._get(t, name, prefix, _REQUIRED if default is None else default)
        if not isinstance(x, int) or isinstance(x, bool) or x < minimum or (maximum is not None and x > maximum):
            bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            self.fail(prefix + name, f"must be an integer {bound}, not {x!r}")
        return x

    def number(self, t: dict, name: str, prefix: str = "", default: Any = None, positive: bool = False) -> float:
        x = self._get(t, name, prefix, _REQUIRED if default is None else default)
        if (not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x) or x < 0
                or (positive and x == 0)):
            self.fail(prefix + name, f"must be a finite {'positive' if positive else 'non-negative'} number, "
                                     f"not {x!r}")
        return float(x)


_REQUIRED = object()


def _checkpoint_config(source: str, ckpt: str) -> dict:
    """The checkpoint's config as the runner reads it (harness.checkpoint.config), refused here when the runner
    could not use it: a config.json that is not JSON, or one without the fields the harness reads (a model that is not
    a Llama-style decoder, e.g. GPT-2's n_embd/n_head), stopped the bench with a traceback after it had started."""
    path = Path(ckpt) / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ScenarioError(f"{source}: field 'model.path' is {ckpt!r}, whose config.json is not valid JSON ({e}); "
                            "give a local checkpoint saved with save_pretrained, or use 'preset'") from None
    cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}
    lacking = [k for k in CHECKPOINT_FIELDS if k not in cfg]
    if lacking or not isinstance(cfg["vocab_size"], int):
        raise ScenarioError(f"{source}: field 'model.path' is {ckpt!r}, whose config.json lacks "
                            f"{', '.join(lacking) or 'an integer vocab_size'}; the harness trains decoder-only "
                            "models of the Llama family (Llama, Qwen2, Qwen3, Mistral: every field of "
                            f"{', '.join(CHECKPOINT_FIELDS)}), or use 'preset'")
    return cfg
