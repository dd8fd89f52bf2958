"""`lineguard-train`: dataset to calibrated, evaluated, signed model bundle.

`run` does every step; each step also exists alone and works on the same --out folder.
Exit codes: 0 success, 2 bad input (the message says what to fix), 1 unexpected failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from lineguard import __version__
from lineguard.agent.bundle import BundleError, Targets
from lineguard.agent.signing import KeyFileError, SignatureError, generate_key_pair

from . import pipeline
from .backbone import BACKBONES
from .calibrate import RateEstimate
from .compare import VARIANTS, compare_models
from .errors import TrainerError
from .models import model_kind

log = logging.getLogger("lineguard.trainer")


def _image_size(text: str) -> tuple[int, int]:
    """'256' -> (256, 256); '320x256' (width x height) -> (256, 320) as (height, width)."""
    try:
        if "x" in text:
            width, height = (int(part) for part in text.lower().split("x"))
            return height, width
        return int(text), int(text)
    except ValueError as error:
        msg = f"image size must be N or WIDTHxHEIGHT, e.g. 256 or 320x256, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from error


def _stages(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError as error:
        msg = f"stages must be comma-separated integers, e.g. 3,4; got {text!r}"
        raise argparse.ArgumentTypeError(msg) from error


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "data",
        type=Path,
        nargs="+",
        help="MVTec-style dataset folder or CSV manifest; more than one (the original, then exports of line "
        "samples) are merged, each image keeping its split",
    )
    parser.add_argument(
        "--calibration-fraction",
        type=float,
        default=0.5,
        help="share of test used for calibration when the dataset has no calibration split (default 0.5)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for derived splits, coreset and sampling (default 0)")


def _add_out_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="work folder shared by the steps")


def _add_model_arguments(parser: argparse.ArgumentParser, *, choose_one: bool = True) -> None:
    group = parser.add_argument_group("model", "settings left out take the model's defaults (see README)")
    if choose_one:
        group.add_argument("--model", choices=pipeline.MODEL_KINDS, default="patchcore")
    group.add_argument("--backbone", choices=BACKBONES)
    group.add_argument("--stages", type=_stages, help="backbone stages by stride exponent (3 = stride 8), e.g. 3,4")
    group.add_argument(
        "--image-size", type=_image_size, help="model input, N or WIDTHxHEIGHT, multiple of 32 (default 256)"
    )
    group.add_argument(
        "--channels",
        choices=("auto", "1", "3"),
        default="auto",
        help="1 = grey, 3 = RGB; auto follows the first training image",
    )
    patchcore = parser.add_argument_group("patchcore")
    patchcore.add_argument("--coreset-ratio", type=float, help="share of training patches kept in the bank (0.1)")
    patchcore.add_argument("--bank-size", type=int, help="cap on memory-bank patches (4096)")
    patchcore.add_argument("--bank-mb", type=float, help="cap on memory-bank RAM in MiB (64)")
    patchcore.add_argument("--bank-dtype", choices=("float32", "float16"), help="memory-bank storage type (float32)")
    patchcore.add_argument(
        "--regions",
        type=int,
        help="position-aware: cut the patch grid into N x N regions, one bank each, for fixtured parts (1 = off)",
    )
    trained = parser.add_argument_group("fastflow and fcdd")
    trained.add_argument("--epochs", type=int, help="most training epochs (fastflow 40, fcdd 60)")
    trained.add_argument(
        "--patience",
        type=int,
        help="stop after this many epochs without a better calibration AUROC (fastflow 8, fcdd 12)",
    )
    trained.add_argument("--learning-rate", type=float, help="Adam learning rate (fastflow 2e-3, fcdd 3e-4)")
    trained.add_argument("--flow-steps", type=int, help="fastflow: coupling steps per stage (8)")
    trained.add_argument("--outliers-per-image", type=float, help="fcdd: confetti outliers per good image (12)")
    parser.add_argument_group("patchcore and fastflow").add_argument(
        "--blur-sigma", type=float, help="Gaussian smoothing of the anomaly map, pixels (4)"
    )


# argparse dest -> config field; an option given for a model without that field is refused (`run`, `fit`)
# or skipped (`compare`, where the options are shared by every model compared).
_MODEL_OPTIONS = {
    "backbone": "backbone",
    "stages": "stages",
    "coreset_ratio": "coreset_ratio",
    "bank_size": "max_bank_size",
    "bank_mb": "max_bank_mb",
    "bank_dtype": "bank_dtype",
    "regions": "regions",
    "epochs": "epochs",
    "patience": "patience",
    "learning_rate": "learning_rate",
    "flow_steps": "flow_steps",
    "outliers_per_image": "outliers_per_image",
    "blur_sigma": "blur_sigma",
}


def _add_threshold_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threshold", default="f1", help="f1 | youden | fpr:<rate> | recall:<rate> | manual:<value> (default f1)"
    )


def _add_sign_key_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sign-key", type=Path, help="Ed25519 private key (from `keygen`); without it the bundle is unsigned"
    )


def _add_bundle_arguments(parser: argparse.ArgumentParser) -> None:
    _add_sign_key_argument(parser)
    parser.add_argument("--model-id", help="bundle model id (default: <dataset>-<model>)")
    parser.add_argument("--model-version", help="bundle model version (default: UTC timestamp)")
    parser.add_argument(
        "--for",
        dest="targets",
        action="append",
        default=[],
        metavar="KIND=NAME",
        help="where the bundle may serve, signed with it: line=NAME, agent=NAME, camera=NAME (repeatable); "
        "default: any agent",
    )


_TARGET_KINDS = {"line": "lines", "agent": "agents", "camera": "cameras"}


def _bundle_options(args: argparse.Namespace) -> pipeline.BundleOptions:
    """BundleOptions from --sign-key, --model-id, --model-version and --for; TrainerError for a bad --for."""
    chosen: dict[str, list[str]] = {}
    for entry in args.targets:
        kind, _, name = entry.partition("=")
        if kind not in _TARGET_KINDS or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            msg = f"--for {entry!r}: use line=NAME, agent=NAME or camera=NAME (names of letters, digits, '_' or '-')"
            raise TrainerError(msg)
        chosen.setdefault(_TARGET_KINDS[kind], []).append(name)
    targets = Targets(**{kind: tuple(names) for kind, names in chosen.items()})
    return pipeline.BundleOptions(args.sign_key, args.model_id, args.model_version, targets)


def _data_options(args: argparse.Namespace) -> pipeline.DataOptions:
    first, *extra = args.data
    return pipeline.DataOptions(
        first, calibration_fraction=args.calibration_fraction, seed=args.seed, extra=tuple(extra)
    )


def _model_config(args: argparse.Namespace, *, strict: bool = True) -> pipeline.ModelConfig:
    """The config of args.model from the model options; strict refuses options the model lacks, else skips them."""
    kind = model_kind(args.model)
    fields = {f.name for f in dataclasses.fields(kind.config_type)}
    given = {dest: field for dest, field in _MODEL_OPTIONS.items() if getattr(args, dest) is not None}
    if strict and (foreign := [f"--{dest.replace('_', '-')}" for dest, field in given.items() if field not in fields]):
        msg = f"{', '.join(foreign)} do(es) not apply to {kind.name}; drop it or choose another --model"
        raise TrainerError(msg)
    values: dict[str, object] = {field: getattr(args, dest) for dest, field in given.items() if field in fields}
    if args.image_size is not None:
        values["input_height"], values["input_width"] = args.image_size
    values["channels"] = (
        int(args.channels) if args.channels != "auto" else pipeline.detect_dataset_channels(_data_options(args))
    )
    values["seed"] = args.seed
    return kind.config_type(**values)


COMPARE_CHOICES = (*pipeline.MODEL_KINDS, *VARIANTS)


def _model_names(text: str) -> tuple[str, ...]:
    """'patchcore,fcdd' -> ("patchcore", "fcdd"), each a known model kind or compare variant, each once."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if unknown := [name for name in names if name not in COMPARE_CHOICES]:
        msg = f"unknown model {', '.join(map(repr, unknown))}; choose from {', '.join(COMPARE_CHOICES)}"
        raise argparse.ArgumentTypeError(msg)
    if not names or len(set(names)) != len(names):
        msg = f"list each model once, comma-separated, e.g. {','.join(pipeline.MODEL_KINDS)}; got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return names


def _add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models",
        type=_model_names,
        default=",".join(COMPARE_CHOICES),
        help=f"comma-separated models or variants to compare (default {','.join(COMPARE_CHOICES)}); "
        "a model option reaches only the models that have it",
    )
    _add_model_arguments(parser, choose_one=False)


def _model_configs(args: argparse.Namespace) -> dict[str, pipeline.ModelConfig]:
    """Name -> config for each name in args.models from the shared model options, each model taking the ones it has.

    A variant (compare.VARIANTS) is its model kind with the shared options, then the variant's own settings.
    """
    if args.channels == "auto":  # detect once, not once per model
        channels = pipeline.detect_dataset_channels(_data_options(args))
        args = argparse.Namespace(**{**vars(args), "channels": str(channels)})
    configs: dict[str, pipeline.ModelConfig] = {}
    for name in args.models:
        kind, settings = VARIANTS.get(name, (name, {}))
        config = _model_config(argparse.Namespace(**{**vars(args), "model": kind}), strict=False)
        configs[name] = dataclasses.replace(config, **settings)
    return configs


def _cmd_compare(args: argparse.Namespace) -> None:
    data, configs = _data_options(args), _model_configs(args)
    result = compare_models(data, args.out, configs, threshold=args.threshold, sign_key=args.sign_key, progress=True)
    for row in result.rows:
        print(
            f"{row.model:<18} image_auroc {_fmt(row.image_auroc)}  f1 {_fmt(row.f1)}  "
            f"{row.cpu_ms_per_image:.1f} ms/image  {row.bundle_bytes:,} bytes  {args.out / row.report}"
        )
    print(f"{'pick':<18} {result.pick}")
    print(f"{'comparison':<18} {result.html_path}")


def _cmd_run(args: argparse.Namespace) -> None:
    work = pipeline.Workdir(args.out)
    metrics, manifest, index = pipeline.run_all(
        _data_options(args),
        work,
        _model_config(args),
        threshold=args.threshold,
        bundle_options=_bundle_options(args),
    )
    test = metrics["test"]
    print(
        f"bundle   {work.bundle_dir}  ({manifest.model_id} {manifest.model_version}, threshold {manifest.threshold.value:.4g} by {manifest.threshold.method})"
    )
    print(f"report   {index}")
    print(
        "test     "
        + "  ".join(
            f"{key} {_fmt(test.get(key))}" for key in ("image_auroc", "average_precision", "f1", "pixel_auroc", "aupro")
        )
    )
    by_type = test.get("by_defect_type")
    if isinstance(by_type, dict) and len(by_type) > 1:
        print("escapes  " + ", ".join(f"{name} {entry['escapes']} of {entry['n']}" for name, entry in by_type.items()))


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "—" if value is None else str(value)


def _cmd_compare_bundles(args: argparse.Namespace) -> None:
    from .compare_bundles import compare_bundles

    result = compare_bundles(
        args.old,
        args.new,
        args.data,
        args.out,
        trusted_keys=args.trusted_key,
        close_call_margin=args.close_call_margin,
    )
    for name, facts, errors in (("old", result.old, result.overall.old), ("new", result.new, result.overall.new)):
        print(
            f"{name}  {facts.label:<32} threshold {facts.threshold:.4g}  false rejects {_rate(errors.false_rejects)}"
            f"  escapes {_rate(errors.escapes)}  close calls {errors.close_calls}"
        )
    print(f"changed  {len(result.changed)} of {len(result.images)} images changed verdict")
    alarm = result.overall.escapes_rise and sys.stdout.isatty()
    print(f"\033[1;31m{result.headline()}\033[0m" if alarm else result.headline())
    print(f"page     {result.html_path}")


def _rate(rate: RateEstimate | None) -> str:
    if rate is None:
        return "—"
    return f"{rate.count}/{rate.total} ({100 * rate.rate:.1f} %, 95 % CI {100 * rate.low:.1f}-{100 * rate.high:.1f})"


def _cmd_make_sample_data(args: argparse.Namespace) -> None:
    from .sample_data import SampleDataSpec, make_sample_dataset

    try:
        spec = SampleDataSpec(image_size=args.image_size, n_train=args.train, seed=args.seed)
    except ValueError as error:
        raise TrainerError(str(error)) from error
    for folder in make_sample_dataset(args.out, categories=args.categories, spec=spec):
        print(folder)


def _cmd_keygen(args: argparse.Namespace) -> None:
    private_path, public_path = generate_key_pair(args.key, overwrite=args.force)
    print(f"private key {private_path} (keep secret)\npublic key  {public_path} (give to agents: trusted keys)")


# name -> (help, argument adders, handler); main ignores what a handler returns (a step's result, for the API)
COMMANDS: dict[
    str, tuple[str, Sequence[Callable[[argparse.ArgumentParser], None]], Callable[[argparse.Namespace], object]]
] = {
    "run": (
        "fit, calibrate, evaluate, export, bundle and report in one go",
        (_add_data_arguments, _add_out_argument, _add_model_arguments, _add_threshold_argument, _add_bundle_arguments),
        _cmd_run,
    ),
    "compare": (
        "run every step for several models into OUT/<model>/ and compare them in OUT/comparison.html",
        (
            _add_data_arguments,
            _add_out_argument,
            _add_compare_arguments,
            _add_threshold_argument,
            _add_sign_key_argument,
        ),
        _cmd_compare,
    ),
    "fit": (
        "fit a model on the train split",
        (_add_data_arguments, _add_out_argument, _add_model_arguments),
        lambda a: pipeline.fit(_data_options(a), pipeline.Workdir(a.out), _model_config(a)),
    ),
    "calibrate": (
        "score the calibration split and choose the threshold",
        (_add_data_arguments, _add_out_argument, _add_threshold_argument),
        lambda a: pipeline.calibrate(_data_options(a), pipeline.Workdir(a.out), a.threshold),
    ),
    "evaluate": (
        "score the test split and write metrics.json",
        (_add_data_arguments, _add_out_argument),
        lambda a: pipeline.evaluate(_data_options(a), pipeline.Workdir(a.out)),
    ),
    "export": (
        "export model.onnx and check parity with torch",
        (_add_out_argument,),
        lambda a: pipeline.export(pipeline.Workdir(a.out)),
    ),
    "bundle": (
        "write (and sign) the model bundle",
        (_add_out_argument, _add_bundle_arguments),
        lambda a: pipeline.bundle(pipeline.Workdir(a.out), _bundle_options(a)),
    ),
    "report": (
        "render report/index.html",
        (_add_out_argument,),
        lambda a: print(pipeline.report(pipeline.Workdir(a.out))),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lineguard-train", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"lineguard {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, adders, handler) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        for add in adders:
            add(sub)
        sub.set_defaults(handler=handler)
    sample = commands.add_parser("make-sample-data", help="write MVTec-style sample data from scikit-image textures")
    sample.add_argument("out", type=Path)
    sample.add_argument("--categories", nargs="+", default=["brick", "gravel", "grass"])
    sample.add_argument("--train", type=int, default=60, help="good training images per category (default 60)")
    sample.add_argument("--image-size", type=int, default=256)
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(handler=_cmd_make_sample_data)
    versus = commands.add_parser(
        "compare-bundles",
        help="score two bundles on the same labelled images (e.g. an export of line samples): false rejects, "
        "escapes, changed verdicts; a page and JSON",
    )
    versus.add_argument("old", type=Path, help="the bundle serving now")
    versus.add_argument("new", type=Path, help="the candidate bundle")
    versus.add_argument(
        "--data", type=Path, nargs="+", required=True, help="labelled datasets (folders or CSV manifests)"
    )
    versus.add_argument("--out", type=Path, required=True, help="folder for compare.html and compare.json")
    versus.add_argument(
        "--trusted-key", type=Path, action="append", default=[], help="check both signatures against this public key"
    )
    versus.add_argument(
        "--close-call-margin",
        type=float,
        default=0.2,
        help="count goods accepted within this share of the way from median good score to threshold (as the "
        "agent's samples.close_call_margin; default 0.2)",
    )
    versus.set_defaults(handler=_cmd_compare_bundles)
    keygen = commands.add_parser("keygen", help="make an Ed25519 key pair for signing bundles")
    keygen.add_argument("key", type=Path, help="private key path; the public key goes beside it as .pub")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing key")
    keygen.set_defaults(handler=_cmd_keygen)
    from .engines.command import add_build_engine_parser  # TensorRT engines (issue 5): its own module

    add_build_engine_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        args.handler(args)
    except (TrainerError, BundleError, SignatureError, KeyFileError) as error:
        print(f"lineguard-train: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
