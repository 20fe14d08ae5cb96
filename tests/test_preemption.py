"""
Runs that survive the scheduler (improved_diffusion/run/preemption.py, docs/multinode.md):
a stop signal saves a checkpoint at one step every rank agrees on and exits with code 75,
--save_minutes saves by the clock, a second signal during the save changes nothing,
slurm.sbatch forwards the signal and requeues on 75, and --dist_timeout ends a job whose
rank froze with one line instead of a silent wait.
"""

import json
import os
import random
import signal
import subprocess
import time

import pytest
import torch

from improved_diffusion.options import config
from improved_diffusion.run import checkpoint as ckpt
from improved_diffusion.run import preemption
from improved_diffusion.run.preemption import EXIT_CODE, StopRequest, Stopped, parse_signals
from improved_diffusion.run.run_dir import RunDir
from test_classifier import CLASSIFIER_FLAGS
from test_gan import TINY as GAN_FLAGS
from test_slurm import clean_env
from test_train import assert_identical, load_checkpoint_files, train_args
from test_train_loop import make_loop
from tiny import PYTHON, ROOT, env, make_npz, mpiexec, run_script

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_npz(tmp_path_factory.mktemp("data") / "train.npz", n=24)


@pytest.fixture
def guarded():
    """While a test runs, a stop signal that reaches the handlers from before the loop fails it
    (instead of killing pytest); the old handlers come back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def unexpected(signum, frame):
        raise AssertionError(f"{signal.Signals(signum).name} reached the handler from before the loop")

    for sig in STOP_SIGNALS:
        signal.signal(sig, unexpected)
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def logged_steps(log_dir):
    """Steps of the rows in LOG_DIR/progress.jsonl (rank 0 writes one per --log_interval)."""
    try:
        with open(os.path.join(log_dir, "progress.jsonl")) as f:
            return [json.loads(line)["step"] for line in f if line.strip()]
    except (OSError, ValueError, KeyError):
        return []


def signal_after(cmd, log_dir, rows, sig=signal.SIGTERM, pids=None, timeout=300):
    """Start `cmd`, wait until `rows` more rows are logged than at its start, send `sig` (to the
    processes `pids(proc)` names, else to `cmd`'s process); (exit code, output, last logged step
    when the signal went)."""
    before = len(logged_steps(log_dir))
    out = open(os.path.join(os.path.dirname(log_dir), f"{os.path.basename(log_dir)}.out"), "a+")
    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout
    while len(logged_steps(log_dir)) < before + rows and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    at = logged_steps(log_dir)[-1] if logged_steps(log_dir) else 0
    for pid in (pids(proc) if pids else [proc.pid]):
        os.kill(pid, sig)
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out.seek(0)
    return code, out.read(), at


def script(name, *args):
    return [PYTHON, os.path.join(ROOT, "scripts", name), *map(str, args)]


def rank_pids(proc, count=2):
    """{rank: pid} of the ranks mpiexec started (its descendants with PMI_RANK set)."""
    found = {}
    for _ in range(200):
        for entry in os.listdir("/proc"):
            if entry.isdigit() and proc.pid in _ancestors(int(entry)):
                try:
                    with open(f"/proc/{entry}/environ", "rb") as f:
                        variables = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
                except OSError:
                    continue
                if b"PMI_RANK" in variables:
                    found[int(variables[b"PMI_RANK"])] = int(entry)
        if len(found) == count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"found ranks {found} of mpiexec {proc.pid}")


def _ancestors(pid):
    chain = []
    try:
        while pid > 1:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
            chain.append(pid)
    except (OSError, ValueError, IndexError):
        pass
    return chain


# ---------------------------------------------------------------------------- the pieces


def test_stop_signals_option():
    assert parse_signals("TERM,USR1") == (signal.SIGTERM, signal.SIGUSR1)
    assert parse_signals(" sigint , usr2") == (signal.SIGINT, signal.SIGUSR2)
    assert parse_signals("") == ()
    with pytest.raises(ValueError, match="--stop_signals names no signal: 'TREM'"):
        parse_signals("TERM,TREM")
    with pytest.raises(ValueError, match="--stop_signals cannot catch KILL"):
        parse_signals("KILL")
    assert f"exit with code {EXIT_CODE} " in config.BY_NAME["stop_signals"].help  # the code the help names


def test_stop_request_in_one_process(guarded):
    """One process: a signal stops at the very next step's end; the clock saves; leaving the
    block raises Stopped (exit code 75); later signals are ignored."""
    now = [0.0]
    lines = []
    with pytest.raises(Stopped) as stopped:
        with StopRequest("TERM,USR1", save_minutes=1.0, log=lines.append, clock=lambda: now[0]) as stop:
            assert [stop.due(k) for k in (1, 2)] == [None, None]
            now[0] = 61.0
            assert stop.due(3) == "save" and stop.due(4) is None
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stop.due(5) == "stop"
            os.kill(os.getpid(), signal.SIGTERM)  # a second one while saving: caught, ignored
            assert stop.due(5) == "stop"
    assert stopped.value.code == EXIT_CODE and stopped.value.step == 5 and stopped.value.cause == "SIGUSR1"
    assert "SIGUSR1: saving a checkpoint at step 5" in lines[0]
    assert "(1 later signal(s) ignored)" in lines[1]
    with StopRequest("", log=lines.append) as stop:  # off: no handler, never due
        assert signal.getsignal(signal.SIGTERM) is not stop._catch and stop.due(1) is None


def test_a_second_signal_during_the_save_changes_nothing(tmp_path, guarded, monkeypatch):
    """SIGTERM at step 3; while the checkpoint is written, a SIGTERM and a SIGUSR1 between its
    files. The loop still saves step 3 whole (checksums hold, weights are the loop's) and
    raises Stopped with code 75."""
    loop = make_loop(tmp_path, total_steps=50, log_interval=1000)
    run_step = loop.run_step

    def step_then_signal(batch, cond):
        run_step(batch, cond)
        if loop.step == 2:  # the loop counts this step as its third
            os.kill(os.getpid(), signal.SIGTERM)

    atomic_save, sent = ckpt.atomic_save, []

    def save_with_signals(obj, path):
        sent.append(os.path.basename(path))
        os.kill(os.getpid(), signal.SIGTERM if len(sent) % 2 else signal.SIGUSR1)
        atomic_save(obj, path)

    monkeypatch.setattr(loop, "run_step", step_then_signal)
    monkeypatch.setattr(ckpt, "atomic_save", save_with_signals)
    with pytest.raises(Stopped) as stopped:
        loop.run_loop()
    assert stopped.value.code == EXIT_CODE and stopped.value.step == 3 == loop.step
    assert len(sent) >= 4  # model, EMA, optimizer, state: a signal before each
    assert RunDir(tmp_path).latest()[0] == 3 and ckpt.damage(str(tmp_path), 3) is None
    saved = torch.load(tmp_path / ckpt.model_name(3), weights_only=True)
    assert_identical(saved, loop.model.state_dict())


def test_save_minutes_saves_by_the_clock(tmp_path, monkeypatch):
    """--save_minutes 1 with a clock that moves 40 s per step: saves at steps 2, 4 (the clock
    restarts at each), and the final step 5; --save_interval never."""
    now = [0.0]
    monkeypatch.setattr(preemption, "CLOCK", lambda: now[0])
    loop = make_loop(tmp_path, total_steps=5, log_interval=1000)
    loop.config.save_minutes = 1.0
    run_step = loop.run_step

    def step_and_tick(batch, cond):
        run_step(batch, cond)
        now[0] += 40.0

    monkeypatch.setattr(loop, "run_step", step_and_tick)
    loop.run_loop()
    assert sorted(RunDir(tmp_path).steps()) == [2, 4, 5]


# ---------------------------------------------------------------------------- the trainers


@pytest.mark.parametrize("sig", STOP_SIGNALS, ids=lambda s: s.name)
def test_a_signal_mid_run_saves_the_step_reached_and_exits_75(data, tmp_path, sig):
    """image_train.py, one process: the step in progress ends, is saved, and the run exits 75;
    the same command continues from there."""
    log_dir = str(tmp_path / "run")
    args = train_args(data, log_dir, total_steps=10000, log_interval=1, save_interval=10000)
    code, out, at = signal_after(script("image_train.py", *args), log_dir, rows=3, sig=sig)
    assert code == EXIT_CODE, out[-3000:]
    step = RunDir(log_dir).latest()[0]
    assert step >= at >= 3 and step == logged_steps(log_dir)[-1]
    assert f"{sig.name}: saving a checkpoint at step {step}" in out and "Traceback" not in out
    proc = run_script("image_train.py", train_args(data, log_dir, total_steps=step + 1, log_interval=1))
    assert f"resumed from step {step}" in proc.stdout


def test_classifier_and_gan_trainers_stop_on_a_signal(tmp_path):
    """classifier_train.py and gan_train.py: SIGTERM mid-run saves the step reached, exit 75."""
    labelled = make_npz(tmp_path / "labelled.npz", n=24, size=16, classes=4)
    images = make_npz(tmp_path / "images.npz", n=24, size=8)
    runs = {
        "classifier": script("classifier_train.py", *CLASSIFIER_FLAGS, "--data_dir", labelled, "--log_dir",
                             tmp_path / "classifier", "--iterations", 10000, "--save_interval", 10000,
                             "--log_interval", 1),
        "gan": script("gan_train.py", *GAN_FLAGS, "--data_dir", images, "--log_dir", tmp_path / "gan",
                      "--total_steps", 100000, "--save_interval", 100000, "--log_interval", 1),
    }
    for name, cmd in runs.items():
        log_dir = str(tmp_path / name)
        code, out, at = signal_after(cmd, log_dir, rows=3)
        assert code == EXIT_CODE, f"{name}: {out[-3000:]}"
        step = RunDir(log_dir).latest()[0]
        assert step >= at >= 3 and step == logged_steps(log_dir)[-1], name
        assert f"SIGTERM: saving a checkpoint at step {step}" in out, name


# ---------------------------------------------------------------------------- two ranks


@pytest.mark.slow
def test_sigterm_soak_two_ranks_resumes_bitwise(data, tmp_path):
    """`mpiexec -n 2`: SIGTERM at a random step, five times, to both ranks or (twice) to one of
    them only; each time both ranks save one agreed step (a multiple of CHECK_EVERY, at or
    after the step logged when the signal went) and exit 75; resumed to the end, the weights
    are bitwise an uninterrupted run's."""
    total = 60
    straight = tmp_path / "straight"
    run_script("image_train.py", train_args(data, straight, total_steps=total, log_interval=1, save_interval=1000),
               mpiexec(2))
    log_dir = str(tmp_path / "stopped")
    args = train_args(data, log_dir, total_steps=total, log_interval=1, save_interval=1000)
    rng, stops = random.Random(0), []
    for ranks in ((0, 1), (1,), (0, 1), (0,), (0, 1)):
        cmd = mpiexec(2) + script("image_train.py", *args)
        code, out, at = signal_after(cmd, log_dir, rows=rng.randint(1, 6),
                                     pids=lambda p: [rank_pids(p)[r] for r in ranks])
        assert code == EXIT_CODE, out[-3000:]
        step, state = RunDir(log_dir).latest()
        assert step % preemption.CHECK_EVERY == 0 and at <= step <= at + preemption.CHECK_EVERY, (at, step)
        assert state["world_size"] == 2 and len(state["ranks"]) == 2  # both ranks reached it and saved
        assert step > (stops[-1] if stops else 0)
        stops.append(step)
    assert stops[-1] < total
    run_script("image_train.py", args, mpiexec(2))
    assert_identical(load_checkpoint_files(straight, total), load_checkpoint_files(log_dir, total))
    print(f"soak: stop steps {stops}, exit code {EXIT_CODE} every time")


@pytest.mark.slow
def test_a_frozen_rank_ends_the_job_within_dist_timeout(data, tmp_path):
    """`mpiexec -n 2 --dist_timeout 5`, rank 1 SIGSTOPped mid-run: rank 0 stops within the
    timeout (plus a margin) with one line naming it; the job ends."""
    log_dir = str(tmp_path / "run")
    cmd = mpiexec(2) + script("image_train.py", *train_args(data, log_dir, total_steps=100000, log_interval=1,
                                                             save_interval=100000, dist_timeout=5))
    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = None
    try:
        deadline = time.time() + 300
        while len(logged_steps(log_dir)) < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        victim = rank_pids(proc)[1]
        os.kill(victim, signal.SIGSTOP)
        frozen = time.time()
        out, err = proc.communicate(timeout=60)
        seconds = time.time() - frozen
    finally:
        if victim is not None:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert 5 <= seconds < 30, seconds
    assert ("error: rank 0 of 2: a collective got no answer from another rank within --dist_timeout 5 s "
            "(Timed out waiting 5000ms") in err, err[-3000:]
    assert "Traceback" not in err
    print(f"dist timeout: the job ended {seconds:.1f} s after rank 1 froze")


# ---------------------------------------------------------------------------- SLURM


def test_sbatch_forwards_a_stop_signal_and_requeues_on_75(tmp_path):
    """The batch template under stand-ins: USR1 to the batch shell reaches srun, whose tasks
    exit 75, and the script requeues the job; a run that ends with 0 is not requeued."""
    path = os.path.join(ROOT, "scripts", "launch", "slurm.sbatch")
    fake = tmp_path / "bin"
    fake.mkdir()
    log = tmp_path / "calls.log"
    (fake / "srun").write_text(
        "#!/bin/bash\n"
        f'trap \'echo "srun got USR1" >> {log}; exit {EXIT_CODE}\' USR1\n'
        f'echo started >> {log}\n'
        'if [[ -n "${FINISH:-}" ]]; then exit 0; fi\n'
        "while true; do sleep 0.05; done\n")
    (fake / "scontrol").write_text(f'#!/bin/sh\necho "scontrol $*" >> {log}\n')
    for name in ("srun", "scontrol"):
        (fake / name).chmod(0o755)
    e = clean_env(SLURM_JOB_ID=7, SLURM_NTASKS=2, SLURM_SUBMIT_DIR=ROOT, PYTHON="python")
    e["PATH"] = f"{fake}{os.pathsep}{e['PATH']}"
    proc = subprocess.Popen(["bash", path, "cifar10", "baseline"], env=e, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (log.exists() and "started" in log.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == EXIT_CODE, err
    assert log.read_text().splitlines() == ["started", "srun got USR1", "scontrol requeue 7"]
    assert "USR1: asking the tasks to save a checkpoint and stop" in out and "requeueing job 7" in out

    log.unlink()
    done = subprocess.run(["bash", path, "cifar10", "baseline"], env=dict(e, FINISH="1"), cwd=tmp_path,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and log.read_text().splitlines() == ["started"]
