"""The user-error type: problems a user can fix (a bad flag, file, field or request).

The CLI prints a ``RagRayError`` as one line and exits 2; any other exception is a bug and keeps
its traceback. It subclasses ``ValueError`` so callers that validate input keep working.
"""

from __future__ import annotations


class RagRayError(ValueError):
    """Bad input: the message names the file, line, field or limit and, where there is one, the fix."""


def user_error(exc: BaseException) -> RagRayError | None:
    """The first RagRayError in an exception's chain, through Ray's task/actor wrappers
    (``RayTaskError(CorpusError)`` and friends carry the original as ``cause``)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, RagRayError) and not type(e).__module__.startswith("ray."):
            return e
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None
