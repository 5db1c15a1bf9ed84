"""Checkpoints a run must not resume, in one job: each case is a `fit` with
TD_CHECKPOINT_DIR set to a prepared directory; what it raised (or "") goes
to OUT/refusals.json (rank 0). The last case is not caught: the job ends.

    mpiexec -n 2 python -m transparent_dist preemptible_refusals.py OUT

Run A (Adam 0.01 on data seed 0) writes genuine checkpoints (every 5 steps)
into OUT/a; the cases copy them where another user could have planted them,
forge their numbers, or resume them from another experiment (B: Adam 0.05 on
data seed 1), with TD_RESUME auto, force and fresh. Each fit also records
the steps it trained (OUT/refusals.json "trained").
"""

import json
import os
import shutil
import sys

import keras
import numpy as np

import transparent_dist
from transparent_dist.core import checkpoint

out = sys.argv[1]
rank = transparent_dist.rank()
results, trained = {}, {}


def data(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(160, 8)).astype("float32")
    return x, (x @ rng.normal(size=(8, 1))).astype("float32")


class Steps(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.count = 0

    def on_train_batch_end(self, batch, logs=None):
        self.count += 1


def fit(directory, rate=0.01, seed=0, resume="auto"):
    transparent_dist.configure(checkpoint_dir=str(directory), resume=resume, checkpoint_every="5")
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(rate), loss="mse")
    x, y = data(seed)
    steps = Steps()
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[steps])
    return steps.count


def case(name, directory, **kwargs):
    try:
        trained[name] = fit(directory, **kwargs)
        results[name] = ""
    except Exception as error:  # noqa: BLE001 - recorded for the test
        results[name] = f"{type(error).__name__}: {error}"


def sync():
    from transparent_dist.core import world

    comm = world.get().comm
    if comm is not None:
        comm.Barrier()


fit(os.path.join(out, "a"))  # run A: 2 epochs of 5 steps, checkpoints at steps 5 and 10

# Another user's directory, or one anyone can write, holding a genuine copy.
loose = os.path.join(out, "loose")
if rank == 0:
    shutil.copytree(os.path.join(out, "a"), loose)
    os.chmod(loose, 0o777)
    if os.getuid() == 0:
        shutil.copytree(os.path.join(out, "a"), os.path.join(out, "other_owner"))
        os.chown(os.path.join(out, "other_owner"), 65534, 65534)
    os.symlink(os.path.join(out, "a"), os.path.join(out, "link"))
    # Our own directory, with a meta.json whose manifest was made to match.
    forged = os.path.join(out, "forged")
    shutil.copytree(os.path.join(out, "a"), forged)
    latest = open(os.path.join(forged, "latest")).read().strip()
    path = os.path.join(forged, latest)
    meta = json.load(open(os.path.join(path, "meta.json")))
    meta["epoch"] = 10**18
    open(os.path.join(path, "meta.json"), "w").write(json.dumps(meta))
    manifest = json.load(open(os.path.join(path, checkpoint.MANIFEST)))
    size, digest = checkpoint._file_digest(os.path.join(path, "meta.json"))
    manifest["meta.json"] = {"size": size, "sha256": digest}
    open(os.path.join(path, checkpoint.MANIFEST), "w").write(json.dumps(manifest))
    for name in ("same", "force", "fresh"):
        # A's checkpoint of step 5 (mid-run): a resume trains the other 5 steps.
        shutil.copytree(os.path.join(out, "a"), os.path.join(out, name))
        shutil.rmtree(os.path.join(out, name, "ckpt-000000000010"))
        os.remove(os.path.join(out, name, "latest"))
sync()

case("loose", loose)
if os.getuid() == 0:
    case("other_owner", os.path.join(out, "other_owner"))
case("symlink", os.path.join(out, "link"))
case("forged_epoch", os.path.join(out, "forged"))
case("same", os.path.join(out, "same"))  # the control: run A again resumes
case("other_run", os.path.join(out, "a"), rate=0.05, seed=1)
case("force", os.path.join(out, "force"), rate=0.05, seed=1, resume="force")
case("fresh", os.path.join(out, "fresh"), rate=0.05, seed=1, resume="fresh")
case("fresh_again", os.path.join(out, "fresh"), rate=0.05, seed=1, resume="fresh")
if rank == 0:
    results["fresh_listing"] = sorted(os.listdir(os.path.join(out, "fresh")))
    with open(os.path.join(out, "refusals.json"), "w") as f:
        json.dump({"results": results, "trained": trained}, f)
sync()
fit(loose)  # not caught: the job ends here
print("finished")
