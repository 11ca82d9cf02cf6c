"""Progress reporting for long steps (rich bars on a terminal, plain lines otherwise)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Reporter:
    """A no-op reporter; the quantizer calls these hooks and never prints itself."""

    def task(self, description: str, total: int):
        return None

    def advance(self, task, n: int = 1) -> None:
        pass

    def update(self, task, description: str) -> None:
        pass

    def log(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass


class RichReporter(Reporter):
    def __init__(self, quiet: bool = False):
        self.console = Console(stderr=True)
        self.quiet = quiet
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                 console=self.console, transient=False)
        self.progress.start()

    def task(self, description, total):
        return self.progress.add_task(description, total=total)

    def advance(self, task, n=1):
        if task is not None:
            self.progress.advance(task, n)

    def update(self, task, description):
        if task is not None:
            self.progress.update(task, description=description)

    def log(self, message):
        if not self.quiet:
            self.progress.console.print(message, highlight=False, markup=False)

    def close(self):
        self.progress.stop()


def default_reporter(quiet: bool = False) -> Reporter:
    return RichReporter(quiet=quiet) if sys.stderr is not None else Reporter()
