"""``cl-release status``, ``ab`` and ``watch``: is an update due, and which version serves."""

from __future__ import annotations

import sys

import click

from .base import Context, echo_json, handle_errors, json_option, main, pass_ctx, say


def _now():
    from ..timeutil import utc

    return utc()


@main.command()
@json_option
@pass_ctx
@handle_errors
def status(ctx: Context, as_json: bool) -> None:
    """Is an update due, and why? Exits 10 when one is due, 0 when not (for cron and CI)."""
    from ..decide.triggers import evaluate, format_decision

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
    from ..decide import abtest

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
    from ..decide import abtest

    e = abtest.set_champion(ctx.root, version, now=_now(), reason=reason)
    click.echo(f"champion: {e['to']} (was {e['from'] or '-'})")


@ab.command("status")
@json_option
@pass_ctx
@handle_errors
def ab_status(ctx: Context, as_json: bool) -> None:
    """Show the champion, the challenger and its traffic share; with a test running, the
    comparison too (interval, guardrails, traffic-split check, decision; a counted look)."""
    from ..decide import abtest

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
    from ..decide import abtest

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
    from ..decide import abtest

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
    from ..decide import abtest

    e = abtest.stop(ctx.root, reason=reason, now=_now())
    click.echo(f"A/B test stopped: {e['challenger']} no longer serves; champion {e['champion']}")


@ab.command("rollback")
@pass_ctx
@handle_errors
def ab_rollback(ctx: Context) -> None:
    """Make the previous champion champion (and current) again."""
    from ..decide import abtest

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
    from ..decide import watch as w

    if show_status:
        last = w.last_iteration(ctx.root)
        echo_json(last) if as_json else click.echo(w.format_iteration(last) if last else "watch has not run yet")
        return
    if not once:
        w.watch_forever(ctx.root, interval_s=w.parse_interval(interval), progress=say)
        return
    it = w.watch_once(ctx.root, progress=say)
    echo_json(it.to_dict()) if as_json else click.echo(w.format_iteration(it.to_dict()))
