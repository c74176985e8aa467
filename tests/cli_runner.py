"""Running the command line in-process, as a user would from the shell."""

from __future__ import annotations

from metalearn.cli import main


def run(args, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``metalearn ARGS``."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err
