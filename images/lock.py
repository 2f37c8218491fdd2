"""Write the pinned requirements of an image from the environment the test suite passed in.

    python images/lock.py tuneforge[qlora] > images/requirements-cpu.txt

Walks the installed distributions from the named roots, evaluating markers for this Python, and prints
`name==version` for each one reached. torch is left out: each image installs its own build of it first
(CPU or CUDA), and tuneforge itself is installed from the build context.
"""

import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

SKIP = {"torch", "tuneforge"}


def closure(roots: list[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    pending = [Requirement(root) for root in roots]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        dist = metadata.distribution(requirement.name)
        if name not in SKIP:
            if name in found:
                continue
            found[name] = dist.version
        for text in dist.requires or []:
            child = Requirement(text)
            extras = requirement.extras or {""}
            if child.marker is None or any(child.marker.evaluate({"extra": extra}) for extra in extras):
                if canonicalize_name(child.name) not in found and canonicalize_name(child.name) not in SKIP:
                    pending.append(child)
    return found


if __name__ == "__main__":
    pins = closure(sys.argv[1:])
    print(f"# pinned by: python images/lock.py {' '.join(sys.argv[1:])}")
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")
