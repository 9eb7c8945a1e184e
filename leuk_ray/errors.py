"""The one exception type for problems a user can cause (bad data, bad config, bad artifact).

Raise it where the problem is found, with a message that names the file or key and says what to do.
Every command line turns it into one line on stderr and exit code 2 (see ``leuk_ray.cli.run_main``).
"""
from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix: the message is shown as one line, without a traceback."""


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses or gradients: the fold cannot train with this config.

    Not a ``UserError``: a search turns it into a pruned trial with this message as its reason.
    """


def user_error_in(exc: BaseException | None) -> UserError | None:
    """The ``UserError`` behind ``exc``, looked for through Ray's wrappers (a ``RayTaskError``
    keeps the remote exception as ``.cause``) and Python's ``__cause__``/``__context__`` chain;
    None when the failure was not the user's."""
    seen: set[int] = set()
    found: UserError | None = None
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, UserError):
            found = exc
            if type(exc).__module__.startswith("leuk_ray"):  # ours, not Ray's dual class
                return exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return found
