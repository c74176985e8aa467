"""The one exception type users see.

Anything the user can fix (a missing data directory, an impossible episode, a checkpoint from
another configuration, a diverging loss) is raised as :class:`MetalearnError` with a message
that says what is wrong and what to do. The CLI prints the message and exits non-zero instead
of showing a traceback from deep inside torch.
"""


class MetalearnError(Exception):
    """A problem the user can act on; its message is shown as is."""
