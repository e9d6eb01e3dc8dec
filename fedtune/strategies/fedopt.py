"""Server optimizers on the pseudo-gradient (Reddi et al. 2021, https://arxiv.org/abs/2003.00295).

The pseudo-gradient is the combined client delta (local minus global), so every rule *adds* its
step: x <- x + lr * direction.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from fedtune.config import StrategyConfig
from fedtune.core.arrays import Arrays


class ServerSGD:
    """x <- x + lr * delta (FedAvg with a server learning rate; lr = 1 is plain FedAvg)."""

    def __init__(self, cfg: StrategyConfig) -> None:
        self.lr = cfg.server_lr

    def step(self, global_arrays: Arrays, delta: Arrays) -> Arrays:
        return {k: (x + self.lr * delta[k]).astype(np.float32) for k, x in global_arrays.items()}

    def state_dict(self) -> Arrays:
        return {}

    def load_state_dict(self, state: Arrays) -> None:
        return None


class _Stateful:
    """Keeps named per-parameter buffers, created lazily at the first step."""

    def __init__(self) -> None:
        self.buffers: dict[str, Arrays] = {}

    def buffer(self, name: str, like: Arrays, fill: float) -> Arrays:
        if name not in self.buffers:
            self.buffers[name] = {k: np.full(v.shape, fill, dtype=np.float32) for k, v in like.items()}
        return self.buffers[name]

    def state_dict(self) -> Arrays:
        return {f"{name}/{key}": value for name, arrays in self.buffers.items() for key, value in arrays.items()}

    def load_state_dict(self, state: Arrays) -> None:
        self.buffers = {}
        for flat, value in state.items():
            name, _, key = flat.partition("/")
            self.buffers.setdefault(name, {})[key] = np.asarray(value, dtype=np.float32)


class ServerMomentum(_Stateful):
    """FedAvgM (Hsu et al. 2019, https://arxiv.org/abs/1909.06335): v <- m v + delta; x <- x + lr v."""

    def __init__(self, cfg: StrategyConfig) -> None:
        super().__init__()
        self.lr, self.momentum = cfg.server_lr, cfg.momentum

    def step(self, global_arrays: Arrays, delta: Arrays) -> Arrays:
        v = self.buffer("momentum", delta, 0.0)
        for k in v:
            v[k] = (self.momentum * v[k] + delta[k]).astype(np.float32)
        return {k: (x + self.lr * v[k]).astype(np.float32) for k, x in global_arrays.items()}


class _Adaptive(_Stateful, ABC):
    """Shared body of FedAdagrad, FedYogi and FedAdam (Reddi et al. 2021, Algorithm 2)."""

    def __init__(self, cfg: StrategyConfig) -> None:
        super().__init__()
        self.lr, self.beta1, self.beta2, self.tau = cfg.server_lr, cfg.beta1, cfg.beta2, cfg.tau

    @abstractmethod
    def second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        """The next second-moment estimate from the last one and the squared delta."""

    def step(self, global_arrays: Arrays, delta: Arrays) -> Arrays:
        m = self.buffer("m", delta, 0.0)
        v = self.buffer("v", delta, self.tau**2)  # v_{-1} = tau^2, as in the paper
        out = {}
        for k, x in global_arrays.items():
            d = delta[k].astype(np.float64)
            m[k] = (self.beta1 * m[k] + (1 - self.beta1) * d).astype(np.float32)
            v[k] = self.second_moment(v[k].astype(np.float64), d * d).astype(np.float32)
            out[k] = (x + self.lr * m[k] / (np.sqrt(v[k]) + self.tau)).astype(np.float32)
        return out


class FedAdagrad(_Adaptive):
    """v <- v + delta^2."""

    def second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return np.asarray(v + d2)


class FedYogi(_Adaptive):
    """v <- v - (1 - beta2) delta^2 sign(v - delta^2)."""

    def second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return np.asarray(v - (1 - self.beta2) * d2 * np.sign(v - d2))


class FedAdam(_Adaptive):
    """v <- beta2 v + (1 - beta2) delta^2."""

    def second_moment(self, v: np.ndarray, d2: np.ndarray) -> np.ndarray:
        return np.asarray(self.beta2 * v + (1 - self.beta2) * d2)
