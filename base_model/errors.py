"""The project's own bad-input errors: bad flags, configs, files; entry points print them as one line."""


class InputError(ValueError):
    """A bad input named by its file, flag or key (a ValueError, so callers that catch those still do)."""
