"""Client masking and server unmasking time: fedtune's chunked in-place path against stream-by-stream.

The baseline is the straightforward computation fedtune used before: each mask stream expanded whole
(ChaCha20 over a zero buffer of 4L bytes, read as uint32, reduced to b bits), then added to or
subtracted from the vector, one stream after another. Both run in the same process, interleaved,
on L = 4.4M values and b = 20 bits (16 quantization bits, 10 clients).

    PYTHONPATH=. .venv/bin/python benchmarks/secagg_masking.py [--length 4400000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedtune.privacy.secagg.masking import mask, round_context, unmask

BITS = 20
CONTEXT = round_context(1, b"bench")


def stream(seed: bytes, length: int) -> np.ndarray:
    nonce = bytes(4) + hashlib.sha256(b"fedtune/secagg+/v1/nonce" + CONTEXT).digest()[:12]
    data = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor().update(bytes(4 * length))
    return np.frombuffer(data, dtype="<u4").astype(np.uint32) & np.uint32((1 << BITS) - 1)


def baseline(x: np.ndarray, seeds: list[tuple[bytes, int]]) -> np.ndarray:
    out = x.astype(np.uint32)
    for seed, sign in seeds:
        if sign > 0:
            out += stream(seed, out.size)
        else:
            out -= stream(seed, out.size)
    out &= np.uint32((1 << BITS) - 1)
    return out


def median_time(repeats: int, fn: Callable[..., np.ndarray], *args: Any) -> tuple[float, np.ndarray]:
    times, out = [], np.empty(0)
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=4_400_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    x = np.random.default_rng(0).integers(0, 1 << 16, args.length, dtype=np.uint32)
    print("| operation | streams | stream by stream | fedtune (chunked, in place) | ratio |\n|---|---|---|---|---|")
    for peers in (2, 9, 20):
        keys = {j: os.urandom(32) for j in range(2, peers + 2)}
        own = os.urandom(32)
        signed = [(own, 1), *((k, 1) for k in keys.values())]
        old, expected = median_time(args.repeats, baseline, x, signed)
        new, got = median_time(args.repeats, mask, x, own, keys, 1, BITS, CONTEXT)
        assert np.array_equal(expected, got)
        print(f"| client mask | {peers + 1} | {old:.3f} s | {new:.3f} s | {new / old:.2f} |")
        survivors = {i: os.urandom(32) for i in range(peers + 1)}
        old, expected = median_time(args.repeats, baseline, x, [(s, -1) for s in survivors.values()])
        new, got = median_time(args.repeats, unmask, x, survivors, {}, BITS, CONTEXT)
        assert np.array_equal(expected, got)
        print(f"| server unmask | {peers + 1} | {old:.3f} s | {new:.3f} s | {new / old:.2f} |")


if __name__ == "__main__":
    main()
