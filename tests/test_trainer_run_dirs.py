"""
Every trainer (diffusion, classifier, super-resolution, GAN) owns its --log_dir the same way
(improved_diffusion/run/run_dir.py): a second run started into it at the same time is refused with
a message naming the holder while the first finishes, and after the newest checkpoint is
damaged the next start continues from the newest intact one, ending where an undamaged run ends.
"""

import os
import shutil
import subprocess
from dataclasses import dataclass

import pytest
import torch

from improved_diffusion.run import checkpoint as ckpt
from improved_diffusion.experiments import gan
from improved_diffusion.run import run_lock
from improved_diffusion.run.run_dir import RunDir
from test_classifier import CLASSIFIER_FLAGS
from test_gan import TINY as GAN_FLAGS
from test_super_res import SR as SR_FLAGS
from test_train import assert_identical
from tiny import PYTHON, ROOT, TINY_MODEL, env, flags, make_npz, mpiexec

pytestmark = pytest.mark.slow


@dataclass
class Trainer:
    script: str
    flags: list  # everything but --data_dir, --log_dir, the step count and --save_interval
    steps_flag: str
    weights: callable  # step -> the checkpoint's weights file
    data_size: int = 8
    classes: int = 0
    busy_steps: int = 8  # enough that a run holds its lock for a few seconds after starting


TRAINERS = {
    "image": Trainer("image_train.py", flags(dict(TINY_MODEL, batch_size=4, log_interval=2, ema_rate="0.9,0.99")),
                     "--total_steps", ckpt.model_name),
    "classifier": Trainer("classifier_train.py", CLASSIFIER_FLAGS, "--iterations", ckpt.model_name,
                          data_size=16, classes=4, busy_steps=16),
    "super_res": Trainer("super_res_train.py", SR_FLAGS, "--total_steps", ckpt.model_name, classes=2),
    "gan": Trainer("gan_train.py", GAN_FLAGS, "--total_steps", gan.gan_name, busy_steps=400),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def command(name, data_dir, log_dir, steps, save_interval, launcher=()):
    trainer = TRAINERS[name]
    data = data_dir / f"{name}.npz"
    if not data.exists():
        make_npz(data, n=24, size=trainer.data_size, classes=trainer.classes)
    args = [*trainer.flags, "--data_dir", data, "--log_dir", log_dir, trainer.steps_flag, steps,
            "--save_interval", save_interval]
    return [*launcher, PYTHON, os.path.join(ROOT, "scripts", trainer.script), *map(str, args)]


def run(cmd):
    proc = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def start_two_at_once(cmd):
    procs = [subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    return procs, [(p.wait(timeout=600), *p.communicate()) for p in procs]


@pytest.mark.parametrize("name", TRAINERS)
def test_a_second_run_into_the_same_log_dir_is_refused(name, data_dir, tmp_path):
    log_dir, steps = tmp_path / "run", TRAINERS[name].busy_steps
    procs, results = start_two_at_once(command(name, data_dir, log_dir, steps=steps, save_interval=steps // 2))
    assert sorted(code for code, _, _ in results) == [0, 2], [err[-1500:] for _, _, err in results]
    winner = 0 if results[0][0] == 0 else 1
    refused = results[1 - winner][2]
    assert refused.startswith("error: --log_dir") and "is in use by another run" in refused
    assert f"pid {procs[winner].pid}" in refused  # the holder
    assert RunDir(log_dir).latest()[0] == steps  # the first run finished
    assert not (log_dir / run_lock.LOCK_NAME).exists()


@pytest.mark.parametrize("name", ["image", "super_res"])
def test_a_second_mpiexec_run_is_refused_on_every_rank(name, data_dir, tmp_path):
    """Two 2-process runs at once: one trains; every rank of the other stops with the lock's
    message (rank 0 takes the lock and tells the others, so none goes on, hangs or dies in a
    collective: the super-resolution trainer's rank 1 used to end in a gloo traceback)."""
    log_dir = tmp_path / "run"
    _, results = start_two_at_once(command(name, data_dir, log_dir, steps=6, save_interval=3, launcher=mpiexec(2)))
    assert sorted(code == 0 for code, _, _ in results) == [False, True], [err[-1500:] for _, _, err in results]
    refused = next(err for code, _, err in results if code != 0)
    assert "is in use by another run (pid " in refused and "Traceback" not in refused, refused[-3000:]
    assert RunDir(log_dir).latest()[0] == 6
    assert not (log_dir / run_lock.LOCK_NAME).exists()


def flip_a_bit(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) - 300] ^= 0x10  # in the tensor data near the end: it would load silently
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("name", TRAINERS)
def test_a_damaged_newest_checkpoint_is_passed_over(name, data_dir, tmp_path):
    straight, damaged = tmp_path / "straight", tmp_path / "damaged"
    cmd = command(name, data_dir, straight, steps=4, save_interval=2)
    run(cmd)
    shutil.copytree(straight, damaged)
    weights = TRAINERS[name].weights(4)
    flip_a_bit(damaged / weights)
    assert ckpt.damage(str(damaged), 4) == f"{weights}: checksum mismatch"

    proc = run(command(name, data_dir, damaged, steps=4, save_interval=2))
    assert f"checkpoint 000004 is damaged ({weights}: checksum mismatch); resuming from 000002" in proc.stdout
    assert "resumed from step 2" in proc.stdout
    # Redone from step 2, the run ends where the undamaged one ended; the damaged one is set aside.
    assert_identical(torch.load(straight / weights, weights_only=True), torch.load(damaged / weights, weights_only=True))
    assert RunDir(damaged / "superseded").steps() == [4]
