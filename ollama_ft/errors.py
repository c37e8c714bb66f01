"""Errors that ollama-ft reports to a person as one line.

Library code raises these; only `cli.py` turns them into a message and an exit code.
Every message names the thing that is wrong (field, file, host) and says how to fix it.
"""

from __future__ import annotations


class OllamaFtError(Exception):
    """Base class: a failure with a message fit to show a user as is."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UserInputError(OllamaFtError):
    """The recipe, a data file, a suite or a command-line value is wrong. Exit code 2."""

    exit_code = 2


class RecipeError(UserInputError):
    """One or more recipe problems, all collected before any heavy work starts."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        head = f"{path}: {len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(head + ": " + "; ".join(problems))


class DataError(UserInputError):
    """A training or validation file cannot be used as it is."""


class MissingDependencyError(OllamaFtError):
    """An optional package or program that this run needs is not installed."""

    exit_code = 2


class OllamaError(OllamaFtError):
    """The Ollama server is unreachable, too old, or answered with an error."""


class StageError(OllamaFtError):
    """A pipeline stage ran but its result failed a check (logits mismatch, smoke test…)."""


class LockedError(OllamaFtError):
    """Another ollama-ft process is already working in this run directory."""

    exit_code = 2


class TrainingInterrupted(OllamaFtError):
    """Ctrl-C during training; a checkpoint was saved and a rerun resumes from it."""

    exit_code = 130


class PreflightError(UserInputError):
    """Several reasons not to start a build, in one message."""

    def __init__(self, problems: list[OllamaFtError]):
        self.problems = problems
        if len(problems) == 1:
            super().__init__(problems[0].message, problems[0].hint)
        else:
            super().__init__(f"{len(problems)} problems stop this build: "
                             + "; ".join(f"({i}) {p.one_line()}" for i, p in enumerate(problems, 1)))
        # Wrong input (2) outranks an environment failure such as a stopped server (1).
        self.exit_code = max(p.exit_code for p in problems)
