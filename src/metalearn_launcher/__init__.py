"""The ``metalearn`` command's entry point, outside the ``metalearn`` package: importing
anything inside it first imports the package, and with it torch (seconds), where a Ctrl-C
would end in a ``KeyboardInterrupt`` traceback. Here the interrupt is one line and exit 130."""

import sys


def main() -> None:
    try:
        from metalearn.cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("interrupted while starting\n")
        raise SystemExit(130) from None
    except ImportError as err:
        if sys.platform != "win32":  # a broken install: the traceback says which module
            raise
        sys.stderr.write(f"error: {err}\n")  # the package's own line: which systems it runs on
        raise SystemExit(2) from None
    run(whole_process=True)
