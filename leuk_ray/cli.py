"""Shared command-line plumbing: the common flags and the one-line error handler.

Every ``python -m leuk_ray.<cmd>`` builds its parser with ``common_parser`` and runs its ``main``
through ``run_main``, which turns a ``UserError`` into one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Callable, Sequence

from leuk_ray.config import Config, describe_fields, list_presets, load_config
from leuk_ray.errors import NonFiniteLossError, UserError


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action: argparse.Action) -> str | None:
        # a help text that already says its default (one that comes from the config) keeps it
        # alone, instead of gaining a second "(default: None)"
        text = action.help or ""
        return text if "(default:" in text else super()._get_help_string(action)


def common_parser(prog: str, description: str, *, data: bool = True, out: bool = True,
                  config_keys_epilog: bool = True) -> argparse.ArgumentParser:
    epilog = ("config keys (set with --set KEY=VALUE or in a --config YAML):\n" + describe_fields()
              if config_keys_epilog else None)
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=_Formatter,
                                epilog=epilog)
    if data:
        p.add_argument("--data", metavar="DIR", default=None,
                       help="data directory (overrides data.root)")
    p.add_argument("--config", metavar="YAML", default=None, help="config file")
    p.add_argument("--preset", default=None, choices=list_presets() or None,
                   help="start from a packaged recipe")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="override one config key, e.g. --set train.epochs=3 (repeatable)")
    if out:
        p.add_argument("--out", metavar="DIR", default=None, help="output directory")
    p.add_argument("--smoke-test", action="store_true",
                   help="tiny model, 64 px, few images and epochs: the whole run in minutes on a CPU")
    p.add_argument("--verbose", action="store_true",
                   help="also print Ray's, Tune's and Optuna's own output (by default it stays in "
                        "Ray's log files, /tmp/ray/session_latest/logs)")
    return p


def config_from_args(args: argparse.Namespace, *, base: dict | None = None) -> Config:
    overrides = list(args.overrides)
    if getattr(args, "data", None):
        overrides.insert(0, f"data.root={args.data}")
    return load_config(args.config, overrides, preset=args.preset, smoke=args.smoke_test, base=base)


def check_port_free(host: str, port: int) -> None:
    """A ``--host``/``--port`` this machine can listen on, or one clear error line."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port}: use a port in 1..65535")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror}); "
                            "choose another --port (or stop what uses it)") from None


def run_main(main: Callable[[Sequence[str] | None], int | None],
             argv: Sequence[str] | None = None) -> None:
    """Run a command's main; a UserError becomes one line on stderr and exit code 2."""
    try:
        code = main(argv)
    except (UserError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; rerun to continue where it can resume",
              file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
