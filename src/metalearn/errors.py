"""The one exception type users see.

Anything the user can fix (a missing data directory, an impossible episode, a checkpoint from
another configuration, a diverging loss) is raised as :class:`MetalearnError` with a message
that says what is wrong and what to do. The CLI prints the message and exits non-zero instead
of showing a traceback from deep inside torch.
"""


import functools
import inspect
import math
import operator
import re
import reprlib
import signal
import sys
import warnings
from typing import Any, Callable, Iterable, TypeVar

FLOAT32_MAX = 3.4028234663852886e38  # the networks compute in float32: a larger value overflows
FLOAT32_TINY = 1.1754943508222875e-38  # float32's smallest normal number: a smaller one loses its digits, or is 0


class MetalearnError(Exception):
    """A problem the user can act on; its message is shown as is."""


class MetalearnWarning(UserWarning):
    """Something the user may want to change, though the run can go on (a learning-rate
    schedule that ends far below a useful rate); the CLI shows it as one ``warning:`` line."""


def check_count(value: Any, name: str, least: int | None = 1, most: int | None = None, *,
                message: str | None = None, error: Callable[[str], Exception] = MetalearnError) -> int:
    """``value`` as Python's int when it is a whole number from ``least`` to ``most`` (both
    included; None: no bound on that side); anything else raises ``error(text)`` in one line, for
    torch would fail on it later (a draw, a layer, a seed) with a message about its own arguments.

    A whole number is an int, a NumPy integer or a 0-d integer tensor: whatever Python takes as
    an index, but not a truth value (``True``, ``np.True_``, ``torch.tensor(True)``), a float
    (``5.0``), a string, or a tensor of one element (``torch.tensor([5])``, which torch takes as
    an index too and which would be kept as given).

    ``message`` is a :meth:`str.format` template of the text, with the fields ``name``,
    ``least``, ``most``, ``value`` (write ``{value!r}``) and ``kind`` (the value's type name);
    a doubled brace is a single one in the text, so that an :class:`OptionError`'s field is
    written ``{{option}}``. Without it: ``{name} must be a whole number of at least {least}, got
    {value!r}`` (``from {least} to {most}`` with both bounds). ``error`` makes the exception of
    the text: an exception class, or a function of the text (an :class:`OptionError` with its
    options)."""
    boolean = isinstance(value, bool) or "bool" in str(getattr(value, "dtype", ""))
    try:
        number = None if boolean or tuple(getattr(value, "shape", ())) != () else operator.index(value)
    except TypeError:
        number = None
    if number is None or (least is not None and number < least) or (most is not None and number > most):
        if message is None:
            bounds = (" from {least} to {most}" if least is not None and most is not None
                      else " of at least {least}" if least is not None
                      else " of at most {most}" if most is not None else "")
            message = "{name} must be a whole number" + bounds + ", got {value!r}"
        raise error(message.format(name=name, least=least, most=most, value=value, kind=type(value).__name__))
    return number


def check_whole(owner: str, minimum: int | None = None, **counts: Any) -> None:
    """Refuse, in one line naming ``owner``'s argument, a count that is not a whole number
    (``ways=5.0``, ``shots="1"``, ``True``) or is below ``minimum`` (see :func:`check_count`)."""
    least = " of at least {least}" if minimum is not None else ""
    for name, value in counts.items():
        check_count(value, f"{owner}'s {name}", minimum, message="{name} is a whole number" + least +
                    ", got {value!r} ({kind})")


def is_flag(value: Any) -> bool:
    """Whether ``value`` is True or False (NumPy's bools, 1 and 0 too), as an on/off keyword
    takes it: a string ("no", "False") would read as true, None as false."""
    try:
        return value in (True, False)
    except (TypeError, ValueError, RuntimeError):  # an array or tensor, whose truth is ambiguous
        return False


def check_flags(owner: str, **flags: Any) -> None:
    """Refuse, in one line naming ``owner``'s keyword, an on/off argument that is not True or
    False (:func:`is_flag`): ``evaluate_run(run, ensemble="False")`` would run an ensemble."""
    for name, value in flags.items():
        if not is_flag(value):
            raise MetalearnError(f"{owner}'s {name} is True or False, got {value!r}")


Function = TypeVar("Function", bound=Callable[..., Any])

_SHORT = reprlib.Repr()  # a value quoted in a deprecation warning: a config or a long path in a few dozen characters
_SHORT.maxstring = _SHORT.maxother = 40


def keyword_only_after(count: int) -> Callable[[Function], Function]:
    """Declare that a public function takes its first ``count`` parameters (what it works on: a
    config and a run folder, a learner and a task source) by position and its options by keyword
    only, so that a call that swaps two options (``evaluate_run(run, 20, 1)``: episodes or seed?)
    cannot silently do something else. The ``def`` writes the ``*`` itself
    (``def evaluate_run(run_dir, *, episodes=None, ...)``), so that ``inspect.signature``, the API
    docs and editors show it; a function that does not take exactly ``count``
    positional-or-keyword parameters, then keyword-only ones, is a TypeError when decorated.

    For one release, a call with more positional arguments is taken as the signature without
    the ``*`` took it (the same parameters in the same order): the extra arguments go, in order,
    to the keyword-only parameters, with one DeprecationWarning per call that names them as
    keywords, at the caller's line (``evaluate_run: give episodes=20, seed=1 by keyword; passing
    them by position is deprecated and will be refused``). A parameter given both ways, or more
    positional arguments than that signature had, is the TypeError Python gives for it. A call
    within the new signature goes straight through; the wrapper keeps the function's name,
    docstring and ``__wrapped__`` (:func:`functools.wraps`)."""
    def decorate(function: Function) -> Function:
        parameters = list(inspect.signature(function).parameters.values())
        positional = [p for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD]
        keyword = [p for p in parameters if p.kind is p.KEYWORD_ONLY]
        if len(positional) != count or positional + keyword != parameters or not keyword:
            raise TypeError(f"keyword_only_after({count}) needs {function.__qualname__} to take {count} "
                            "positional-or-keyword parameters, then `*` and keyword-only ones")
        names = [p.name for p in keyword]  # the order of the signature without `*`: the def keeps them in place
        most = len(parameters)
        least = sum(p.default is p.empty for p in parameters)  # that signature's required positionals
        name = function.__qualname__
        shown = name.removesuffix(".__init__")  # as the caller wrote it: Trainer(...), Trainer.fit(...)

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if len(args) <= count:
                return function(*args, **kwargs)
            moved = dict(zip(names, args[count:]))
            for given in moved:  # Python checks the keywords against the filled slots before counting them
                if given in kwargs:
                    raise TypeError(f"{name}() got multiple values for argument '{given}'")
            if len(args) > most:
                raise TypeError(too_many_positionals(name, least, most, len(args)))
            spelled = ", ".join(f"{key}={_SHORT.repr(value)}" for key, value in moved.items())
            them = "them" if len(moved) > 1 else "it"
            warnings.warn(f"{shown}: give {spelled} by keyword; passing {them} by position is deprecated "
                          "and will be refused", DeprecationWarning, stacklevel=2)  # at the caller's line
            return function(*args[:count], **moved, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def too_many_positionals(name: str, least: int, most: int, given: int) -> str:
    """CPython's words for ``given`` positional arguments to the function ``name`` that takes
    ``least`` to ``most`` of them and no keyword-only ones."""
    takes = (f"from {least} to {most} positional arguments" if least < most
             else f"{most} positional argument{'s' if most != 1 else ''}")
    return f"{name}() takes {takes} but {given} {'was' if given == 1 else 'were'} given"


def require_number(value: float, owner: str, field: str, *, zero_allowed: bool = False) -> None:
    """Refuse a learning rate, scale or standard deviation that is not a finite number above 0
    (at least 0 with ``zero_allowed``): NaN, infinity or a value beyond float32 would only
    surface later as a NaN loss whose message blames something else."""
    ok = isinstance(value, (int, float)) and math.isfinite(value) and abs(value) <= FLOAT32_MAX
    if not ok or not (value >= 0 if zero_allowed else value > 0):
        bound = ">= 0" if zero_allowed else "> 0"
        beyond = isinstance(value, (int, float)) and math.isfinite(value) and abs(value) > FLOAT32_MAX
        limit = f" and at most {FLOAT32_MAX:.4g} (float32's largest)" if beyond else ""
        raise ConfigError(owner, field, f"must be a finite number {bound}{limit}, got {value}")
    if value and abs(value) < FLOAT32_TINY:  # 1e-320: 0 in float32 (a learning rate that adapts nothing)
        least = "0 or at least" if zero_allowed else "at least"
        raise ConfigError(owner, field, f"must be {least} {FLOAT32_TINY:.4g} (float32's smallest normal number; "
                                        f"a smaller one loses its precision or becomes 0), got {value}")


def size_overflow_in(err: BaseException) -> BaseException | None:
    """``err`` where it is torch's refusal of a size too large for 64-bit arithmetic, or None: a
    layer or a draw of 2**63 - 1 units ends in a RuntimeError "Storage size calculation
    overflowed" or a TypeError "... Overflow when unpacking long long", from deep inside torch;
    the callers turn it into one line that names what to make smaller. Not torch's "value cannot
    be converted to type float without overflow" (a value, not a size), nor any other
    OverflowError (``math.exp``, ``os.kill`` of a huge number: a bug of its own, with its
    traceback)."""
    text = str(err)
    sized = isinstance(err, RuntimeError) and "overflow" in text.lower() and "without overflow" not in text
    if sized or (isinstance(err, (TypeError, OverflowError)) and "Overflow when unpacking" in text):
        return err
    return None


def first_line(err: BaseException, width: int = 160) -> str:
    """The first line of ``err``'s message, cut to ``width`` characters (its type's name where it
    has none): torch's long messages (a C++ stack after the first line) quoted in one line."""
    return (str(err).splitlines() or [""])[0][:width] or type(err).__name__


class ConfigError(MetalearnError):
    """An option value a config refuses. The library's message names the field
    (``MAML.Config.inner_lr must be > 0, got -1``); the CLI shows the same problem with the flag
    (``--inner-lr must be > 0, got -1``) through :meth:`with_flags`, its one field-to-flag mapping.

    ``owner`` is the config that names the field (``"MAML.Config"``; ``""``: the field alone),
    ``field`` the refused field (a tuple: several named together, ``a, b must ...``), and
    ``problem`` is the rest of the sentence; other fields it mentions are written in backticks
    (``"must be at most `memory_size` (8192)"``) and are named the same way in either form; a
    field of another config is written with its owner (```MAMLRL.Config.outer```), which the
    command line spells as the flag alone (``--outer``). An option of the call that is no config
    field (``preset``) is a ``{name}`` field given in ``options``, as :class:`Options` takes it
    (``preset=("preset='maml++'", "--preset maml++")``).

    An evaluation's refusal of its method options names them as that call changes them
    (:meth:`name_overrides`): ``overrides['test_inner_steps']`` from Python, ``--set
    test_inner_steps`` on the command line."""

    def __init__(self, owner: str, field: str | tuple[str, ...], problem: str, **options: str | tuple[str, str]):
        self.owner, self.problem = owner, problem
        self.options = spelled(options)
        self.settings: frozenset[str] = frozenset()  # fields given as `--set NAME=VALUE`, not as their flags
        self.overridden: frozenset[str] = frozenset()  # fields given in a Python call's `overrides`
        self.fields = (field,) if isinstance(field, str) else tuple(field)
        self.field = self.fields[0]
        super().__init__(self.render(self.python_name))

    def python_name(self, field: str, owner: str | None = None) -> str:
        """How the Python API names ``field`` (of ``owner``, else of this error's config):
        ``MAML.Config.inner_lr``, or ``overrides['inner_lr']`` for a field of :attr:`overridden`."""
        if owner is None:
            if field in self.overridden:
                return f"overrides[{field!r}]"
            owner = self.owner
        return f"{owner}.{field}" if owner else field

    def name_overrides(self, settable: Iterable[str], given: Iterable[str]) -> None:
        """Name fields as an evaluation changes a run's method options: each of ``settable`` (every
        option that the command line changes with ``--set`` alone) as ``--set NAME`` there, and
        each of ``given`` (the call's ``overrides``) as ``overrides['NAME']`` from Python, where
        the others keep their config's name; the message is spelled again so."""
        self.settings, self.overridden = frozenset(settable), frozenset(given)
        self.args = (self.render(self.python_name),)

    def render(self, name: Callable[..., str], flags: bool = False) -> str:
        """The message with every field named by ``name(field)``, or ``name(field, owner)`` for a
        field of another config, and its options as the command line (``flags``) or Python spells them."""
        def mentioned(match: re.Match) -> str:
            owner, _, field = match.group(1).rpartition(".")
            return name(field, owner) if owner else name(field)

        text = re.sub(r"`([A-Za-z_][A-Za-z0-9_.]*)`", mentioned, self.problem)
        text = fill(text, self.options, flags) if self.options else text
        return f"{', '.join(name(field) for field in self.fields)} {text}"

    def with_flags(self) -> str:
        """The message as the command line spells options: ``--inner-lr must be > 0, got -1``, or
        for a field of :attr:`settings` (an evaluation's ``--set``) ``--set inner_lr``."""
        return self.render(lambda name, owner="": f"--set {name}" if name in self.settings else flag(name, owner),
                           flags=True)


class Options:
    """A message that names options of a call, which the Python API and the command line spell
    differently (``resume=True`` and ``--resume``, ``json_out`` and ``--json``): a ``template``
    whose ``{name}`` fields are the options, each given as ``name="python"`` (its flag then
    ``--`` and the name with hyphens, ``run_dir`` -> ``--run-dir``) or ``name=("python", "flag")``
    (a value in both: ``stop_at=("stop_at=5", "--stop-at 5")``; a path after the option's name,
    :func:`valued`; a nested message's two forms, :func:`spellings`); a literal brace is doubled.
    ``str()`` reads as the Python API spells the options, :meth:`with_flags` as the command line
    does.

    Only those fields and doubled braces are read: any other brace is kept as it is, so that a
    path or an error's text quoted into the template (an f-string, its option fields written
    ``{{name}}``) needs no escaping and cannot break the message that quotes it. A quoted text
    that may itself hold doubled braces (the repr of nested dicts) goes in as a field spelled the
    same both ways, ``lines=(text, text)``: a field's spellings are never read."""

    def __init__(self, template: str, **options: str | tuple[str, str]):
        self.template = template
        self.options = spelled(options)
        super().__init__(self.render(flags=False))

    def render(self, flags: bool) -> str:
        return fill(self.template, self.options, flags)

    def with_flags(self) -> str:
        """The message with the options spelled as the command line's flags."""
        return self.render(flags=True)


class OptionError(Options, MetalearnError):
    """A refusal that names options (its ``template`` and options as :class:`Options` takes
    them): ``OptionError("{resume} needs {run_dir}, the run to continue", resume=("resume=True",
    "--resume"), run_dir="run_dir")`` reads "resume=True needs run_dir, ..." from Python,
    "--resume needs --run-dir, ..." on the command line."""


class OptionWarning(Options, MetalearnWarning):
    """A :class:`MetalearnWarning` that names options (its ``template`` and options as
    :class:`Options` takes them), spelled as the caller spells them."""


class OptionLine(str):
    """A line of output that names options (see :class:`Options`), as ``train`` announces a run:
    the string itself reads as the Python API spells them, :meth:`with_flags` as the command
    line does, so that an ``announce`` of the user's prints it as their call spells it."""

    template: str
    options: dict[str, tuple[str, str]]

    def __new__(cls, template: str, **options: str | tuple[str, str]):
        named = spelled(options)
        line = super().__new__(cls, fill(template, named, flags=False))
        line.template, line.options = template, named
        return line

    def with_flags(self) -> str:
        """The line with the options spelled as the command line's flags."""
        return fill(self.template, self.options, flags=True)

    def __reduce__(self):  # a copy or a pickle is built from the template, not from the filled text
        return _option_line, (self.template, self.options)


def _option_line(template: str, options: dict[str, tuple[str, str]]) -> OptionLine:
    """:class:`OptionLine` again from its template and spelled options (its ``__reduce__``)."""
    return OptionLine(template, **options)


def spelled(options: dict[str, str | tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """:class:`Options`' ``options`` as (Python, command line) pairs."""
    return {name: (given, flag(given)) if isinstance(given, str) else tuple(given) for name, given in options.items()}


_FIELD = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")


def fill(template: str, options: dict[str, tuple[str, str]], flags: bool) -> str:
    """``template`` with its ``{name}`` fields of ``options`` spelled as the command line
    (``flags``) or Python does, doubled braces as single ones, and every other brace as it is."""
    def field(match: re.Match) -> str:
        name = match.group(1)
        if name is None:  # a doubled brace
            return match.group(0)[0]
        return options[name][flags] if name in options else match.group(0)

    return _FIELD.sub(field, template)


def valued(option: str | tuple[str, str], value: object) -> tuple[str, str]:
    """``option`` (as :class:`Options` takes it) followed by ``value``, a path, in both spellings:
    ``valued("split_file", "s.json")`` is ("split_file s.json", "--split-file s.json")."""
    python, command_line = spelled({"option": option})["option"]
    return f"{python} {value}", f"{command_line} {value}"


def spellings(err: BaseException) -> tuple[str, str]:
    """``err``'s message as (the Python API, the command line) spell it: for a message that
    quotes another's (``{detail}`` given as ``detail=spellings(err)``), so that each form quotes
    its own."""
    return (str(err), err.with_flags()) if isinstance(err, (Options, ConfigError)) else (str(err), str(err))


def kind_of(value: object) -> str:
    """``value``'s type as a reader knows it, for a message that refuses it: ``list``,
    ``numpy.ndarray``, ``torch.utils.data.dataloader.DataLoader``."""
    module, name = type(value).__module__, type(value).__qualname__
    return name if module == "builtins" else f"{module}.{name}"


def flag(field: str, owner: str = "") -> str:
    """The command-line spelling of a config field (of any owner): ``inner_lr`` -> ``--inner-lr``."""
    return "--" + field.replace("_", "-")


TIME_LIMIT_EXIT = 75  # sysexits' EX_TEMPFAIL: not finished, try again later (with --resume)


class TrainingStopped(Options, MetalearnError):
    """Training stopped at its time limit or at its ``stop_at`` step, after saving a checkpoint
    of its last step; ``exit_code`` is :data:`TIME_LIMIT_EXIT` (75) for the time limit, 0 for
    ``stop_at``. The ``message`` names the options it mentions as :class:`Options`' template does
    (``stop_at`` here, ``--stop-at`` on the command line). A stop by Ctrl-C or a stop signal is
    :class:`TrainingInterrupted`."""

    def __init__(self, message: str, exit_code: int, **options: str | tuple[str, str]):
        super().__init__(message, **options)
        self.exit_code = exit_code

    def __reduce__(self):  # pickled whole (a process pool hands it back): message, exit code, options
        return _rebuilt_stop, (type(self), self.template, self.exit_code, self.options)


def _rebuilt_stop(kind: type, template: str, exit_code: int, options: dict[str, tuple[str, str]]):
    return kind(template, exit_code, **options)


class TrainingInterrupted(Options, BaseException):
    """Training stopped by Ctrl-C or a stop signal (SIGTERM, SIGUSR1, SIGUSR2; also the loss of
    torchrun, or another rank's signal), after saving a checkpoint of its last step, or before
    training began; ``exit_code`` is the shell's for that signal (130, 143, 138, 140). Not an
    ``Exception``, as ``KeyboardInterrupt`` is not: a loop over runs that skips a failed one
    with ``except MetalearnError`` or ``except Exception`` (a hyper-parameter sweep) stops at
    it, as it would at a Ctrl-C anywhere else. Its ``message`` says how to go on, with options
    spelled as :class:`Options` does."""

    def __init__(self, message: str, exit_code: int, **options: str | tuple[str, str]):
        super().__init__(message, **options)
        self.exit_code = exit_code

    __reduce__ = TrainingStopped.__reduce__


def training_stop(message: str, exit_code: int, **options: str | tuple[str, str]) -> BaseException:
    """The exception for a stop with ``exit_code``: :class:`TrainingInterrupted` for a signal's
    (128 + its number), else :class:`TrainingStopped`."""
    kind = TrainingInterrupted if exit_code >= 128 else TrainingStopped
    return kind(message, exit_code, **options)


# The signals that stop a command as SIGTERM does: SIGTERM, and a scheduler's warning that the
# job's time is nearly up (Slurm's --signal=USR1@120, submitit's SIGUSR2; not on Windows), whose
# default action would kill the process without a word or a checkpoint. Training saves its step
# first (training.StopRequests, with Ctrl-C); every other whole-process command ends cleaning up.
STOP_SIGNALS = (signal.SIGTERM,) + tuple(getattr(signal, name) for name in ("SIGUSR1", "SIGUSR2")
                                         if hasattr(signal, name))


class Terminated(BaseException):
    """A SIGTERM to a command's process (or a scheduler's SIGUSR1 or SIGUSR2: ``signal_number``),
    raised where the process is (as Python raises a Ctrl-C), so that what the command holds is
    cleaned up on the way out: an export's temporary folder, a lock, a partial file. Training
    notes such a signal itself (a checkpoint after the step); before and after its loop
    (reading the data, the test) it is met as a Ctrl-C is, with the shell's exit status for
    it, 128 + the signal's number (143 for SIGTERM)."""

    def __init__(self, signal_number: int = 15):
        super().__init__(signal_number)
        self.signal_number = int(signal_number)


def signal_name(number: int) -> str:
    """``SIGTERM`` for 15: the name the shell and the docs give a signal's number."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def stopped_by(signal_exception: BaseException) -> tuple[str, int]:
    """How a command says it was stopped by ``signal_exception`` (a :class:`KeyboardInterrupt` or
    :class:`Terminated`), and the shell's exit status for that signal."""
    if isinstance(signal_exception, Terminated):
        number = signal_exception.signal_number
        return f"terminated ({signal_name(number)})", 128 + number
    return "interrupted", 130


def caller_level() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` made by the function that calls this one, that
    names the first frame outside metalearn (a notebook's cell, a script's line): the warning
    points at the user's call, not at the library's, and Python's default filter, which shows a
    warning once per place, shows it again for each call of the user's."""
    frame, level = sys._getframe(2), 2  # the warning function's caller: stacklevel 2
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == "metalearn":
        frame, level = frame.f_back, level + 1
    return level
