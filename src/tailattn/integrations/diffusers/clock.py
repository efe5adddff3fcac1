"""The diffusion step and the guidance branch, read from the timesteps the transformer sees.

A pipeline calls its transformer once per step (classifier-free guidance as a batch of 2, as
CogVideoX does) or several times per step at the same timestep (guidance as separate calls, as
Wan and HunyuanVideo do: conditional first, then unconditional). So, call by call:

- the same timestep as the previous call: the next *branch* of the same step;
- a smaller timestep: the next *step*, branch 0;
- a larger timestep (or the first call): a new *run* (generation), step 0, branch 0.

Timesteps are compared as the largest value of the timestep tensor (Wan2.2 TI2V passes one per
token, with 0 for the conditioning frame).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tick:
    """Where one transformer call falls: run, step, branch, and its timestep."""

    run: int
    step: int
    branch: int
    timestep: float

    @property
    def new_run(self) -> bool:
        return self.step == 0 and self.branch == 0


class StepClock:
    """Counts runs, steps and branches from successive timesteps (module docstring)."""

    def __init__(self) -> None:
        self._last: Tick | None = None

    def tick(self, timestep: float) -> Tick:
        last = self._last
        if last is None or timestep > last.timestep:
            tick = Tick(0 if last is None else last.run + 1, 0, 0, timestep)
        elif timestep == last.timestep:
            tick = Tick(last.run, last.step, last.branch + 1, timestep)
        else:
            tick = Tick(last.run, last.step + 1, 0, timestep)
        self._last = tick
        return tick

    def reset(self) -> None:
        """Forget the previous call: the next call starts a new run."""
        if self._last is not None:
            self._last = Tick(self._last.run, 0, 0, float("-inf"))
