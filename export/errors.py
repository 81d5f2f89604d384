"""The error export raises."""


class ExportError(Exception):
    """A checkpoint cannot be exported, or the exported file failed verification.

    The message names the file and the reason on one line (the CLI prints it as is).
    """
