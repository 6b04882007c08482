"""The ``fedsparse`` command line: ``run`` a configuration, ``bench`` a suite, ``data`` fetch/split, ``config`` keys."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn

#: How long the command waits, after its work is done, for threads it did not start to end.
EXIT_GRACE_SECONDS = 2.0


def _cmd_run(args: argparse.Namespace) -> int:
    from fedsparse.config import parse_overrides
    from fedsparse.simulation import simulate

    overrides = parse_overrides(args.set)
    if args.data_dir:
        overrides["data-dir"] = args.data_dir
    df = simulate(
        args.config,
        overrides,
        out_dir=args.out,
        progress=not args.quiet,
        verbose=args.verbose,
        resume=args.resume,
        ray_address=args.ray_address,
        overwrite=args.overwrite,
    )
    last = df.dropna(subset=["test_accuracy"]).iloc[-1]
    out = Path(df.attrs.get("out_dir", args.out or ""))
    print(
        f"round {int(last['round'])}: test accuracy {last['test_accuracy']:.4f}, "
        f"up {last['cum_bytes_up'] / 1e6:.2f} MB, down {last['cum_bytes_down'] / 1e6:.2f} MB"
        + (f" — results in {out}" if str(out) else "")
    )
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from fedsparse.config import SCHEMA, defaults

    defaults()  # registers strategy keys
    for name, key in SCHEMA.items():
        if args.section and key.section != args.section:
            continue
        print(f"{name:24s} {key.default!r:>14}  [{key.section}] {key.help}; {key.describe_allowed()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedsparse", description=__doc__, epilog="--debug (anywhere on the line): show tracebacks of user errors"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one configuration on Flower's simulation engine")
    run.add_argument("config", nargs="?", help="a flat TOML file of kebab-case keys (omit: defaults)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key (repeatable)")
    run.add_argument("--out", help="output directory (default: runs/<strategy>-<dataset>-<model>-<time>)")
    run.add_argument("--data-dir", help="directory holding the datasets")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    run.add_argument(
        "--ray-address", help="connect to an existing Ray cluster (e.g. HEAD_IP:6379) instead of starting one"
    )
    run.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR from its checkpoint (needs checkpoint-every > 0), with DIR's config.toml",
    )
    run.add_argument(
        "--overwrite", action="store_true", help="replace the run already in --out (it says which files it replaces)"
    )
    run.set_defaults(func=_cmd_run)

    config = sub.add_parser("config", help="list every configuration key with its default")
    config.add_argument("--section", help="only keys of this section (core, or a strategy name)")
    config.set_defaults(func=_cmd_config)

    from fedsparse.data.cli import add_data_commands

    add_data_commands(sub)
    from fedsparse.traffic import add_traffic_command

    add_traffic_command(sub)
    from fedsparse.bench import add_bench_command

    add_bench_command(sub)
    from fedsparse.dev import add_dev_commands

    add_dev_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; user errors print one line (exit 2) unless ``--debug`` (anywhere) asks for the traceback."""
    from fedsparse.config import ConfigError
    from fedsparse.data import DatasetFormatError, DatasetNotFoundError
    from fedsparse.data.fetch import ChecksumError
    from fedsparse.stopping import EngineFailed, RunInterrupted

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    try:
        return int(args.func(args))
    except RunInterrupted as stop:
        print(f"fedsparse: {stop}", file=sys.stderr)
        return stop.exit_code
    except EngineFailed as failed:
        if debug:
            raise
        print(f"fedsparse: {failed}", file=sys.stderr)
        return 1
    except (ConfigError, DatasetNotFoundError, DatasetFormatError, ChecksumError) as err:
        if debug:
            raise
        print(f"fedsparse: error: {err}", file=sys.stderr)
        print("fedsparse: (run again with --debug for the traceback)", file=sys.stderr)
        return 2


def entry() -> NoReturn:
    """The console script: :func:`main`, then exit without joining threads Flower's engine left blocked.

    Flower's simulation engine runs clients from a ``ThreadPoolExecutor``; when Ray shuts down (a stop
    by signal, or an actor that died with it) a worker can stay in ``ray.get`` for good, and the
    interpreter's exit joins every such thread, so a finished run — results written, checkpoint
    saved — would never exit. Live non-daemon threads get :data:`EXIT_GRACE_SECONDS`, then the
    process leaves with ``os._exit`` after flushing its streams and logs.
    """
    code = main()
    deadline = time.monotonic() + EXIT_GRACE_SECONDS
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
