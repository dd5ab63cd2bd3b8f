"""Hypothesis profiles. `dev` (the default) draws new examples on every run, so local runs keep
exploring; `ci` (HYPOTHESIS_PROFILE=ci, set by .ci/run) is derandomized, the same examples on
every run, so a submission is judged on its change rather than on a new draw. A case a local
run finds becomes an `@example` of its test."""

import os

from hypothesis import settings

settings.register_profile("dev", print_blob=True)
settings.register_profile("ci", derandomize=True, print_blob=True)
# tools/gpu_check.py under compute-sanitizer, which slows every launch down a hundredfold.
settings.register_profile("sanitizer", derandomize=True, max_examples=3, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _fvdm_cache(tmp_path_factory):
    """Tests never write the user's cache folder: FVDM_CACHE (the built-in I3D's converted
    weights) points into the session's temporary folder."""
    old = os.environ.get("FVDM_CACHE")
    os.environ["FVDM_CACHE"] = str(tmp_path_factory.mktemp("fvdm-cache"))
    yield
    if old is None:
        os.environ.pop("FVDM_CACHE", None)
    else:
        os.environ["FVDM_CACHE"] = old
