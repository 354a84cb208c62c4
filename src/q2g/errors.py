"""The errors q2g raises on purpose, and the exit code each one means.

Helpers raise these; only `cli.main` (and the stage `main`s it calls) turn them into an exit code
and a one-line message, so every stage answers the same kind of failure the same way:

| exit | meaning |
| ---: | --- |
| 0 | done |
| 1 | the run failed (a backend gave up, a training step went NaN, a merge check failed) |
| 2 | bad input or settings (a flag, a YAML key, a data file, an existing output of another run) |
| 130 | interrupted (Ctrl-C / SIGINT); what was finished is kept, the same command resumes |
"""

from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class Q2GError(Exception):
    """Base of q2g's own errors; `exit_code` is what the command exits with."""

    exit_code = EXIT_FAILED


class BadInput(Q2GError, ValueError):
    """Input or settings that cannot be used as given; the message names the flag, key or file:line."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(BadInput):
    """An option (command line or YAML) of the wrong type, outside its range or choices, or unknown."""


class DataError(BadInput):
    """A data or traces file that is missing, unreadable or malformed (the message names file:line)."""


class RunFailed(Q2GError, RuntimeError):
    """A run that started and could not finish (the message says what to do)."""
