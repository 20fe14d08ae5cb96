"""
Past one node: SLURM's srun simulated on this machine (its variables set for two processes),
the host-list parser on the forms SLURM prints, and the launcher precedence of dist_util.
"""

import os
import random
import socket
import subprocess

import pytest
import torch
import torch.distributed as dist

from improved_diffusion.run import checkpoint as ckpt
from improved_diffusion import dist_util
from improved_diffusion.dist_util import detect_launcher, expand_hostlist, slurm_task
from test_train import assert_identical, load_checkpoint_files, train_args
from tiny import PYTHON, ROOT, env, make_npz, mpiexec

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LAUNCHER_PREFIXES = ("SLURM_", "PMI_", "PMIX_", "OMPI_", "MV2_")


def clean_env(**extra):
    """tiny.env() without any launcher's variables (this machine may sit in a job), plus `extra`."""
    e = {k: v for k, v in env().items() if k not in LAUNCHER_VARS and not k.startswith(LAUNCHER_PREFIXES)}
    e.update({k: str(v) for k, v in extra.items()})
    return e


@pytest.fixture
def no_launcher(monkeypatch):
    """The test process's own environment without launcher variables (for setup_dist in-process)."""
    for key in list(os.environ):
        if key in LAUNCHER_VARS or key.startswith(LAUNCHER_PREFIXES):
            monkeypatch.delenv(key)
    return monkeypatch


def job_id_with_free_port():
    """A SLURM job id whose derived rendezvous port (15000 + id mod 15000) is free now."""
    for _ in range(100):
        job_id = random.randrange(1, 10**7)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("", 15000 + job_id % 15000))
            except OSError:
                continue
        return job_id
    pytest.skip("no free port in 15000-29999")


def srun_env(rank, ntasks=2, job_id=1234, **extra):
    """The variables srun sets for task `rank` of a one-node step (`extra` added or replaced)."""
    e = dict(
        SLURM_JOB_ID=job_id, SLURM_STEP_ID=0, SLURM_PROCID=rank, SLURM_LOCALID=rank, SLURM_NTASKS=ntasks,
        SLURM_JOB_NODELIST="localhost", SLURM_NODEID=0,
    )
    e.update(extra)
    return {k: str(v) for k, v in e.items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_npz(tmp_path_factory.mktemp("data") / "train.npz", n=24)


# ---------------------------------------------------------------------------- end to end


def test_srun_simulated_matches_mpiexec_bitwise(data, tmp_path):
    """Two processes with srun's variables train the weights `mpiexec -n 2` trains, bit for bit.
    The mpiexec run also carries SLURM variables that say "task 0 of 2" (mpiexec started from
    an srun shell): MPI's must win, or both ranks would claim rank 0."""
    steps = 4
    script = os.path.join(ROOT, "scripts", "image_train.py")
    job_id = job_id_with_free_port()

    slurm_dir = tmp_path / "srun"
    procs = []
    for rank in range(2):
        out = open(tmp_path / f"rank{rank}.log", "w")
        cmd = [PYTHON, script] + train_args(data, slurm_dir, total_steps=steps)
        procs.append((subprocess.Popen(cmd, env=clean_env(**srun_env(rank, job_id=job_id)), cwd=ROOT,
                                       stdout=out, stderr=subprocess.STDOUT), out))
    try:
        codes = [p.wait(timeout=300) for p, _ in procs]
    finally:
        for p, out in procs:
            if p.poll() is None:
                p.kill()
            out.close()
    logs = [(tmp_path / f"rank{rank}.log").read_text() for rank in range(2)]
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    announced = [line for log in logs for line in log.splitlines() if line.startswith("distributed:")]
    assert len(announced) == 1, announced  # one line, from rank 0
    assert f"launcher srun (SLURM job {job_id}, step 0), world size 2 on 1 node(s)" in announced[0]
    assert f"rendezvous localhost:{15000 + job_id % 15000}" in announced[0]

    mpi_dir = tmp_path / "mpiexec"
    cmd = mpiexec(2) + [PYTHON, script] + train_args(data, mpi_dir, total_steps=steps)
    proc = subprocess.run(cmd, env=clean_env(**srun_env(0, job_id=job_id)), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "distributed: launcher mpiexec (MPI.COMM_WORLD), world size 2" in proc.stdout

    assert_identical(load_checkpoint_files(slurm_dir, steps), load_checkpoint_files(mpi_dir, steps))
    state = torch.load(slurm_dir / ckpt.state_name(steps), weights_only=True)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2


def test_bad_srun_environment_fails_clearly(data, tmp_path):
    """image_train.py under a partial srun environment: one `error:` line naming the variable."""
    partial = srun_env(0)
    del partial["SLURM_NTASKS"]
    cmd = [PYTHON, os.path.join(ROOT, "scripts", "image_train.py")] + train_args(data, tmp_path / "run", total_steps=1)
    proc = subprocess.run(cmd, env=clean_env(**partial), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error: SLURM_NTASKS is not set" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------- host lists


@pytest.mark.parametrize("text, hosts", [
    ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
    ("node17", ["node17"]),
    ("localhost", ["localhost"]),
    ("nid[00008-00010]", ["nid00008", "nid00009", "nid00010"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("a[1-2]-b[3-4]", ["a1-b3", "a1-b4", "a2-b3", "a2-b4"]),
    ("rack[1-2]-gpu[1,3]", ["rack1-gpu1", "rack1-gpu3", "rack2-gpu1", "rack2-gpu3"]),
    ("cpu5,gpu[2-3],login-1", ["cpu5", "gpu2", "gpu3", "login-1"]),
    ("gpu-a100-[1-2].cluster,x", ["gpu-a100-1.cluster", "gpu-a100-2.cluster", "x"]),
    ("n[3]", ["n3"]),
    (" n[1-2] ", ["n1", "n2"]),
])
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("text, message", [
    ("", "empty host list"),
    ("gpu[01-03", "never closed"),
    ("gpu01]", r"without '\["),
    ("gpu[1[2]]", "nested"),
    ("gpu[a-b]", "not a number"),
    ("gpu[3-1]", "backwards"),
    ("gpu[]", "not a number"),
    ("a,,b", "bad host name"),
    ("a b", "bad host name"),
])
def test_expand_hostlist_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        expand_hostlist(text)


# ---------------------------------------------------------------------------- the environment


def test_slurm_task_reads_srun_variables():
    e = srun_env(3, ntasks=8, job_id=4711, SLURM_LOCALID=1, SLURM_JOB_NODELIST="gpu[07-10]")
    task = slurm_task(e)
    assert (task.rank, task.world_size, task.local_rank) == (3, 8, 1)
    assert (task.host, task.port, task.job_id) == ("gpu07", 15000 + 4711, "4711")
    # the step's node list first; MASTER_ADDR / MASTER_PORT override the derived ones
    assert slurm_task(dict(e, SLURM_STEP_NODELIST="gpu[09-10]")).host == "gpu09"
    assert slurm_task(dict(e, SLURM_JOB_ID="123456")).port == 15000 + 123456 % 15000
    over = slurm_task(dict(e, MASTER_ADDR="10.0.0.5", MASTER_PORT="29500", SLURM_JOB_NODELIST="not[a-list"))
    assert (over.host, over.port) == ("10.0.0.5", 29500)
    assert slurm_task(dict(e, SLURM_NODELIST="cpu[2-3]", SLURM_JOB_NODELIST="")).host == "cpu2"


@pytest.mark.parametrize("change, message", [
    ({"SLURM_NTASKS": None}, "SLURM_NTASKS is not set"),
    ({"SLURM_NTASKS": "two"}, "SLURM_NTASKS='two' is not an integer"),
    ({"SLURM_NTASKS": "0"}, "SLURM_NTASKS='0' must be >= 1"),
    ({"SLURM_PROCID": "2"}, "SLURM_PROCID=2 is not below SLURM_NTASKS=2"),
    ({"SLURM_PROCID": "-1"}, "SLURM_PROCID='-1' must be >= 0"),
    ({"SLURM_LOCALID": None}, "SLURM_LOCALID is not set"),
    ({"SLURM_JOB_NODELIST": "gpu[01-"}, r"SLURM_JOB_NODELIST='gpu\[01-' is not a SLURM host list .*MASTER_ADDR"),
    ({"SLURM_JOB_NODELIST": None}, "SLURM_JOB_NODELIST is not set.*MASTER_ADDR"),
    ({"SLURM_JOB_ID": None}, "SLURM_JOB_ID is not set.*MASTER_PORT"),
    ({"SLURM_JOB_ID": "x12"}, "SLURM_JOB_ID='x12' is not an integer"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
])
def test_bad_or_partial_srun_environment(change, message):
    e = srun_env(1)
    for key, value in change.items():
        if value is None:
            del e[key]
        else:
            e[key] = value
    assert detect_launcher(e) == "srun"
    with pytest.raises(ValueError, match=message):
        slurm_task(e)


def test_one_task_steps_need_no_rendezvous():
    """SLURM_NTASKS=1 (e.g. `srun -n 1` inside a job of many tasks): one process, nothing else read."""
    task = slurm_task({"SLURM_PROCID": "0", "SLURM_STEP_ID": "3", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "9"})
    assert (task.rank, task.world_size, task.host, task.port) == (0, 1, None, None)


@pytest.mark.parametrize("environ, launcher", [
    ({}, None),
    ({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "16"}, None),  # salloc shell
    ({"SLURM_JOB_ID": "5", "SLURM_PROCID": "0", "SLURM_NTASKS": "16"}, None),  # a batch script's own shell
    ({"SLURM_JOB_ID": "5", "SLURM_PROCID": "0"}, None),  # a batch script without --ntasks
    ({"SLURM_JOB_ID": "5", "SLURM_PROCID": "1", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2"}, "srun"),
    ({"SLURM_PROCID": "1", "SLURM_STEPID": "0", "SLURM_NTASKS": "2"}, "srun"),  # the old name of the step id
    # mpiexec inside a batch script, or srun with an MPI plugin: MPI's variables win
    ({"PMI_SIZE": "2", "PMI_RANK": "1", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "1"}, "mpiexec"),
    ({"OMPI_COMM_WORLD_SIZE": "4", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "mpiexec"),
    ({"PMI_SIZE": "1", "SLURM_PROCID": "0"}, None),  # mpiexec -n 1
    # srun starting one torchrun per node: torchrun's variables win
    ({"RANK": "5", "WORLD_SIZE": "8", "SLURM_PROCID": "1", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2"}, "torchrun"),
    ({"RANK": "1", "WORLD_SIZE": "2", "PMI_SIZE": "2"}, "torchrun"),
])
def test_launcher_precedence(environ, launcher):
    assert detect_launcher(environ) == launcher


def test_task_id_without_step_id_is_an_error():
    """SLURM_PROCID 1 without a step id is neither an srun task nor a batch shell (task 0)."""
    with pytest.raises(ValueError, match="SLURM_PROCID='1' but SLURM_STEP_ID is not set"):
        detect_launcher({"SLURM_JOB_ID": "5", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"})


@pytest.mark.parametrize("extra, said", [
    ({"SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n[1-4]"},
     "plain python in SLURM job 77 (no srun step): world size 1; start the job's 4 tasks with srun"),
    ({"SLURM_JOB_ID": "77"}, "plain python in SLURM job 77 (no srun step): world size 1\n"),
    ({"SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_STEP_ID": "2", "SLURM_NTASKS": "1"},
     "launcher srun (SLURM job 77, step 2), world size 1 on 1 node(s)"),
    ({}, ""),
])
def test_one_process_inside_a_job(no_launcher, capsys, extra, said):
    """A plain python (or a one-task step) inside an allocation runs alone and says so; outside, silently."""
    for key, value in extra.items():
        no_launcher.setenv(key, value)
    dist_util.setup_dist()
    assert not dist.is_initialized() and dist_util.get_world_size() == 1
    out = capsys.readouterr().out
    assert said in out if said else out == ""


def test_sbatch_template(tmp_path):
    """The batch template parses as bash, requeues, and runs the experiment's config through srun
    with the global batch split over the tasks (a stand-in srun prints what it was given)."""
    path = os.path.join(ROOT, "scripts", "launch", "slurm.sbatch")
    proc = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = open(path).read()
    for needle in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1", "scontrol requeue", "--resume auto"):
        assert needle in text, needle
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/sh\necho "srun $*"\n')
    (fake / "srun").chmod(0o755)
    e = clean_env(SLURM_JOB_ID=7, SLURM_NTASKS=16, SLURM_SUBMIT_DIR=ROOT, PYTHON="python")
    e["PATH"] = f"{fake}{os.pathsep}{e['PATH']}"
    for experiment, per_rank in (("cifar10", 8), ("imagenet128", 16)):
        proc = subprocess.run(["bash", path, experiment, "md_lrc", "--total_steps", "5"], env=e, cwd=tmp_path,
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert (f"srun --kill-on-bad-exit=1 python scripts/image_train.py --config configs/{experiment}_md_lrc.json "
                f"--data_dir data/{experiment}/train --log_dir runs/{experiment}_md_lrc --batch_size {per_rank} "
                "--resume auto --total_steps 5") in proc.stdout
    bad = subprocess.run(["bash", path, "mnist", "all"], env=e, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "EXPERIMENT must be cifar10 or imagenet128" in bad.stderr
    odd = subprocess.run(["bash", path, "cifar10", "all"], env=dict(e, SLURM_NTASKS="3"), capture_output=True,
                         text=True, timeout=30)
    assert odd.returncode == 2 and "not divisible by 3 tasks" in odd.stderr


def test_multinode_doc():
    with open(os.path.join(ROOT, "docs", "multinode.md")) as f:
        text = f.read()
    for heading in ("## SLURM", "## mpiexec with a hostfile", "## torchrun with a rendezvous", "## Preemption and requeue"):
        assert heading in text, heading
    with open(os.path.join(ROOT, "README.md")) as f:
        assert "docs/multinode.md" in f.read()
