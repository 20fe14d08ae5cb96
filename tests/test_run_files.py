"""
A run's files in the real world (improved_diffusion/run/run_dir.py, checkpoint.py, logger.py):
checkpoint files without their state files, a progress.csv cut mid-row, a log dir reached
through a symlink, and damaged weights handed to the loaders of sampling and analysis.
"""

import csv
import errno
import json
import os
import shutil

import pytest
import torch

from improved_diffusion.logger import Logger
from improved_diffusion.run import checkpoint as ckpt
from improved_diffusion.run import posthoc_ema
from improved_diffusion.run.run_dir import CONFIG, RunDir, load_run
from test_train_loop import make_loop
from tiny import TINY_MODEL


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A run folder of the TrainLoop of test_train_loop.make_loop with checkpoints at steps 2 and 4."""
    folder = tmp_path_factory.mktemp("ckpt") / "run"
    make_loop(folder, save_interval=2, total_steps=4).run_loop()
    return folder


# ---------------------------------------------------------------------------------------
# Checkpoint files without their state files
# ---------------------------------------------------------------------------------------


def original_format(two_checkpoints, folder, step=5):
    """The original's checkpoint files of `step` (no state file), as its runs leave them."""
    folder.mkdir()
    for name in (ckpt.model_name(4), ckpt.ema_name(0.9999, 4), ckpt.opt_name(4)):
        shutil.copy(two_checkpoints / name, folder / name.replace("000004", f"{step:06d}"))
    return folder


@pytest.mark.parametrize("resume", ["auto", "none"])
def test_a_start_from_zero_never_overwrites_checkpoint_files_without_state(two_checkpoints, tmp_path, resume):
    folder = original_format(two_checkpoints, tmp_path / "original")
    before = (folder / "model000005.pt").read_bytes()
    with pytest.raises(ValueError) as err:
        make_loop(folder, resume=resume, save_interval=5, total_steps=5)
    text = str(err.value)
    assert "\n" not in text and f"--resume {resume}: " in text
    assert "ema_0.9999_000005.pt, model000005.pt, opt000005.pt" in text
    assert f"--resume {folder / 'model000005.pt'}" in text
    assert (folder / "model000005.pt").read_bytes() == before


def test_checkpoint_files_without_state_are_still_resumed_by_name(two_checkpoints, tmp_path):
    folder = original_format(two_checkpoints, tmp_path / "original")
    loop = make_loop(folder, resume=str(folder / "model000005.pt"))
    assert loop.step == 5
    assert torch.equal(loop.model.state_dict()["out.2.bias"],
                       torch.load(folder / "model000005.pt", weights_only=True)["out.2.bias"])


def test_an_interrupted_first_save_of_the_run_itself_is_redone(two_checkpoints, tmp_path):
    """The files of a save killed before its state file, beside the run's config.json (written
    before any save): --resume auto starts at step 0 and writes them again."""
    folder = original_format(two_checkpoints, tmp_path / "run", step=2)
    (folder / CONFIG).write_text("{}")
    loop = make_loop(folder, resume="auto", save_interval=2, total_steps=2)
    assert loop.step == 0
    loop.run_loop()
    assert RunDir(folder).latest()[0] == 2


# ---------------------------------------------------------------------------------------
# progress.csv cut mid-row
# ---------------------------------------------------------------------------------------


def _log_rows(folder, steps):
    logger = Logger(str(folder), stdout=False, tensorboard=False)
    for step in steps:
        logger.logkv("step", step)
        logger.logkv("loss", 0.5)
        logger.dumpkvs()
    return logger


def test_rows_appended_after_a_cut_row_stay_rows(tmp_path):
    _log_rows(tmp_path, [1, 2, 3]).close()
    for name in ("progress.csv", "progress.jsonl"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) - 4])  # killed while writing step 3's row
    _log_rows(tmp_path, [3, 4]).close()
    with open(tmp_path / "progress.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["step", "loss"], ["1", "0.5"], ["2", "0.5"], ["3", "0.5"], ["4", "0.5"]]
    steps = [json.loads(line)["step"] for line in (tmp_path / "progress.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_glued_row_from_earlier_versions_does_not_stop_a_resume(tmp_path):
    """A row glued onto a cut one has more cells than the header: cutting the log back to the
    resumed step drops the extra cells instead of failing after the checkpoints were moved."""
    (tmp_path / "progress.csv").write_text("step,loss\n1,0.5\n2,0.3,0.5\n3,0.5\n")  # "2,0." + "3,0.5"
    logger = Logger(str(tmp_path), stdout=False, tensorboard=False)
    assert logger.drop_rows_after(2) == 1
    assert (tmp_path / "progress.csv").read_text().splitlines() == ["step,loss", "1,0.5", "2,0.3"]


def test_a_failed_rewrite_of_progress_csv_leaves_it_whole(tmp_path, monkeypatch):
    _log_rows(tmp_path, [1, 2, 3])
    before = (tmp_path / "progress.csv").read_text()
    logger = Logger(str(tmp_path), stdout=False, tensorboard=False)

    def full_disk(self, rows):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(csv.DictWriter, "writerows", full_disk)
    with pytest.raises(OSError):
        logger.drop_rows_after(1)
    assert (tmp_path / "progress.csv").read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["log.txt", "progress.csv", "progress.jsonl"]


# ---------------------------------------------------------------------------------------
# A log dir given through a symlink
# ---------------------------------------------------------------------------------------


def test_continuing_from_an_older_checkpoint_through_a_symlink_sets_the_newer_aside(two_checkpoints, tmp_path):
    folder, link = tmp_path / "run", tmp_path / "link"
    shutil.copytree(two_checkpoints, folder)
    link.symlink_to(folder)
    loop = make_loop(link, resume=str(folder / ckpt.model_name(2)))
    assert loop.step == 2
    assert RunDir(folder).steps() == [2]
    assert RunDir(folder / "superseded").steps() == [4]
    assert make_loop(link, resume="auto").step == 2  # never back to the abandoned step 4


def test_posthoc_weights_written_into_the_run_through_a_symlink(tmp_path):
    """The run's config.json is copied beside weights written elsewhere, not onto itself."""
    folder, link = tmp_path / "run", tmp_path / "link"
    folder.mkdir()
    (folder / CONFIG).write_text("{}")
    link.symlink_to(folder)
    posthoc_ema.write({"w": torch.zeros(1)}, str(link / "ema_std0.1_000004.pt"), str(folder))
    assert (folder / "ema_std0.1_000004.pt").exists() and (folder / CONFIG).read_text() == "{}"


# ---------------------------------------------------------------------------------------
# Damaged weights handed to a loader
# ---------------------------------------------------------------------------------------


def flip_a_bit(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) - 300] ^= 0x10  # in the tensor data near the end: it would load silently
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("name", [ckpt.ema_name(0.9999, 4), ckpt.model_name(4)])
def test_loaders_refuse_a_file_that_its_state_file_says_is_damaged(two_checkpoints, tmp_path, name):
    folder = tmp_path / "run"
    shutil.copytree(two_checkpoints, folder)
    flip_a_bit(folder / name)
    model = make_loop(tmp_path / "other").model
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_model_weights(model, str(folder / name))
    text = str(err.value)
    assert "\n" not in text and f"checkpoint {folder / name} is damaged (checksum mismatch" in text
    with pytest.raises(ckpt.CheckpointError, match="is damaged"):
        load_run(folder / name, overrides=dict(TINY_MODEL, dropout=0.0))


def test_loaders_take_a_file_that_no_state_file_lists(two_checkpoints, tmp_path):
    """Released weights, or an original-format checkpoint: nothing to verify against."""
    folder = tmp_path / "released"
    folder.mkdir()
    shutil.copy(two_checkpoints / ckpt.ema_name(0.9999, 4), folder / "ema_0.9999_000004.pt")
    loaded = load_run(folder / "ema_0.9999_000004.pt", overrides=dict(TINY_MODEL, dropout=0.0))
    assert loaded.step == 4
