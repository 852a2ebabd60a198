"""gproc: reach and drive many hosts through a tree of persistent agents over SSH."""

from megafleet.gproc.fleet import Fleet, FleetError, HostResult, Report  # noqa: F401
