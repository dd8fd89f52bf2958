"""`lineguard-agent samples list|label|export`: the sample store on the agent's own machine.

Access to the machine is the authority here (as for `activate`): local labels need no signature.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from ..config import load_config
from .export import ExportError, Selection, export_samples
from .files import KINDS, SampleFileError, SampleInfo, folder_bytes, read_sample, sample_folders
from .labels import LabelError, store_label
from .store import samples_root

EXIT_REFUSED = 2


def add_samples_parser(commands: argparse._SubParsersAction) -> None:
    """Register `samples list|label|export` under the agent's subcommands."""
    samples = commands.add_parser("samples", help="the sample store: list, label, export for the trainer")
    actions = samples.add_subparsers(dest="samples_command", required=True)
    listing = actions.add_parser("list", help="stored samples, newest first, and how much each class holds")
    listing.add_argument("--camera", action="append", default=[], help="only this camera (repeatable)")
    listing.add_argument("--kind", choices=KINDS, help="only this class")
    listing.add_argument("--label", choices=("ok", "nok", "unsure", "none"), help="only this label (none: unlabelled)")
    listing.add_argument("--limit", type=int, default=50, help="rows to print (default 50; the totals cover all)")
    listing.set_defaults(handler=_cmd_list)
    labeller = actions.add_parser("label", help="label stored samples (no signature needed on this machine)")
    labeller.add_argument("label", choices=("ok", "nok", "unsure"))
    labeller.add_argument("sample_ids", nargs="+", metavar="SAMPLE_ID")
    labeller.add_argument("--defect-type", default="", help="for nok: e.g. crack, scratch (a-z, 0-9, _ and -)")
    labeller.add_argument("--by", default=_user(), help="who labels (default: this user)")
    labeller.set_defaults(handler=_cmd_label)
    exporter = actions.add_parser("export", help="labelled samples -> a dataset lineguard-train reads, with a README")
    exporter.add_argument("--out", type=Path, required=True, help="a new or empty folder")
    exporter.add_argument("--format", choices=("mvtec", "csv"), default="mvtec", help="folder layout (default mvtec)")
    exporter.add_argument("--camera", action="append", default=[], help="only this camera (repeatable)")
    exporter.add_argument("--since", type=_timestamp, help="captured at or after (ISO 8601, UTC if no zone)")
    exporter.add_argument("--until", type=_timestamp, help="captured before (ISO 8601, UTC if no zone)")
    exporter.add_argument(
        "--image",
        choices=("view", "roi"),
        default="view",
        help="the model's view (default) or the ROI (samples.full_roi)",
    )
    exporter.set_defaults(handler=_cmd_export)
    for sub in (listing, labeller, exporter):
        sub.add_argument("--config", type=Path, help="the agent's agent.toml")


def _user() -> str:
    try:
        return getpass.getuser()[:64] or "local"
    except (KeyError, OSError):
        return "local"


def _timestamp(text: str) -> float:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as error:
        msg = f"{text!r} is not an ISO 8601 time, e.g. 2026-12-01T06:00"
        raise argparse.ArgumentTypeError(msg) from error
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def _read_all(root: Path) -> list[SampleInfo]:
    found = []
    for folder in sample_folders(root):
        try:
            found.append(read_sample(folder))
        except SampleFileError as error:
            print(f"skipped: {error}", file=sys.stderr)
    return sorted(found, key=lambda info: info.meta.decision.capture_ts, reverse=True)


def _cmd_list(args: argparse.Namespace) -> int:
    root = samples_root(load_config(args.config))
    every = _read_all(root)
    shown = [
        info
        for info in every
        if (not args.camera or info.camera in args.camera)
        and args.kind in (None, info.meta.kind)
        and args.label in (None, "none" if info.label is None else info.label.label)
    ]
    print(
        f"{'sample':<24} {'kind':<10} {'verdict':<8} {'score':>8} {'thresh':>8} {'model':<24} {'captured (UTC)':<19} label"
    )
    for info in shown[: args.limit]:
        verdict, label = info.meta.decision, info.label
        score = "—" if verdict.score is None else f"{verdict.score:.4g}"
        when = datetime.fromtimestamp(verdict.capture_ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        said = (
            "—"
            if label is None
            else f"{label.label}{'/' + label.defect_type if label.defect_type else ''} ({label.by})"
        )
        print(
            f"{info.meta.sample_id:<24} {info.meta.kind:<10} {verdict.verdict:<8} {score:>8} "
            f"{verdict.threshold:>8.4g} {verdict.model[:24]:<24} {when:<19} {said}"
        )
    counts = Counter((info.camera, info.meta.kind) for info in every)
    sizes: Counter[tuple[str, str]] = Counter()
    for info in every:
        sizes[(info.camera, info.meta.kind)] += folder_bytes(info.path)
    labelled = sum(info.label is not None for info in every)
    print(f"\n{len(shown)} shown of {len(every)} stored in {root} ({labelled} labelled)")
    for (camera, kind), n in sorted(counts.items()):
        print(f"  {camera}/{kind}: {n} samples, {sizes[(camera, kind)] / 2**20:.1f} MiB")
    return 0


def _cmd_label(args: argparse.Namespace) -> int:
    root = samples_root(load_config(args.config))
    failed = 0
    for sample_id in args.sample_ids:
        try:
            store_label(root, sample_id, args.label, defect_type=args.defect_type, by=args.by)
        except (LabelError, ValueError) as error:
            print(f"lineguard-agent: {sample_id}: {error}", file=sys.stderr)
            failed += 1
            continue
        print(f"{sample_id}: {args.label}{' (' + args.defect_type + ')' if args.defect_type else ''} by {args.by}")
    return EXIT_REFUSED if failed else 0


def _cmd_export(args: argparse.Namespace) -> int:
    root = samples_root(load_config(args.config))
    selection = Selection(tuple(args.camera), args.since, args.until)
    try:
        summary = export_samples(root, args.out, layout=args.format, image=args.image, selection=selection)
    except ExportError as error:
        print(f"lineguard-agent: error: {error}", file=sys.stderr)
        return EXIT_REFUSED
    splits = Counter((image.split, image.label) for image in summary.index.images)
    print(f"exported {len(summary.index.images)} labelled samples to {summary.out}")
    for (split, label), n in sorted(splits.items()):
        print(f"  {split}/{label}: {n}")
    if summary.left_out:
        print("left out: " + ", ".join(f"{n} {why}" for why, n in sorted(summary.left_out.items())))
    print(f"see {summary.out / 'README.md'}")
    return 0
