"""The `megafleet` command: a click root to which each package adds its group.

Groups are imported lazily, by name, so that `megafleet --help` stays fast and a
package's heavy imports (libvirt, pymongo, asyncssh) are paid only by the command
that needs them. The root holds no logic.
"""

from __future__ import annotations

import importlib
import importlib.util

import click

# command name -> "module:attribute". A package that is not present yet is simply
# not listed; nothing pretends to work.
LAZY_COMMANDS: dict[str, str] = {
    "doctor": "megafleet.doctor:doctor",
    "image": "megafleet.imagegen.cli:image",
    "vm": "megafleet.vm.cli:vm",
    "net": "megafleet.netlang.cli:net",
    "import": "megafleet.netlang.importers.cli:import_command",
    "hosts": "megafleet.gproc.cli:hosts",
    "gproc": "megafleet.gproc.cli:gproc",
    "agent": "megafleet.gproc.cli:agent",
    "ksm": "megafleet.ksm.cli:ksm",
    "telemetry": "megafleet.collect.cli:telemetry",
    "up": "megafleet.up:up_command",
    "down": "megafleet.up:down_command",
    "plan": "megafleet.up:plan_command",
    "status": "megafleet.up:status_command",
    "exec": "megafleet.up:exec_command",
    "verify": "megafleet.experiment.cli:verify_command",
    "link": "megafleet.experiment.cli:link",
    "node": "megafleet.experiment.cli:node_command",
    "capture": "megafleet.experiment.cli:capture_command",
    "run-schedule": "megafleet.experiment.cli:run_schedule_command",
    "diff": "megafleet.experiment.cli:diff_command",
    "web": "megafleet.web.cli:web",
}


def _available(target: str) -> bool:
    module = target.split(":", 1)[0]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        eager = super().list_commands(ctx)
        lazy = [name for name, target in LAZY_COMMANDS.items() if _available(target)]
        return sorted(set(eager) | set(lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is not None:
            return command
        target = LAZY_COMMANDS.get(name)
        if target is None or not _available(target):
            return None
        module_name, attribute = target.split(":", 1)
        return getattr(importlib.import_module(module_name), attribute)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="megafleet")
def root() -> None:
    """megafleet: describe a testbed of thousands of VMs, bring it up, observe it,
    tear it down.

    \b
    Typical session:
      megafleet doctor                      what this host can do
      megafleet image build examples/images/tiny.toml
      megafleet image boot-test tiny        boot one guest, time it
      megafleet net check testbed.fleet     compile and validate a testbed
      megafleet up testbed.fleet            bring it up (local host by default)
      megafleet down                        tear everything down

    State lives in $MEGAFLEET_STATE (default /var/lib/megafleet as root), images in
    $MEGAFLEET_CACHE (default ~/.cache/megafleet).
    """


def main() -> None:
    root()
