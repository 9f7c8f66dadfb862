"""`dvc` as the pipeline runs it once per stage (`tracking.dvc.run_dvc`: in the fork server, or as
`python -m qlora_pipeline.tracking.dvc_cli`): DVC's own CLI, less the hint it logs after every
stage to `git add dvc.lock` and to turn on autostaging (seven lines, fifteen times a run; the
README says once what a run leaves to commit)."""

from __future__ import annotations

import logging
import sys

HINTS = "dvc.repo.scm_context"  # the logger of those hints; its warnings still show


def main(argv: list[str]) -> int:
    from dvc.cli import main as dvc_main

    logging.getLogger(HINTS).setLevel(logging.WARNING)
    return int(dvc_main(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
