"""The timm releases this package runs with, checked before timm is imported.

The prefix attention overrides timm's `Attention.forward` and reads its internals (`q_norm`, `k_norm`, `norm`,
`gate`, the `is_causal` argument), and the backbone uses `VisionTransformer(attn_layer=...)`; both change between
timm releases. Tested: 1.0.26 to 1.0.31 (the suite under each); 1.0.25 and older fail (no `is_causal`, no
`timm.layers.Attention` before 1.0.16). `requirements.txt` pins the same range.
"""

import re
from importlib.metadata import PackageNotFoundError, version

TIMM_MIN = (1, 0, 26)
TIMM_MAX = (1, 0, 31)


def _parse(text: str) -> tuple[int, ...]:
    """(major, minor, patch) from a version string; suffixes such as ``rc1`` or ``+local`` are ignored."""
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        leading = re.match(r"\d+", piece)
        parts.append(int(leading.group()) if leading else 0)
    return tuple(parts)


def check_timm_version(installed: str | None = None) -> str:
    """Raise ImportError unless timm is within the tested range.

    Args:
        installed: version string to check (default: the installed timm's).

    Returns:
        The checked version string.
    """
    if installed is None:
        try:
            installed = version("timm")
        except PackageNotFoundError as err:
            raise ImportError("timm is not installed; run `bash shell/setup.sh` (requirements.txt pins it)") from err
    if not TIMM_MIN <= _parse(installed) <= TIMM_MAX:
        wanted = f">={'.'.join(map(str, TIMM_MIN))},<={'.'.join(map(str, TIMM_MAX))}"
        raise ImportError(
            f"timm {installed} is not supported: this code overrides timm's Attention internals and was tested with "
            f"timm{wanted}; run `pip install 'timm{wanted}'` (or `bash shell/setup.sh`)"
        )
    return installed
