"""Libraries whose internals reflexarc relies on, and the release series it is tested with.

reflexarc.mqtt drives paho-mqtt's client internals (its own packet encoder and in-flight
window) and reflexarc.kafka/kafkastart aiokafka's consumer (positions, assignment). A new
minor release can change those without notice, so pyproject.toml admits only the series
below, and a unit test (tests/unit/kernel/test_pins.py) fails when the installed version
or pyproject.toml leaves it: test the new release, then move the pin here and there together.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

#: Distribution -> the ``major.minor`` series reflexarc is tested with.
TESTED: dict[str, str] = {
    "paho-mqtt": "2.2",
    "aiokafka": "0.14",
}


def mismatch(dist: str) -> str | None:
    """Why the installed ``dist`` is not the tested series, or None when it is (or is not installed)."""
    try:
        installed = version(dist)
    except PackageNotFoundError:
        return None
    series = TESTED[dist]
    if installed == series or installed.startswith(series + "."):
        return None
    return f"{dist} {installed} is installed, reflexarc is tested with {series}.x"
