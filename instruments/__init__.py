"""The bridge to hardware: ophyd devices, the bluesky plan of one experiment, the reader."""

from instruments.binding import (
    Instrument,
    MeasurementError,
    Observation,
    experiment_plan,
    outcome_keys,
    read_observation,
    signal_attr,
)
from instruments.runner import InstrumentRunner, InstrumentTimeout

__all__ = ["Instrument", "InstrumentRunner", "InstrumentTimeout", "MeasurementError",
           "Observation", "experiment_plan", "outcome_keys", "read_observation", "signal_attr"]
