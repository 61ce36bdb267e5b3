"""bf16 units are read from the CPU's flags, on sample CPUs and on the machine running the suite."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from lmexp import hardware
from lmexp.hardware import cpu_has_bf16_units, cpuinfo_flags, has_bf16_units

TORCH_PROBES = ("get_capabilities", "_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_amx_fp16_supported")


def cpuinfo(model: str, flags: str) -> str:
    """The first processor of a /proc/cpuinfo, abridged to the lines that matter here."""
    return f"processor\t: 0\nvendor_id\t: x\nmodel name\t: {model}\ncpu MHz\t\t: 2450.000\nflags\t\t: {flags}\nbugs\t\t: \n\n"


X86_BASE = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht "
    "syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl cpuid pni pclmulqdq ssse3 fma cx16 pcid sse4_1 "
    "sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm abm fsgsbase bmi1 avx2 smep bmi2 "
    "erms invpcid rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 xsaves"
)
ZEN3 = cpuinfo("AMD EPYC 7763 64-Core Processor", X86_BASE + " sse4a misalignsse 3dnowprefetch topoext clzero vaes vpclmulqdq")
AVX512 = (
    " avx512f avx512dq avx512ifma avx512cd avx512bw avx512vl avx512vbmi avx512_vbmi2 gfni vaes vpclmulqdq "
    "avx512_vnni avx512_bitalg avx512_vpopcntdq"
)
ZEN5 = cpuinfo("AMD EPYC 9755 128-Core Processor", X86_BASE + AVX512 + " avx_vnni avx512_bf16 avx512_vp2intersect movdiri")
SAPPHIRE_RAPIDS = cpuinfo(
    "Intel(R) Xeon(R) Platinum 8480+",
    X86_BASE + AVX512 + " avx_vnni avx512_bf16 wbnoinvd serialize tsxldtrk amx_bf16 avx512_fp16 amx_tile amx_int8",
)
FP16_ONLY = cpuinfo("fp16 units only", X86_BASE + AVX512 + " avx512_fp16 amx_fp16 amx_int8")


@pytest.mark.parametrize(
    ("text", "expected"),
    [(ZEN3, False), (ZEN5, True), (SAPPHIRE_RAPIDS, True), (FP16_ONLY, False)],
    ids=["zen3-avx2-only", "zen5-avx512_bf16", "sapphire-rapids-amx", "fp16-flags-are-not-bf16"],
)
def test_bf16_units_from_cpuinfo_flags(text, expected):
    assert has_bf16_units(cpuinfo_flags(text)) is expected


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_either_bf16_flag_alone_is_enough(flag):
    assert has_bf16_units(cpuinfo_flags(cpuinfo("x", f"{X86_BASE} {flag}")))


def test_cpuinfo_without_a_flags_line_gives_no_answer():
    assert cpuinfo_flags("processor\t: 0\nmodel name\t: x\n") is None
    assert cpuinfo_flags("processor\t: 0\nFeatures\t: fp asimd evtstrm aes\n") == {"fp", "asimd", "evtstrm", "aes"}


@pytest.mark.parametrize(("text", "expected"), [(SAPPHIRE_RAPIDS, True), (ZEN3, False)], ids=["spr", "zen3"])
def test_cpuinfo_answers_without_any_torch_probe(monkeypatch, text, expected):
    """A torch release that renames its CPU probes must not switch bf16 off where cpuinfo can tell."""
    monkeypatch.setattr(hardware, "read_cpuinfo", lambda: text)
    for name in TORCH_PROBES:
        monkeypatch.delattr(torch.cpu, name, raising=False)
    assert cpu_has_bf16_units() is expected


@pytest.mark.parametrize(("capabilities", "expected"), [({"amx_bf16": True}, True), ({"avx512_fp16": True}, False)])
def test_torch_answers_where_there_is_no_cpuinfo(monkeypatch, capabilities, expected):
    monkeypatch.setattr(hardware, "read_cpuinfo", lambda: None)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities, raising=False)
    assert cpu_has_bf16_units() is expected


def test_older_torch_private_probes_answer_where_there_is_no_cpuinfo(monkeypatch):
    monkeypatch.setattr(hardware, "read_cpuinfo", lambda: None)
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert cpu_has_bf16_units() is True


def test_no_cpuinfo_and_no_torch_probe_warns(monkeypatch):
    monkeypatch.setattr(hardware, "read_cpuinfo", lambda: None)
    for name in TORCH_PROBES:
        monkeypatch.delattr(torch.cpu, name, raising=False)
    with pytest.warns(UserWarning, match="cannot tell whether this CPU has bf16 units"):
        assert cpu_has_bf16_units() is False


def lscpu_flags() -> set[str]:
    """This machine's CPU flags as ``lscpu`` prints them (skips where there is no lscpu)."""
    if shutil.which("lscpu") is None:
        pytest.skip("lscpu is not installed: cannot read this machine's CPU flags independently")
    output = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, env={**os.environ, "LC_ALL": "C"})
    for line in output.stdout.splitlines():
        if line.startswith("Flags:"):
            return set(line.split(":", 1)[1].split())
    pytest.skip("lscpu prints no Flags line on this machine")


def test_this_machine_matches_lscpu(monkeypatch):
    """Unmocked: the answer for the CPU running the suite is what lscpu's flags say, with or
    without torch's probes (and torch's public probe, where there is one, agrees)."""
    flags = lscpu_flags()
    expected = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert cpu_has_bf16_units() is expected
    if hasattr(torch.cpu, "get_capabilities"):
        capabilities = torch.cpu.get_capabilities()
        assert {f for f in ("avx512_bf16", "amx_bf16") if capabilities.get(f)} == flags & {"avx512_bf16", "amx_bf16"}
    for name in TORCH_PROBES:
        monkeypatch.delattr(torch.cpu, name, raising=False)
    assert cpu_has_bf16_units() is expected
