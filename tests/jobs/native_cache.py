"""The native-op cache refuses what it must not load; one process, no MPI.

    python native_cache.py OUT_DIR
Writes OUT_DIR/native_cache.json: for each case, the error text (or "").
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from transparent_dist.tf import native

out = Path(sys.argv[1])
built = native.build()  # the real op, from the default cache
results = {}


def attempt(name, cache, action=None):
    os.environ["TD_CACHE_DIR"] = str(cache)
    try:
        (action or (lambda: native.op._load_here(None)))()
        results[name] = ""
    except Exception as error:  # noqa: BLE001 - recorded for the test
        results[name] = f"{type(error).__name__}: {error}"


def fresh(name, mode=0o700):
    directory = out / name
    directory.mkdir(mode=mode)
    os.chmod(directory, mode)
    return directory


# A library whose constructor would leave a mark, planted under the op's name.
planted_source = out / "planted.c"
planted_source.write_text(
    "#include <stdio.h>\n#include <stdlib.h>\n__attribute__((constructor)) static void "
    'planted(void){FILE*f=fopen(getenv("PLANT_MARK"),"w");if(f){fputs("ran",f);fclose(f);}}\n'
)
planted = out / "planted.so"
subprocess.run(["gcc", "-shared", "-fPIC", str(planted_source), "-o", str(planted)], check=True)
os.environ["PLANT_MARK"] = str(out / "constructor-ran")
expected_name = built.name


def plant(directory, file_mode=0o755):
    target = directory / expected_name
    shutil.copy(planted, target)
    os.chmod(target, file_mode)
    return target


plant(fresh("loose_dir", 0o777))
os.chmod(out / "loose_dir", 0o777)
attempt("loose_dir", out / "loose_dir")
plant(fresh("loose_file"), 0o666)
attempt("loose_file", out / "loose_file")
if os.getuid() == 0:
    os.chown(plant(fresh("other_owner")), 65534, 65534)
    attempt("other_owner", out / "other_owner")
link_dir = fresh("symlink")
os.symlink(planted, link_dir / expected_name)
attempt("symlink", link_dir)
results["constructor_ran"] = (out / "constructor-ran").exists()

# The real op, copied into a private cache: loads (the control).
good = fresh("good")
shutil.copy(built, good / expected_name)
attempt("good", good, lambda: native.build())

# A lock file planted as a symbolic link to a victim: refused, not followed.
victim = out / "victim.txt"
victim.write_text("precious\n")
lock_dir = fresh("lock")
os.symlink(victim, (lock_dir / expected_name).with_suffix(".lock"))
os.environ["CXX"] = "/bin/false"
attempt("lock_symlink", lock_dir, lambda: native.build())
results["victim"] = victim.read_text()

# A failing compiler runs once; later builds fall back at once.
failing = fresh("failing")
attempt("first_failure", failing, lambda: native.build())
os.environ["CXX"] = str(out / "no-such-compiler")
attempt("second_failure", failing, lambda: native.build())
attempt("retry", failing, lambda: native.build(retry=True))
results["leftovers"] = sorted(p.name for p in failing.iterdir())
(out / "native_cache.json").write_text(json.dumps(results, indent=1))
