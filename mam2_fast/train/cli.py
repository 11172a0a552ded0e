"""The command line the training entries share (``python -m mam2_fast.pretrain`` / ``.finetune``):
``--config``, ``--resume``, ``--output-dir``, ``--max-steps``, ``--overwrite``, ``--print-config``
and dotted overrides; ``main`` resolves the config, trains and maps errors to exit codes."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Callable, Optional

from mam2_fast.config import ConfigError


def resume_value_as_override(args: argparse.Namespace) -> argparse.Namespace:
    """``--resume key.sub=value`` (no checkpoint path given, an override right after it):
    resume from the latest checkpoint and keep the override, instead of reading it as a path.
    ``--resume RUN_DIR``: resume that run folder (= ``--resume --output-dir RUN_DIR``)."""
    r = args.resume
    if r and r != "auto" and re.match(r"^[A-Za-z_]\w*(\.\w+)+=", r) and not os.path.exists(r):
        args.overrides = [r, *args.overrides]
        args.resume = "auto"
    elif r and r != "auto" and os.path.isdir(os.path.expanduser(r)):
        # ``--resume RUN_DIR`` (as init=, export and evaluate take a run folder): that run, from
        # its newest checkpoint that verifies, with its saved config unless --config is given
        if args.output_dir and os.path.realpath(os.path.expanduser(args.output_dir)) != os.path.realpath(
                os.path.expanduser(r)):
            raise SystemExit(f"--resume {r} is a run folder but --output-dir names another ({args.output_dir})")
        args.output_dir, args.resume = r, "auto"
    return args


def training_parser(prog: str, doc: str, config_help: str, resume_help: str, overrides_help: str,
                    extra: Callable[[argparse.ArgumentParser], None] = lambda p: None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", help=config_help)
    extra(p)
    p.add_argument("--resume", nargs="?", const="auto", default=None, help=resume_help)
    p.add_argument("--output-dir", help="shorthand for train.output_dir=...")
    p.add_argument("--max-steps", type=int, help="shorthand for train.max_steps=...")
    p.add_argument("--overwrite", action="store_true",
                   help="replace another run's files in train.output_dir (shorthand for train.overwrite=true)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help=overrides_help)
    return p


def parse(parser: argparse.ArgumentParser, argv: Optional[list[str]]) -> argparse.Namespace:
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after options
    return resume_value_as_override(args)


def shorthand_overrides(args: argparse.Namespace) -> list[str]:
    """``--output-dir`` / ``--max-steps`` / ``--overwrite`` as dotted overrides (after the given ones)."""
    overrides = []
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if getattr(args, "overwrite", False):
        overrides.append("train.overwrite=true")
    return overrides


def main(args: argparse.Namespace, resolve_config: Callable, train: Callable, format_summary: Callable,
         user_errors: tuple = ()) -> int:
    """Resolve, train, print the summary; exit 2 on a config error (or one of ``user_errors``:
    ``(exception class, label)``), 143 after a SIGTERM stop (checkpoint written), else 0."""
    try:
        cfg = resolve_config(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    try:
        summary = train(cfg, resume=args.resume, log=lambda s: print(f"[mam2_fast] {s}", flush=True))
    except tuple(cls for cls, _ in user_errors) as e:
        label = next(label for cls, label in user_errors if isinstance(e, cls))
        print(f"{label}: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary), flush=True)
    from mam2_fast.train.distributed import EXIT_SIGTERM
    return EXIT_SIGTERM if summary.get("interrupted") else 0   # stopped by SIGTERM, checkpoint written
