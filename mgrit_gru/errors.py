"""User-facing errors.

Anything a user can get wrong (a file, an option, a value) raises
:class:`InputError` with one line that names the file/option and the problem.
The CLI turns it into ``mgrit-gru: error: <message>`` and exit code 2, with no
traceback.
"""


class InputError(ValueError):
    """Bad user input (file, option or value). The message is shown as is."""
