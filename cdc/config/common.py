"""What every section of the pipeline model shares: number fields that refuse YAML booleans, the
models' settings, the loader's context flag, and the retry policy each component carries."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

# Loader context flag: rules that need YAML lines to report well are skipped inside pydantic and
# run by the loader instead (see cross_check). Direct construction in code still runs them.
LOADER = "cdc_config_loader"

DEFAULT_CONNECT_TIMEOUT_S = 10


def no_bool(value: Any) -> Any:
    # Pydantic's lax mode turns `true` into 1; a YAML boolean in a number field is a user mistake.
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    return value


Int = Annotated[int, BeforeValidator(no_bool)]
Float = Annotated[float, BeforeValidator(no_bool)]


def none_to_empty_dict(value: Any) -> Any:
    # `sinks:` with every entry commented out is YAML null; treat it as "none".
    return {} if value is None else value


MODEL_CONFIG = ConfigDict(extra="forbid", frozen=True)


class RetryConfig(BaseModel):
    """How long a running component waits out a transient fault (README: Faults and retries):
    exponential backoff with jitter from `initial_delay_s` up to `max_delay_s` between attempts;
    after `give_up_after_s` of one outage the error stands and cdc exits with its code."""

    model_config = MODEL_CONFIG

    initial_delay_s: Float = Field(0.5, gt=0)
    max_delay_s: Float = Field(30.0, gt=0)
    give_up_after_s: Float = Field(600.0, ge=0)  # 0: no retries, the first fault stops cdc
