"""The one user-facing error type, translated to a message once.

Every failure that is the user's to fix (a bad flag, a bad plan file, an
unknown plan, a locked or newer database) raises a ``MuseError`` subclass.
The CLI's single handler prints ``error: <message>`` on one line and exits
with code 2; nothing else in the code prints errors. Unexpected exceptions
are bugs and keep their traceback.
"""


class MuseError(Exception):
    """A failure the user can fix; its message is one line that says how."""

    exit_code = 2
    prefix = "error: "


class PlanError(MuseError):
    """A plan (flags, YAML, JSON or an edit) does not validate."""


class NotFound(MuseError):
    """A plan, revision or run that the user named does not exist."""


class Conflict(MuseError):
    """The request clashes with what is stored (a taken name, a running run)."""


class StoreError(MuseError):
    """The database can't be opened or used (bad URL, newer schema, locked)."""


class RunFailed(MuseError):
    """A run stopped on a training fault (NaN loss, out of memory); exit code 1.

    Not the user's input: the plan was valid, training failed. The message says
    where, why, and how to resume.
    """

    exit_code = 1


class RunInterrupted(MuseError):
    """The user stopped a run (Ctrl-C); exit code 130, as for any SIGINT. The
    message says where it stopped and how to go on; it is not an error."""

    exit_code = 130
    prefix = ""
