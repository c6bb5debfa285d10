"""csrc/include/mupopt/common.h's float16 conversions against torch's, on the host compiler.

to_float(f16_t): all 65536 float16 values. from_float<f16_t>: every 251st float32 bit pattern
(17M values across every exponent, subnormals, inf) and every pattern whose low 13 bits are a
tie (0x1000: halfway between two float16 neighbours in the normal range), against torch's
float32 -> float16 conversion (round to nearest even). NaNs only need to stay NaN with their
sign (torch's vectorised conversion keeps part of the payload, c10::Half's scalar one does not).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

INCLUDE = Path(__file__).resolve().parents[1] / "csrc" / "include"
STRIDE = 251

PROGRAM = r"""
#include "mupopt/common.h"
#include <cstdio>
#include <vector>
using namespace mupopt;
int main(int argc, char** argv) {
  const uint64_t stride = 251;
  std::vector<uint32_t> to(65536);
  for (uint32_t h = 0; h < 65536; ++h) { f16_t x; x.bits = (uint16_t)h; to[h] = float_bits(to_float(x)); }
  std::vector<uint16_t> from;
  for (uint64_t u = 0; u < (uint64_t{1} << 32); u += stride) from.push_back(from_float<f16_t>(bits_float((uint32_t)u)).bits);
  for (uint64_t k = 0; k < (uint64_t{1} << 19); ++k) from.push_back(from_float<f16_t>(bits_float((uint32_t)((k << 13) | 0x1000u))).bits);
  FILE* f = fopen(argv[1], "wb");
  fwrite(to.data(), 4, to.size(), f);
  fwrite(from.data(), 2, from.size(), f);
  fclose(f);
  return 0;
}
"""


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        pytest.skip("no C++ compiler")
    d = tmp_path_factory.mktemp("f16")
    (d / "t.cpp").write_text(PROGRAM)
    subprocess.run([cxx, "-O2", "-std=c++17", "-ffp-contract=off", f"-I{INCLUDE}", str(d / "t.cpp"), "-o", str(d / "t")],
                   check=True, capture_output=True, text=True)
    subprocess.run([str(d / "t"), str(d / "out.bin")], check=True)
    raw = (d / "out.bin").read_bytes()
    to = np.frombuffer(raw[: 65536 * 4], dtype=np.uint32)
    frm = np.frombuffer(raw[65536 * 4:], dtype=np.uint16)
    return torch.from_numpy(to.astype(np.int64)), torch.from_numpy(frm.astype(np.int64))


def _as_int32(u: torch.Tensor) -> torch.Tensor:
    return torch.where(u >= 2**31, u - 2**32, u).to(torch.int32)


def test_float16_to_float32_exact(converted):
    to, _ = converted
    halves = _as_int32(torch.arange(65536)).to(torch.int16).view(torch.float16)
    expected = halves.float()
    got = _as_int32(to).view(torch.float32)
    same = (got.view(torch.int32) == expected.view(torch.int32)) | (got.isnan() & expected.isnan())
    assert bool(same.all()), halves[~same][:5]


def test_float32_to_float16_round_to_nearest_even(converted):
    _, frm = converted
    sample = torch.cat([torch.arange(0, 2**32, STRIDE), (torch.arange(2**19) << 13) | 0x1000])
    x = _as_int32(sample).view(torch.float32)
    expected = x.half().view(torch.int16).to(torch.int64) & 0xFFFF
    got = frm
    nan = x.isnan()
    assert torch.equal(got[~nan], expected[~nan]), x[~nan][got[~nan] != expected[~nan]][:5]
    # NaN: a quiet NaN with the input's sign.
    assert bool(((got[nan] & 0x7E00) == 0x7E00).all())
    assert torch.equal(got[nan] >> 15, (sample[nan] >> 31))
