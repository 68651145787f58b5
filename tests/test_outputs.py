"""Outputs never destroy a user's file (issue 12, item 1): an output that is an input, an
existing file, two submits in the same second, bad output places found before any work."""
import datetime
import os

import megengine as mge
import numpy as np
import pytest

from megfb import atomic, infer, submit
from megfb.atomic import atomic_output
from megfb.cli import main
from megfb.errors import MegfbError
from megfb.io import write_bin
from megfb.model import build_model

from helpers import TINY  # noqa: E402


@pytest.fixture
def files(tmp_path):
    mge.random.seed(0)
    mge.save(build_model(TINY).state_dict(), str(tmp_path / "w.mge"))
    (tmp_path / "tiny.yaml").write_text("model: {name: fbrestormer, num_feats: 8, heads: 2, num_blocks: 3, num_steps: 2}\n")
    rng = np.random.default_rng(0)
    for name in ("in.bin", "gt.bin"):
        write_bin(tmp_path / name, rng.integers(2000, 60000, (2, 256, 256)).astype(np.uint16))
    return tmp_path


def _predict(d, output, *extra):
    return main(["predict", "--ckpt", str(d / "w.mge"), "--config", str(d / "tiny.yaml"),
                 "--input", str(d / "in.bin"), "--output", str(output), *extra])


def _one_line_error(capsys):
    err = capsys.readouterr().err
    assert err.startswith("megfb: error: ") and len(err.strip().splitlines()) == 1, err
    return err


def test_predict_refuses_its_own_input_as_output(files, capsys):
    before = (files / "in.bin").read_bytes()
    assert _predict(files, files / "in.bin") == 1
    assert "also an input" in _one_line_error(capsys)
    assert _predict(files, files / "in.bin", "--force") == 1  # --force never allows it
    os.symlink(files / "in.bin", files / "link.bin")  # nor through another name
    assert _predict(files, files / "link.bin", "--force") == 1
    assert (files / "in.bin").read_bytes() == before


def test_predict_refuses_an_existing_file_unless_force(files, capsys):
    gt = (files / "gt.bin").read_bytes()
    assert _predict(files, files / "gt.bin") == 1
    assert "already exists; pass --force" in _one_line_error(capsys)
    assert (files / "gt.bin").read_bytes() == gt
    assert _predict(files, files / "gt.bin", "--force") == 0
    assert (files / "gt.bin").read_bytes() != gt


def test_stats_refuses_to_write_over_its_input(files, capsys):
    data = files / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    for name in ("competition_train_input.0.2.bin", "competition_train_gt.0.2.bin"):
        write_bin(data / name, rng.integers(2000, 60000, (4, 256, 256)).astype(np.uint16))
    before = (data / "competition_train_input.0.2.bin").read_bytes()
    out = str(data / "competition_train_input.0.2.bin")
    for extra in ([], ["--force"]):
        assert main(["data", "stats", "--data-dir", str(data), "--out", out, *extra]) == 1
        assert "also an input" in _one_line_error(capsys)
    assert (data / "competition_train_input.0.2.bin").read_bytes() == before
    (files / "mine.yaml").write_text("my notes\n")
    assert main(["data", "stats", "--data-dir", str(data), "--out", str(files / "mine.yaml")]) == 1
    assert "already exists" in _one_line_error(capsys)
    # its own stats.yaml is the project's file: rewritten without --force
    assert main(["data", "stats", "--data-dir", str(data)]) == 0
    assert main(["data", "stats", "--data-dir", str(data)]) == 0


@pytest.mark.parametrize("where", ["missing", "file_as_folder", "folder", "read_only"])
def test_output_place_is_checked_before_any_work(files, capsys, monkeypatch, where):
    def no_work(*a, **k):
        raise AssertionError("predicted before checking the output place")

    monkeypatch.setattr(infer, "predict_bin", no_work)
    monkeypatch.setattr(infer, "read_bin", lambda p: None)  # input validation is not under test
    (files / "plain.txt").write_text("")
    if where == "read_only" and not os.path.isdir("/sys/kernel"):
        pytest.skip("no read-only /sys here")
    output = {"missing": files / "nowhere" / "out.bin", "file_as_folder": files / "plain.txt" / "out.bin",
              "folder": files, "read_only": "/sys/kernel/megfb-out.bin"}[where]
    if where == "read_only" and os.geteuid() != 0:
        ro = files / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        output = ro / "out.bin"
    import megfb.checkpoint

    monkeypatch.setattr(megfb.checkpoint, "model_from_checkpoint", no_work)
    assert _predict(files, output) == 1
    err = _one_line_error(capsys)
    assert {"missing": "does not exist", "file_as_folder": "is a file, not a folder", "folder": "is a folder",
            "read_only": "cannot be written"}[where] in err


def test_atomic_new_file_never_replaces(tmp_path):
    from megfb.atomic import atomic_new_file

    target = tmp_path / "run-20260101-000000.zip"
    names = []
    for content in (b"one", b"two", b"three"):
        with atomic_new_file(target) as new:
            with open(new.tmp, "wb") as f:
                f.write(content)
        names.append(os.path.basename(new.path))
    assert names == ["run-20260101-000000.zip", "run-20260101-000000-2.zip", "run-20260101-000000-3.zip"]
    assert [open(tmp_path / n, "rb").read() for n in names] == [b"one", b"two", b"three"]
    assert sorted(os.listdir(tmp_path)) == sorted(names)  # no temporaries left


def test_two_submits_in_the_same_second_both_survive(files, monkeypatch, capsys):
    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 1, 12, 0, 0)

    monkeypatch.setattr(submit.datetime, "datetime", Frozen)
    out = files / "submit"
    out.mkdir()
    (out / "w-20260101-120000.zip").write_bytes(b"the zip another submit wrote this second")
    assert main(["submit", "--ckpt", str(files / "w.mge"), "--config", str(files / "tiny.yaml"),
                 "--input", str(files / "in.bin"), "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["w-20260101-120000-2.zip", "w-20260101-120000.zip"]
    assert (out / "w-20260101-120000.zip").read_bytes() == b"the zip another submit wrote this second"
    assert "wrote " + str(out / "w-20260101-120000-2.zip") in capsys.readouterr().out


def test_stale_temporaries_are_swept_live_ones_kept(tmp_path):
    from megfb.atomic import temp_name

    dead = tmp_path / temp_name("latest.mge", pid=2 ** 22 + 11)  # above any pid_max: never alive
    live = tmp_path / temp_name("latest.mge", pid=1)
    foreign = tmp_path / ".latest.mge.notours.tmp"
    for p in (dead, live, foreign):
        p.write_bytes(b"partial")
    with atomic_output(tmp_path / "latest.mge") as tmp, open(tmp, "w") as f:
        f.write("new")
    assert not dead.exists() and live.exists() and foreign.exists()
    assert (tmp_path / "latest.mge").read_text() == "new"


def test_submit_temporary_folder_of_a_dead_process_is_swept(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic.tempfile, "gettempdir", lambda: str(tmp_path))
    stale = tmp_path / f"megfb-submit-{2 ** 22 + 5}-abc"
    stale.mkdir()
    (stale / "result.bin").write_bytes(b"x")
    with atomic.temporary_directory("submit") as tmp:
        assert os.path.basename(tmp).startswith(f"megfb-submit-{os.getpid()}-")
    assert not stale.exists()


def test_check_output_accepts_a_new_file(tmp_path):
    from megfb.atomic import check_output

    assert check_output(str(tmp_path / "new.bin"), inputs=(str(tmp_path / "in.bin"),)) == str(tmp_path / "new.bin")
    with pytest.raises(MegfbError):
        check_output(str(tmp_path))


def test_prediction_inputs_are_read_once_not_memory_mapped(files, monkeypatch):
    """A file truncated while predict/submit run cannot end the process with SIGBUS: the input
    is in memory before the model runs (the eval/predict leftover of the memmap reads)."""
    from megfb import io

    seen = {}

    def truncate_then_predict(model, noisy, *a, **k):
        os.truncate(files / "in.bin", 1000)  # another program truncates the input mid-run
        seen["type"] = type(noisy)
        return np.asarray(noisy) + 0

    monkeypatch.setattr(infer, "predict_mosaics", truncate_then_predict)
    assert _predict(files, files / "out.bin") == 0
    assert seen["type"] is np.ndarray  # not an np.memmap
    monkeypatch.setattr(io, "count_patches", lambda p: 2)  # sized before, truncated while read
    with pytest.raises(MegfbError, match="in.bin changed while it was read"):
        io.load_bin(files / "in.bin")


def test_denoise_output_place_and_inputs_through_links(files, capsys):
    """The merged `megfb denoise` follows the same output rules: its input is never replaced,
    not even through a link with --force; a file given as --out-dir is one line before work."""
    ckpt = ["--ckpt", str(files / "w.mge"), "--config", str(files / "tiny.yaml")]
    (files / "plain.txt").write_text("")
    assert main(["denoise", str(files / "in.bin"), "-o", str(files / "plain.txt")] + ckpt) == 1
    assert "plain.txt is a file, not a folder" in _one_line_error(capsys)
    out = files / "out"
    out.mkdir()
    os.symlink(files / "in.bin", out / "in.denoised.bin")  # the output name is a link to the input
    before = (files / "in.bin").read_bytes()
    assert main(["denoise", str(files / "in.bin"), "-o", str(out), "--force"] + ckpt) == 1
    assert "refusing to overwrite the input" in _one_line_error(capsys)
    assert (files / "in.bin").read_bytes() == before


def test_compare_checks_its_output_place_first(tmp_path, capsys):
    assert main(["compare", "--quick", "--out", str(tmp_path / "nowhere" / "c.json")]) == 1
    assert "does not exist" in _one_line_error(capsys)
