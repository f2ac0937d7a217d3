"""Security: hostile tar member names, unsafe deserialisation, malicious weights files.

* prepare/extract never extract tar members to disk: a member called ``../x.jpg`` or ``/abs/x.jpg``
  is a key string, and no file appears outside the output directories (checked over the whole
  pytest base directory and at the absolute path);
* the project's code never deserialises with pickle (``torch.load`` always has ``weights_only=True``;
  no ``pickle``/``marshal``/``eval``/``exec``/unsafe ``yaml``/``allow_pickle``/``tarfile.extract``) —
  checked on the syntax tree of every project module;
* a crafted pickle that would run code (here: create a marker directory) passed as ``--weights`` to
  the timm, open_clip, EfficientNet and k-means teachers is refused with exit 2 and never executed;
  the same file swapped in under a cache's recorded weights is refused by ``verify``.
"""

from __future__ import annotations

import ast
import io
import os
import pickle
import tarfile
import uuid
from pathlib import Path

import pytest
import torch
from PIL import Image

import cli

REPO = Path(__file__).resolve().parent.parent
PROJECT_CODE = ["teacher_cache", "student", "pipelines", "cli.py", "scripts", "bench"]


# ---------------------------------------------------------------------------------------------
# hostile member names


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 20), color).save(buf, "JPEG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data)
    tf.addfile(info, io.BytesIO(data) if data else None)


def _files_under(path: Path) -> set[str]:
    return {os.path.join(d, f) for d, _, files in os.walk(path) for f in files}


def test_hostile_member_names_never_leave_the_output(tmp_path, monkeypatch, capsys):
    tag = uuid.uuid4().hex[:10]
    abs_dir = Path("/tmp") / f"digpt-escape-{tag}"
    names = [f"../evil_{tag}", f"../../evil_{tag}", f"{abs_dir}/evil_{tag}", f"a/../../evil_{tag}", f"ok_{tag}"]
    raw = tmp_path / "raw"
    raw.mkdir()
    with tarfile.open(raw / "hostile.tar", "w", format=tarfile.PAX_FORMAT) as tf:
        for i, name in enumerate(names):
            _add(tf, f"{name}.jpg", _jpeg((40 * i, 90, 200)))
            _add(tf, f"{name}.cls", b"1")
        _add(tf, f"link_{tag}.jpg", kind=tarfile.SYMTYPE, link="/etc/passwd")  # never followed
        _add(tf, f"hard_{tag}.jpg", kind=tarfile.LNKTYPE, link=f"ok_{tag}.jpg")
        _add(tf, f"dev_{tag}.jpg", kind=tarfile.CHRTYPE)
    work = tmp_path / "work" / "deeper"  # relative paths, if ever written, would land in tmp_path
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    base = tmp_path.parent  # pytest's base directory for this session: every test's tmp_path
    before = _files_under(base)

    ds, cache = tmp_path / "ds", tmp_path / "cache"
    assert cli.main(["prepare", "wds", str(raw / "hostile.tar"), "--out", str(ds)]) == 0
    assert (
        cli.main(
            ["extract", "--shards", str(ds), "--out", str(cache), "--teacher", "pixel:32/8", "--executor", "local"]
        )
        == 0
    )
    assert cli.main(["verify", "--shards", str(ds), "--cache", str(cache), "--spot-checks", "2"]) == 0

    new = _files_under(base) - before
    outside = sorted(p for p in new if not (p.startswith(f"{ds}{os.sep}") or p.startswith(f"{cache}{os.sep}")))
    assert not outside, f"files written outside the outputs: {outside}"
    assert not abs_dir.exists()
    assert not [p for p in new if f"evil_{tag}" in os.path.basename(p) or f"ok_{tag}" in os.path.basename(p)]

    from teacher_cache.dataset import load_dataset

    keys = load_dataset(str(ds)).manifest.column("key").to_pylist()
    assert keys == names  # the names are only keys; links and devices are not samples
    import zarr

    tok = zarr.open_group(str(cache), mode="r")["pixel_32_8"]
    ((_, g),) = tok.groups()
    assert [str(k) for k in g["keys"][:]] == names and g["valid"][:].all()


# ---------------------------------------------------------------------------------------------
# no unsafe deserialisation anywhere in the project's code

_FORBIDDEN_CALLS = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("pickle", "Unpickler"),
    ("cPickle", "load"),
    ("cPickle", "loads"),
    ("dill", "load"),
    ("dill", "loads"),
    ("cloudpickle", "load"),
    ("cloudpickle", "loads"),
    ("marshal", "load"),
    ("marshal", "loads"),
    ("shelve", "open"),
    ("joblib", "load"),
    ("yaml", "unsafe_load"),
    ("yaml", "full_load"),
    ("yaml", "unsafe_load_all"),
    ("pd", "read_pickle"),
    ("pandas", "read_pickle"),
    ("jit", "load"),
}
_FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _kw(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _unsafe_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in _FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in _FORBIDDEN_MODULES:
                found.append(f"{where} from {node.module} import ...")
            if node.module == "torch" and any(a.name == "load" for a in node.names):
                found.append(f"{where} from torch import load (hides the weights_only check)")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            parts = tuple(name.split("."))
            builtin = name in ("eval", "exec", "compile", "__import__", "builtins.eval", "builtins.exec")
            if builtin or parts[-2:] in _FORBIDDEN_CALLS:
                found.append(f"{where} {name}(...)")
            elif name == "torch.load":
                wo = _kw(node, "weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    found.append(f"{where} torch.load without weights_only=True")
            elif parts[-2:] == ("yaml", "load") or parts[-2:] == ("yaml", "load_all"):
                loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
                if loader is None or "Safe" not in _dotted(loader):
                    found.append(f"{where} {name} without a SafeLoader")
            elif parts[-1] == "load" and parts[0] in ("np", "numpy"):
                ap = _kw(node, "allow_pickle")
                if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                    found.append(f"{where} {name}(allow_pickle=...)")
            elif parts[-1] == "extractall" or (parts[-1] == "extract" and ("tar" in name or "zip" in name)):
                found.append(f"{where} {name}(...) writes tar members to disk")
            elif parts[-1] in ("run", "Popen", "call", "check_call", "check_output", "system"):
                shell = _kw(node, "shell")
                if (isinstance(shell, ast.Constant) and shell.value is True) or name == "os.system":
                    found.append(f"{where} {name} through a shell")
    return found


def _project_files() -> list[Path]:
    files: list[Path] = []
    for item in PROJECT_CODE:
        p = REPO / item
        files += [p] if p.is_file() else sorted(p.rglob("*.py")) if p.is_dir() else []
    return files


def test_no_unsafe_deserialisation_in_project_code():
    files = _project_files()
    assert len(files) > 20, files  # the scan really covers the packages
    problems = [p for f in files for p in _unsafe_calls(f)]
    assert not problems, "unsafe loading / execution in project code:\n" + "\n".join(problems)


def test_scanner_catches_what_it_should(tmp_path):
    """The checker itself: each bad pattern in a decoy module is reported, the safe forms are not."""
    decoy = tmp_path / "decoy.py"
    decoy.write_text(
        "import pickle, yaml, torch, numpy as np, tarfile\n"
        "torch.load('a')\ntorch.load('a', weights_only=False)\ntorch.load('a', map_location='cpu', weights_only=True)\n"
        "pickle.loads(b'')\nyaml.load(s)\nyaml.load(s, Loader=yaml.SafeLoader)\neval('1')\nm.eval()\n"
        "np.load('x', allow_pickle=True)\nnp.load('x')\ntarfile.open('t').extractall('/')\nexec('x=1')\n"
    )
    found = _unsafe_calls(decoy)
    lines = sorted(int(f.split(":")[1].split()[0]) for f in found)
    assert lines == [1, 2, 3, 5, 6, 8, 10, 12, 13], found


# ---------------------------------------------------------------------------------------------
# malicious weights files


class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``: the proof that a loader executed the file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _malicious(path: Path, marker: Path, fmt: str) -> str:
    p = _Payload(str(marker))  # one object (pickle memoises it): the payload runs once when loaded
    payload = {"patch_embed.proj.weight": p, "state_dict": p}
    if fmt == "zip":  # torch.save's default zip archive
        torch.save(payload, path)
    elif fmt == "legacy":  # torch's pre-1.6 format
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:  # a bare pickle stream under any name, .safetensors included
        path.write_bytes(pickle.dumps(payload))
    return str(path)


def test_payload_is_live(tmp_path):
    """Control: the crafted files DO run code when unpickled unsafely, so 'no marker' below means refused."""
    for fmt in ("zip", "legacy", "raw"):
        marker = tmp_path / f"control-{fmt}"
        path = _malicious(tmp_path / f"w-{fmt}.pt", marker, fmt)
        if fmt == "raw":
            pickle.loads(Path(path).read_bytes())
        else:  # deliberately unsafe, test-only: proves the payload (it only makes a dir under tmp_path) is live
            torch.load(path, weights_only=False)
        assert marker.is_dir()


@pytest.mark.parametrize(
    "teacher", ["timm:vit_tiny_test", "openclip:tiny", "efficientnet_lite0", "kmeans:timm:vit_tiny_test"]
)
@pytest.mark.parametrize("fmt,suffix", [("zip", ".pth"), ("legacy", ".bin"), ("raw", ".pt"), ("raw", ".safetensors")])
def test_malicious_weights_are_refused_not_run(teacher, fmt, suffix, tiny_dataset, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    weights = _malicious(tmp_path / f"evil{suffix}", marker, fmt)
    out = tmp_path / "cache"
    capsys.readouterr()
    rc = cli.main(
        [
            "extract",
            "--shards",
            tiny_dataset,
            "--out",
            str(out),
            "--teacher",
            teacher,
            "--weights",
            weights,
            "--executor",
            "local",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert not marker.exists(), "the malicious pickle was executed"
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and weights in err, err
    assert "weights_only=False" not in err  # never advises the user to load unsafely
    assert not out.exists()


def test_verify_refuses_swapped_in_malicious_weights(tiny_dataset, tmp_path, capsys):
    """The cache records its weights file; verify rebuilds the teacher from it. A file swapped for a
    malicious one is refused (a failed check), never executed."""
    from teacher_cache.teachers import create_teacher

    weights = tmp_path / "vit.pth"
    torch.save(create_teacher("timm:vit_tiny_test").model.state_dict(), weights)
    cache = tmp_path / "cache"
    assert (
        cli.main(
            [
                "extract",
                "--shards",
                tiny_dataset,
                "--out",
                str(cache),
                "--teacher",
                "timm:vit_tiny_test",
                "--weights",
                str(weights),
                "--executor",
                "local",
            ]
        )
        == 0
    )
    marker = tmp_path / "PWNED"
    _malicious(weights, marker, "zip")
    capsys.readouterr()
    assert cli.main(["verify", "--shards", tiny_dataset, "--cache", str(cache), "--spot-checks", "2"]) == 1
    out = capsys.readouterr().out
    assert not marker.exists(), "the malicious pickle was executed"
    assert any(
        line.startswith("FAIL") and "teacher rebuilds" in line and str(weights) in line for line in out.splitlines()
    ), out
