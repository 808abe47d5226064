"""``nnunetv2-gtv register | remove | check``: connect this package to nnU-Net's stock commands."""
from __future__ import annotations

import argparse
import sys

from nnunetv2_gtv import __version__
from nnunetv2_gtv.registration import RegistrationError, check, register, remove

FIX_HINT = "nnunetv2-gtv register"


def _check(_: argparse.Namespace) -> int:
    nnunet_version, results = check()
    print(f"nnunetv2_gtv {__version__}; nnunetv2 {nnunet_version}")
    for result in results:
        print(f"  [{'ok' if result.found else 'MISSING'}] {result.kind:8s} {result.name}: {result.detail}")
    missing = [r.name for r in results if not r.found]
    if missing:
        print(f"{len(missing)} of {len(results)} classes are not visible to nnU-Net. "
              f"Fix: run `{FIX_HINT}` (needed again after nnunetv2 is reinstalled or upgraded).")
        return 1
    print(f"all {len(results)} classes are visible to nnU-Net's commands")
    return 0


def _register(_: argparse.Namespace) -> int:
    changed = register()
    if changed:
        for folder in changed:
            print(f"registered: wrote {folder}")
    else:
        print("already registered: nothing changed")
    return 0


def _remove(_: argparse.Namespace) -> int:
    removed = remove()
    for folder in removed:
        print(f"removed {folder}")
    if not removed:
        print("nothing to remove: nnunetv2_gtv was not registered")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nnunetv2-gtv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("register", help="make nnU-Net's commands find our planner and trainers (idempotent)").set_defaults(
        run=_register)
    sub.add_parser("remove", help="undo register: leaves nnunetv2 exactly as installed").set_defaults(run=_remove)
    sub.add_parser("check", help="report whether nnU-Net finds every class of ours (exit 1 if not)").set_defaults(
        run=_check)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except RegistrationError as error:
        print(f"nnunetv2-gtv {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
