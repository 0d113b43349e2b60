"""kernels.inspect's settings and its messages when it cannot compile (no compiling here)."""

import argparse

import jaxlib
import pytest

from kernels import inspect as kinspect


def test_settings_follow_the_flags():
  args = kinspect.parse_args(["--head-dims", "64,128", "--causal", "on",
                              "--segments", "both", "--gqa", "1,4",
                              "--blocks", "block_q_dkv=64,num_warps_bwd=8"])
  settings = kinspect.settings_from(args)
  assert len(settings) == 2 * 1 * 2 * 2
  assert all(s.causal and s.blocks.block_q_dkv == 64 and s.blocks.num_warps_bwd == 8
             for s in settings)
  assert {(s.head_dim, s.segments, s.group) for s in settings} == {
      (d, seg, g) for d in (64, 128) for seg in (False, True) for g in (1, 4)}


def test_unknown_block_field_is_refused():
  with pytest.raises(argparse.ArgumentTypeError, match="field of BlockSizes"):
    kinspect._blocks("block_x=64")


def test_missing_triton_says_what_to_install(monkeypatch):
  monkeypatch.setattr(jaxlib, "__version__", "0.10.2")
  monkeypatch.setattr(kinspect, "_triton_version", lambda: None)
  with pytest.raises(kinspect.InspectError, match=r'\.\[inspect\]".*triton==3\.8\.0'):
    kinspect.check_compiler()


def test_other_triton_names_both_versions(monkeypatch):
  monkeypatch.setattr(jaxlib, "__version__", "0.10.2")
  monkeypatch.setattr(kinspect, "_triton_version", lambda: "3.9.0")
  with pytest.raises(kinspect.InspectError,
                     match=r"triton 3\.9\.0 .*jaxlib 0\.10\.2.*triton==3\.8\.0"):
    kinspect.check_compiler()


def test_other_jaxlib_names_the_known_pairs(monkeypatch):
  monkeypatch.setattr(jaxlib, "__version__", "0.11.2")
  monkeypatch.setattr(kinspect, "_triton_version", lambda: "3.8.0")
  with pytest.raises(kinspect.InspectError,
                     match=r"jaxlib 0\.11\.2 .*jaxlib 0\.10\.2 <-> triton==3\.8\.0"):
    kinspect.check_compiler()


def test_main_prints_the_error_and_exits_2(monkeypatch, capsys):
  monkeypatch.setattr(kinspect, "_triton_version", lambda: None)
  assert kinspect.main(["--head-dims", "64"]) == 2
  assert "error: triton is not installed" in capsys.readouterr().err
