"""Privacy accounting with Opacus accountants: one source of truth for every epsilon we report.

A *history* is Opacus's own representation of what a mechanism did: a list of
``(noise_multiplier, sample_rate, num_steps)`` triples. Local DP-SGD steps it once per
optimizer step (Opacus's optimizer hook); central DP steps it once per released aggregate.
Epsilon is always computed by an Opacus accountant (``RDPAccountant`` or ``PRVAccountant``)
fed with that history, so a reported epsilon can be re-derived by anyone holding the ledger.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS: dict[str, type[IAccountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant}

Step = tuple[float, float, int]  # (noise_multiplier, sample_rate, num_steps)


def make_accountant(name: str, history: list[Step] | None = None) -> IAccountant:
    """A fresh Opacus accountant (``rdp`` or ``prv``) holding a copy of ``history``."""
    if name not in ACCOUNTANTS:
        raise ValueError(
            f"privacy.accountant must be one of {', '.join(ACCOUNTANTS)}, got '{name}'"
        )
    accountant = ACCOUNTANTS[name]()
    accountant.history = [tuple(step) for step in (history or [])]
    return accountant


def epsilon(history: list[Step], delta: float, name: str) -> float:
    """Epsilon spent by ``history`` at ``delta`` (0 for an empty history)."""
    if not history or total_steps(history) == 0:
        return 0.0
    key = tuple((float(n), float(q), int(s)) for n, q, s in history)
    return _epsilon(key, float(delta), name)


@lru_cache(maxsize=4096)
def _epsilon(history: tuple[Step, ...], delta: float, name: str) -> float:
    # cached: central DP asks for the same history once per site and round
    return float(make_accountant(name, list(history)).get_epsilon(delta=delta))


def add_steps(history: list[Step], noise_multiplier: float, sample_rate: float,
              steps: int) -> list[Step]:
    """``history`` followed by ``steps`` more steps, merged the way Opacus's ``step`` merges.

    Consecutive steps with the same (noise, sample rate) form one entry, exactly as Opacus's
    accountants record them during training, so a history rebuilt here is identical to the
    one the optimizer hook produces.
    """
    out = [tuple(step) for step in history]
    if steps <= 0:
        return out
    if out and out[-1][0] == noise_multiplier and out[-1][1] == sample_rate:
        out[-1] = (out[-1][0], out[-1][1], int(out[-1][2]) + steps)
    else:
        out.append((float(noise_multiplier), float(sample_rate), int(steps)))
    return out


def total_steps(history: list[Step]) -> int:
    """Number of mechanism steps in ``history``."""
    return sum(int(step[2]) for step in history)


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    name: str) -> float:
    """Smallest noise multiplier (to Opacus's tolerance) whose ``steps`` steps stay <= target.

    Opacus's binary search returns the upper end of its bracket, so the epsilon after the
    planned number of steps never exceeds ``target_epsilon``.
    """
    if target_epsilon <= 0:
        raise ValueError(f"privacy.target_epsilon must be positive, got {target_epsilon}")
    if steps <= 0:
        raise ValueError("cannot calibrate noise for a run with no training steps")
    try:
        return float(get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
            steps=steps, accountant=name, epsilon_tolerance=0.01,
        ))
    except ValueError as err:  # Opacus: "The privacy budget is too low."
        raise ValueError(
            f"privacy.target_epsilon={target_epsilon} at delta={delta} cannot be reached with "
            f"sample rate {sample_rate:.4g} over {steps} steps ({err})"
        ) from None


@dataclass
class AccountantState:
    """What a mechanism has spent so far: accountant kind, delta, noise and step history.

    Serialised as JSON (inside a ConfigRecord of the ClientApp's ``context.state`` for local
    DP), so it survives between rounds for as long as the SuperNode runs.
    """

    accountant: str
    delta: float
    noise_multiplier: float | None = None
    history: list[Step] = field(default_factory=list)
    rounds: int = 0

    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta``."""
        return epsilon(self.history, self.delta, self.accountant)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int,
                      delta: float | None = None) -> float:
        """Epsilon if ``steps`` more steps were taken (at ``delta``, default the state's)."""
        future = add_steps(self.history, noise_multiplier, sample_rate, steps)
        return epsilon(future, self.delta if delta is None else delta, self.accountant)

    def record(self, history: list[Step]) -> int:
        """Adopt ``history`` (the old one plus this round's steps); return the steps added."""
        added = total_steps(history) - total_steps(self.history)
        kept = max(len(self.history) - 1, 0)  # the last entry may have been extended (merged)
        same_past = [tuple(s) for s in history[:kept]] == [tuple(s) for s in self.history[:kept]]
        if added < 0 or not same_past:
            raise ValueError("accountant history went backwards: privacy state is corrupt")
        self.history = [tuple(step) for step in history]
        self.rounds += 1
        return added

    def to_json(self) -> str:
        """JSON text of the state."""
        return json.dumps({
            "accountant": self.accountant, "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "history": [list(step) for step in self.history], "rounds": self.rounds,
        })

    @classmethod
    def from_json(cls, text: str) -> AccountantState:
        """Read back ``to_json``."""
        data: dict[str, Any] = json.loads(text)
        return cls(
            accountant=str(data["accountant"]), delta=float(data["delta"]),
            noise_multiplier=data.get("noise_multiplier"),
            history=[(float(n), float(q), int(s)) for n, q, s in data.get("history", [])],
            rounds=int(data.get("rounds", 0)),
        )
