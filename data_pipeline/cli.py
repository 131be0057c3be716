"""`adm data ...` / `python -m data_pipeline ...`: write, verify and describe WebDataset shards."""

import argparse
import json
import os
import sys
from pathlib import Path


def cmd_write(args) -> int:
    from adm import __version__

    from .sources import read_source
    from .writer import check_write_options, write_dataset

    check_write_options(args.out, args.shard_size, args.workers, args.preprocess, args.image_format, args.resume,
                        args.seed)
    for flag, value in (("--split", args.split), ("--labels", args.labels)):
        if value is not None and args.layout != "imagenet":  # (a folder tree has no splits: one would be ignored)
            raise ValueError(f"{flag} is for --layout imagenet; with --layout {args.layout} give the split's own "
                             "folder or list file")
    if not args.quiet:  # (ImageNet's train split: about a minute from a local disk, minutes over NFS)
        print(f"listing {args.source} ...", file=sys.stderr, flush=True)
    source = read_source(args.source, args.layout, args.split or "train", args.labels)
    print(f"{len(source.items)} images in {len(source.classes)} classes ({source.layout}) from {args.source}",
          file=sys.stderr)
    held = {item.label for item in source.items}
    empty = [c["id"] for c in source.classes if c["index"] not in held]
    if empty:  # in ImageNet's train split, an interrupted extraction; in a val subset, expected
        print(f"warning: {len(empty)} of {len(source.classes)} classes have no images here ("
              + ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else "") + "); they keep their class numbers",
              file=sys.stderr)
    manifest = write_dataset(source, args.out, shard_size=args.shard_size, workers=args.workers,
                             preprocess=args.preprocess, resume=args.resume, seed=args.seed,
                             progress=not args.quiet, tool_version=__version__, image_format=args.image_format,
                             skip_unreadable=args.skip_unreadable)
    print(f"wrote {manifest['num_samples']} samples in {len(manifest['shards'])} shard{'s' * (len(manifest['shards']) != 1)} to {args.out}; "
          f"skipped {manifest['skipped_count']}" + (" (listed in manifest.json)" if manifest["skipped_count"] else ""))
    return 0


def cmd_verify(args) -> int:
    from .verify import verify

    if not Path(args.dir).is_dir():  # a mistyped path: the command's error, not a dataset's problem
        raise FileNotFoundError(f"{args.dir}: no such directory (expected shards written by `adm data write`)")
    report = verify(args.dir, decode=not args.no_decode, workers=args.workers, progress=not args.quiet)
    for p in report["problems"]:
        print(f"  {p}")
    status = "OK" if report["ok"] else f"{len(report['problems'])} problem(s)"
    print(f"{args.dir}: {report['shards']} shards, {report['samples_checked']} samples checked: {status}")
    return 0 if report["ok"] else 1


def cmd_info(args) -> int:
    from .verify import info

    summary = info(args.dir)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for k, v in summary.items():
            print(f"{k:>14}: {v}")
    return 0


def cmd_bench(args) -> int:
    from .bench import measure

    result = measure(args.dir, args.resolution, workers=args.workers, seconds=args.seconds,
                     batch_size=args.batch_size, crop=args.crop, jpeg_draft=args.jpeg_draft)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['images_per_s']:.1f} images/s ({result['images_per_s_per_worker']:.1f} per worker process, "
              f"{args.workers} workers) at {args.resolution}x{args.resolution} from {result['preprocess']} shards")
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("write", help="images -> WebDataset shards + manifest.json")
    p.add_argument("source", help="ImageNet root (or its ILSVRC2012_img_{train,val}.tar, read in place) / "
                   "class-folder tree / list file")
    p.add_argument("out", help="output directory (new, or an interrupted write with --resume)")
    p.add_argument("--layout", choices=["imagenet", "folder", "list"], default="imagenet",
                   help="imagenet: ILSVRC train/ and val/ (or their tars); folder: one folder per class; "
                        "list: a file of 'path<TAB>label' lines")
    p.add_argument("--split", choices=["train", "val"], help="for --layout imagenet (default: train)")
    p.add_argument("--labels", help="LOC_val_solution.csv for a flat ImageNet val folder or the val tar "
                   "(default: searched upwards)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--workers", type=int, default=1, help="writer processes")
    p.add_argument("--preprocess", default="none", help="none | max-side:N | center-crop:R")
    p.add_argument("--image-format", choices=["png", "npy"], default="png",
                   help="for center-crop: png (lossless, compact) or npy (raw uint8, fastest to load)")
    p.add_argument("--seed", type=int, default=0, help="seed of the write-time global shuffle")
    p.add_argument("--resume", action="store_true", help="complete an interrupted write")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="skip and list a source file still failing with I/O errors after 30 s of tries (a bad "
                        "sector) instead of stopping the write")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_write)
    p = sub.add_parser("verify", help="check every shard against the manifest (exit 1 on problems)")
    p.add_argument("dir", help="a directory written by `write` (shards + manifest.json)")
    p.add_argument("--no-decode", action="store_true", help="skip decoding every image")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes checking shards at once (default: the cores, at most 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("bench", help="images/s of the streaming loader")
    p.add_argument("dir", help="a directory written by `write` (shards + manifest.json)")
    p.add_argument("--resolution", type=int, required=True, help="side of the images the loader yields")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (0: in the main process)")
    p.add_argument("--seconds", type=float, default=10.0, help="how long to measure")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--crop", choices=["center", "random-resized"], default="center",
                   help="center: ADM's diffusion preprocessing; random-resized: the classifier's augmentation")
    p.add_argument("--jpeg-draft", action="store_true", help="reduced-scale JPEG decoding (faster, not ADM-exact)")
    p.add_argument("--json", action="store_true", help="one JSON object on standard output")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("info", help="summarise a dataset")
    p.add_argument("dir", help="a directory written by `write` (shards + manifest.json)")
    p.add_argument("--json", action="store_true", help="one JSON object on standard output")
    p.set_defaults(func=cmd_info)


def main(argv: list[str] | None = None, prog: str = "python -m data_pipeline") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="WebDataset shards: write, verify, info, bench")
    register(parser)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
