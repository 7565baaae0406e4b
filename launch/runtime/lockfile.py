"""The locked environment (`requirements/cpu.lock`) against the one that is running.

`make install` checks the fresh `.venv` with `python -m launch.runtime.lockfile LOCK` (exit 1 on drift); `ldm bench
report` and `ldm demo --readme` warn when the versions that produced their figures are not the locked ones.
"""
from __future__ import annotations

import importlib.metadata as metadata
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LOCK = REPO_ROOT / "requirements" / "cpu.lock"
_PIN = re.compile(r"^\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*==\s*([^\s;#\\]+)")


def normalize(name: str) -> str:
    """PEP 503 name: `Open_Clip.torch` and `open-clip-torch` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: str | Path = DEFAULT_LOCK) -> dict[str, str]:
    """`name -> version` for every `name==version` line of a pip-compile output."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        m = _PIN.match(line)
        if m:
            pins[normalize(m.group(1))] = m.group(3)
    return pins


def installed() -> dict[str, str]:
    return {normalize(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def _public(version: str) -> str:
    return version.split("+", 1)[0]          # a local build tag (+cpu, +cu124) is the same release


@dataclass(frozen=True)
class Drift:
    name: str
    locked: str | None       # None: installed but not in the lock
    running: str | None      # None: locked but not installed

    def __str__(self) -> str:
        return f"{self.name} (lock {self.locked or '-'}, running {self.running or '-'})"


# Installed beside the lock on purpose: the installer itself and this project (editable).
_OUTSIDE_LOCK = {"pip", "ldm-train"}


def drift(lock: str | Path = DEFAULT_LOCK, *, only: list[str] | None = None) -> list[Drift]:
    """Differences between the lock and this interpreter's packages; `only` restricts to some names."""
    pins, have = read_lock(lock), installed()
    names = [normalize(n) for n in only] if only else sorted(set(pins) | set(have))
    out = []
    for name in names:
        if name in _OUTSIDE_LOCK:
            continue
        locked, running = pins.get(name), have.get(name)
        if locked is not None and running is not None and _public(locked) == _public(running):
            continue
        if locked is None and running is None:
            continue
        out.append(Drift(name, locked, running))
    return out


def warn_if_drifted(versions: dict[str, str], lock: str | Path = DEFAULT_LOCK) -> list[str]:
    """Warnings for figures measured with `versions` (name -> version) that differ from the lock."""
    if not Path(lock).exists():
        return [f"no lock at {lock}: the versions behind these figures are not pinned"]
    pins = read_lock(lock)
    shown = Path(lock).resolve()
    shown = shown.relative_to(REPO_ROOT) if shown.is_relative_to(REPO_ROOT) else shown
    out = []
    for name, version in versions.items():
        locked = pins.get(normalize(name))
        if locked is not None and _public(locked) != _public(str(version)):
            out.append(f"{name} {version} differs from the lock's {locked} ({shown}): "
                       f"these figures are not what `make install` gives a new user")
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    lock = Path(args[0]) if args else DEFAULT_LOCK
    found = drift(lock)
    if found:
        print(f"the running environment differs from {lock} in {len(found)} package(s):", file=sys.stderr)
        for d in found:
            print(f"  {d}", file=sys.stderr)
        print("reinstall from the lock: rm -rf .venv && make install", file=sys.stderr)
        return 1
    print(f"environment matches {lock} ({len(read_lock(lock))} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
