"""The `gateway` command line (SPEC §1)."""

from __future__ import annotations

import argparse
import os
import sys

from gateway import __version__


def _default_config() -> str:
    return os.environ.get("GATEWAY_CONFIG") or "config/gateway.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="An API gateway for the edge.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="serve")
    run.add_argument("-c", "--config", default=None, help="config file")
    run.add_argument("--workers", type=int, default=1, help="worker processes (SO_REUSEPORT)")
    run.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    run.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="the least severe application log lines written (the access log has its own rules)",
    )
    run.add_argument(
        "--no-watch",
        action="store_true",
        help="do not reload on file changes (SIGHUP and POST /admin/reload still reload)",
    )
    check = commands.add_parser("check", help="validate the config and every file it references")
    check.add_argument("-c", "--config", default=None, help="config file")
    certs = commands.add_parser("certs", help="development certificates")
    certs.add_argument("action", choices=["init"])
    certs.add_argument("--out", default="certs")
    certs.add_argument("--hosts", default="localhost,127.0.0.1")
    certs.add_argument(
        "--no-ca-key",
        action="store_true",
        help="sign the certificates, then discard the CA's key instead of writing ca.key",
    )
    token = commands.add_parser("token", help="mint an idempotency token")
    token.add_argument("--client-id", required=True)
    token.add_argument("--secret-env", default="IDEMPOTENCY_SECRET")
    commands.add_parser("version", help="print the version")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "version":
        print(f"gateway {__version__}")
        return 0
    if args.command == "check":
        from gateway.app import check

        version, errors = check(args.config or _default_config())
        if errors:
            for line in errors:
                print(line)
            return 1
        print(f"ok {version}")
        return 0
    if args.command == "run":
        if args.workers < 1:
            print("gateway run: --workers must be >= 1", file=sys.stderr)
            return 2
        config = args.config or _default_config()
        if args.workers > 1 and args.worker_index is None:
            from gateway.app import check
            from gateway.supervisor import supervise

            # refused before any worker starts: a worker that exits on a bad config would be
            # restarted for ever, and the process would never say why it does not serve
            _, errors = check(config)
            if errors:
                for line in errors:
                    print(line, file=sys.stderr)
                print(f"configuration rejected: {len(errors)} error(s)", file=sys.stderr)
                return 1
            return supervise(
                config, args.workers, watch=not args.no_watch, log_level=args.log_level
            )
        from gateway.app import serve

        return serve(
            config,
            worker_index=args.worker_index or 0,
            workers=args.workers,
            watch=not args.no_watch,
            log_level=args.log_level,
        )
    if args.command == "certs":
        from pathlib import Path

        from gateway.dev_certificates import init_dev_certificates

        hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
        if not hosts:
            print("gateway certs init: --hosts names no host", file=sys.stderr)
            return 2
        for path in init_dev_certificates(Path(args.out), hosts, keep_ca_key=not args.no_ca_key):
            print(f"wrote {path}")
        if args.no_ca_key:
            print("for development only: the CA's key was discarded, no more can be signed")
        else:
            print("for development only: anyone with ca.key can mint certificates these trust")
        return 0
    # token: the secret comes from the environment, never from the command line (shell history)
    from gateway.core.idempotency_tokens import mint_token

    secret = os.environ.get(args.secret_env, "")
    if not secret:
        print(f"gateway token: set the secret in ${args.secret_env}", file=sys.stderr)
        return 2
    print(mint_token(secret, args.client_id))
    return 0
