"""Reply validation: wrong keys, shapes, dtypes, non-finite values and oversized norms are refused."""

from __future__ import annotations

import numpy as np
import pytest

from fedtune.core.errors import UpdateRejected
from fedtune.server.validation import validate_delta

REF = {"x.lora_A.weight": np.zeros((2, 3), np.float32), "x.lora_B.weight": np.zeros((3, 2), np.float32)}


def _ok() -> dict[str, np.ndarray]:
    return {k: np.full(v.shape, 0.1, np.float32) for k, v in REF.items()}


def test_valid_delta_passes_and_its_norm_is_returned() -> None:
    delta = _ok()
    reference = float(np.sqrt(sum(np.square(v.astype(np.float64)).sum() for v in delta.values())))
    assert validate_delta(delta, REF, max_norm=10.0) == pytest.approx(reference, rel=1e-6)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d.pop("x.lora_B.weight"), "missing 1 adapter key"),
        (lambda d: d.update({"evil": np.zeros(1, np.float32)}), "unexpected key"),
        (lambda d: d.update({"x.lora_A.weight": np.zeros((3, 2), np.float32)}), "shape"),
        (lambda d: d.update({"x.lora_A.weight": np.zeros((2, 3), np.float64)}), "dtype"),
        (lambda d: d["x.lora_A.weight"].__setitem__((0, 0), np.nan), "NaN or Inf"),
        (lambda d: d["x.lora_B.weight"].__setitem__((0, 0), np.inf), "NaN or Inf"),
        (lambda d: d["x.lora_B.weight"].__setitem__((0, 0), 100.0), "exceeds server.max-update-norm"),
    ],
)
def test_bad_delta_is_rejected(mutate: object, match: str) -> None:
    delta = _ok()
    mutate(delta)  # type: ignore[operator]
    with pytest.raises(UpdateRejected, match=match):
        validate_delta(delta, REF, max_norm=10.0)


def test_norm_bound_off_when_zero() -> None:
    delta = _ok()
    delta["x.lora_B.weight"][0, 0] = 1e6
    assert validate_delta(delta, REF, max_norm=0.0) > 1e5
