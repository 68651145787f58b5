"""`megfb clean` / `make clean`: remove what the project generated, and nothing else.

Removed: the virtual environment, build leftovers (build/, *.egg-info), bench.json,
compare.json/.png, the files the trainer writes in runs/<name>/ (then the folders left empty),
the synthetic set's files as listed by data/synthetic.yaml (each only when it is still the
very file the note recorded), the note itself, a data/stats.yaml that `megfb data stats` wrote,
and temporaries of the project's own naming. Kept: real contest files, submission zips, and every file or folder the
project does not know (notes, backups, a README.md anywhere).

Runs with a plain `python3` too (the Makefile calls it before the venv is gone): no MegEngine,
and PyYAML only when it is installed.
"""
import argparse
import contextlib
import glob
import hashlib
import os
import re
import shutil
import sys

# Files `megfb train` writes into runs/<name>/ (latest/best checkpoints, log, curves, config,
# the run lock); anything else a user put there stays.
RUN_FILES = ("config.yaml", "log.jsonl", "latest.mge", "best.mge", "curves.png", ".lock")
DATA_NOTE, STATS = "synthetic.yaml", "stats.yaml"
_PROJECT_TEMP = re.compile(r"^\..+\.\d+-[0-9a-f]{8}\.tmp$")  # megfb.atomic.temp_name
# the mkstemp names of earlier versions, only for files the project itself writes
_OLD_TEMP = re.compile(r"^\.(competition_.+\.bin|synthetic_.+\.bin|synthetic\.yaml|stats\.yaml|latest\.mge|"
                       r"best\.mge|log\.jsonl|curves\.png|config\.yaml|.+\.zip)\.[a-z0-9_]{8}\.tmp$")


def _load_yaml(path):
    try:
        import yaml
    except ImportError:
        return None
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None


def _note_files(note_path):
    """{file name: {bytes, sha256, mtime_ns}} from the synthetic note (PyYAML or a line reader)."""
    note = _load_yaml(note_path)
    if isinstance(note, dict):
        return note.get("files") or {} if note.get("synthetic") is True else {}
    files, current, in_files, synthetic = {}, None, False, False
    try:
        with open(note_path) as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    for line in lines:
        if line.strip() == "synthetic: true":
            synthetic = True
        if line == "files:":
            in_files = True
            continue
        if in_files and not line.startswith(" "):
            in_files = False
        if in_files:
            m = re.match(r"^  (\S+):\s*(\{.*\})?$", line)
            if m:
                current = files.setdefault(m.group(1), {})
                for key, value in re.findall(r"(\w+): ([0-9a-f]+)", m.group(2) or ""):
                    current[key] = value
                continue
            m = re.match(r"^    (\w+): (\S+)$", line)
            if m and current is not None:
                current[m.group(1)] = m.group(2)
    return files if synthetic else {}


def _is_recorded(path, entry):
    """True when `path` is still the file the note recorded (size, then mtime or SHA-256)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    if not os.path.isfile(path) or str(st.st_size) != str(entry.get("bytes")):
        return False
    if str(st.st_mtime_ns) == str(entry.get("mtime_ns")):
        return True
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest() == str(entry.get("sha256"))


def is_megfb_stats(path):
    """A stats.yaml that `megfb data stats` (or the trainer) wrote."""
    stats = _load_yaml(path)
    if isinstance(stats, dict):
        return stats.get("written_by") == "megfb data stats" or {"channels", "mean", "std", "black_level"} <= set(stats)
    try:
        with open(path) as f:
            text = f.read(200000)
    except (OSError, UnicodeDecodeError):
        return False
    return "written_by: megfb data stats" in text


def _temporaries(folder):
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return [os.path.join(folder, n) for n in names if _PROJECT_TEMP.match(n) or _OLD_TEMP.match(n)]


def generated_paths(root=".", venv=".venv"):
    """Everything `clean` would remove under `root`, files before the folders that hold them."""
    out = []
    j = lambda *p: os.path.join(root, *p)  # noqa: E731
    for name in (venv, "build", ".pytest_cache"):
        if os.path.isdir(j(name)) and not os.path.islink(j(name)):
            out.append(j(name))
    out += [p for p in glob.glob(j("*.egg-info")) if os.path.isdir(p)]
    out += [j(name) for name in ("bench.json", "compare.json", "compare.png") if os.path.isfile(j(name))]
    out += _temporaries(root)

    data = j("data")
    if os.path.isdir(data):
        files = _note_files(j("data", DATA_NOTE)) if os.path.isfile(j("data", DATA_NOTE)) else {}
        recorded = [j("data", name) for name, entry in files.items()
                    if isinstance(entry, dict) and os.sep not in name and _is_recorded(j("data", name), entry)]
        out += recorded
        if files and len(recorded) == len(files):  # the note goes only with every file it lists
            out.append(j("data", DATA_NOTE))
        if os.path.isfile(j("data", STATS)) and is_megfb_stats(j("data", STATS)):
            out.append(j("data", STATS))
        out += _temporaries(data)

    if os.path.isdir(j("submit")):
        out += _temporaries(j("submit"))  # submission zips themselves are results: kept

    runs = j("runs")
    if os.path.isdir(runs) and not os.path.islink(runs):
        for run in sorted(os.listdir(runs)):
            folder = os.path.join(runs, run)
            if not os.path.isdir(folder) or os.path.islink(folder):
                continue
            mine = [os.path.join(folder, n) for n in RUN_FILES if os.path.isfile(os.path.join(folder, n))]
            mine += _temporaries(folder)
            out += mine
            if set(os.listdir(folder)) <= {os.path.basename(p) for p in mine}:
                out.append(folder)
    return out


def clean(root=".", venv=".venv", dry_run=False, echo=print):
    """Remove generated_paths(root); returns them. Folders go only once empty (runs/<name>)."""
    paths = generated_paths(root, venv)
    for path in paths:
        echo(("would remove " if dry_run else "removed ") + os.path.relpath(path, root))
        if dry_run:
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            if os.path.basename(os.path.dirname(path)) == "runs":
                with contextlib.suppress(OSError):
                    os.rmdir(path)
            else:
                shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    runs = os.path.join(root, "runs")
    if not dry_run and os.path.isdir(runs) and not os.listdir(runs):
        os.rmdir(runs)
    if not paths:
        echo("nothing to clean")
    return paths


def cmd_clean(args):
    clean(args.root, dry_run=args.dry_run)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m megfb.clean", description=__doc__.splitlines()[0])
    p.add_argument("--root", default=".")
    p.add_argument("--venv", default=".venv")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    clean(args.root, args.venv, args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
