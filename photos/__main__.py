"""``python -m photos align --src RAW --out ALIGNED`` (see ``photos.align``)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from utils.cli_errors import exit_code
from utils.config import hide_alias_spellings
from utils.logging import setup_logging

logger = logging.getLogger("photos")
COMMANDS = ("align",)


def cli(argv: Sequence[str] | None = None) -> int:
    """Dispatch the sub-command; bad input ends with one error message and exit code 2."""
    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        logger.error("usage: python -m photos {%s} ... (got %s)", ",".join(COMMANDS), argv[:1] or "nothing")
        return 2
    from photos import align

    args = hide_alias_spellings(align.get_args_parser()).parse_args(argv[1:])
    return exit_code(lambda: align.run(args), logger)


if __name__ == "__main__":
    sys.exit(cli())
