"""The error a single case fails with: the run goes on with the other cases and lists it at the end."""


class CaseError(ValueError):
    """One case cannot be finished; the message names the case and the file or step that failed."""
