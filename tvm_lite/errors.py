"""tvm_lite's documented errors, and the stage boundary that turns TVM's own errors into them.

Every error tvm_lite raises on purpose is a :class:`TvmLiteError`:

    TvmLiteError
      UserError (also a ValueError)     bad input: the message names the file, option or value
        TargetError, DeviceUnavailableError       (tvm_lite.target)
        OnnxImportError                           (tvm_lite.frontend)
        ExportError, ArtifactError                (tvm_lite.export, tvm_lite.artifact)
        ContextLengthError, GenerationConfigError (tvm_lite.engine, here)
        QuantFormatError, QuantizeError           (tvm_lite.quant, relax_passes)
        KVCacheRewriteError                       (relax_passes/inplace_kv_cache.py)
        TuningError                               (tvm_lite.tuning_db)
      RPCError (also a RuntimeError)    a tracker or server that cannot be reached or was lost
      CompileError (also a RuntimeError) TVM itself failed while importing or compiling; it names
                                        the stage, the pass and the function, and chains TVM's
                                        original error (``err.original``, ``__cause__``)

The command line prints one line for any of them (``tvm-lite: error: ...``) and exits 2 for a
:class:`UserError` and 1 otherwise; ``--debug`` prints the whole chain.

:func:`stage` is the boundary: ``with stage("compile", target=...):`` around a call into TVM
re-raises anything TVM (or a pass) raises that is not already a tvm_lite error as a
:class:`CompileError` (or the given error type) naming the pass that was running.
"""

from __future__ import annotations

import contextlib
import re


class TvmLiteError(Exception):
    """Base of every error tvm_lite raises on purpose."""


class UserError(TvmLiteError, ValueError):
    """Bad input (a file, an option, a value): the message names the cause. CLI exit status 2."""


class GenerationConfigError(UserError):
    """A generation setting out of range (temperature < 0, top_p outside (0, 1], empty prompt...)."""


class CompileError(TvmLiteError, RuntimeError):
    """TVM raised while tvm_lite imported or compiled a model.

    ``stage`` ("import", "compile"...), ``pass_name`` (the innermost pass that was running, or
    None), ``function`` (a function of the module the message names, or None) and ``original``
    (TVM's exception, also ``__cause__``)."""

    def __init__(self, message: str, *, stage: str, pass_name: str | None = None,
                 function: str | None = None, original: BaseException | None = None):
        super().__init__(message)
        self.stage, self.pass_name, self.function, self.original = stage, pass_name, function, original

    def __reduce__(self):
        # picklable, so a build in another process (``python -m tvm_lite.profile --jobs``) hands
        # its error back whole; TVM's original error (often not picklable) travels as the
        # message's text only
        return (_compile_error, (str(self), self.stage, self.pass_name, self.function))


def _compile_error(message: str, stage: str, pass_name: str | None, function: str | None):
    return CompileError(message, stage=stage, pass_name=pass_name, function=function)


def is_user_error(err: BaseException) -> bool:
    return isinstance(err, UserError)


def _pass_tracker():
    """A TVM pass instrument that keeps the stack of passes being run (innermost last) and the
    function names of the module each one was given."""
    import tvm

    @tvm.instrument.pass_instrument
    class PassTracker:
        def __init__(self):
            self.stack: list = []
            self.functions: list = []

        def run_before_pass(self, mod, info):
            self.stack.append(info.name)
            self.functions = [gv.name_hint for gv in mod.get_global_vars()]

        def run_after_pass(self, mod, info):
            if self.stack:
                self.stack.pop()

    return PassTracker()


def _last_line(err: BaseException) -> str:
    """TVM's messages carry a C++/Python backtrace first; the cause is on the last lines."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if not ln.startswith(("File ", "at ", "0:", "1:", "2:")) and "Traceback" not in ln:
            return ln
    return lines[-1] if lines else type(err).__name__


def _named_function(message: str, functions) -> str | None:
    """The first module function the message mentions (``@name``, ``'name'`` or a bare word)."""
    for name in sorted(functions, key=len, reverse=True):
        if re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", message):
            return name
    return None


@contextlib.contextmanager
def stage(name: str, *, error: type | None = None, where: str = ""):
    """Run TVM work as stage ``name``; anything it raises that is not a :class:`TvmLiteError`
    becomes ``error`` (default :class:`CompileError`) naming the stage, the running pass and the
    function, with the original chained. ``where``: what is being worked on (a file, a target).

    Passes run inside are tracked with a pass instrument added to the current ``PassContext``
    (its options are kept)."""
    import tvm

    tracker = _pass_tracker()
    current = tvm.transform.PassContext.current()
    ctx = tvm.transform.PassContext(
        opt_level=current.opt_level, required_pass=list(current.required_pass),
        disabled_pass=list(current.disabled_pass), config=dict(current.config),
        instruments=[*current.instruments, tracker])
    try:
        with ctx:
            yield
    except TvmLiteError:
        raise
    except (KeyboardInterrupt, MemoryError, SystemExit, GeneratorExit):
        raise
    except Exception as err:
        cause = _last_line(err)
        pass_name = tracker.stack[-1] if tracker.stack else None
        function = _named_function(str(err), tracker.functions) if tracker.functions else None
        parts = [f"{name} failed"]
        if where:
            parts[0] += f" ({where})"
        if pass_name:
            path = " > ".join(tracker.stack)
            parts.append(f"in pass {pass_name}" + (f" [{path}]" if len(tracker.stack) > 1 else ""))
        if function:
            parts.append(f"function {function}")
        message = ", ".join(parts) + f": {type(err).__name__}: {cause}"
        if error is None or issubclass(error, CompileError):
            raise (error or CompileError)(message, stage=name, pass_name=pass_name,
                                          function=function, original=err) from err
        raise error(message) from err


def run_reporting_errors(fn, *, debug: bool = False, prog: str = "tvm-lite") -> int:
    """Run ``fn`` (a command) and turn any error into one line on stderr: exit status 2 for a
    :class:`UserError`, 1 for anything else (an unexpected error says ``--debug`` shows it).
    With ``debug`` the whole chain is printed first (TVM's original error included)."""
    import sys
    import traceback

    try:
        return fn()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the command line never ends in a traceback
        if debug:
            traceback.print_exc()
        if isinstance(err, TvmLiteError):
            line = str(err).strip().splitlines()
            message = line[0] if len(line) == 1 else " ".join(x.strip() for x in line)
        else:
            message = f"internal error: {type(err).__name__}: {_last_line(err)}"
            if not debug:
                message += " (run with --debug for the traceback)"
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2 if isinstance(err, UserError) else 1
