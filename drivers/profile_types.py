"""The pydantic base and the identifier type every model of the profile schema uses."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

Identifier = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)]


class Strict(BaseModel):
    """Unknown keys refused, frozen; allow_inf_nan=False: every number in a profile is finite
    (``.inf``/``.nan`` refused)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False
    )
