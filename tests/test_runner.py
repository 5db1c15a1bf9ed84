"""`python -m transparent_dist` behaves like the interpreter, and a rank that
fails ends the whole job promptly."""

from __future__ import annotations

import json

import pytest
from conftest import JOBS, load_ranks, run

pytestmark = pytest.mark.mpi

SCRIPT = str(JOBS / "show_context.py")


def test_script_sees_what_it_would_see_without_the_plugin(tmp_path):
    job = run(["-m", "transparent_dist", SCRIPT, str(tmp_path), "0", "extra"], ranks=2).check()
    assert job.returncode == 0
    for context in load_ranks(tmp_path, "context", 2):
        assert context["argv"] == [SCRIPT, str(tmp_path), "0", "extra"]
        assert context["file"] == SCRIPT
        assert context["name"] == "__main__"
        assert context["path0"] == str(JOBS)
        assert context["tf_loaded"] is False  # the runner imports no framework


def test_module_and_code_forms(tmp_path):
    run(
        ["-m", "transparent_dist", "-m", "show_context", str(tmp_path), "0"], ranks=2, cwd=JOBS
    ).check()
    context = load_ranks(tmp_path, "context", 1)[0]
    assert context["name"] == "__main__" and context["file"] == SCRIPT
    assert context["argv"] == [SCRIPT, str(tmp_path), "0"]
    code = (
        "import sys, json, transparent_dist as td; "
        "json.dump([sys.argv, __name__], open(sys.argv[1] + f'/c{td.rank()}.json', 'w'))"
    )
    run(["-m", "transparent_dist", "-c", code, str(tmp_path), "x"], ranks=2).check()
    assert json.loads((tmp_path / "c1.json").read_text()) == [
        ["-c", str(tmp_path), "x"],
        "__main__",
    ]


def test_exit_status_is_the_scripts(tmp_path):
    assert run(["-m", "transparent_dist", SCRIPT, str(tmp_path), "0"]).returncode == 0
    assert run(["-m", "transparent_dist", SCRIPT, str(tmp_path), "3"]).returncode == 3
    assert run(["-m", "transparent_dist", SCRIPT, str(tmp_path), "3"], ranks=2).returncode == 3
    missing = run(["-m", "transparent_dist", str(tmp_path / "nope.py")])
    assert missing.returncode == 2 and "nope.py" in missing.stderr


def test_one_rank_exiting_with_error_ends_the_job(tmp_path):
    """Rank 0 exits with 5 while rank 1 would sleep for two minutes."""
    job = run(["-m", "transparent_dist", SCRIPT, str(tmp_path), "5", "root"], ranks=2, timeout=90)
    assert job.returncode == 5
    assert job.seconds < 30
    assert "rank 0 of 2 exited with status 5" in job.stderr


def test_exception_on_one_rank_ends_the_job_and_names_it(tmp_path):
    code = (
        "import time, transparent_dist as td\n"
        "if td.rank() == 1: raise RuntimeError('boom on one rank')\n"
        "time.sleep(120)\n"
    )
    job = run(["-m", "transparent_dist", "-c", code], ranks=3, timeout=90)
    assert job.returncode != 0
    assert job.seconds < 30
    assert "[rank 1] RuntimeError: boom on one rank" in job.stderr
    assert "rank 1 of 3 failed with RuntimeError" in job.stderr
    # The import-line form, too (the exception hook, not the runner).
    script = tmp_path / "fails.py"
    script.write_text(code)
    job = run([str(script)], ranks=2, timeout=90)
    assert job.returncode != 0 and job.seconds < 30
    assert "boom on one rank" in job.stderr
