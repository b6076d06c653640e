"""The one exception type a stage raises for bad input; the CLI turns it into one sentence and exit 1."""


class ProtoclipError(Exception):
    """A problem the user can fix. The message is a sentence saying what is wrong and what to do."""


class MissingInputError(ProtoclipError):
    """An artifact a stage needs is not in the workspace; the message names the command that makes it."""
