"""The one error of the studies package: a study file, or a request about one, that cannot be carried out.

Imports: nothing.
"""


class StudyError(ValueError):
    """A study file, or a request about one, that cannot be carried out; the message names the fix."""
