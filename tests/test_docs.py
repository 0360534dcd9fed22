"""The README and docs/ against the code: length and order, every flag, every output file,
links that resolve, and commands a user can run as written (no paths of this machine)."""
from __future__ import annotations

import fnmatch
import re

from tests.conftest import ROOT
from utils.outputs import files
from utils.train_setting import build_parser

README = (ROOT / "README.md").read_text()
SECTIONS = ["Install", "Quick start", "The seed's commands", "Outputs", "Use from Python",
            "Layout", "Citation"]


def section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def test_readme_is_short_and_in_order():
    assert len(README.splitlines()) <= 200
    found = re.findall(r"(?m)^## (.+)$", README)
    assert found == SECTIONS
    intro = README[:README.index("\n## ")]
    # the main finding comes first, with its sources
    assert "74.04%" in intro and "0.00%" in intro
    assert "Rethinking-Clustering-for-Robustness/issues/1" in intro
    assert "github.com/fra31/auto-attack" in intro
    citation = section(README, "Citation")
    assert "@inproceedings{alfarra2021rethinking" in citation
    assert "Metric Learning with Adaptive Density Discrimination" in citation  # Magnet loss


def test_docs_name_every_flag_of_the_parser():
    usage = (ROOT / "docs" / "usage.md").read_text()
    flags = [opt for action in build_parser()._actions for opt in action.option_strings
             if opt.startswith("--") and opt != "--help"]
    assert len(flags) > 30
    missing = [f for f in flags if f"`{f}" not in usage]
    assert not missing, f"docs/usage.md does not describe {missing}"


def test_readme_outputs_table_lists_every_output_file():
    table = section(README, "Outputs")
    shown = re.findall(r"^\| `([^`]+)` \|", table, re.M)
    for name in files.TRAIN_OUTPUTS + files.EVAL_OUTPUTS:
        assert any(fnmatch.fnmatchcase(s, files.pattern(name)) for s in shown), name
    assert len(shown) == len(set(files.TRAIN_OUTPUTS + files.EVAL_OUTPUTS))


def test_links_resolve():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#]+)\)", doc.read_text()):
            if target.startswith("http"):
                continue
            assert (doc.parent / target).exists(), f"{doc.name}: {target}"


def test_docs_holds_hand_written_pages_and_the_reports_apart():
    """Generated reports (which record the command, paths and all, that made them) live in
    docs/results/; docs/ itself holds the hand-written pages."""
    pages = {p.name for p in (ROOT / "docs").iterdir() if p.is_file()}
    assert pages == {"usage.md", "evaluation.md", "failures.md", "distributed.md",
                     "benchmarking.md", "reproducing.md", "differences.md"}
    reports = {p.name for p in (ROOT / "docs" / "results").iterdir()}
    assert "BENCHMARKS.md" in reports and "REPRODUCTION.md" in reports


def test_user_commands_hold_no_paths_of_this_machine():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```(?:bash|python)\n(.*?)```", doc.read_text(), re.S):
            for bad in ("../shared", "/tmp/", "/work/", "/root/", "/home/"):
                assert bad not in block, f"{doc.name}: {bad} in a command"


def test_the_seeds_commands_parse():
    from tests.test_readme import commands
    from utils.train_setting import parse_args

    seed = commands("The seed's commands")
    assert len(seed) == 3
    parsed = [parse_args(argv[2:]) for argv in seed]
    assert [a.checkpoint for a in parsed] == ["expA", "expB", "expA_pgd100"]
    assert parsed[1].consistency_lambda == 12.5
    assert parsed[2].evaluate_ckpt == "expA/checkpoint.pth" and parsed[2].iterations == 100
