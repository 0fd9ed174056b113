"""Compares the installed environment with lock files (name==version pins), for scripts/bootstrap.

    python scripts/lock_state.py stale  LOCK...   prints the installed packages no lock names (to uninstall)
    python scripts/lock_state.py verify LOCK...   exits non-zero unless every pin is installed at exactly its
                                                  version and nothing else is (pip and the project aside)
Standard library only: it runs in the fresh .venv before anything else is trusted.
"""

import re
import sys
from importlib.metadata import distributions

ALWAYS = {"pip", "neat-finetune"}  # the installer itself, and the project (installed editable, not locked)


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(mode: str, locks: list[str]) -> None:
    pin = re.compile(r"^([A-Za-z0-9][\w.-]*)==(\S+)", re.M)
    want = {norm(n): v for lock in locks for n, v in pin.findall(open(lock).read())}
    have = {norm(d.metadata["Name"]): d.version for d in distributions()}
    extra = sorted(set(have) - set(want) - ALWAYS)
    if mode == "stale":
        print(" ".join(extra))
        return
    wrong = {n: f"{have.get(n)} installed, {v} locked" for n, v in want.items() if have.get(n) != v}
    if wrong or extra:
        sys.exit(f"the environment differs from the lock: wrong versions {wrong}, not locked {extra}")
    print(
        f"installed from {' + '.join(locks)}: {len(want)} packages, each at its locked version, hash-checked; "
        "nothing unlocked"
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
