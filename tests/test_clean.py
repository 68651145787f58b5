"""`megfb clean` / `make clean` remove only what the project generated (issue 12, item 1)."""
import os
import subprocess

import numpy as np
import yaml

from megfb.cli import main
from megfb.io import FILE_NAMES, write_bin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _project(root, real_train=False):
    """A project folder as a user leaves it: a synthetic set (one file replaced by a real one
    when real_train), a personal note, a backup folder, submission zips, runs with a user file."""
    data = root / "data"
    data.mkdir(parents=True)
    (data / "README.md").write_text("contest files go here\n")
    files = {}
    for i, name in enumerate(FILE_NAMES.values()):
        write_bin(data / name, np.full((1, 256, 256), i, np.uint16))
        st = os.stat(data / name)
        files[name] = {"bytes": st.st_size, "patches": 1, "sha256": "0" * 64, "mtime_ns": st.st_mtime_ns}
    (data / "synthetic.yaml").write_text(yaml.safe_dump({"synthetic": True, "files": files}))
    if real_train:  # the user put the real contest file in place of the generated one
        write_bin(data / FILE_NAMES["train_input"], np.full((1, 256, 256), 77, np.uint16))
    (data / "stats.yaml").write_text(yaml.safe_dump({"written_by": "megfb data stats", "channels": ["R"],
                                                     "mean": [0.1] * 4, "std": [0.1] * 4, "black_level": {}}))
    (data / "my_notes.txt").write_text("do not lose me\n")
    (data / "backup").mkdir()
    (data / "backup" / "README.md").write_text("a README in a subfolder\n")
    (data / "backup" / "competition_train_input.0.2.bin").write_bytes(b"\1" * 10)
    (data / f".competition_train_gt.0.2.bin.{2 ** 22 + 7}-0123abcd.tmp").write_bytes(b"partial")
    (root / "submit").mkdir()
    (root / "submit" / "README.md").write_text("zips\n")
    (root / "submit" / "quickstart-20261122-013512.zip").write_bytes(b"PK")
    run = root / "runs" / "quickstart"
    run.mkdir(parents=True)
    for name in ("config.yaml", "log.jsonl", "latest.mge", "best.mge", "curves.png"):
        (run / name).write_bytes(b"x")
    other = root / "runs" / "mine"
    other.mkdir()
    (other / "latest.mge").write_bytes(b"x")
    (other / "analysis.ipynb").write_text("{}")
    (root / "bench.json").write_text("{}")
    (root / ".venv").mkdir()
    (root / ".venv" / "pyvenv.cfg").write_text("")


def _all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_clean_removes_only_generated_files(tmp_path, capsys):
    _project(tmp_path)
    assert main(["clean", "--root", str(tmp_path), "--dry-run"]) == 0
    assert "would remove" in capsys.readouterr().out
    assert (tmp_path / "runs" / "quickstart" / "best.mge").exists()  # a dry run removes nothing
    assert main(["clean", "--root", str(tmp_path)]) == 0
    assert _all_files(tmp_path) == [
        "data/README.md", "data/backup/README.md", "data/backup/competition_train_input.0.2.bin",
        "data/my_notes.txt", "runs/mine/analysis.ipynb", "submit/README.md",
        "submit/quickstart-20261122-013512.zip"]
    assert not (tmp_path / "runs" / "quickstart").exists() and not (tmp_path / ".venv").exists()


def test_clean_keeps_real_contest_files_and_the_note_that_lists_them(tmp_path):
    from megfb import clean as cleaner

    _project(tmp_path, real_train=True)
    cleaner.clean(str(tmp_path), echo=lambda line: None)
    left = _all_files(tmp_path)
    assert "data/competition_train_input.0.2.bin" in left  # not the file the note recorded
    assert "data/synthetic.yaml" in left  # still describes a file that is there
    assert "data/competition_train_gt.0.2.bin" not in left


def test_clean_keeps_a_stats_file_it_did_not_write(tmp_path):
    from megfb import clean as cleaner

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "stats.yaml").write_text("my own statistics: [1, 2]\n")
    cleaner.clean(str(tmp_path), echo=lambda line: None)
    assert (tmp_path / "data" / "stats.yaml").exists()


def test_make_clean_calls_megfb_clean():
    out = subprocess.run(["make", "-n", "clean"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "megfb.clean" in out and "-delete" not in out and "rm -rf" not in out
