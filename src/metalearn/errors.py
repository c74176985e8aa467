"""The one exception type users see.

Anything the user can fix (a missing data directory, an impossible episode, a checkpoint from
another configuration, a diverging loss) is raised as :class:`MetalearnError` with a message
that says what is wrong and what to do. The CLI prints the message and exits non-zero instead
of showing a traceback from deep inside torch.
"""


class MetalearnError(Exception):
    """A problem the user can act on; its message is shown as is."""


class TrainingStopped(MetalearnError):
    """Training stopped on request (Ctrl-C or SIGTERM) after saving a checkpoint of its last
    step; ``exit_code`` is the shell's for that signal (130, 143)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
