"""User-facing errors and the exit codes of ``mgrit-gru``.

Anything a user can get wrong (a file, an option, a value) raises
:class:`InputError` with one line that names the file/option and the problem.
The CLI turns it into ``mgrit-gru: error: <message>`` and exit code 2, with no
traceback.

Exit codes (docs/reliability.md):

======  =====================================================================
0       the run finished
1       an internal error (a bug: the traceback of the failing rank)
2       bad input (:class:`InputError`): options, data, run folder
3       the run diverged (:class:`Diverged`): non-finite loss, gradient or
        MGRIT residual; the last good checkpoint is untouched
75      stopped by SIGTERM or the stop signal after writing a checkpoint
        (EX_TEMPFAIL: resume it, e.g. ``--resume-or-start DIR``)
130     interrupted by SIGINT (Ctrl-C); nothing written since the last checkpoint
======  =====================================================================
"""

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_INPUT = 2
EXIT_DIVERGED = 3
EXIT_STOPPED = 75
EXIT_INTERRUPTED = 130


class InputError(ValueError):
    """Bad user input (file, option or value). The message is shown as is."""


class Diverged(RuntimeError):
    """A non-finite loss, gradient or residual; the message names where."""


class Stopped(Exception):
    """The run stopped on a signal after writing its checkpoint."""
