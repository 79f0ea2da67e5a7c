"""One exception type for every user-facing failure: its message is a single line that says
what is wrong and what to do. The CLI prints it without a traceback."""


class TaesdError(Exception):
    pass
