"""The ``cl-release`` command: parse, call the library, turn errors into one-line messages.

Heavy modules (torch, axolotl, transformers) are imported inside commands, never here, so
``cl-release --help`` is instant.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import click

from . import __version__
from .errors import ClReleaseError


class Context:
    """What every command gets: the release repository root and output switches."""

    def __init__(self, root: Path, debug: bool):
        self.root = root
        self.debug = debug

    def project(self):
        from .project import Project

        return Project.load(self.root)

    def registry(self):
        from .registry import Registry

        return Registry(self.root)


pass_ctx = click.make_pass_decorator(Context)


def handle_errors(fn: Callable) -> Callable:
    """Print ClReleaseError on one line (red) and exit with its code; traceback with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ClReleaseError as e:
            ctx = click.get_current_context(silent=True)
            debug = bool(ctx and ctx.find_object(Context) and ctx.find_object(Context).debug)
            if debug or os.environ.get("CL_RELEASE_DEBUG"):
                raise
            click.secho(f"Error: {e}", fg="red", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.secho("Interrupted.", fg="red", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except BrokenPipeError:  # output piped into head & co.: stop quietly
            sys.stderr.close()
            os._exit(0)
        except Exception as e:  # a bug or an environment problem: one line unless --debug
            ctx = click.get_current_context(silent=True)
            debug = bool(ctx and ctx.find_object(Context) and ctx.find_object(Context).debug)
            if debug or os.environ.get("CL_RELEASE_DEBUG"):
                raise
            click.secho(f"Error: unexpected {type(e).__name__}: {e} (run with --debug for the traceback)",
                        fg="red", err=True)
            sys.exit(1)

    return wrapper


def json_option(fn: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")(fn)


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cl-release")
@click.option(
    "-C",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Run as if started in this release repository (like git -C).",
)
@click.option("--debug", is_flag=True, envvar="CL_RELEASE_DEBUG", help="Show tracebacks on errors.")
@click.pass_context
def main(ctx: click.Context, directory: Path | None, debug: bool) -> None:
    """Keep a LoRA-tuned domain LLM current: capture feedback, build data, train with
    Axolotl, gate, and release semantic versions with full lineage."""
    root = Path(directory) if directory is not None else Path.cwd()
    ctx.obj = Context(root=root, debug=debug)


# ---- data commands (data build, data validate) ----


def _in_root(ctx: Context, path: Path | None) -> Path | None:
    """Relative paths are taken from the release repository (``-C DIR``), like git -C."""
    return None if path is None else (path if path.is_absolute() else ctx.root / path)


@main.group()
def data() -> None:
    """Build training sets from feedback; validate data files."""


@data.command("build")
@click.option("--since", help="Only feedback since DATE (YYYY-MM-DD, ISO time) or since release VERSION.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Output JSONL (default: outputs/data/<sha256>.jsonl, git-ignored).")
@click.option("--format", "fmt", type=click.Choice(["messages", "chatml", "alpaca", "completion"]),
              help="Output format (default: extraction.format, else messages).")
@click.option("--redact/--no-redact", default=None,
              help="Replace emails, phone numbers and extraction.redact_patterns (default: on).")
@click.option("--from-jsonl", type=click.Path(dir_okay=False, path_type=Path),
              help="Read feedback rows from a JSONL file instead of the feedback store.")
@click.option("--workers", type=click.IntRange(min=1),
              help="Processes reading a large feedback store (default: one per core from 100,000 records).")
@json_option
@pass_ctx
@handle_errors
def data_build(ctx: Context, since, out, fmt, redact, from_jsonl, workers, as_json) -> None:
    """Turn rated and corrected feedback into a deduplicated, hashed training set."""
    from .data.build import build_project

    project = ctx.project()
    result, paths = build_project(project, since=since, out=_in_root(ctx, out), fmt=fmt,
                                  redact=redact, from_jsonl=_in_root(ctx, from_jsonl), workers=workers)
    m = result.manifest
    if as_json:
        echo_json({**m, "files": {k: project.rel(p) for k, p in paths.items()}})
        return
    src = m["sources"]
    click.echo(f"{project.rel(paths['data'])}: {m['examples']} examples ({src['kept']} kept, "
               f"{src['corrected']} corrected), format {m['format']}, sha256 {m['sha256']}")
    if "corrections" in paths:
        click.echo(f"corrections: {project.rel(paths['corrections'])} ({src['corrected']} examples)")
    skipped = m["skipped"]
    if skipped:
        detail = ", ".join(f"{k} {v}" for k, v in skipped.items())
        click.echo(f"skipped {sum(skipped.values())} of {m['rows_read']} rows: {detail}")
    click.echo(f"manifest: {project.rel(paths['manifest'])}")


@data.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", default="messages", show_default=True,
              type=click.Choice(["messages", "alpaca", "completion", "chatml", "suite"]),
              help="Row format; 'suite' checks regression-suite rows.")
@pass_ctx
@handle_errors
def data_validate(ctx: Context, files, fmt) -> None:
    """Check every row of FILES; the first problem is reported with file, line and field.

    Examples over the size limit (limits.max_example_chars, else 32 characters per token of
    sequence_len; the defaults outside a release repository) are refused too."""
    from .data.formats import max_example_chars
    from .data.build import validate_data_file

    project = _project_or_none(ctx)
    max_chars = max_example_chars(project.data if project is not None else None)
    for f in files:
        n = validate_data_file(_in_root(ctx, f), fmt, display=str(f), max_chars=max_chars)
        click.echo(f"{f}: {n} records OK")


def say(message: str) -> None:
    """Progress messages go to stderr so stdout stays clean for --json and pipes."""
    click.secho(message, err=True, fg="cyan")


def release_options(fn: Callable) -> Callable:
    fn = click.option("--base-model", default=None, metavar="ID", help="New base model (annual_reset, major only).")(fn)
    fn = click.option("--strategy", default=None, metavar="S",
                      help="initial, continued_lora, merge_and_retrain, annual_reset or patch "
                           "(default: minor=continued_lora, patch=patch, major=merge_and_retrain).")(fn)
    fn = click.option("--from", "from_version", default=None, metavar="VERSION",
                      help="Build on this version instead of the current one.")(fn)
    fn = click.argument("bump", type=click.Choice(["major", "minor", "patch"]))(fn)
    return fn


# ---- release core (init, render, plan, release, list, show, rollback, merge, push, verify) ----


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--demo", is_flag=True, help="Add the tiny local model and demo datasets (runs offline).")
@click.option("--name", default=None, help="Project name (default: the folder name).")
@click.option("--base-model", default="meta-llama/Llama-3.1-8B-Instruct", show_default=True, help="Base model id.")
@handle_errors
def init(directory: Path, demo: bool, name: str | None, base_model: str) -> None:
    """Scaffold a release repository in DIRECTORY (git init + first commit)."""
    from .release.scaffold import init_repository

    path = init_repository(directory, demo=demo, name=name, base_model=base_model, progress=say)
    click.echo(f"Created release repository {path}")
    click.echo(f"Next: cd {path} && cl-release plan minor")


@main.command()
@click.argument("strategy")
@click.option("--from", "from_version", default=None, metavar="VERSION", help="Parent version (default: current).")
@click.option("--base-model", default=None, metavar="ID", help="New base model (annual_reset).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the config to FILE instead of printing it.")
@pass_ctx
@handle_errors
def render(ctx: Context, strategy: str, from_version: str | None, base_model: str | None, output: Path | None) -> None:
    """Render the Axolotl YAML a STRATEGY would train with."""
    from .files import atomic_write_text
    from .release.plan import plan_strategy

    plan = plan_strategy(ctx.project(), strategy, from_version=from_version, base_model=base_model)
    if output:
        atomic_write_text(output, plan.config_text)
        say(f"wrote {output}")
    else:
        click.echo(plan.config_text, nl=False)


@main.command()
@release_options
@json_option
@pass_ctx
@handle_errors
def plan(ctx: Context, bump: str, from_version, strategy, base_model, as_json: bool) -> None:
    """Show what a release would do, without training or writing anything."""
    from .release.plan import plan_release

    p = plan_release(ctx.project(), bump=bump, from_version=from_version, strategy=strategy, base_model=base_model)
    if as_json:
        echo_json(p.to_dict())
        return
    click.echo(f"version   {p.version}  ({p.bump}, strategy {p.strategy}, parent {p.parent or '-'})")
    click.echo(f"base      {p.train_base['path']}" + (f"  (merged from {p.train_base['merged_from']})" if p.train_base.get("merged_from") else ""))
    if p.lora_model_dir:
        click.echo(f"adapter   continues {p.lora_model_dir}")
    click.echo(f"tokens    {p.tokens if p.tokens is not None else 'unknown (tokenizer not available offline)'}")
    for part in p.parts:
        click.echo(f"data      {part.role:<11} {len(part.records):>6} examples  {part.sha256[:12]}  {part.path}")
    if p.heldout is not None:
        click.echo(f"checks    {'heldout':<11} {len(p.heldout.records):>6} examples  {p.heldout.sha256[:12]}  "
                   f"{p.heldout.path}  (kept out of training)")
    for src in p.sources:
        if src["name"] == "feedback":
            skipped = ", ".join(f"{k} {v}" for k, v in src["skipped"].items()) or "none"
            window = src["window"]
            lineage = f"{p.parent}'s lineage" if p.parent else "any release"
            click.echo(f"feedback  {src['records']} usable rows not yet trained by {lineage}, logged "
                       f"{(window['first_created_at'] or '?')[:10]} .. {(window['last_created_at'] or '?')[:10]}"
                       f" (skipped: {skipped})")
            if src["trained_elsewhere"]:
                click.echo("          of these, trained by releases outside this lineage (abandoned or rejected): "
                           + ", ".join(f"{v} {n}" for v, n in src["trained_elsewhere"].items()))
    if p.retired:
        click.echo(f"retired   {len(p.retired)} examples a correction or a newer answer replaced "
                   f"({p.retired_new} by this release; see 'plan --json' retired.examples)")
        for w in [w for w in p.retired.values() if w.get("at") == p.version][:5]:
            click.echo(f"          {w['question']!r}: {w['answer']!r} -> {w['by_answer']!r} ({w['why']})")
    for warning in p.data_warnings:
        click.secho(f"warning   {warning}", fg="yellow", err=True)
    for warning in p.warnings:
        click.secho(f"warning   {warning} (release refuses it without --force --reason)", fg="yellow", err=True)
    click.echo("config:")
    click.echo(p.config_text, nl=False)


@main.command()
@release_options
@click.option("--notes", default="", help="What changed (goes into the registry, commit and tag).")
@click.option("--notes-file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path), default=None,
              help="Read the notes from FILE (UTF-8, at most 1 MiB; '-': standard input).")
@click.option("--allow-dirty", is_flag=True, help="Release even if the repository has uncommitted changes.")
@click.option("--force", is_flag=True,
              help="Release even if a gate fails or a knob is outside its sane range (needs --reason; recorded).")
@click.option("--reason", default=None, help="Why the gates are overridden (with --force).")
@click.option("--deploy/--no-deploy", default=None,
              help="Make the release champion in the same registry move (default: a patch does, "
                   "unless abtest.test_patches; other bumps go through 'ab start').")
@pass_ctx
@handle_errors
def release(ctx: Context, bump: str, from_version, strategy, base_model, notes: str, notes_file: Path | None,
            allow_dirty: bool, force: bool, reason: str | None, deploy: bool | None) -> None:
    """Build data, train, evaluate against the parent, gate, record and tag the next version.

    On an empty registry any bump makes 1.0.0. A candidate that fails a gate is recorded as
    rejected (exit 1) and the parent stays current. A patch builds on the version that serves
    (the champion) and, once it passes its gates, becomes champion."""
    from .eval.gates import release_evaluator
    from .release.run import check_notes, read_notes_file, run_release

    if notes_file is not None:
        if notes:
            raise click.UsageError("pass --notes or --notes-file, not both")
        notes = read_notes_file(notes_file if str(notes_file) == "-" else _in_root(ctx, notes_file))
    else:
        notes = check_notes(notes)
    evaluator = release_evaluator(force=force, reason=reason)
    with TrainingProgress() as bar:
        result = run_release(ctx.project(), bump=bump, from_version=from_version, strategy=strategy,
                             base_model=base_model, notes=notes, allow_dirty=allow_dirty, progress=bar.say,
                             train_progress=bar.update, evaluator=evaluator, deploy=deploy,
                             knob_override=reason if force else None)
    e = result.entry
    if result.plan is None:
        click.echo(f"Finished the interrupted release {e['version']} (recorded, committed, tagged); "
                   "nothing new to train on.")
        return
    loss = e["training"].get("train_loss")
    pass_rate = (e.get("evaluation") or {}).get("pass_rate")
    click.echo(f"{e['status'].capitalize()} {e['version']} ({e['strategy']}, parent {e['parent'] or '-'})"
               f"  train_loss={loss}" + (f"  pass_rate={pass_rate:.1%}" if pass_rate is not None else "")
               + f"  adapter={e['adapter']['path']}")
    if result.timings:
        click.echo("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items()))
    if evaluator.last is not None:
        show = ((ctx.project().data.get("evaluation") or {}).get("show") or [])
        _print_before_after(evaluator.last.before_after(show))
    for why in (e.get("gates") or {}).get("reasons", []):
        click.echo(f"  gate failed: {why}" + ("  (overridden: --force)" if e.get("override") else ""))
    if result.deployed:
        d = result.deployed
        click.echo(f"  champion: {d['to']} (was {d['from'] or '-'})" + (f"; current {d['current']['to']}"
                                                                      if d.get("current") else ""))
    if e["status"] != "released":
        click.echo(f"Current version stays {e['parent'] or 'none'}; 'cl-release release --force --reason TEXT' overrides.")
        sys.exit(1)


@main.command(name="patch")
@click.argument("request_ids", nargs=-1)
@click.option("--correction", default=None, help="The right answer (with exactly one REQUEST_ID): recorded first.")
@click.option("--from", "from_version", default=None, metavar="VERSION",
              help="Patch this version instead of the one that serves (the champion).")
@click.option("--notes", default="", help="What the patch fixes (default: the incidents and their tests).")
@click.option("--notes-file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path), default=None,
              help="Read the notes from FILE (UTF-8, at most 1 MiB; '-': standard input).")
@click.option("--deploy/--no-deploy", default=None, help="Make the patch champion (default: yes).")
@click.option("--push/--no-push", default=None, help="Push it to the Hub (default: hub.push_patches).")
@click.option("--dry-run", is_flag=True, help="Show the tests and the plan; record, add and train nothing.")
@click.option("--suite", default="registry/regression_tests.jsonl", show_default=True,
              help="The regression suite the incident tests go into.")
@click.option("--force", is_flag=True, help="Release even if a gate fails (needs --reason; recorded).")
@click.option("--reason", default=None, help="Why the gates are overridden (with --force).")
@pass_ctx
@handle_errors
def patch_(ctx: Context, request_ids, correction, from_version, notes, notes_file, deploy, push, dry_run, suite,
           force, reason) -> None:
    """Fix a safety incident in one command: record the correction, add it to the regression
    suite as a critical test, release a PATCH of the serving version that must pass it, make
    it champion, and (with --push) push it.

    Without REQUEST_IDS it takes every open critical or safety correction (what 'cl-release
    status' reports as a PATCH due). Each step is idempotent: a re-run after a crash continues,
    a second run changes nothing."""
    from .release.incident import patch
    from .release.run import check_notes, read_notes_file

    if notes_file is not None:
        if notes:
            raise click.UsageError("pass --notes or --notes-file, not both")
        notes = read_notes_file(notes_file if str(notes_file) == "-" else _in_root(ctx, notes_file))
    else:
        notes = check_notes(notes)

    def show(tests: list[dict]) -> None:
        click.echo(f"incident tests ({suite}):")
        for t in tests:
            click.echo(f"  [{t['criticality']}] {t['id']}: {t['match']} {t['expected']!r}")

    with TrainingProgress() as bar:
        r = patch(ctx.project(), request_ids, correction=correction, from_version=from_version, notes=notes,
                  deploy=deploy, push=push, dry_run=dry_run, suite=suite, force=force, reason=reason,
                  progress=bar.say, show=show, train_progress=bar.update)
    if not r.request_ids:
        click.echo("Nothing to patch: no open critical or safety corrections (give the incident's request id, "
                   "and --correction TEXT, to patch another answer)")
        return
    if r.plan is not None:
        parts = ", ".join(f"{p.role} {len(p.records)}" for p in r.plan.parts)
        click.echo(f"{'plan' if dry_run else 'patch'}: {r.plan.version} on {r.plan.parent} ({parts})")
    if dry_run:
        if r.plan is None:
            click.echo("nothing to train: the incidents' corrections are already trained on")
        return
    if r.release is not None:
        e = r.release.entry
        click.echo(f"{e['status'].capitalize()} {e['version']} (patch of {e['parent']})")
        for why in (e.get("gates") or {}).get("reasons", []):
            click.echo(f"  gate failed: {why}")
        if e["status"] != "released":
            sys.exit(1)
        if r.release.deployed:
            click.echo(f"  champion: {r.release.deployed['to']} (was {r.release.deployed['from'] or '-'})")
    elif r.fixed_in:
        click.echo(f"Nothing to do: {', '.join(r.request_ids)} already fixed in {r.fixed_in}"
                   + ("" if r.tests_added else "; the tests are in the suite"))
    if r.pushed:
        click.echo(f"  pushed {r.pushed['revision']} to {r.pushed['repo_id']}")


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


def _pct(x) -> str:
    return "-" if x is None else f"{x:.0%}"


def _print_before_after(ba: dict) -> None:
    """Pass rate per domain before and after a release, and the answers to ``evaluation.show``."""
    before, after = ba["before"] or "-", ba["after"]
    width = max([len("domain")] + [len(r["domain"]) for r in ba["domains"]])
    col = max(len(before), len(after), 5)
    click.echo(f"  {'domain':<{width}}  {before:>{col}}  {after:>{col}}")
    for r in ba["domains"] + [{"domain": "all", **ba["pass_rate"]}]:
        click.echo(f"  {r['domain']:<{width}}  {_pct(r['before']):>{col}}  {_pct(r['after']):>{col}}")
    nd = ba.get("new_data")
    if nd:
        what = "held-out examples of its new data" if nd["source"] == "heldout" else "corrections"
        click.echo(f"  learned: {nd['passed']} of {nd['n']} {what} answered right ({_pct(nd['pass_rate'])})")
    for a in ba["answers"]:
        click.echo(f"  {a['id']} (expected {a['expected']!r}):")
        label = max(len(before), len(after))
        if a["before"] is not None:
            click.echo(f"    {before:<{label}}  {a['before']!r}")
        click.echo(f"    {after:<{label}}  {a['after']!r}")


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


@main.command(name="list")
@json_option
@pass_ctx
@handle_errors
def list_(ctx: Context, as_json: bool) -> None:
    """Show the lineage: every version, its parent, strategy and status."""
    data = ctx.registry().load()
    if as_json:
        echo_json({"current": data["current"], "aliases": data.get("aliases", {}), "models": [
            {k: m.get(k) for k in ("version", "parent", "bump", "strategy", "status", "created_at", "notes")}
            for m in data["models"]]})
        return
    if not data["models"]:
        click.echo("No releases yet. Run 'cl-release release minor' for 1.0.0.")
        return
    marks = {v: [] for v in (m["version"] for m in data["models"])}
    if data["current"]:
        marks[data["current"]].append("current")
    for alias, v in (data.get("aliases") or {}).items():
        marks.setdefault(v, []).append(alias)
    header = ("version", "parent", "bump", "strategy", "status", "created", "train loss", "", "notes")
    rows = []
    for m in data["models"]:
        depth = _depth(data, m)
        notes = (m.get("notes") or "").strip().splitlines()
        rows.append(("  " * depth + ("└ " if depth else "") + m["version"], m["parent"] or "-", m["bump"],
                     m["strategy"], m["status"], m["created_at"][:16].replace("T", " "),
                     str(m["training"].get("train_loss", "")), ", ".join(marks.get(m["version"], [])),
                     notes[0] if notes else ""))
    if not sys.stdout.isatty():  # piped or redirected: plain columns, nothing wrapped or cut
        click.echo(plain_table(header, rows))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(*header, box=None, pad_edge=False)
    for row in rows:
        table.add_row(*row[:-1], row[-1][:60])
    Console(width=max(120, shutil.get_terminal_size().columns)).print(table)


def plain_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns separated by two spaces; the last column is never padded or cut."""
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header) - 1)]
    return "\n".join("  ".join([*(str(c).ljust(w) for c, w in zip(r, widths)), str(r[-1])]).rstrip()
                     for r in (header, *rows))


def _depth(data: dict, entry: dict) -> int:
    by_version = {m["version"]: m for m in data["models"]}
    depth, parent = 0, entry["parent"]
    while parent:
        depth += 1
        parent = by_version[parent]["parent"]
    return depth


@main.command()
@click.argument("version")
@json_option
@pass_ctx
@handle_errors
def show(ctx: Context, version: str, as_json: bool) -> None:
    """Show one version's registry entry."""
    entry = ctx.registry().get(version)
    if as_json:
        echo_json(entry)
        return
    for key in ("version", "parent", "bump", "strategy", "status", "created_at", "notes", "source_commit", "seed"):
        click.echo(f"{key:<14}{entry.get(key)}")
    click.echo(f"{'base_model':<14}{entry['base_model']['name']} (revision {entry['base_model'].get('revision')})")
    click.echo(f"{'train_base':<14}{entry.get('train_base', {}).get('path')}")
    click.echo(f"{'adapter':<14}{entry['adapter']['path']}  sha256 {entry['adapter']['sha256'][:16]}")
    click.echo(f"{'config':<14}{entry['config']['path']}  sha256 {entry['config']['sha256'][:16]}")
    for d in entry["datasets"]:
        click.echo(f"{'dataset':<14}{d['role']:<12}{d['examples']:>6}  {d['sha256'][:16]}  {d['path']}")
    click.echo(f"{'training':<14}{json.dumps(entry['training'], sort_keys=True)}")
    if entry.get("evaluation"):
        click.echo(f"{'evaluation':<14}{json.dumps(entry['evaluation'], sort_keys=True)}")
    gates = entry.get("gates")
    if gates:
        click.echo(f"{'gates':<14}{'passed' if gates.get('passed') else 'failed'}"
                   + (f" (overridden: {entry['override'].get('reason')})" if entry.get("override") else ""))
        for check in gates.get("checks", []):
            click.echo(f"{'':<14}[{'ok' if check['passed'] else '--'}] {check['name']}: {check['detail']}")
    else:
        click.echo(f"{'gates':<14}none recorded")


@main.command()
@click.argument("version")
@pass_ctx
@handle_errors
def rollback(ctx: Context, version: str) -> None:
    """Make an earlier VERSION current; the next release builds on it. Nothing is deleted."""
    from .release.recovery import rollback as do_rollback

    result = do_rollback(ctx.project(), version)
    if not result.changed:
        click.echo(f"{result.entry['version']} is already the current version; nothing changed.")
        return
    click.echo(f"Current version is now {result.entry['version']}; the next release builds on it.")


@main.command()
@click.argument("version")
@pass_ctx
@handle_errors
def merge(ctx: Context, version: str) -> None:
    """Merge VERSION's adapter into its base (outputs/vX.Y.Z/merged)."""
    from .release.merge import merge_and_commit

    entry = merge_and_commit(ctx.project(), version, progress=say)
    click.echo(f"Merged {entry['version']}: {entry['merged']['path']} (sha256 {entry['merged']['sha256'][:16]})")


@main.command()
@json_option
@pass_ctx
@handle_errors
def verify(ctx: Context, as_json: bool) -> None:
    """Re-hash every dataset, config, adapter and merged model the registry names."""
    from .release.recovery import verify as do_verify

    checks = do_verify(ctx.root)
    bad = [c for c in checks if not c.ok]
    if as_json:
        echo_json({"ok": not bad, "checked": len(checks), "mismatches": [c.to_dict() for c in bad]})
    else:
        for c in bad:
            state = "missing" if c.actual is None else f"sha256 {c.actual[:16]} != recorded {c.expected[:16]}"
            click.echo(f"MISMATCH {c.version} {c.what}: {c.path}: {state}")
        click.echo(f"{len(checks) - len(bad)}/{len(checks)} files match the registry.")
    if bad:
        sys.exit(1)


@main.command()
@click.argument("version")
@click.option("--merged", is_flag=True, help="Push the merged weights (run 'cl-release merge' first).")
@click.option("--dry-run", is_flag=True, help="List what would be uploaded; send nothing.")
@json_option
@pass_ctx
@handle_errors
def push(ctx: Context, version: str, merged: bool, dry_run: bool, as_json: bool) -> None:
    """Upload VERSION to the Hub repo named in cl-release.yaml, with a model card and a tag.

    The token comes from HF_TOKEN or 'hf auth login', never from the command line."""
    from .hub import push as hub

    if dry_run:
        plan = hub.plan_version(ctx.project(), version, merged=merged)
        echo_json(plan.to_dict()) if as_json else click.echo(plan.summary())
        return
    result = hub.publish(ctx.project(), version, merged=merged, progress=say)
    echo_json(result.to_registry()) if as_json else click.echo(f"Pushed {result.revision} to {result.url}")


# ---- feedback commands (feedback store, annotate, review) ----


def _store(ctx: Context):
    from .store.sqlite import FeedbackStore

    return FeedbackStore(ctx.project().feedback_path)


def _at_root(ctx: Context, path: Path | None) -> Path | None:
    """Relative paths are taken from the release repository (``-C DIR``), like git -C."""
    return path if path is None or path.is_absolute() else ctx.root / path


@main.group()
def feedback() -> None:
    """Log answers and feedback in the project's feedback store; import, export, prune."""


@feedback.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--workers", type=click.IntRange(min=1),
              help="Processes parsing the file (default: one per core for files of 16 MB or more).")
@click.option("--timezone", "tz", metavar="ZONE",
              help="How to read timestamps without a UTC offset: an IANA name (Europe/Athens), "
                   "'local' or 'UTC' (the default, with a warning when there are any).")
@json_option
@pass_ctx
@handle_errors
def feedback_import(ctx: Context, file: Path, workers: int | None, tz: str | None, as_json: bool) -> None:
    """Import logged answers (and user feedback) from a JSONL file; all or nothing.

    Known fields that collectors log inside ``metadata`` (model_version, latency_ms, tokens,
    quality_score, hallucinated, error_tag, severity) are used when the line has none of its
    own; version strings such as v1.0 are stored as the release they name."""
    from .data.formats import max_example_chars

    project = ctx.project()
    store, path = _store(ctx), _at_root(ctx, file)
    size = path.stat().st_size if path.is_file() else 0
    registry = ctx.registry()
    releases = [m["version"] for m in registry.models()] if registry.path.is_file() else None
    with ByteProgress("importing", size) as bar:
        result = store.import_jsonl(path, progress=bar.advance, workers=workers, timezone=tz, releases=releases,
                                    max_example_chars=max_example_chars(project.data))
    if as_json:
        echo_json(result.to_dict())
    else:
        click.echo(f"{file}: {result.lines} lines, {result.records} new records, "
                   f"{result.duplicates} already stored, {result.feedback} feedback rows "
                   f"({result.per_second:,.0f} lines/s)")
        click.echo("  by model version: " + (", ".join(f"{v} {n}" for v, n in result.by_model_version.items())
                                              or "none"))
        if result.lifted:
            click.echo("  from metadata: " + ", ".join(f"{k} {n}" for k, n in result.lifted.items()))
        if result.conflicts:
            click.echo("  top level and metadata disagree (top level kept): "
                       + ", ".join(f"{k} {n}" for k, n in result.conflicts.items()))
        if result.mapped_versions:
            click.echo(f"  {result.mapped_versions} version strings mapped to releases (as given: logged_version)")
        if result.unmatched_versions:
            click.echo(f"  {result.unmatched_versions} records name a version that matches no release")
        if result.naive_timestamps:
            click.echo(f"  {result.naive_timestamps} timestamps without a UTC offset, read as {result.timezone}")
    if result.unknown_fields:
        click.secho("Warning: ignored fields no line shape knows: "
                    + ", ".join(f"{k} ({n} lines)" for k, n in result.unknown_fields.items()), fg="yellow", err=True)
    if result.naive_timestamps and tz is None:
        click.secho(f"Warning: {result.naive_timestamps} timestamps in {file} have no UTC offset and were read as "
                    "UTC; if they are local times, import with --timezone ZONE (e.g. Europe/Athens or local).",
                    fg="yellow", err=True)


@feedback.command("add")
@click.argument("request_id")
@click.option("--rating", type=click.IntRange(1, 5), help="Rating from 1 (bad) to 5 (good).")
@click.option("--thumbs", type=click.Choice(["up", "down"]), help="Thumbs up or down.")
@click.option("--correction", help="The answer the model should have given.")
@click.option("--notes", help="Free-text notes.")
@click.option("--hallucinated/--not-hallucinated", default=None, help="Whether the answer invented facts.")
@click.option("--error-tag", help="A short label for the kind of error.")
@click.option("--severity", type=click.Choice(["low", "high", "critical", "safety"]),
              help="critical/safety corrections trigger an immediate PATCH release.")
@click.option("--annotator", help="Who gave this feedback.")
@click.option("--supersedes", "supersedes", multiple=True, metavar="QUESTION",
              help="Another question the correction answers (repeatable): releases retire its old answers.")
@pass_ctx
@handle_errors
def feedback_add(ctx: Context, request_id: str, thumbs: str | None, supersedes: tuple[str, ...], **fields) -> None:
    """Record feedback on the logged answer REQUEST_ID (the latest feedback wins)."""
    store = _store(ctx)
    if supersedes and not fields.get("correction"):
        raise click.UsageError("--supersedes goes with --correction")
    row_id = store.feedback(request_id, thumbs=thumbs, **fields)
    if supersedes:
        store.set_supersedes(request_id, supersedes)
    click.echo(f"feedback {row_id} recorded for {request_id}")


@feedback.command("log")
@click.option("--input", "input_", required=True, help="The prompt the model answered.")
@click.option("--output", required=True, help="The model's answer.")
@click.option("--model-version", help="The model version that answered.")
@click.option("--request-id", help="The request id (default: a new one).")
@pass_ctx
@handle_errors
def feedback_log(ctx: Context, input_: str, output: str, model_version: str | None, request_id: str | None) -> None:
    """Log one answer and print its request id."""
    click.echo(_store(ctx).log(input_, output, model_version=model_version, request_id=request_id))


@feedback.command("stats")
@click.option("--since", help="Only answers created, or given feedback, since DATE (ISO-8601).")
@json_option
@pass_ctx
@handle_errors
def feedback_stats(ctx: Context, since: str | None, as_json: bool) -> None:
    """Totals and rates: feedback, average rating, negative, hallucinated, corrections."""
    stats = _store(ctx).stats(since=since)
    if as_json:
        echo_json(stats)
        return
    click.echo(_format_stats("all", stats))
    for version, block in stats["by_model_version"].items():
        click.echo(_format_stats(version, block))


def _format_stats(label: str, s: dict) -> str:
    avg = "-" if s["average_rating"] is None else f"{s['average_rating']:.2f}"
    return (f"{label}: {s['records']} answers, feedback {s['feedback']} ({s['feedback_rate']:.1%}), "
            f"avg rating {avg}, negative {s['negative_rate']:.1%}, hallucinated "
            f"{s['hallucination_rate']:.1%}, corrections {s['corrections']}, critical {s['critical']}")


@feedback.command("export")
@click.option("--since", help="Only answers created, or given feedback, since DATE (ISO-8601).")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), help="Output JSONL (default: stdout).")
@pass_ctx
@handle_errors
def feedback_export(ctx: Context, since: str | None, out: Path | None) -> None:
    """Write each answer with its latest feedback as JSON lines."""
    store = _store(ctx)
    if out is None:
        store.export(sys.stdout, since=since)
        return
    n = store.export(_at_root(ctx, out), since=since)
    click.echo(f"{out}: {n} rows", err=True)


@feedback.command("prune")
@click.option("--before", required=True, help="Delete answers created before DATE (ISO-8601).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_ctx
@handle_errors
def feedback_prune(ctx: Context, before: str, yes: bool) -> None:
    """Delete old answers and their feedback; answers a release trained on are kept."""
    store = _store(ctx)
    n = store.prune(before, dry_run=True)
    if n and not yes:
        click.confirm(f"Delete {n} answers created before {before} and their feedback?", abort=True)
    click.echo(f"deleted {store.prune(before) if n else 0} answers")


@main.group()
def annotate() -> None:
    """Expert review sessions: export a stratified CSV sample, import the experts' ratings."""


@annotate.command("export")
@click.option("--n", "n", default=50, show_default=True, type=click.IntRange(min=1), help="Sample size.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Output CSV (default: stdout).")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed (same seed, same sample).")
@pass_ctx
@handle_errors
def annotate_export(ctx: Context, n: int, out: Path | None, seed: int) -> None:
    """Sample ~30% errors, ~30% low-confidence and random answers into a CSV for experts."""
    from .data.annotate import export_sample

    counts = export_sample(_store(ctx), _at_root(ctx, out) or sys.stdout, n=n, seed=seed)
    detail = ", ".join(f"{k} {v}" for k, v in counts.items())
    click.echo(f"{out or 'stdout'}: {sum(counts.values())} answers ({detail})", err=True)


@annotate.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@pass_ctx
@handle_errors
def annotate_import(ctx: Context, file: Path) -> None:
    """Store the experts' ratings and corrections from FILE; all rows or none."""
    from .data.annotate import import_csv

    click.echo(f"{file}: {import_csv(_store(ctx), _at_root(ctx, file))} feedback rows stored")


@main.command()
@click.option("--since", help="Only answers created since DATE (ISO-8601).")
@click.option("--model", help="Only answers from this model version.")
@pass_ctx
@handle_errors
def review(ctx: Context, since: str | None, model: str | None) -> None:
    """Rate answers without feedback one by one (1-5, s=skip, q=quit); resumes where you stopped."""
    from .data.annotate import review as run_review

    def ask(text: str) -> str:
        try:
            return click.prompt(text, default="", show_default=False)
        except click.Abort:
            raise EOFError from None

    s = run_review(_store(ctx), since=since, model=model, prompt=ask, echo=click.echo)
    click.echo(f"\nreviewed {s.reviewed}, skipped {s.skipped}" + (" (stopped)" if s.quit else ""))


# ---- evaluation commands (eval, diff, report) ----


class _EvalGroup(click.Group):
    """``cl-release eval VERSION`` runs the suite; ``eval add`` / ``eval import`` manage it."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


def _suite_option(fn: Callable) -> Callable:
    return click.option("--suite", "suites", multiple=True,
                        help="Suite file (repeatable; any path, relative to the repository; default: "
                             "evaluation.suites, else registry/regression_tests.jsonl).")(fn)


def _project_or_none(ctx: Context):
    from .project import PROJECT_FILE

    return ctx.project() if (ctx.root / PROJECT_FILE).is_file() else None


def _print_summary(s: dict) -> None:
    click.echo(f"pass rate {s['pass_rate']:.1%} ({s['passed']}/{s['n_tests']})  hallucination rate "
               + (f"{s['hallucination_rate']:.1%}" if s["hallucination_rate"] is not None else "-")
               + (f"  pass@{s['pass_at_k']['k']} {s['pass_at_k']['rate']:.1%}" if s.get("pass_at_k") else ""))
    click.echo("per criticality: " + ", ".join(f"{k} {v:.0%}" for k, v in s["per_criticality"].items()))
    click.echo("per domain: " + ", ".join(f"{k} {v:.0%}" for k, v in s["per_domain"].items()))
    click.echo(f"{s['tokens_per_second']} tokens/s, peak memory {s['peak_memory_mb']} MB ({s['peak_memory_kind']})")


@main.group(name="eval", cls=_EvalGroup)
def eval_() -> None:
    """Run the regression suite on a version (eval VERSION), or add tests to it."""


@eval_.command("run")
@click.argument("version")
@_suite_option
@click.option("--against", help="Also evaluate this version and list regressions and improvements.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Prompts per generate call.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), help="Tokens generated per answer.")
@click.option("--pass-k", type=click.IntRange(min=1), help="Also sample K answers per test for pass@K.")
@click.option("--no-cache", is_flag=True, help="Recompute even if results for this suite are saved.")
@click.option("--cases", "show_cases", is_flag=True,
              help="Also give every test's result (id, passed, output; in the JSON: a 'cases' list).")
@json_option
@pass_ctx
@handle_errors
def eval_run(ctx: Context, version, suites, against, batch_size, max_new_tokens, pass_k, no_cache, show_cases,
             as_json) -> None:
    """Evaluate VERSION on the suite; save results and summarize them into the registry."""
    from .eval import gates, runner

    knobs = {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "pass_k": pass_k}
    project = _project_or_none(ctx)
    result, suite = runner.evaluate_version(ctx.root, version, project=project, suites=suites, cache=not no_cache,
                                            **knobs)
    recorded = runner.record_in_registry(ctx.root, result.version, result)
    out = {"summary": result.summary()}
    if show_cases:
        out["cases"] = [c.to_dict() for c in result.cases]
    if against:
        other, _ = runner.evaluate_version(ctx.root, against, project=project, suites=suites, cache=not no_cache,
                                           **knobs)
        runner.record_in_registry(ctx.root, other.version, other)
        out["comparison"] = gates.compare_results(other, result).to_dict()
    if as_json:
        echo_json(out)
        return
    click.echo(f"{result.version} on {len(suite)} tests (suite {suite.sha256[:16]}), results {result.summary()['results']}; "
               f"registry: {recorded} (the release-time evaluation is kept)")
    _print_summary(out["summary"])
    for c in out.get("cases", []):
        click.echo(f"  {'PASS' if c['passed'] else 'FAIL'} [{c['criticality']}] {c['id']}: {c['output'][:80]!r}")
    if against:
        cmp = out["comparison"]
        click.echo(f"vs {against}: {len(cmp['regressions'])} regressions, {len(cmp['improvements'])} improvements, "
                   f"{cmp['unchanged']['passed'] + cmp['unchanged']['failed']} unchanged")
        for r in cmp["regressions"]:
            click.echo(f"  REGRESSION [{r['criticality']}] {r['id']}: {r['candidate_output'][:80]!r}")
        for r in cmp["improvements"]:
            click.echo(f"  improved   [{r['criticality']}] {r['id']}")


def _case_options(fn: Callable) -> Callable:
    for opt in reversed([
        click.option("--match", type=click.Choice(["contains", "exact", "regex", "not_contains", "json_equal"]),
                     help="How the answer is checked (default: contains)."),
        click.option("--criticality", type=click.Choice(["critical", "high", "medium", "low"]),
                     help="How bad a regression is (default: medium; from feedback: its severity)."),
        click.option("--domain", help="Domain for per-domain scores (default: general)."),
        click.option("--tag", "tags", multiple=True, help="Tag (repeatable), e.g. hallucination."),
        click.option("--suite", "suite", default="registry/regression_tests.jsonl", show_default=True,
                     help="Suite file to add to."),
    ]):
        fn = opt(fn)
    return fn


@eval_.command("add")
@click.option("--from-feedback", "feedback_id", help="Promote this logged answer (its correction, if any).")
@click.option("--input", "prompt", help="The prompt.")
@click.option("--expected", help="Expected answer or key fact (default with --from-feedback: the answer).")
@click.option("--id", "test_id", help="Test id (default: derived from the content).")
@_case_options
@pass_ctx
@handle_errors
def eval_add(ctx: Context, feedback_id, prompt, expected, test_id, match, criticality, domain, tags, suite) -> None:
    """Add one test to a suite, typed in or promoted from production feedback."""
    from .errors import UserError
    from .eval import suite as sv

    defaults = sv.case_defaults(match=match, criticality=criticality, domain=domain, tags=tags)
    if feedback_id:
        with _store(ctx) as store:
            row = sv.row_from_store(store, feedback_id, defaults=defaults, expected=expected, test_id=test_id)
    elif not prompt or not expected:
        raise UserError("give --input and --expected, or --from-feedback ID")
    else:
        row = sv.typed_row(prompt, expected, defaults=defaults, test_id=test_id)
    added, _ = sv.append_cases(ctx.root, suite, [row])
    click.echo(f"{suite}: added {row['id']}" if added else f"{suite}: {row['id']} is already there")


@eval_.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@_case_options
@pass_ctx
@handle_errors
def eval_import(ctx: Context, file, match, criticality, domain, tags, suite) -> None:
    """Import tests from FILE: suite rows, or chat/alpaca rows (last answer = expected)."""
    from .eval import suite as sv

    defaults = sv.case_defaults(match=match, criticality=criticality, domain=domain, tags=tags)
    added, skipped = sv.append_cases(ctx.root, suite, sv.rows_from_file(_in_root(ctx, file), defaults=defaults))
    click.echo(f"{suite}: added {len(added)} tests, {len(skipped)} already there")


@main.command()
@click.argument("version_a")
@click.argument("version_b")
@_suite_option
@click.option("--no-eval", is_flag=True, help="Do not run the models; metrics from the registry only.")
@click.option("--out", help="Where to save the JSON (default: outputs/vB/diff-A-B.json).")
@json_option
@pass_ctx
@handle_errors
def diff(ctx: Context, version_a, version_b, suites, no_eval, out, as_json) -> None:
    """What changed from A to B: config, data, metrics, and every test whose result flipped."""
    from .eval.report import diff_versions, save_diff
    from .eval.runner import EvalSettings
    from .eval.suite import load_project_suite

    project = _project_or_none(ctx)
    suite = None if no_eval else load_project_suite(ctx.root, project, suites)
    d = diff_versions(ctx.root, version_a, version_b, suite=suite,
                      settings=EvalSettings.from_project(project), run_eval=not no_eval)
    saved = save_diff(ctx.root, d, out)
    if as_json:
        echo_json(d)
        return
    click.echo(f"{d['a']} -> {d['b']}: {d['lineage']}  (saved {saved})")
    for k, v in d["config"]["changed"].items():
        click.echo(f"config  {k}: {v['a']!r} -> {v['b']!r}")
    for k, v in d["config"]["added"].items():
        click.echo(f"config  {k}: added {v!r}")
    for k, v in d["config"]["removed"].items():
        click.echo(f"config  {k}: removed (was {v!r})")
    for k, v in d["data"]["by_role"].items():
        click.echo(f"data    {k}: {v['a']} -> {v['b']} examples")
    m = d["metrics"]
    if "tests" in d:
        click.echo(f"metrics pass rate {m['pass_rate']['parent']} -> {m['pass_rate']['candidate']}, hallucination rate "
                   f"{m['hallucination_rate']['parent']} -> {m['hallucination_rate']['candidate']}")
        tests = d["tests"]
        click.echo(f"outputs {tests['outputs_changed']} of {tests['outputs_total']} answers changed")
        for ex in tests["changed_examples"]:
            click.echo(f"  {ex['id']}\n    {d['a']}: {ex['a']!r}\n    {d['b']}: {ex['b']!r}")
        for kind in ("regressions", "improvements"):
            for t in tests[kind]:
                click.echo(f"{kind[:-1]:<11} [{t['criticality']}] {t['id']}\n  {d['a']}: {t['parent_output']!r}\n"
                           f"  {d['b']}: {t['candidate_output']!r}")


@main.command()
@click.option("--out", "out_dir", default="outputs/reports", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Directory for index.html, report.md and the plots.")
@pass_ctx
@handle_errors
def report(ctx: Context, out_dir: Path) -> None:
    """Write an HTML + Markdown report: lineage, gate decisions, metrics across versions."""
    from .eval.report import build_report

    paths = build_report(ctx.root, _in_root(ctx, out_dir))
    click.echo(f"wrote {paths['html']} and {paths['markdown']} ({len(paths) - 2} images)")


# ---- decision commands (status, ab, watch, serve) ----


def _now():
    from .timeutil import utc

    return utc()


@main.command()
@json_option
@pass_ctx
@handle_errors
def status(ctx: Context, as_json: bool) -> None:
    """Is an update due, and why? Exits 10 when one is due, 0 when not (for cron and CI)."""
    from .decide.triggers import evaluate, format_decision

    decision = evaluate(ctx.project(), now=_now())
    echo_json(decision.to_dict()) if as_json else click.echo(format_decision(decision))
    sys.exit(decision.exit_code)


@main.group()
def ab() -> None:
    """Champion/challenger tests: start, status, compare, promote, stop, rollback."""


@ab.command("start")
@click.argument("version")
@click.option("--traffic", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Challenger share of traffic (default: abtest.traffic, else 0.1).")
@pass_ctx
@handle_errors
def ab_start(ctx: Context, version: str, traffic: float | None) -> None:
    """Start VERSION as the challenger of the current champion."""
    from .decide import abtest

    traffic = traffic if traffic is not None else abtest.ab_config(ctx.project())["traffic"]
    e = abtest.start(ctx.root, version, traffic=traffic, now=_now())
    click.echo(f"A/B test started: {e['challenger']} on {e['traffic']:.0%} of traffic, champion {e['champion']}")


@ab.command("champion")
@click.argument("version")
@click.option("--reason", default="", help="Why (recorded in the registry events).")
@pass_ctx
@handle_errors
def ab_champion(ctx: Context, version: str, reason: str) -> None:
    """Make VERSION the champion directly (first deployment; no test running)."""
    from .decide import abtest

    e = abtest.set_champion(ctx.root, version, now=_now(), reason=reason)
    click.echo(f"champion: {e['to']} (was {e['from'] or '-'})")


@ab.command("status")
@json_option
@pass_ctx
@handle_errors
def ab_status(ctx: Context, as_json: bool) -> None:
    """Show the champion, the challenger and its traffic share; with a test running, the
    comparison too (interval, guardrails, traffic-split check, decision; a counted look)."""
    from .decide import abtest

    data = ctx.registry().load()
    out = {"aliases": data.get("aliases", {}), "abtest": abtest.state(data), "current": data["current"]}
    comparison = abtest.compare(ctx.project(), now=_now(), data=data) if out["abtest"] else None
    if as_json:
        echo_json({**out, "comparison": comparison.to_dict() if comparison else None})
        return
    ab_ = out["abtest"]
    click.echo(f"champion   {out['aliases'].get('champion') or '-'}   (current {data['current'] or '-'})")
    click.echo(f"challenger {ab_['challenger']} on {ab_['traffic']:.0%} since {ab_['started_at']}" if ab_
               else "challenger -   (no A/B test running)")
    if comparison:
        click.echo(abtest.format_comparison(comparison))


@ab.command("compare")
@json_option
@pass_ctx
@handle_errors
def ab_compare(ctx: Context, as_json: bool) -> None:
    """Per-version metrics since the test started, the always-valid interval, each guardrail,
    the traffic-split (SRM) check, the decision now and what it still waits for."""
    from .decide import abtest

    c = abtest.compare(ctx.project(), now=_now())
    echo_json(c.to_dict()) if as_json else click.echo(abtest.format_comparison(c))


@ab.command("promote")
@click.option("--auto", is_flag=True,
              help="Promote only if every check holds; stop the test if the rule says stop; else do nothing, exit 0.")
@click.option("--force", is_flag=True, help="Promote even though a check fails (needs --reason).")
@click.option("--reason", default=None, help="Why the checks are overridden (recorded).")
@pass_ctx
@handle_errors
def ab_promote(ctx: Context, auto: bool, force: bool, reason: str | None) -> None:
    """Make the challenger champion when the rule says so: significantly better at every look's
    error budget, better by the threshold, enough samples and time, a sound traffic split."""
    from .decide import abtest

    r = abtest.promote(ctx.project(), now=_now(), auto=auto, force=force, reason=reason)
    if r.promoted:
        click.echo(f"promoted {r.event['to']} to champion (was {r.event['from']})")
    elif r.stopped:
        click.echo(f"stopped the A/B test of {r.event['challenger']}: {'; '.join(r.reasons)}; "
                   f"champion {r.event['champion']} keeps serving")
    else:
        click.echo(f"not promoted: {'; '.join(r.reasons)}")


@ab.command("stop")
@click.option("--reason", default="", help="Why (recorded in the registry events).")
@pass_ctx
@handle_errors
def ab_stop(ctx: Context, reason: str) -> None:
    """End the A/B test; the champion keeps serving (and becomes current again)."""
    from .decide import abtest

    e = abtest.stop(ctx.root, reason=reason, now=_now())
    click.echo(f"A/B test stopped: {e['challenger']} no longer serves; champion {e['champion']}")


@ab.command("rollback")
@pass_ctx
@handle_errors
def ab_rollback(ctx: Context) -> None:
    """Make the previous champion champion (and current) again."""
    from .decide import abtest

    e = abtest.rollback_champion(ctx.root, now=_now())
    click.echo(f"champion rolled back: {e['from']} -> {e['to']}")


@main.command()
@click.option("--once", is_flag=True, help="Run one iteration and exit (for cron).")
@click.option("--interval", default="1h", show_default=True, help="Time between iterations: 30m, 1h, 1d.")
@click.option("--status", "show_status", is_flag=True, help="Show the last iteration and exit.")
@json_option
@pass_ctx
@handle_errors
def watch(ctx: Context, once: bool, interval: str, show_status: bool, as_json: bool) -> None:
    """Check triggers, release, start the challenger, compare, promote or stop: on a loop."""
    from .decide import watch as w

    if show_status:
        last = w.last_iteration(ctx.root)
        echo_json(last) if as_json else click.echo(w.format_iteration(last) if last else "watch has not run yet")
        return
    if not once:
        w.watch_forever(ctx.root, interval_s=w.parse_interval(interval), progress=say)
        return
    it = w.watch_once(ctx.root, progress=say)
    echo_json(it.to_dict()) if as_json else click.echo(w.format_iteration(it.to_dict()))


@main.group(invoke_without_command=True)
@click.option("--host", default=None, help="Address to listen on (default: serve.host, else 127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="Port (default: serve.port, else 8765; 0: any).")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Server processes on the one port (each with its own log writer and model).")
@click.option("--backend", type=click.Choice(["local", "openai", "none"]), default=None,
              help="What answers /v1/chat/completions (default: serve.backend, else local): the model in this "
                   "process, an OpenAI-compatible upstream such as vLLM, or none (collector only).")
@click.option("--upstream-url", default=None, metavar="URL",
              help="The openai backend's upstream, with /v1 (default: serve.upstream_url).")
@click.option("--verbose", is_flag=True, help="Log every request to stderr (secrets redacted).")
@click.pass_context
@handle_errors
def serve(click_ctx: click.Context, host: str | None, port: int | None, workers: int, backend: str | None,
          upstream_url: str | None, verbose: bool) -> None:
    """The gateway: OpenAI-compatible chat completions from the champion and the challenger
    (POST /v1/chat/completions, GET /v1/models), every answer captured; and the collector
    (POST /log, POST /feedback, GET /route, /stats, /health). OpenAPI at /openapi.json.

    Every request but /health and /openapi.json needs "Authorization: Bearer TOKEN". The
    token is read from the environment variable named by serve.token_env (default
    CL_RELEASE_TOKEN), never from the command line; the server refuses to start without it."""
    if click_ctx.invoked_subcommand is not None:
        return
    from .serve import make_server

    ctx = click_ctx.find_object(Context)
    project = ctx.project()
    server = make_server(project, host=host, port=port, verbose=verbose, workers=workers, backend=backend,
                         upstream_url=upstream_url, warm=True, debug=ctx.debug)
    from .serve import serve_config

    kind = backend or serve_config(project)["backend"]
    click.echo(f"cl-release gateway listening on {server.url} (backend {kind}, {workers} worker"
               f"{'s' if workers > 1 else ''}; OpenAPI: {server.url}/openapi.json)", err=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


@serve.command("vllm-command")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="vLLM's port (default: vLLM's 8000).")
@click.option("--repo-path", default=None, metavar="PATH",
              help="This repository's path on the vLLM machine (default: serve.upstream_repo_path, else here).")
@json_option
@pass_ctx
@handle_errors
def serve_vllm_command(ctx: Context, port: int | None, repo_path: str | None, as_json: bool) -> None:
    """Print the vllm serve line that serves the current champion and challenger as LoRA modules
    (v1.1.0=PATH ...), with runtime adapter updates on when serve.upstream_admin is."""
    from .serve import serve_config
    from .serve.vllm import format_command, vllm_command

    project = ctx.project()
    argv = vllm_command(project, port=port, repo_path=repo_path)
    admin = bool(serve_config(project).get("upstream_admin"))
    if as_json:
        echo_json({"argv": argv, "env": {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"} if admin else {}})
    else:
        click.echo(format_command(argv, runtime_updates=admin))


@serve.command("sync-adapters")
@json_option
@pass_ctx
@handle_errors
def serve_sync_adapters(ctx: Context, as_json: bool) -> None:
    """Make the upstream (serve.upstream_url) hold exactly the served versions' adapters:
    load the missing ones, unload the others (after a crash or a failed unload)."""
    from .serve.vllm import admin_for

    out = admin_for(ctx.project()).sync(ctx.registry().load())
    if as_json:
        echo_json(out)
    else:
        click.echo(f"loaded: {', '.join(out['loaded']) or '-'}; unloaded: {', '.join(out['unloaded']) or '-'}")


@serve.command("openapi")
@handle_errors
def serve_openapi() -> None:
    """Print the gateway's OpenAPI document (JSON), as GET /openapi.json serves it."""
    from .serve import openapi_spec

    click.echo(openapi_spec().decode())


# ---- console entry point ----

# Modules whose interpreter teardown takes seconds (finalising thousands of objects and
# extension modules). Once the command's work is done and flushed there is nothing left to
# tear down that the OS does not release anyway.
_SLOW_TEARDOWN = ("torch", "transformers", "peft")


def exit_code(code: Any) -> int:
    """sys.exit's argument as a process exit status (None: 0; a message: printed, 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    click.echo(str(code), err=True)
    return 1


def finish(code: Any) -> None:
    """Exit with ``code``; skip the slow interpreter teardown when torch & co. were loaded.

    Everything the command wrote is already on disk (atomic writes, committed SQLite
    transactions); stdout/stderr and logging are flushed before ``os._exit``."""
    status = exit_code(code)
    if not any(m in sys.modules for m in _SLOW_TEARDOWN):
        sys.exit(status)
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def run() -> None:
    """The ``cl-release`` console script: ``main`` as a click program, then :func:`finish`."""
    try:
        main.main(prog_name="cl-release")
    except SystemExit as e:
        finish(e.code)
    finish(0)
