"""The `lazyfs` command.

Every subcommand is a function taking the parsed arguments. `main()` maps LazyfsError to a
one-line message on stderr and the error's exit code; tracebacks only with --debug.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

from lazyfs import __version__
from lazyfs.errors import FormatError, LazyfsError, NotFound
from lazyfs.format import FORMATS


class UsageError(LazyfsError):
    """The command line asks for something impossible."""

    exit_code = 2

log = logging.getLogger("lazyfs")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def _chunk_size(text: str) -> int:
    from lazyfs.format.toc import MAX_CHUNK_SIZE  # readers refuse larger chunks

    value = _positive_int(text)
    if value > MAX_CHUNK_SIZE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_CHUNK_SIZE}: {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _non_negative_float(text: str) -> float:
    value = _float(text)
    if not value >= 0:  # (also refuses nan)
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lazyfs", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"lazyfs {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = commands.add_parser(
        "convert", help="rewrite a layer tar or an image into seekable eStargz",
        description="Convert a plain/gzip/zstd layer tar into one eStargz blob (printing its TOC "
                    "digest), or an OCI layout, oci-archive or docker-archive into an OCI image "
                    "whose layers are eStargz.")
    convert.add_argument("source", help="layer tar, OCI layout dir[:TAG], oci-archive or docker-archive")
    convert.add_argument("destination", help="output blob (layer input) or OCI layout directory")
    convert.add_argument("--archive", action="store_true", help="write an oci-archive tar instead of a layout")
    convert.add_argument("--chunk-size", type=_chunk_size, default=4 << 20, metavar="BYTES",
                         help="largest uncompressed chunk of a file (default 4 MiB)")
    convert.add_argument("--format", choices=FORMATS, default="estargz",
                         help="estargz (gzip members, the default) or zstd:chunked (zstd frames)")
    convert.add_argument("--compression-level", type=int, metavar="N",
                         help="gzip 0-9 (default 9, as the reference uses) or zstd 1-22 (default 3)")
    convert.add_argument("--startup-compression-level", type=int, metavar="N",
                         help="level for what a cold mount waits for, the TOC and the prioritized "
                              "files (default 9 for estargz, 19 for zstd:chunked)")
    convert.add_argument("--prioritize", metavar="LIST",
                         help="file of paths (one per line, in access order) to put first for "
                              "prefetch, as `lazyfs record` writes it (its #read lines: what of "
                              "each file to prefetch)")
    convert.add_argument("--workers", type=_positive_int, metavar="N",
                         help="compression threads (default: every core); output is the same for any N")
    convert.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                         help="progress bar (default: on a terminal, for multi-layer images)")
    _add_source_options(convert)
    convert.set_defaults(run=_cmd_convert)

    inspect = commands.add_parser("inspect", help="show layers, entries, chunks and sizes")
    inspect.add_argument("target", help="eStargz blob or OCI image (layout dir[:TAG] or oci-archive)")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    _add_source_options(inspect)
    inspect.set_defaults(run=_cmd_inspect)

    verify = commands.add_parser(
        "verify", help="check footer, TOC digest, every chunk, and the tar against the TOC")
    verify.add_argument("target", help="eStargz blob or OCI image (layout dir[:TAG] or oci-archive)")
    verify.add_argument("--toc-digest", metavar="DIGEST",
                        help="pin a lone blob's TOC digest (images pin it in the manifest)")
    _add_verify_key_option(verify)
    _add_source_options(verify)
    verify.set_defaults(run=_cmd_verify)

    keygen = commands.add_parser(
        "keygen", help="make a signing key pair: PREFIX.key (private) and PREFIX.pub",
        description="Write PREFIX.key (PKCS#8 PEM, mode 0600; encrypted with "
                    "$LAZYFS_KEY_PASSWORD when set) and PREFIX.pub (public key PEM, as "
                    "`cosign verify --key` and openssl read it).")
    keygen.add_argument("prefix")
    keygen.add_argument("--type", choices=("ecdsa-p256", "ed25519"), default="ecdsa-p256",
                        dest="key_type", help="key type (default ecdsa-p256, as cosign's)")
    keygen.set_defaults(run=_cmd_keygen)

    sign = commands.add_parser(
        "sign", help="sign an image's manifest digest into its OCI layout (cosign's format)",
        description="Sign the manifest that IMAGE (a local OCI layout DIR[:TAG|@DIGEST]) "
                    "resolves to: a cosign simple-signing payload, stored in the layout under "
                    "the tag sha256-<hex>.sig, next to any earlier signatures. The key's "
                    "password, if any, comes from $LAZYFS_KEY_PASSWORD.")
    sign.add_argument("image")
    sign.add_argument("--key", required=True, help="private key (PEM) from `lazyfs keygen`")
    sign.add_argument("--identity", metavar="NAME",
                      help="the payload's docker-reference (default: the layout's path)")
    sign.set_defaults(run=_cmd_sign)

    mount = commands.add_parser(
        "mount", help="mount a seekable image read-only, fetching chunks on demand",
        description="Mount an eStargz blob (path or http(s) URL) or an OCI image (layout "
                    "DIR[:TAG|@DIGEST], oci-archive, or a layout on a web server: "
                    "https://host/path/layout:TAG). Returns once the mount is ready.")
    mount.add_argument("image")
    mount.add_argument("mountpoint")
    _add_mount_options(mount)
    mount.add_argument("--foreground", action="store_true", help="stay attached (do not daemonize)")
    mount.add_argument("--log-file", help="where the background daemon logs (default: nowhere)")
    mount.set_defaults(run=_cmd_mount)

    run = commands.add_parser(
        "run", help="run a program from a lazily mounted image: lazyfs run IMAGE [-- CMD ARGS...]",
        description="Mount IMAGE, put a writable overlay on top, provide /proc, /dev and /sys, "
                    "and run CMD chrooted into it in a private mount namespace (or in a crun "
                    "container with --runtime crun); its output streams through and its exit "
                    "status is returned. As a container runtime would, the image config gives "
                    "the environment (Env, plus the caller's TERM), the working directory "
                    "(WorkingDir), the user (User) and, without CMD, the program (Entrypoint + "
                    "Cmd). Everything is cleaned up. Options go before IMAGE.")
    run.add_argument("image")
    # Not dest "command": that names the subcommand, which error messages print.
    run.add_argument("program", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...",
                     help="the program to run (default: the image's Entrypoint + Cmd)")
    _add_runtime_options(run)
    _add_mount_options(run)
    run.set_defaults(run=_cmd_run)

    record = commands.add_parser(
        "record", help="run a program as `run` does and list the files it read, in order: "
                       "lazyfs record IMAGE --output LIST [-- CMD ARGS...]",
        description="Run CMD from IMAGE exactly as `lazyfs run` does and write LIST: the "
                    "regular files it read (image paths relative to the root, one per line), in "
                    "first-read order, recorded by the mount itself. `lazyfs convert IMAGE OUT "
                    "--prioritize LIST` puts them first so that mounts prefetch them. The "
                    "program's output streams through and its exit status is returned; LIST is "
                    "written only when the program ran. Options go before IMAGE, or after it "
                    "and before `--`.")
    record.add_argument("image")
    record.add_argument("program", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...",
                        help="the program to run (default: the image's Entrypoint + Cmd)")
    _add_record_options(record)
    record.set_defaults(run=_cmd_record)

    push = commands.add_parser(
        "push", help="copy a converted image to a directory, an S3 prefix or a registry",
        description="Copy IMAGE (an OCI layout DIR[:TAG|@DIGEST] or an oci-archive) to DEST: "
                    "DIR[:TAG] (creates or updates an OCI layout, for a web server or CDN to "
                    "serve), s3://BUCKET/PREFIX/LAYOUT[:TAG] or oci://REGISTRY/REPO[:TAG]. "
                    "Blobs go first and are skipped when already there, then manifests, then "
                    "the tag (DEST's, else IMAGE's), so readers never see a partial image. "
                    "Signatures (cosign's sha256-<hex>.sig tags) are copied along. Prints the "
                    "reference to mount.")
    push.add_argument("image", help="OCI layout DIR[:TAG|@DIGEST] or oci-archive")
    push.add_argument("destination", help="DIR[:TAG], s3://BUCKET/PREFIX/LAYOUT[:TAG] or "
                                          "oci://REGISTRY/REPO[:TAG]")
    push.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                      help="progress bar (default: on a terminal)")
    _add_source_options(push)
    push.set_defaults(run=_cmd_push)

    umount = commands.add_parser("umount", help="unmount (also clears the mount of a dead daemon)")
    umount.add_argument("mountpoint")
    umount.set_defaults(run=_cmd_umount)

    stats = commands.add_parser("stats", help="per-layer fetch and cache figures of a running mount")
    stats.add_argument("mountpoint")
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.set_defaults(run=_cmd_stats)

    serve = commands.add_parser(
        "serve", help="publish a directory (an OCI layout) over HTTP with Range support",
        description="A small static server for loopback and quick sharing; any static web "
                    "server or CDN serves lazyfs images just as well.")
    serve.add_argument("directory")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.set_defaults(run=_cmd_serve)

    demo = commands.add_parser("demo", help="run the main job end to end on a built-in sample")
    demo.add_argument("--workdir", help="where to put the sample and its outputs (default: a temp dir)")
    demo.set_defaults(run=_cmd_demo)
    return parser


def _size(text: str) -> int:
    """A byte size: plain bytes or with a K/M/G/T suffix (powers of 1024)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 500M, 10G)") from None


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"a header is NAME:VALUE, not {text!r}")
    return name.strip(), value.strip()


def _add_mount_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--toc-digest", metavar="DIGEST",
                        help="pin a lone blob's TOC digest (images pin it in the manifest)")
    parser.add_argument("--insecure-skip-verify", action="store_true",
                        help="mount a lone blob with no pinned TOC digest (reported by stats)")
    parser.add_argument("--cache-dir", help="chunk cache (default: /var/cache/lazyfs for root, "
                                            "else $XDG_CACHE_HOME/lazyfs)")
    parser.add_argument("--cache-size", type=_size, default="10G", metavar="SIZE",
                        help="cache bound, least recently used chunks evicted (default 10G)")
    _add_verify_key_option(parser)
    _add_source_options(parser)
    from lazyfs.fetchoptions import BUSY_POLL_S, FetchOptions  # light: no trio, no HTTP

    default = FetchOptions()
    parser.add_argument("--max-connections", type=_positive_int, default=default.max_connections,
                        metavar="N", help="parallel requests (kept-alive connections) per layer "
                                          f"source (default {default.max_connections})")
    parser.add_argument("--retries", type=_non_negative_int, default=default.retry.retries,
                        metavar="N", help="retries of a failed request (connection errors, "
                                          "timeouts, 5xx, 429), with exponential backoff "
                                          f"(default {default.retry.retries})")
    parser.add_argument("--timeout", type=_positive_float, default=default.read_timeout_s,
                        metavar="SECONDS", help="longest wait for the next bytes of an answer "
                                                f"(default {default.read_timeout_s:g})")
    parser.add_argument("--connect-timeout", type=_positive_float,
                        default=default.connect_timeout_s, metavar="SECONDS",
                        help=f"longest wait to connect (default {default.connect_timeout_s:g})")
    parser.add_argument("--merge-gap", type=_size, default=default.merge_gap_bytes,
                        metavar="SIZE", help="fetch ranges at most this far apart as one "
                                             "(default 64K)")
    parser.add_argument("--no-prefetch", action="store_true",
                        help="do not fetch the prioritized files of each layer at mount")
    parser.add_argument("--no-background-fetch", action="store_true",
                        help="do not fetch the rest of the image in the background")
    parser.add_argument("--kernel-readahead", type=_size, default="1M", metavar="SIZE",
                        help="the kernel's readahead window for the mount, which also sizes its "
                             "read requests to lazyfs (at most 1M count; default 1M)")
    parser.add_argument("--startup-readahead", type=_size, default="128K", metavar="SIZE",
                        help="the window while `lazyfs record` records, and while a program "
                             "starts from an image whose prefetch is what a recorded start-up "
                             "read; keep it the same for both (default 128K)")
    parser.add_argument("--busy-poll", type=_non_negative_float, default=BUSY_POLL_S,
                        metavar="SECONDS", help="keep polling for the next FUSE request this "
                        "long after each one before sleeping: a sleeping CPU wakes slower than "
                        f"a small read is served (default {BUSY_POLL_S:g}; 0: never)")
    parser.add_argument("--bandwidth-limit", type=_size, metavar="BYTES_PER_S",
                        help="average cap of the background fetch, e.g. 5M (default: none)")
    parser.add_argument("--memory-cache", type=_size, default=default.memory_bytes, metavar="SIZE",
                        help="verified chunks the daemon keeps in memory, least recently used "
                             "dropped (default 64M)")


def _add_source_options(parser: argparse.ArgumentParser) -> None:
    """How to reach remote images: every command that reads one takes these."""
    parser.add_argument("--header", type=_header, action="append", default=[], metavar="NAME:VALUE",
                        help="HTTP header sent with every request (repeatable)")
    parser.add_argument("--ca-cert", help="CA bundle for https sources")
    parser.add_argument("--s3-endpoint", metavar="URL",
                        help="S3-compatible endpoint for s3:// images (default: AWS, or "
                             "$AWS_ENDPOINT_URL)")


def _add_verify_key_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verify-key", action="append", default=[], metavar="PUB",
                        help="refuse the image unless it carries a valid signature of its "
                             "manifest by this public key (repeatable: any one suffices)")


def _verify_keys(args) -> tuple[str, ...]:
    # Absolute: the mount daemon may resolve the image after a chdir.
    return tuple(os.path.abspath(path) for path in args.verify_key)


def _source_options(args):
    from lazyfs.imageref import SourceOptions

    return SourceOptions(headers=dict(args.header) or None, ca_cert=args.ca_cert,
                         s3_endpoint=args.s3_endpoint)


def _fetch_options(args):
    import dataclasses

    from lazyfs.fetchoptions import FetchOptions, RetryPolicy

    return FetchOptions(
        max_connections=args.max_connections,
        retry=dataclasses.replace(RetryPolicy(), retries=args.retries),
        read_timeout_s=args.timeout, connect_timeout_s=args.connect_timeout,
        merge_gap_bytes=args.merge_gap, prefetch=not args.no_prefetch,
        background_fetch=not args.no_background_fetch,
        background_bytes_per_s=args.bandwidth_limit or None, memory_bytes=args.memory_cache)


def _add_record_options(parser: argparse.ArgumentParser) -> None:
    from lazyfs.record import DEFAULT_LIMIT  # a light module: no FUSE, no trio

    parser.add_argument("--output", "-o", metavar="LIST",
                        help="where to write the list (required; written when the program has "
                             "run, replacing LIST)")
    parser.add_argument("--max-files", type=_positive_int, default=DEFAULT_LIMIT, metavar="N",
                        help=f"record at most N files (default {DEFAULT_LIMIT:,}); the daemon's "
                             "memory for the recording is bounded by it and by the image's size")
    _add_runtime_options(parser)
    _add_mount_options(parser)


def _add_runtime_options(parser: argparse.ArgumentParser) -> None:
    """How `run` and `record` start the program."""
    parser.add_argument("--runtime", choices=("chroot", "crun"), default="chroot",
                        help="chroot (default) or crun: an OCI container run by crun "
                             "(apt-get install crun)")
    parser.add_argument("--network", choices=("host", "none"), default="host",
                        help="host (default): share the host's network; none: a private "
                             "network namespace with only loopback")


def _record_command(args) -> list[str]:
    """The program of `lazyfs record`, once the options given after IMAGE are parsed.

    REMAINDER takes everything after IMAGE, so `record IMAGE --output LIST -- CMD` leaves
    `--output LIST -- CMD` in args.program: what comes before `--` (all of it, when there is
    no `--`) is options when it starts with one. A program never starts with "-".
    """
    program = list(args.program)
    if program and program[0].startswith("-") and program[0] != "--":
        split = program.index("--") if "--" in program else len(program)
        options = argparse.ArgumentParser(prog="lazyfs record", add_help=False)
        _add_record_options(options)
        options.parse_args(program[:split], namespace=args)
        program = program[split:]
    return program[1:] if program[:1] == ["--"] else program


def _mount_options(args):
    from lazyfs.mount import MountOptions

    return MountOptions(toc_digest=args.toc_digest, insecure=args.insecure_skip_verify,
                        cache_dir=args.cache_dir, cache_bytes=args.cache_size,
                        foreground=getattr(args, "foreground", False),
                        log_file=getattr(args, "log_file", None), headers=dict(args.header),
                        ca_cert=args.ca_cert, s3_endpoint=args.s3_endpoint,
                        kernel_readahead_bytes=args.kernel_readahead,
                        startup_readahead_bytes=args.startup_readahead,
                        busy_poll_s=args.busy_poll, fetch=_fetch_options(args),
                        verify_keys=_verify_keys(args))


def _cmd_mount(args) -> int:
    from lazyfs.mount import mount

    return mount(args.image, args.mountpoint, _mount_options(args))


def _cmd_run(args) -> int:
    from lazyfs.source import preconnect

    # The image's server is connected to while the rest of lazyfs loads (a round trip saved).
    preconnect.start(args.image)
    try:
        from lazyfs.run import run

        command = args.program[1:] if args.program[:1] == ["--"] else args.program
        return run(args.image, command, _mount_options(args), runtime=args.runtime,
                   network=args.network)
    finally:
        preconnect.discard()


def _cmd_record(args) -> int:
    from lazyfs.record import record

    command = _record_command(args)
    if not args.output:
        raise LazyfsError("--output LIST is required: where to write the list of files")
    return record(args.image, command, args.output, _mount_options(args), runtime=args.runtime,
                  network=args.network, limit=args.max_files)


def _cmd_umount(args) -> int:
    from lazyfs.mount import umount

    return umount(args.mountpoint)


def _cmd_stats(args) -> int:
    from lazyfs import stats

    return _show(stats.read_stats(args.mountpoint), args.json, stats.print_stats)


def _show(report: dict, as_json: bool, print_human) -> int:
    """Print a report as indented JSON or in its human form."""
    if as_json:
        import json

        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_human(report, sys.stdout)
    return 0


def _read_prioritized(path: str | None):
    """The list's paths, and the recorded reads of them (lazyfs.format.workload)."""
    from lazyfs.format import workload

    if path is None:
        return workload.WorkloadList()
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise NotFound(f"cannot read the prioritized list {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise FormatError(f"the prioritized list {path} is not UTF-8: {exc.reason} at byte "
                          f"{exc.start}") from None
    return workload.parse(text, where=path)


def _cmd_convert(args) -> int:
    from converter.layer import LayerOptions, convert_layer
    from converter import inputs

    _check_level(args.format, "--compression-level", args.compression_level)
    _check_level(args.format, "--startup-compression-level", args.startup_compression_level)
    listed = _read_prioritized(args.prioritize)
    options = LayerOptions(
        format=args.format,
        chunk_size=args.chunk_size,
        compression_level=args.compression_level,
        startup_compression_level=args.startup_compression_level,
        prioritized_files=tuple(listed.paths),
        prioritized_reads=tuple((path, tuple(extents))
                                for path, extents in listed.reads.items()),
        workers=args.workers,
    )
    if os.path.isfile(args.source) and inputs.detect_kind(args.source) is inputs.InputKind.LAYER:
        result = convert_layer(args.source, args.destination, options)
        print(f"wrote {args.destination}: {result.blob_size} bytes, "
              f"{result.uncompressed_size} uncompressed", file=sys.stderr)
        print(result.toc_digest)
        return 0
    from converter.image import convert_image

    image = convert_image(args.source, args.destination, archive=args.archive,
                          options=_image_options(options), progress=args.progress,
                          sources=_source_options(args))
    print(f"wrote {args.destination}: {len(image.layers)} {args.format} layers, manifest "
          f"{image.manifest_digest}" + (f", tag {image.tag}" if image.tag else ""), file=sys.stderr)
    print(image.manifest_digest)
    return 0


def _check_level(layer_format: str, option: str, level: int | None) -> None:
    low, high = (0, 9) if layer_format == "estargz" else (1, 22)
    if level is not None and not low <= level <= high:
        raise UsageError(f"{option} for {layer_format} must be {low}..{high}, not {level}")


def _image_options(options):
    import dataclasses

    return dataclasses.replace(options, missing_prioritized_ok=True)


def _cmd_inspect(args) -> int:
    from lazyfs import inspect

    return _show(inspect.inspect_target(args.target, _source_options(args)), args.json,
                 inspect.print_report)


def _cmd_verify(args) -> int:
    from lazyfs import inspect

    for line in inspect.verify_target(args.target, args.toc_digest, _source_options(args),
                                      verify_keys=_verify_keys(args)):
        print(line)
    return 0


def _cmd_keygen(args) -> int:
    from lazyfs import signing

    password = os.environ.get(signing.PASSWORD_ENV) or None
    key_path, pub_path = signing.keygen(args.prefix, args.key_type, password)
    state = "encrypted" if password else f"not encrypted: set ${signing.PASSWORD_ENV} to encrypt"
    print(f"wrote {key_path} (private, {state}) and {pub_path} (public)", file=sys.stderr)
    print(pub_path)
    return 0


def _cmd_sign(args) -> int:
    from lazyfs import signing

    result = signing.sign_image(args.image, args.key, identity=args.identity,
                                password=os.environ.get(signing.PASSWORD_ENV) or None)
    print(f"signed manifest {result.manifest_digest}: {result.layout}:{result.tag} holds "
          f"{result.signature_count} signature(s)", file=sys.stderr)
    print(result.manifest_digest)
    return 0


def _cmd_push(args) -> int:
    from lazyfs.push import push

    result = push(args.image, args.destination, sources=_source_options(args),
                  progress=args.progress)
    print(f"pushed {args.image} to {args.destination}: {result.summary()}", file=sys.stderr)
    print(result.reference)
    return 0


def _cmd_serve(args) -> int:
    from lazyfs.serve import serve_forever

    return serve_forever(args.directory, args.host, args.port)


def _cmd_demo(args) -> int:
    from lazyfs import demo

    return demo.run(args.workdir)


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="lazyfs: %(message)s")
    try:
        return args.run(args)
    except LazyfsError as exc:
        if args.debug:
            log.exception("failed")
        print(f"lazyfs {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into `head` and the like: not an error worth a traceback.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
