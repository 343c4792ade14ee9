"""Hang guards for tests that start processes or wait on them. A limit never decides whether a test passes:
it only stops a test that hangs. The limits are several times what a loaded 2-core machine needs, and
scale with the environment variable JAXSEG_TEST_TIME_FACTOR (default 3) on slower machines."""
import os

DEFAULT_FACTOR = 3.0


def hang_guard(seconds: float) -> float:
    """`seconds` (what the wait needs on a loaded 2-core machine, with margin) times the factor."""
    return seconds * float(os.environ.get("JAXSEG_TEST_TIME_FACTOR", DEFAULT_FACTOR))
