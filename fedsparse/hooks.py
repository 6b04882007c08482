"""The hooks a method's strategy offers fedsparse's round loop, with their defaults.

A strategy that inherits :class:`MethodHooks` (beside its Flower base class) gets every hook below;
it overrides the ones it needs. The round loop, the checkpoint and wrappers such as FedLUAR call
them only on ``isinstance(strategy, MethodHooks)`` — never by probing attributes — and treat any
other strategy as one of Flower's own (plain-model replies, state in Flower's attributes).

None of the hooks is needed by Flower: a strategy that has them still runs unchanged under
``Strategy.start`` in someone else's deployment.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, Message

if TYPE_CHECKING:
    from fedsparse.robust import AggregationRule


class MethodHooks:
    """fedsparse's hooks, each with a default that does nothing."""

    def validate_reply(self, server_round: int, msg: Message) -> str | None:
        """Content check of one train reply, after the universal checks: None accepts it, a string
        is the reason to reject it (:mod:`fedsparse.validation`). Strategies whose replies are not
        plain models must check what they decode (:func:`fedsparse.validation.check_arrays`)."""
        return None

    def round_report(self, server_round: int) -> dict[str, Any]:
        """Method-specific columns of ``rounds.csv`` for ``server_round``."""
        return {}

    def final_report(self, out_dir: Path) -> dict[str, Any] | None:
        """End-of-run tables and plots written to ``out_dir``; what it returns joins summary.json."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """State that must survive a checkpoint (numpy arrays and JSON-able values)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned into a freshly built strategy."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but the checkpoint holds {sorted(state)}")

    def constrain(self, arrays: ArrayRecord) -> ArrayRecord:
        """The global model projected onto this strategy's constraints (e.g. FedDIP's masks).

        A wrapper that changes the model its base returned (FedLUAR moving recycled layers by their
        previous update) calls it so the result still satisfies the base; the default keeps
        ``arrays`` as they are (the same object)."""
        return arrays

    def use_aggregation(self, rule: AggregationRule) -> Any:
        """This strategy with its replies combined by ``rule`` (:mod:`fedsparse.robust`) in place of
        its weighted mean; returns the strategy to use (usually ``self``).

        A strategy that decodes its replies itself hands the decoded updates to the rule; a
        wrapper hands the rule to its base. The default refuses: a strategy that does not say how
        its replies become dense updates cannot have them combined by another rule.
        """
        from fedsparse.config import ConfigError

        raise ConfigError(
            f"aggregation = {rule.describe()!r} is not supported by {type(self).__name__}: it does not decode its "
            "replies into dense updates for another rule; allowed: aggregation = 'mean' without clip-norm"
        )


__all__ = ["MethodHooks"]
