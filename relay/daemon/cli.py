"""The ``relay`` command: argument parsing and exit codes, no logic of its own."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay",
        description="Relay browsers, Twilio phone calls and SMS chats to OpenAI Realtime.",
        epilog="Secrets come from the environment or $CREDENTIALS_DIRECTORY: "
        "OPENAI_API_KEY, ENCRYPTION_KEY, TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN, REDIS_URL, "
        "EVENTS_SIGNING_KEY.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the daemon in the foreground until SIGTERM/SIGINT")
    serve.add_argument("--config", required=True, help="path to config.toml")
    check = sub.add_parser(
        "check-config", help="validate the config and secrets; print the effective config"
    )
    check.add_argument("--config", required=True, help="path to config.toml")
    token = sub.add_parser("token", help="print one fresh client token")
    token.add_argument("--config", help="path to config.toml (default: built-in defaults)")
    token.add_argument(
        "--ttl",
        type=int,
        default=None,
        help="lifetime in seconds (default and maximum: auth.token_max_ttl_seconds)",
    )
    sub.add_parser("keygen", help="print a new random ENCRYPTION_KEY (32 bytes, base64url)")
    demo = sub.add_parser(
        "demo", help="relay plus a voice page on loopback: talk to it in a browser"
    )
    demo.add_argument("--config", help="path to config.toml (default: built-in defaults)")
    demo.add_argument("--port", type=int, default=8788, help="the page's port (0: any free)")
    demo.add_argument("--page-dir", help="the page's folder (default: examples/browser)")
    # Listed here for --help only: main() hands `bench` and its arguments to relay.bench.
    sub.add_parser("bench", help="measure calls per core (see `relay bench --help`)")
    sub.add_parser("soak", help="hold calls and clients for minutes, watch for leaks "
                   "(see `relay soak --help`)")  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # The bench has its own parser and many options; it runs no daemon code in-process.
        from relay.bench import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["soak"]:
        # The same for the soak: its own parser, and only real sockets to the relay.
        from relay.bench.soak import main as soak_main

        return soak_main(argv[1:])
    args = _parser().parse_args(argv)
    # Imports are deferred so `relay keygen` and `--help` stay instant.
    from relay.config import ConfigError, describe, load_settings

    try:
        if args.command == "keygen":
            from relay.admission.tokens import new_key

            print(new_key())
            return EXIT_OK
        if args.command == "token":
            return _token(load_settings(args.config), args.ttl)
        if args.command == "demo":
            from relay.demo.command import main as demo_main

            return demo_main(load_settings(args.config), args.port, args.page_dir)
        settings = load_settings(args.config)
        if args.command == "check-config":
            print(describe(settings))
            from relay.ops.risky import risky_settings

            for line in risky_settings(settings):
                print(f"relay: warning: {line}", file=sys.stderr)
            settings.require_serving_secrets()
            print("config ok", file=sys.stderr)
            return EXIT_OK
        if args.command == "serve":
            settings.require_serving_secrets()
            from relay.daemon.server import run
            from relay.ops.logs import setup_logging

            setup_logging(
                settings.server.log_format, settings.server.log_level, settings.secret_values()
            )
            run(settings)
            return EXIT_OK
    except ConfigError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_OK
    except OSError as exc:  # e.g. the bind address is taken: an operator matter, no traceback
        print(f"relay: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    except BaseExceptionGroup as group:  # the same, raised from inside the server's nursery
        found = group.subgroup(OSError)
        if found is None:
            raise
        leaf: BaseException = found
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        print(f"relay: {getattr(leaf, 'strerror', None) or leaf}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_FAILURE


def _token(settings: object, ttl: int | None) -> int:
    from relay.admission.tokens import mint
    from relay.config import ConfigError, Settings

    assert isinstance(settings, Settings)
    key = settings.secrets.encryption_key
    if key is None:
        raise ConfigError(
            "ENCRYPTION_KEY is not set: export ENCRYPTION_KEY=... (make one with `relay keygen`)"
        )
    max_ttl = settings.auth.token_max_ttl_seconds
    ttl = max_ttl if ttl is None else ttl
    if not 0 < ttl <= max_ttl:
        raise ConfigError(f"--ttl must be between 1 and auth.token_max_ttl_seconds ({max_ttl})")
    print(mint(key, ttl))
    return EXIT_OK


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
