"""kernels.bench.triton_compile's settings and its messages when it cannot compile (no compiling here)."""


import jaxlib
import pytest
from absl import flags

from fusedlm.kernels.bench import triton_compile as kinspect
from tests.commands import fusedlm


def _parse(argv):
  flag_values = flags.FlagValues()
  kinspect.define_flags(flag_values)
  flag_values(["kernels.bench.triton_compile", *argv])
  return flag_values


def test_settings_follow_the_flags():
  parsed = _parse(["--head_dims=64,128", "--causal=on", "--segments=both",
                   "--gqa=1,4", "--blocks=block_q_dkv=64,num_warps_bwd=8"])
  settings = kinspect.settings_from(parsed)
  assert len(settings) == 2 * 1 * 2 * 2
  assert all(s.causal and s.blocks.block_q_dkv == 64 and s.blocks.num_warps_bwd == 8
             for s in settings)
  assert {(s.head_dim, s.segments, s.group) for s in settings} == {
      (d, seg, g) for d in (64, 128) for seg in (False, True) for g in (1, 4)}


def test_unknown_block_field_is_refused():
  with pytest.raises(ValueError, match="field of BlockSizes"):
    kinspect.blocks_from(["block_x=64"])
  with pytest.raises(ValueError, match="integer value"):
    kinspect.blocks_from(["block_q=big"])


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


def test_run_says_what_is_missing(monkeypatch):
  monkeypatch.setattr(kinspect, "_triton_version", lambda: None)
  with pytest.raises(kinspect.InspectError, match="triton is not installed"):
    kinspect.run(_parse(["--head_dims=64"]))


def test_command_line_error_is_one_line_and_exit_2():
  # A bad flag value is refused before anything is compiled.
  done = fusedlm("inspect", "triton", "--gqa=1,four", timeout=120)
  assert done.returncode == 2, done.stderr
  assert done.stderr.strip().splitlines() == [
      "fusedlm inspect triton: error: --gqa takes a comma list of integers, got '1,four'."]
