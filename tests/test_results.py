"""RESULTS.md's measured cells are generated from the committed files in results/, not typed:
every generated block is regenerated here by the command its marker names and must match, and
results/ holds text only, each run with its arguments."""
import os
import re
import shlex

import pytest

from conftest import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = re.compile(r"<!-- begin generated: python (\S+)\.py (.*?) --out (\S+); file (\S+) -->\n(.*?)<!-- end generated -->",
                   re.S)


def blocks():
    with open(os.path.join(ROOT, "RESULTS.md")) as f:
        return BLOCK.findall(f.read())


def test_results_md_has_generated_blocks():
    assert blocks(), "RESULTS.md embeds no generated table"


@pytest.mark.parametrize("script,flags,out,file,content", blocks(), ids=[b[3] for b in blocks()])
def test_generated_block_matches_a_fresh_plot_of_results(tmp_path, monkeypatch, script, flags, out, file, content):
    monkeypatch.chdir(ROOT)   # the run paths in the tables are relative to the repository
    load_script(script).main([*shlex.split(flags), "--out", str(tmp_path)])
    fresh = (tmp_path / os.path.relpath(file, out)).read_text()
    assert content == fresh, f"RESULTS.md's block of {file} differs from a fresh --plot: rerun `python {script}.py {flags} --out {out}` and paste {file}"
    with open(os.path.join(ROOT, file)) as f:
        assert f.read() == fresh, f"{file} is stale: rerun `python {script}.py {flags} --out {out}`"


def test_results_hold_small_text_files_and_every_run_its_arguments():
    import subprocess
    tracked = subprocess.run(["git", "ls-files", "results"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    for path in tracked:   # what is committed: text a reader can diff, never weights or figures
        assert path.endswith((".json", ".jsonl", ".md")) and os.path.getsize(os.path.join(ROOT, path)) < 2 ** 20, path
    for dirpath, _, names in os.walk(os.path.join(ROOT, "results")):
        if "metrics.jsonl" in names:
            assert "args.json" in names, dirpath


def test_a_2000_step_run_holds_its_400_step_run():
    # one 2000-step run gives both scales (constant lr, a seeded permutation per epoch): its rows
    # through step 400 are those of the 400-step run of the same arguments, to the last digit -- on
    # the same CPU: fp32 kernels round differently on another one (RESULTS.md, "Rerun with files")
    import json

    def machines(d):
        return {s["machine"] for s in json.load(open(os.path.join(d, "provenance.json")))["segments"]}

    pairs = [(os.path.join(ROOT, "results", "cpu400", name), os.path.join(ROOT, "results", "cpu2000", name))
             for name in sorted(os.listdir(os.path.join(ROOT, "results", "cpu400")))
             if os.path.isdir(os.path.join(ROOT, "results", "cpu2000", name))]   # the points run at both lengths
    pairs = [(short, long) for short, long in pairs if machines(short) == machines(long)]
    assert pairs
    for short, long in pairs:
        rows = [[json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))] for d in (short, long)]
        args = [json.load(open(os.path.join(d, "args.json"))) for d in (short, long)]
        differ = {k for k in args[0] if args[0][k] != args[1].get(k)}
        assert differ <= load_script("distill").RESUMABLE, (short, differ)   # what a rerun may change
        assert rows[0] == [r for r in rows[1] if r["step"] <= args[0]["steps"]], short
