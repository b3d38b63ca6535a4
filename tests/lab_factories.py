"""Device factories that campaign-file tests name in ``device: tests.lab_factories:bench``.

Validation finds them without calling them; a campaign that ran one would get no device.
"""

from __future__ import annotations


def bench():  # noqa: ANN201 - stands in for a factory that returns an ophyd device
    raise NotImplementedError("a stand-in for validation tests; it builds no device")
