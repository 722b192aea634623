"""Base class for typed stage configs: unknown keys are errors, not silently ignored."""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
