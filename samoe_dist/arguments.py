"""Command line: argparse generated from the config dataclasses, plus DeepSpeed's own arguments.

Each dataclass field ``foo_bar`` becomes ``--foo-bar`` (Megatron's spelling); booleans are
``store_true`` flags. DeepSpeed's ``--deepspeed``/``--deepspeed_config`` come from
``deepspeed.add_config_arguments``, with ``--ds_config`` accepted as the short form. Parse errors
and invalid values exit with one line (``error: ...``), never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from typing import Optional, Sequence

from samoe_dist.config import (
    flag_name,
    ConfigError,
    DataConfig,
    MoEConfig,
    ModelConfig,
    ParallelConfig,
    RunConfig,
    SaMoEConfig,
    TrainingConfig,
)

# RunConfig field -> dataclass, in the order the groups appear in --help.
GROUPS = {
    "model": ModelConfig,
    "moe": MoEConfig,
    "samoe": SaMoEConfig,
    "parallel": ParallelConfig,
    "training": TrainingConfig,
    "data": DataConfig,
}


def _add_dataclass_group(parser: argparse.ArgumentParser, title: str, cls) -> None:
    group = parser.add_argument_group(title, (cls.__doc__ or "").strip())
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        help_text = f.metadata.get("help", "")
        if hint is bool:
            group.add_argument(flag_name(f.name), dest=f.name, action="store_true", default=f.default,
                               help=help_text)
            if f.default:
                group.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name,
                                   action="store_false", help=f"Turn off {flag_name(f.name)}.")
            continue
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        kwargs = dict(dest=f.name, default=f.default, help=f"{help_text} (default: {f.default})")
        if base is list or typing.get_origin(base) is list:
            kwargs.update(nargs="+", type=str)
        else:
            kwargs.update(type=base, metavar=base.__name__.upper())
        group.add_argument(flag_name(f.name), **kwargs)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (the full usage is 40 lines: see --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def exit(self, status: int = 0, message=None):
        # Under a launcher every rank parses the same flags: one copy of a message is enough.
        if message and os.environ.get("RANK", "0") != "0":
            message = None
        super().exit(status, message)


def build_parser() -> argparse.ArgumentParser:
    import deepspeed

    parser = _Parser(
        prog="pretrain_samoe.py",
        description="Pretrain a dense, standard-MoE or SaMoE GPT with megatron-core and DeepSpeed.",
        allow_abbrev=False,
    )
    for title, cls in GROUPS.items():
        _add_dataclass_group(parser, title, cls)
    deepspeed.add_config_arguments(parser)
    parser.add_argument("--ds_config", "--ds-config", dest="ds_config", default=None,
                        help="Short form of --deepspeed_config.")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="Set by the deepspeed launcher; ignored (LOCAL_RANK is read from the environment).")
    return parser


def config_from_namespace(ns: argparse.Namespace) -> RunConfig:
    """Build the RunConfig from parsed flags; raises ConfigError naming the bad field."""
    parts = {}
    for key, cls in GROUPS.items():
        parts[key] = cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})
    return RunConfig(**parts)


def ds_config_path(ns: argparse.Namespace) -> Optional[str]:
    paths = {p for p in (ns.ds_config, ns.deepspeed_config, ns.deepscale_config) if p}
    if len(paths) > 1:
        raise ConfigError(f"--ds_config and --deepspeed_config name different files: {sorted(paths)}; give one")
    return paths.pop() if paths else None


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[RunConfig, Optional[str]]:
    """Parse the command line into (RunConfig, ds_config path). Exits with one line on bad input."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        cfg = config_from_namespace(ns)
        return cfg, ds_config_path(ns)
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")


def all_flags() -> list[str]:
    """Every long option the entry script accepts (frozen by a test)."""
    flags = set()
    for action in build_parser()._actions:
        flags.update(o for o in action.option_strings if o.startswith("--"))
    return sorted(flags)


if __name__ == "__main__":  # pragma: no cover - debugging aid
    print(parse_args(sys.argv[1:]))
