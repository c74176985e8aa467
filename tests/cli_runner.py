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


class ClosedPipe:
    """A standard output whose reader has gone (``| head -1``): every write and flush fails."""

    encoding, errors = "utf-8", "strict"

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")

    def isatty(self):
        return False


class FullDisk(ClosedPipe):
    """A standard stream on a full disk (``> /dev/full``, a file-size limit): every write fails."""

    def write(self, text):
        raise OSError(28, "No space left on device")

    def flush(self):
        raise OSError(28, "No space left on device")


def one_line_error(code: int, out: str, err: str, match: str) -> None:
    """A usage error (exit code 2): one line on stderr, ``error: ...`` containing ``match``, no traceback."""
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert match in lines[0], lines[0]
    assert "Traceback" not in err + out
