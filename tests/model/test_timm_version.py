"""The timm range the code is tested with is enforced with a clear message, and matches requirements.txt."""

import re
from importlib.metadata import version
from pathlib import Path

import pytest

from model.timm_version import TIMM_MAX, TIMM_MIN, check_timm_version


@pytest.mark.parametrize("ok", ["1.0.26", "1.0.31", "1.0.28+local", "1.0.27rc1"])
def test_versions_in_the_tested_range_pass(ok):
    assert check_timm_version(ok) == ok


@pytest.mark.parametrize("bad", ["1.0.25", "1.0.9", "0.9.16", "1.0.32", "1.1.0"])
def test_other_versions_fail_with_the_range_and_the_fix(bad):
    with pytest.raises(ImportError, match=rf"timm {re.escape(bad)} is not supported.*timm>=1\.0\.26,<=1\.0\.31"):
        check_timm_version(bad)


def test_the_installed_timm_and_requirements_agree_with_the_range():
    assert check_timm_version() == version("timm")
    requirements = (Path(__file__).resolve().parents[2] / "requirements.txt").read_text()
    low, high = ".".join(map(str, TIMM_MIN)), ".".join(map(str, TIMM_MAX))
    assert re.search(rf"^timm>={re.escape(low)},<={re.escape(high)}$", requirements, flags=re.M)
