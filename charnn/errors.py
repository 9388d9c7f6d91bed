"""User-facing errors: raised for bad input, printed by the CLI as one line."""


class CharnnError(Exception):
    """A problem caused by the user's input or environment, with a fix in its message.

    The CLI prints ``error: <message>`` and exits with status 2; library users
    can catch it to tell user mistakes from bugs.
    """

    exit_code = 2
