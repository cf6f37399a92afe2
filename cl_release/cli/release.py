"""``cl-release init``, ``render``, ``plan``, ``release`` and ``patch``: making versions."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import click

from ..eval import DEFAULT_SUITE
from .base import (
    Context,
    OwnedChoice,
    echo_json,
    handle_errors,
    json_option,
    main,
    notes_options,
    pass_ctx,
    read_notes,
    say,
)
from .progress import TrainingProgress


def _bumps():
    from ..registry import BUMPS

    return BUMPS


def release_options(fn: Callable) -> Callable:
    fn = click.option("--base-model", default=None, metavar="ID", help="New base model (annual_reset, major only).")(fn)
    fn = click.option("--strategy", default=None, metavar="S",
                      help="initial, continued_lora, merge_and_retrain, annual_reset or patch "
                           "(default: minor=continued_lora, patch=patch, major=merge_and_retrain).")(fn)
    fn = click.option("--from", "from_version", default=None, metavar="VERSION",
                      help="Build on this version instead of the current one.")(fn)
    fn = click.argument("bump", type=OwnedChoice(_bumps))(fn)
    return fn


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--demo", is_flag=True, help="Add the tiny local model and demo datasets (runs offline).")
@click.option("--name", default=None, help="Project name (default: the folder name).")
@click.option("--base-model", default="meta-llama/Llama-3.1-8B-Instruct", show_default=True, help="Base model id.")
@handle_errors
def init(directory: Path, demo: bool, name: str | None, base_model: str) -> None:
    """Scaffold a release repository in DIRECTORY (git init + first commit)."""
    from ..release.scaffold import init_repository

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
    from ..files import atomic_write_text
    from ..release.plan import plan_strategy

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
    from ..release.plan import plan_release

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
@notes_options("What changed (goes into the registry, commit and tag).")
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
    from ..eval.gates import release_evaluator
    from ..release.run import run_release

    notes = read_notes(ctx, notes, notes_file)
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
        _print_before_after(evaluator.last.before_after())
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
@notes_options("What the patch fixes (default: the incidents and their tests).")
@click.option("--deploy/--no-deploy", default=None, help="Make the patch champion (default: yes).")
@click.option("--push/--no-push", default=None, help="Push it to the Hub (default: hub.push_patches).")
@click.option("--dry-run", is_flag=True, help="Show the tests and the plan; record, add and train nothing.")
@click.option("--suite", default=DEFAULT_SUITE, show_default=True,
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
    from ..release.incident import patch

    notes = read_notes(ctx, notes, notes_file)

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
