"""The one exception type digitlab raises for problems a user can fix."""


class DigitlabError(Exception):
    """A problem with the user's input or files, with a one-line message saying how to fix it."""
