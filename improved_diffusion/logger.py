"""
Training metrics: the familiar `logkv` / `logkv_mean` / `dumpkvs` facade of the original,
without its faults.

Means are accumulated as (sum, count) pairs, on the device when given tensors, so the
training step never waits for the host; at `dumpkvs` all pairs are reduced across ranks in
a single all-reduce, so the logged loss is the mean over every rank, not rank 0's alone.
Rank 0 writes a stdout table, `progress.csv`, `progress.jsonl`, `log.txt`, and TensorBoard
events when `tensorboard` is installed.
"""

import csv
import datetime
import json
import math
import os
import sys

import torch

from . import dist_util


class _CSVWriter:
    """progress.csv whose header grows when new keys appear (the file is rewritten then)."""

    def __init__(self, path):
        self.path = path
        self.keys = []
        if os.path.exists(path):
            _cut_partial_line(path)
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
            self.keys = list(header)

    def write(self, row):
        new = [k for k in row if k not in self.keys]
        if new:
            rows = []
            if os.path.exists(self.path):
                with open(self.path, newline="") as f:
                    rows = list(csv.DictReader(f))
            self.keys.extend(new)
            _rewrite_csv(self.path, self.keys, rows)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.keys).writerow({k: row.get(k, "") for k in self.keys})


class _TensorBoardWriter:
    def __init__(self, log_dir):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(log_dir)

    def write(self, row):
        step = row.get("step", 0)
        for k, v in row.items():
            if isinstance(v, (int, float)) and k != "step":
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def write_image(self, key, image, step):
        self.writer.add_image(key, image, step, dataformats="HWC")
        self.writer.flush()


def _format_table(row):
    def fmt(v):
        if isinstance(v, float):
            return f"{v:<8.4g}"
        return str(v)

    items = [(str(k)[:30], fmt(v)[:30]) for k, v in row.items()]
    if not items:
        return ""
    kw = max(len(k) for k, _ in items)
    vw = max(len(v) for _, v in items)
    bar = "-" * (kw + vw + 7)
    lines = [bar] + [f"| {k:<{kw}} | {v:<{vw}} |" for k, v in items] + [bar]
    return "\n".join(lines)


class Logger:
    """Collects metrics for one log interval and writes them on rank 0."""

    def __init__(self, log_dir=None, stdout=True, tensorboard=True):
        self.dir = log_dir
        self.values = {}  # key -> plain value, written as is (rank 0's)
        self.means = {}  # key -> [sum, count], tensors or floats, reduced over ranks
        self.groups = {}  # (key, ...) -> [sums, counts]: 1-D tensors, one entry per key
        self.stdout = stdout
        self.writers = []
        self.text = None
        self.write_error = None  # set when a write of rank 0's files failed (a full disk): they stop
        if log_dir is not None and dist_util.is_main():
            os.makedirs(log_dir, exist_ok=True)
            self.writers.append(_CSVWriter(os.path.join(log_dir, "progress.csv")))
            _cut_partial_line(os.path.join(log_dir, "progress.jsonl"))
            self.jsonl = open(os.path.join(log_dir, "progress.jsonl"), "a")
            self.text = open(os.path.join(log_dir, "log.txt"), "a")
            if tensorboard:
                try:
                    self.writers.append(_TensorBoardWriter(os.path.join(log_dir, "tb")))
                except ImportError:
                    pass

    def logkv(self, key, value):
        self.values[key] = value

    def logkv_mean(self, key, value):
        self.logkv_sum(key, value, 1)

    def logkv_sum(self, key, total, count):
        """Add `total` over `count` items to the mean of `key` (tensors stay on device)."""
        if isinstance(total, torch.Tensor):
            total = total.detach().float()
        if isinstance(count, torch.Tensor):
            count = count.detach().float()
        if key in self.means:
            acc = self.means[key]
            acc[0] = acc[0] + total
            acc[1] = acc[1] + count
        else:
            self.means[key] = [total, count]

    def logkv_sums(self, keys, totals, counts):
        """`logkv_sum` for several keys at once from 1-D tensors: one device add per call."""
        keys = tuple(keys)
        totals, counts = totals.detach().float(), counts.detach().float()
        if keys in self.groups:
            acc = self.groups[keys]
            acc[0] = acc[0] + totals
            acc[1] = acc[1] + counts
        else:
            self.groups[keys] = [totals, counts]

    @property
    def pending(self):
        """Whether anything waits to be written by `dumpkvs`."""
        return bool(self.values or self.means or self.groups)

    def _reduced_means(self):
        """One all-reduce for every mean of every rank; keys must match across ranks."""
        if not (self.means or self.groups):
            return {}
        tensors = [v for pair in (*self.means.values(), *self.groups.values()) for v in pair]
        device = next(
            (v.device for v in tensors if isinstance(v, torch.Tensor)),
            dist_util.dev() if dist_util.get_world_size() > 1 else torch.device("cpu"),
        )
        names, parts = [], []
        for key in sorted(self.means):
            names.append(key)
            parts.append(torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in self.means[key]]))
        for keys in sorted(self.groups):
            totals, counts = self.groups[keys]
            names.extend(keys)
            parts.append(torch.stack([totals.double(), counts.double()], dim=1).flatten())
        flat = torch.cat(parts)
        dist_util.all_reduce_sum(flat)
        flat = flat.cpu().tolist()
        sums = {}
        for i, key in enumerate(names):
            total, count = sums.get(key, (0.0, 0.0))
            sums[key] = (total + flat[2 * i], count + flat[2 * i + 1])
        return {key: total / count for key, (total, count) in sums.items() if count > 0}

    def dumpkvs(self):
        """Reduce, write and clear this interval's metrics; returns the row on every rank."""
        row = dict(self.values)
        row.update(self._reduced_means())
        self.values.clear()
        self.means.clear()
        self.groups.clear()
        if dist_util.is_main():
            if self.stdout:
                print(_format_table(row), flush=True)
            clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}

            def write():
                for w in self.writers:
                    w.write(row)
                if self.dir is not None:
                    self.jsonl.write(json.dumps(clean) + "\n")
                    self.jsonl.flush()

            self._write("progress.csv / progress.jsonl", write)
        return row

    def _write(self, what, write):
        """`write()` of rank 0's files; after a failed one (a full disk, most often) the files
        are left alone and `write_error` says what failed: a training loop saves and stops on it
        (run/preemption.py) instead of losing the steps since its last checkpoint."""
        if self.write_error is not None:
            return
        try:
            write()
        except OSError as e:
            self.write_error = f"cannot write {what} in {self.dir}: {os.strerror(e.errno) if e.errno else e}"
            print(f"ERROR: {self.write_error}; the logs stop here", file=sys.stderr, flush=True)

    def drop_rows_after(self, step):
        """Remove rows logged after `step` from progress.csv / .jsonl (a resumed run redoes
        them); returns how many rows of progress.csv went."""
        if self.dir is None or not dist_util.is_main():
            return 0
        dropped = 0
        csv_path = os.path.join(self.dir, "progress.csv")
        if os.path.isfile(csv_path):
            with open(csv_path, newline="") as f:
                reader = csv.DictReader(f)
                keys, rows = reader.fieldnames or [], list(reader)
            kept = [r for r in rows if (parse_number(r.get("step")) or 0) <= step]
            dropped = len(rows) - len(kept)
            if dropped:
                _rewrite_csv(csv_path, keys, kept)
        jsonl_path = os.path.join(self.dir, "progress.jsonl")
        if os.path.isfile(jsonl_path):
            self.jsonl.flush()
            with open(jsonl_path) as f:
                lines = f.readlines()
            kept_lines = [line for line in lines if _jsonl_step(line) <= step]
            if len(kept_lines) != len(lines):
                _replace_file(jsonl_path, lambda f: f.writelines(kept_lines))
                self.jsonl.close()  # it wrote to the file just replaced
                self.jsonl = open(jsonl_path, "a")
        return dropped

    def log_image(self, key, image, step):
        """An image summary (uint8 [H x W x 3], e.g. a sample grid) for TensorBoard, when it is
        installed; rank 0 only. The other writers keep no images."""
        for w in self.writers:
            if hasattr(w, "write_image"):
                w.write_image(key, image, step)

    def log(self, *args):
        """A line on stdout and in log.txt, from rank 0 only."""
        if not dist_util.is_main():
            return
        msg = " ".join(str(a) for a in args)
        print(msg, flush=True)
        if self.text is not None:
            stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
            self._write("log.txt", lambda: (self.text.write(f"[{stamp}] {msg}\n"), self.text.flush()))

    def close(self):
        for f in (self.text, getattr(self, "jsonl", None)):
            if f is not None:
                f.close()


def read_progress(log_dir):
    """
    {step: {column: value}} from LOG_DIR/progress.csv (or a .csv path): numbers only, empty
    and non-finite cells skipped; a step logged twice (after a resume) keeps the last values.
    """
    path = log_dir if str(log_dir).endswith(".csv") else os.path.join(log_dir, "progress.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no progress.csv in {log_dir} (looked for {path})")
    rows = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "step" not in reader.fieldnames:
            raise ValueError(f"{path} has no 'step' column (columns: {reader.fieldnames})")
        for row in reader:
            step = parse_number(row.get("step"))
            if step is None:
                continue
            merged = rows.setdefault(int(step), {})
            for key, cell in row.items():
                value = parse_number(cell)
                if key not in ("step", None) and value is not None:
                    merged[key] = value
    return rows


def progress_series(rows, key):
    """[(step, value), ...] of one column of `read_progress`'s rows, in step order."""
    return [(step, rows[step][key]) for step in sorted(rows) if key in rows[step]]


def _cut_partial_line(path):
    """Cut a file back to its last complete line: a run killed while writing a row leaves a
    partial one, which the next row appended would be glued onto."""
    try:
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    except FileNotFoundError:
        pass


def _replace_file(path, write):
    """Rewrite `path` whole through a temporary file and os.replace: a run killed meanwhile
    leaves the old file or the new one, never a cut one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", newline="") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _rewrite_csv(path, keys, rows):
    """progress.csv as `keys` and `rows`; cells of no column (a row glued onto a cut one by
    earlier versions) are dropped rather than failing the rewrite."""
    def write(f):
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    _replace_file(path, write)


def _jsonl_step(line):
    try:
        return json.loads(line).get("step") or 0
    except (ValueError, AttributeError):
        return 0


def parse_number(cell):
    """A finite float from a CSV cell, or None for an empty, non-numeric or non-finite one."""
    if cell is None or str(cell).strip() == "":
        return None
    try:
        value = float(cell)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


# The original's module-level facade, for scripts and users' code that call logger.logkv(...).
_current = Logger()


def configure(dir=None, stdout=True, tensorboard=True):
    """Point the module-level logger at `dir` (default: $OPENAI_LOGDIR)."""
    global _current
    dir = dir or os.environ.get("OPENAI_LOGDIR")
    _current = Logger(dir, stdout=stdout, tensorboard=tensorboard)
    return _current


def get_current():
    return _current


def get_dir():
    return _current.dir


def logkv(key, value):
    _current.logkv(key, value)


def logkv_mean(key, value):
    _current.logkv_mean(key, value)


def dumpkvs():
    return _current.dumpkvs()


def log(*args):
    _current.log(*args)


def warn(*args):
    _current.log("WARNING:", *args)


def error(*args):
    print("ERROR:", *args, file=sys.stderr, flush=True)
