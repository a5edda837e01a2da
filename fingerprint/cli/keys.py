"""``fingerprint keys``: create, revoke and list the lab server's API keys.

    fingerprint keys create --name NAME [--admin] [--data-dir DIR]
    fingerprint keys revoke NAME_OR_ID [--data-dir DIR]
    fingerprint keys list [--data-dir DIR]

Keys are stored hashed in the server's database (``<data-dir>/fingerprint.sqlite3``);
a new key is shown once, as the last line of ``create``'s output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fingerprint.cli.serve import check_data_dir


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``fingerprint keys`` and its actions."""
    parser = subparsers.add_parser(
        "keys", help="manage the lab server's API keys",
        description="Create, revoke and list the API keys of a lab server. Keys are stored "
                    "hashed in the server's database (<data-dir>/fingerprint.sqlite3); run "
                    "these on the server's machine.")
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION")
    parser.set_defaults(func=lambda args: _no_action(parser))

    def data_dir_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", type=Path,
                       help="the server's data directory (default $FINGERPRINT_DATA_DIR or "
                            "./fingerprint-data)")

    create = sub.add_parser(
        "create", help="create a key (printed once, last line)",
        description="Create an API key for a user. The key is printed once, as the last "
                    "line of the output; only its hash is stored, so keep it.")
    create.add_argument("--name", required=True, help="unique name, e.g. the user's login")
    create.add_argument("--admin", action="store_true",
                        help="may also build dictionaries (POST /v1/dictionaries)")
    data_dir_option(create)
    create.set_defaults(func=_create)

    revoke = sub.add_parser(
        "revoke", help="revoke a key by name or id",
        description="Revoke an API key: requests with it are refused from now on; the "
                    "key's jobs and results stay.")
    revoke.add_argument("key", metavar="NAME_OR_ID",
                        help="the key's name (as given to `keys create`) or its id")
    data_dir_option(revoke)
    revoke.set_defaults(func=_revoke)

    lst = sub.add_parser(
        "list", help="list keys (never the secrets)",
        description="List the server's API keys: id, name, admin flag, creation time and "
                    "whether revoked (the keys themselves are never shown).")
    data_dir_option(lst)
    lst.set_defaults(func=_list)


def _no_action(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _database(args: argparse.Namespace) -> Any:
    # lazy: keeps the server off CLI start-up
    from server.config import Settings
    from server.db import Database

    settings = Settings(data_dir=args.data_dir) if args.data_dir else Settings()
    check_data_dir(settings.data_dir)
    db = Database(settings.database_path)
    db.initialize()
    return db


def _create(args: argparse.Namespace) -> int:
    from server.auth import create_key  # lazy: keeps the server off CLI start-up

    db = _database(args)
    record, token = create_key(db, args.name, admin=args.admin)
    kind = "admin key" if record.is_admin else "key"
    sys.stdout.write(f"created {kind} {record.name!r} (id {record.id}) in {db.path}\n"
                     "store it now: it is not shown again.\n")
    sys.stdout.write(f"{token}\n")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from server.auth import revoke_key  # lazy: keeps the server off CLI start-up

    record = revoke_key(_database(args), args.key)
    sys.stdout.write(f"revoked key {record.name!r} (id {record.id})\n")
    return 0


def _list(args: argparse.Namespace) -> int:
    from server.auth import list_keys  # lazy: keeps the server off CLI start-up

    keys = list_keys(_database(args))
    if not keys:
        sys.stdout.write("no API keys\n")
        return 0
    sys.stdout.write(f"{'ID':8s}  {'NAME':24s}  {'ROLE':5s}  {'CREATED':29s}  STATUS\n")
    for k in keys:
        status = f"revoked {k.revoked}" if k.revoked else "active"
        role = "admin" if k.is_admin else "user"
        sys.stdout.write(f"{k.id:8s}  {k.name:24s}  {role:5s}  {k.created:29s}  {status}\n")
    return 0
