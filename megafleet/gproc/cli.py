import click


@click.command()
def agent():
    """Serve the gproc protocol on stdin/stdout."""
    from megafleet.gproc.agent import main
    raise SystemExit(main())
