"""Progress on stderr (rich bars on a terminal, nothing or plain lines otherwise): gone before a
command prints its result, so stdout stays clean for --json and pipes."""

from __future__ import annotations


class ByteProgress:
    """A rich progress bar on stderr over a byte count (``advance(n)``); nothing when not a
    terminal. It is gone (transient) before the command prints its result."""

    def __init__(self, label: str, total: int):
        self.label, self.total = label, total

    def __enter__(self):
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        self.progress = Progress(TextColumn(self.label), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                                 console=console, transient=True, disable=not console.is_terminal)
        self.progress.__enter__()
        self.task = self.progress.add_task(self.label, total=self.total)
        return self

    def advance(self, n: int) -> None:
        self.progress.advance(self.task, n)

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)


class TrainingProgress:
    """A rich progress bar on stderr for training steps; plain lines when not a terminal."""

    def __enter__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
                                 console=self.console, transient=True, disable=not self.console.is_terminal)
        self.progress.__enter__()
        self.task = None
        return self

    def say(self, message: str) -> None:
        self.console.print(f"[cyan]{message}[/cyan]")

    def update(self, step: int, total: int, loss: float | None) -> None:
        if self.task is None:
            self.task = self.progress.add_task("training", total=total, loss="-")
        self.progress.update(self.task, completed=step, total=total, loss=f"{loss:.4f}" if loss is not None else "-")

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)
