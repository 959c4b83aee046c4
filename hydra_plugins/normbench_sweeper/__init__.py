"""normbench's Hydra sweeper: the basic sweeper, given its jobs by normbench's plan.

Hydra instantiates sweepers only from the ``hydra_plugins`` package, so this shim lives
here; the work is in :mod:`normbench.launchers`. ``normbench sweep`` selects it
(``hydra.sweeper._target_``) after planning: Hydra then launches only the runs that are
not done, with whatever launcher the overrides pick, and never composes a job twice to
validate it (the plan checked every job already).
"""

from __future__ import annotations

from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper


class PlannedSweeper(BasicSweeper):
    """Launches the runs of ``normbench.sweep``'s plan that are left to run."""

    def sweep(self, arguments: list[str]) -> Any:
        from normbench.launchers import launch_planned

        return launch_planned(self)
