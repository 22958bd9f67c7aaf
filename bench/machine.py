"""Facts about the machine and interpreter that the report records."""

from __future__ import annotations

import os
import platform
import sys


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or the platform's guess."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    """Return the 1, 5 and 15 minute load averages, formatted."""
    try:
        one_minute, five_minutes, fifteen_minutes = os.getloadavg()
    except OSError:
        return "unavailable"
    return f"{one_minute:.2f} {five_minutes:.2f} {fifteen_minutes:.2f}"


def describe() -> dict[str, str]:
    """Return the machine facts that go at the top of the report."""
    return {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "executable": sys.executable,
        "platform": platform.platform(),
    }
