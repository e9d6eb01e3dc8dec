"""Config section ``personalize.*``: what each site does for itself after the federation."""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.config.fields import require


@dataclass(frozen=True, kw_only=True)
class PersonalizeConfig:
    """``personalize.*``: local adaptation of the final adapter at each site."""

    local_steps: int = 0
    """After the last round, each site fine-tunes the final global adapter (its personal adapter under
    ``lora.share = a``) for this many steps on its own training data and evaluates the result beside the
    global adapter on its held-out split; 0 turns it off."""

    def __post_init__(self) -> None:
        require(self.local_steps >= 0, "personalize.local-steps", f"must be >= 0, got {self.local_steps}.")
