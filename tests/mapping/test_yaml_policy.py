"""The one YAML reading policy (mapping/yamldoc.py): attacks on the parser end in a short MappingError.

Mapping files and quality.yaml come from whoever edits the site's mapping directory; a file of a few
hundred bytes must not take minutes, gigabytes or a traceback to refuse.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qis_fhir.errors import ExitCode, MappingError
from qis_fhir.mapping import MAPPINGS_ROOT, load_mapping
from qis_fhir.mapping.yamldoc import MAX_DEPTH, MAX_ERRORS, MAX_MESSAGE
from qis_fhir.quality import load_suites, parse_suites

V1 = MAPPINGS_ROOT / "v1"

# "Billion laughs": nine aliases nine levels deep, 9**9 (387 million) strings once expanded. Safe
# loading expands aliases, so before the policy this ran for minutes and took gigabytes.
BILLION_LAUGHS = """\
lol0: &lol0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
lol1: &lol1 [*lol0, *lol0, *lol0, *lol0, *lol0, *lol0, *lol0, *lol0, *lol0]
lol2: &lol2 [*lol1, *lol1, *lol1, *lol1, *lol1, *lol1, *lol1, *lol1, *lol1]
lol3: &lol3 [*lol2, *lol2, *lol2, *lol2, *lol2, *lol2, *lol2, *lol2, *lol2]
lol4: &lol4 [*lol3, *lol3, *lol3, *lol3, *lol3, *lol3, *lol3, *lol3, *lol3]
lol5: &lol5 [*lol4, *lol4, *lol4, *lol4, *lol4, *lol4, *lol4, *lol4, *lol4]
lol6: &lol6 [*lol5, *lol5, *lol5, *lol5, *lol5, *lol5, *lol5, *lol5, *lol5]
lol7: &lol7 [*lol6, *lol6, *lol6, *lol6, *lol6, *lol6, *lol6, *lol6, *lol6]
lol8: &lol8 [*lol7, *lol7, *lol7, *lol7, *lol7, *lol7, *lol7, *lol7, *lol7]
"""
# Measured: `qis-fhir mapping check` peaks at 29 MB on the shipped set and on the bomb; the bomb
# took 1.55 GB before. The bound leaves room for interpreter and library changes.
MAX_RSS_KB = 200 * 1024
# The child prints its peak RSS from /proc (VmHWM, kB): ru_maxrss would also count the pytest process
# it was forked from, which Linux keeps across exec.
_RSS_CHILD = """\
import re, sys
from qis_fhir.cli import main
try:
    main(sys.argv[1:])
finally:
    print(re.search(r"VmHWM:\\s*(\\d+)", open("/proc/self/status").read()).group(1))
"""


@pytest.fixture
def v1(tmp_path) -> Path:
    return Path(shutil.copytree(V1, tmp_path / "v1"))


def append(path: Path, text: str) -> int:
    """Append ``text`` to ``path``; return the 1-based line where it starts."""
    old = path.read_text()
    path.write_text(old + text)
    return len(old.splitlines()) + 1


def error_of(directory: Path) -> str:
    with pytest.raises(MappingError) as info:
        load_mapping(directory)
    assert info.value.exit_code == ExitCode.MAPPING_INVALID
    return str(info.value)


@pytest.mark.timeout(60)
def test_billion_laughs_is_refused_fast_in_bounded_memory_with_exit_code_4(v1):
    line = append(v1 / "conditions.yaml", BILLION_LAUGHS)
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, "mapping", "check", str(v1)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == ExitCode.MAPPING_INVALID, proc.stderr
    assert proc.stderr == (
        f"error: conditions.yaml:{line}: YAML anchors and aliases (&name, *name) are not allowed; "
        "write the value out in full\n"
    )
    assert int(proc.stdout.split()[-1]) < MAX_RSS_KB


def test_self_referencing_alias_is_a_mapping_error_not_a_recursion_error(v1):
    line = append(v1 / "cohorts.yaml", "loop: &loop [*loop]\n")
    assert error_of(v1) == f"cohorts.yaml:{line}: YAML anchors and aliases (&name, *name) are not allowed; write the value out in full"


def test_an_alias_in_quality_yaml_is_refused_with_its_line(v1):
    line = append(v1 / "quality.yaml", "  extra: &rules\n    - not_null: patient_key\n")
    with pytest.raises(MappingError) as info:
        load_suites(load_mapping(v1))
    assert str(info.value).startswith(f"quality.yaml:{line}: YAML anchors and aliases")


def test_deep_nesting_is_refused_at_the_limit(v1):
    line = append(v1 / "cohorts.yaml", "deep: " + "[" * 3000 + "]" * 3000 + "\n")
    assert error_of(v1) == f"cohorts.yaml:{line}: nested more than {MAX_DEPTH} levels deep"


def test_duplicate_table_in_quality_yaml_is_refused():
    """The last of two equal keys would silently replace the first table's whole suite."""
    text = "schema: 1\ntables:\n  patients:\n    - not_null: sex\n  patients:\n    - not_null: patient_key\n"
    with pytest.raises(MappingError) as info:
        parse_suites(text, load_mapping(V1))
    assert str(info.value) == "quality.yaml:5: duplicate key 'patients' (first on line 3)"


def test_control_character_and_non_utf8_name_their_line(v1):
    line = append(v1 / "treatments.yaml", '  TX_0009:\n    display: "a\x01b"\n') + 1
    assert error_of(v1) == f"treatments.yaml:{line}: invalid YAML: character #x0001 is not allowed"
    shutil.copy(V1 / "treatments.yaml", v1 / "treatments.yaml")
    with (v1 / "outcomes.yaml").open("ab") as f:
        f.write(b"# \xff\xfe\n")
    line = len((V1 / "outcomes.yaml").read_bytes().splitlines()) + 1
    assert error_of(v1) == f"outcomes.yaml:{line}: not UTF-8 text (invalid start byte)"


def test_error_text_is_bounded_per_line_and_in_lines(v1):
    """A schema message quotes the offending value; a huge value or many errors stay a short report."""
    text = (v1 / "mapping.yaml").read_text()
    (v1 / "mapping.yaml").write_text(text.replace("description:", f"unknown_{'x' * 5000}: 1\ndescription:", 1))
    msg = error_of(v1)
    assert msg.startswith("mapping.yaml:") and len(msg) <= MAX_MESSAGE
    shutil.copy(V1 / "mapping.yaml", v1 / "mapping.yaml")
    extra = "".join(f"  bad{i}: 1\n" for i in range(MAX_ERRORS + 30))
    append(v1 / "treatments.yaml", extra)
    lines = error_of(v1).splitlines()
    assert len(lines) == MAX_ERRORS + 1 and lines[-1] == "... and 30 more"
