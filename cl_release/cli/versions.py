"""``cl-release list``, ``show``, ``rollback``, ``merge``, ``verify`` and ``push``: the versions
the registry holds."""

from __future__ import annotations

import json
import shutil
import sys

import click

from .base import Context, echo_json, handle_errors, json_option, main, pass_ctx, say


@main.command(name="list")
@json_option
@pass_ctx
@handle_errors
def list_(ctx: Context, as_json: bool) -> None:
    """Show the lineage: every version, its parent, strategy and status."""
    registry = ctx.registry()
    data = registry.load()
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
        depth = len(registry.lineage(data, m["version"])) - 1
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
    from ..release.recovery import rollback as do_rollback

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
    from ..release.merge import merge_and_commit

    entry = merge_and_commit(ctx.project(), version, progress=say)
    click.echo(f"Merged {entry['version']}: {entry['merged']['path']} (sha256 {entry['merged']['sha256'][:16]})")


@main.command()
@json_option
@pass_ctx
@handle_errors
def verify(ctx: Context, as_json: bool) -> None:
    """Re-hash every dataset, config, adapter and merged model the registry names."""
    from ..release.recovery import verify as do_verify

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
    from ..hub import push as hub

    if dry_run:
        plan = hub.plan_version(ctx.project(), version, merged=merged)
        echo_json(plan.to_dict()) if as_json else click.echo(plan.summary())
        return
    result = hub.publish(ctx.project(), version, merged=merged, progress=say)
    echo_json(result.to_registry()) if as_json else click.echo(f"Pushed {result.revision} to {result.url}")
