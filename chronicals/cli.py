"""`chronicals train [CONFIG.yaml] [key=value ...]` (also `python -m chronicals train ...`).

With no config file the embedded quick start runs (`chronicals.config.demo_config()`: a tiny Llama-shaped model
trained on text that ships with Python, about a minute on a laptop CPU). Overrides apply on top of either.
Configuration, data and model problems end with a one-line error and exit status 2, not a stack trace; Ctrl-C ends
with status 130 (the first one in the training loop saves a checkpoint first).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from chronicals.config import ChronicalsConfig, ConfigError, demo_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="chronicals", description="Fast, lean fine-tuning of causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train", help="fine-tune a model as a config says",
        usage="chronicals train [-h] [CONFIG.yaml | CONFIG.toml] [key=value ...]",
        description="Fine-tune a model. With no CONFIG, run the embedded CPU quick start. The fields are those of "
                    "chronicals/config.py (docs/TRAINING.md).",
        epilog="Exit status: 0 when done, 2 on a config, data or setup error (one line), 130 after Ctrl-C (the "
               "first one in training saves a checkpoint).")
    train.add_argument("args", nargs="*", metavar="CONFIG key=value",
                       help="a YAML config file (or TOML, named *.toml), then overrides such as learning_rate=1e-4, "
                            "max_steps=100 or model_kwargs.num_hidden_layers=4 (values read as YAML)")
    return parser.parse_args(argv)


def _is_config_path(arg: str) -> bool:
    """Whether the first argument is the config file rather than a key=value override. A path may hold '=' too
    (sweep folders such as runs/lr=1e-4/run.yaml): an existing file, a name ending in .yaml, .yml or .toml, or a
    'key' with a '/' in it is a path."""
    return ("=" not in arg or Path(arg).is_file() or "/" in arg.split("=", 1)[0]
            or arg.lower().endswith((".yaml", ".yml", ".toml")))


def load_config(args: list[str]) -> ChronicalsConfig:
    path = None
    if args and _is_config_path(args[0]):
        path, args = args[0], args[1:]
        if not path.strip():  # `chronicals train "$CONFIG"` with CONFIG unset; Path('') would be '.', a directory
            raise ConfigError("the config file path is empty; pass a YAML or TOML file, or leave it out for the "
                              "quick start")
        if not Path(path).is_file():
            what = "is a directory, not a YAML file" if Path(path).is_dir() else "does not exist"
            raise ConfigError(f"config file {path!r} {what} (overrides look like key=value)")
    base = None if path else demo_config()
    return ChronicalsConfig.from_yaml(path, args, base=base)


def train(cfg: ChronicalsConfig):
    from chronicals.training import ChronicalsTrainer, distributed
    from chronicals.training.build import load_model, load_tokenizer

    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer)
    trainer = ChronicalsTrainer(model, tokenizer, cfg)
    try:
        return trainer.train(cfg.dataset)
    finally:
        distributed.teardown(trainer.env)  # under torchrun: leave the process group cleanly, error or not


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    try:
        from chronicals.training import DataError, NonFiniteError, SetupError

        try:
            cfg = load_config(ns.args)
            result = train(cfg)
        except (ConfigError, DataError, SetupError, NonFiniteError, FileNotFoundError) as e:
            print(f"chronicals: error: {e}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        # Ctrl-C before the training loop (loading the model or the data), or a second Ctrl-C in a step, which the
        # trainer turns into KeyboardInterrupt; the first one in the loop saves a checkpoint and returns instead.
        print("chronicals: interrupted by Ctrl-C (stopped without saving a checkpoint; earlier ones are kept)",
              file=sys.stderr)
        return 130
    return 130 if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
