"""Limits for rendering chat templates that someone else wrote: a time limit and a cap on the text made.

jinja2's sandbox stops a template from leaving it, not from taking all the time or memory there is:
nested loops hung `train`, `'x' * 10**9` made a 1 GB string. `LimitedSandbox` (a mixin for jinja2's
sandboxed environments) checks, before they run, the operations that make big values from small ones
(`*`, `**`, `+`, `%`, `~`, `str.format` widths, `center`/`ljust`/`rjust`/`zfill`/`replace`/`expandtabs`
calls, the `center`/`indent`/`format`/`replace`/`tojson` filters) against `max_chars`;
`time_limit(seconds)` interrupts a render that runs longer (the rendering thread gets an exception at its
next Python instruction). The chat template module turns both into a TemplateError.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import threading
from collections.abc import Iterator

from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import SecurityError

GROWING_METHODS = ("center", "ljust", "rjust", "zfill", "expandtabs", "replace")
_BIG_WIDTH = re.compile(r"\d{6,}")  # a width or precision of 100000 or more in a format string
MAX_EXPONENT = 256


class RenderTimeout(BaseException):
    """Raised inside the rendering thread when its time is up (a BaseException: no template code swallows it)."""


class TooLarge(SecurityError):
    """A template operation would make a value above the size cap."""


def _size(value) -> int | None:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else None


class _Deadline:
    """Arms a timer that raises RenderTimeout in this thread; disarmed (and any undelivered raise cleared) on exit."""

    def __init__(self, seconds: float):
        self.thread_id = threading.get_ident()
        self.lock = threading.Lock()
        self.active = True
        self.fired = False
        self.timer = threading.Timer(seconds, self._fire)
        self.timer.daemon = True

    def _fire(self) -> None:
        with self.lock:
            if self.active:
                self.fired = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.thread_id), ctypes.py_object(RenderTimeout))

    def __enter__(self) -> _Deadline:
        self.timer.start()
        return self

    def __exit__(self, *exc_info) -> bool:
        self.timer.cancel()
        with self.lock:
            self.active = False
            if self.fired:  # raised but perhaps not delivered yet: clear it
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.thread_id), None)
        return False


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise RenderTimeout in this thread if the block runs longer than `seconds` (None: no limit). Callers
    catch RenderTimeout around the whole `with` (it may arrive as the block ends)."""
    if not seconds or seconds <= 0:
        yield
        return
    with _Deadline(seconds):
        yield


class _ConcatChecked(CodeGenerator):
    """Compiles `a ~ b` to a call of environment.checked_concat, so string concatenation is size-checked too."""

    def visit_Concat(self, node: nodes.Concat, frame) -> None:  # type: ignore[override]
        self.write("environment.checked_concat((")
        for argument in node.nodes:
            self.visit(argument, frame)
            self.write(", ")
        self.write("))")


class LimitedSandbox:
    """Mixin for a jinja2 SandboxedEnvironment: refuses operations that would make a value over `max_chars`."""

    max_chars = 1_000_000
    intercepted_binops = frozenset(["*", "**", "+", "%"])
    code_generator_class = _ConcatChecked

    def too_large(self, what: str, size: int) -> TooLarge:
        return TooLarge(f"{what} would make {size} characters, more than the {self.max_chars} a chat template may")

    def checked_concat(self, parts) -> str:
        pieces = [str(part) for part in parts]
        total = sum(len(piece) for piece in pieces)
        if total > self.max_chars:
            raise self.too_large("'~'", total)
        return "".join(pieces)

    def call_binop(self, context, operator: str, left, right):
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if _size(sequence) is not None and isinstance(count, int) and _size(sequence) * count > self.max_chars:
                    raise self.too_large("'*'", _size(sequence) * count)
        elif operator == "**":
            if isinstance(right, int) and abs(right) > MAX_EXPONENT and isinstance(left, (int, float)) and abs(left) not in (0, 1):
                raise TooLarge(f"'**' with exponent {right} (at most {MAX_EXPONENT} in a chat template)")
        elif operator == "+":
            if _size(left) is not None and _size(right) is not None and _size(left) + _size(right) > self.max_chars:
                raise self.too_large("'+'", _size(left) + _size(right))
        elif operator == "%" and isinstance(left, str):
            self.check_format_string(left, right if isinstance(right, tuple) else (right,))
        return super().call_binop(context, operator, left, right)

    def check_format_string(self, text: str, arguments=()) -> None:
        """A format string may not ask for huge widths (`%999999999s`, `{:>999999999}`, `*` from a big argument)."""
        if _BIG_WIDTH.search(text) or re.search(r"\{[^{}]*:[^{}]*\{", text):
            raise TooLarge("a format string with a width or precision of 100000 or more, or a nested width")
        if "*" in text and any(isinstance(value, int) and abs(value) >= 100_000 for value in arguments):
            raise TooLarge("a format width of 100000 or more")

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        template = value.__self__

        def checked(*args, **kwargs):
            self.check_format_string(template)
            return wrapped(*args, **kwargs)

        return checked

    def call(__self, __context, __obj, *args, **kwargs):
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str) and getattr(__obj, "__name__", "") in GROWING_METHODS:
            __self.check_growth(owner, __obj.__name__, args)
        return super().call(__context, __obj, *args, **kwargs)

    def check_growth(self, text: str, method: str, args) -> None:
        if method == "replace":
            old, new = (str(args[0]), str(args[1])) if len(args) >= 2 else ("", "")
            count = text.count(old) if old else len(text) + 1
            if len(args) >= 3 and isinstance(args[2], int) and args[2] >= 0:
                count = min(count, args[2])
            size = len(text) + count * max(len(new) - len(old), 0)
        elif method == "expandtabs":
            width = args[0] if args and isinstance(args[0], int) else 8
            size = len(text) + text.count("\t") * max(width, 0)
        else:
            size = max((arg for arg in args[:1] if isinstance(arg, int)), default=0)
        if size > self.max_chars:
            raise self.too_large(f"{method}()", size)

    def limit_filters(self) -> None:
        """Wrap the built-in filters that can make a long string from a short one with the same checks."""
        filters = self.filters  # type: ignore[attr-defined]

        def guard(name: str, check):
            original = filters[name]
            passes_context = hasattr(original, "jinja_pass_arg")  # eval context / context / environment first

            def limited(*args, **kwargs):
                check(*(args[1:] if passes_context else args), **kwargs)
                return original(*args, **kwargs)

            limited.__name__ = name
            if passes_context:
                limited.jinja_pass_arg = original.jinja_pass_arg
            filters[name] = limited

        def width_check(position: int, keyword: str):
            def check(*args, **kwargs):
                width = kwargs.get(keyword, args[position] if len(args) > position else None)
                if isinstance(width, int) and width > self.max_chars:
                    raise self.too_large(f"a width of {width}", width)
            return check

        def replace_check(text="", old="", new="", count=None, **_kwargs):
            self.check_growth(str(text), "replace", (str(old), str(new), *([count] if isinstance(count, int) else [])))

        guard("center", width_check(1, "width"))
        guard("indent", width_check(1, "width"))
        if "tojson" in filters:
            guard("tojson", width_check(2, "indent"))
        guard("format", lambda value="", *args, **kwargs: self.check_format_string(str(value), args))
        guard("replace", replace_check)
