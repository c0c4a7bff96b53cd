"""``python -m unsam.ops``: build the CPU kernels now (``scripts/setup.sh`` runs this).

Exit 0 with one line saying whether the kernels were built or the pure-PyTorch fallback will be
used; a failed build is not an error (everything runs without the kernels, only slower).
"""

import logging
import sys

from . import build


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        build()
    except Exception as e:  # noqa: BLE001 - report and fall back, as at run time
        first = str(e).splitlines()[0] if str(e) else ""
        print(
            f"[setup] CPU kernels not built ({type(e).__name__}: {first}): inference uses the "
            "slower pure-PyTorch paths"
        )
        return 0
    print("[setup] CPU kernels built (deformable attention, mask resize + threshold)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
