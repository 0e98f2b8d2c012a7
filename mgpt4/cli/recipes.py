"""``mgpt4 recipes`` (list the built-in recipes) and ``mgpt4 recipes show NAME`` (print one)."""

from __future__ import annotations

import click

from mgpt4.config import builtin_recipes, resolve_recipe_path


@click.group(invoke_without_command=True)
@click.pass_context
def recipes(ctx: click.Context) -> None:
    """List built-in recipes (`mgpt4 recipes show NAME` prints one)."""
    if ctx.invoked_subcommand is None:
        for name, path in sorted(builtin_recipes().items()):
            first = path.read_text().splitlines()[0] if path.suffix == ".yaml" else "DeepSpeed config"
            click.echo(f"{name:<20} {first.lstrip('# ').strip()}")


@recipes.command("show")
@click.argument("name")
def show(name: str) -> None:
    """Print a built-in recipe."""
    click.echo(resolve_recipe_path(name).read_text(), nl=False)
