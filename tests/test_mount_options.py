"""p2pfs the way Linux runs services (issue 12, acceptance 6): `-o` options,
`mount -t fuse.p2pfs KEY DIR -o ...` and an fstab line through mount.fuse3,
and the systemd user units.

mount(8) looks for the program `p2pfs` (the type's subtype) in a fixed PATH
(/usr/local/bin, /usr/bin, ...): the tests that run mount(8) do it in a
private mount namespace (`unshare -m`) where a directory holding the console
script pip makes from pyproject.toml is bound over /usr/local/bin, so nothing
changes outside.  Every mount is undone in the same script.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib

import pytest

from helpers import REPO, cli_env, create, make_tree, run_cli
from p2pfs.cli import mount_helper_argv
from p2pfs.errors import UsageError
from p2pfs.mount import parse_mount_options
from test_mount import mount_layers, mounted, wait_until

needs_root_mount = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mount.fuse3") is None or shutil.which("unshare") is None,
    reason="needs root, mount.fuse3 (fuse3) and unshare (util-linux)")


def test_mount_options_as_mount_and_fstab_give_them():
    assert parse_mount_options(["nonempty"]).allow_non_empty
    o = parse_mount_options(["ro,allow_other,timeout=5,cache_size=100M,dev,suid",
                             "peer=127.0.0.11:7640,peer=127.0.0.12:7640,no_lan,noexec,noatime",
                             "rw,noauto,_netdev,nofail,x-systemd.automount,user,home=/srv/p2pfs,"
                             "listen=0.0.0.0:7640,bootstrap=127.0.0.19:7640,comment=anything"])
    assert o.allow_other and o.timeout == "5" and o.cache_size == "100M"
    assert o.peers == ["127.0.0.11:7640", "127.0.0.12:7640"] and o.lan is False and o.dht is None
    assert o.kernel == ["noexec", "noatime"] and o.home == "/srv/p2pfs"
    assert o.listen == "0.0.0.0:7640" and o.bootstrap == ["127.0.0.19:7640"]
    for bad in ("writeback", "timeout", "peer=", "max_read=4096", "suid=1"):
        with pytest.raises(UsageError, match="unknown mount option"):
            parse_mount_options([bad])


def test_mount_helper_calling_convention():
    key = "p2pfs://" + "y" * 52
    assert mount_helper_argv([key, "/mnt", "-o", "ro,allow_other,dev,suid"]) == \
        ["mount", key, "/mnt", "-o", "ro,allow_other,dev,suid", "--daemon"]
    assert mount_helper_argv([key, "/mnt", "-oro", "-f", "-n"]) == ["mount", key, "/mnt", "-o", "ro"]
    assert mount_helper_argv(["y" * 52 + "@3", "/mnt"]) == ["mount", "y" * 52 + "@3", "/mnt", "--daemon"]
    assert mount_helper_argv(["mount", key, "/mnt"]) is None       # a command, as always
    assert mount_helper_argv(["ls", key]) is None
    assert mount_helper_argv(["--home", "/h", "ls", key]) is None
    assert mount_helper_argv(["mout", "/mnt"]) is None             # a typo stays a usage error
    with pytest.raises(UsageError):
        mount_helper_argv([key, "/mnt", "--weird"])


def test_mount_dash_o(tmp_path, home):
    src = make_tree(tmp_path / "src", files=10)
    key = create(home, src)
    mnt = tmp_path / "mnt"
    with mounted(home, key, mnt, "-o", "ro,allow_other,noexec,timeout=5,cache_size=10M,dev,suid"):
        with open("/proc/self/mountinfo") as f:
            line = next(l for l in f if f" {mnt} " in l)
        assert "fuse.p2pfs" in line and "allow_other" in line and "noexec" in line
        assert "nosuid" in line and "nodev" in line  # dev,suid from mount(8) are not honoured
        assert (mnt / "run.sh").read_bytes() == (src / "run.sh").read_bytes()
    r = run_cli(home, "mount", key, mnt, "-o", "bogus", check=False)
    assert r.returncode == 2 and "unknown mount option 'bogus'" in r.stderr
    (mnt / "here.txt").write_text("hidden by the mount")
    r = run_cli(home, "mount", key, mnt, check=False)
    assert r.returncode == 2 and "not empty" in r.stderr
    with mounted(home, key, mnt, "-o", "nonempty"):
        assert (mnt / "run.sh").exists() and not (mnt / "here.txt").exists()


def _console_script(bin_dir) -> None:
    """`p2pfs` as pip writes a console script for pyproject.toml's entry point."""
    entry = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["p2pfs"]
    module, func = entry.split(":")
    bin_dir.mkdir()
    script = bin_dir / "p2pfs"
    script.write_text(f"#!{sys.executable}\n# -*- coding: utf-8 -*-\nimport re\nimport sys\n"
                      f"from {module} import {func}\nif __name__ == '__main__':\n"
                      "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
                      f"    sys.exit({func}())\n")
    script.chmod(0o755)


def _in_mount_namespace(tmp_path, script: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    _console_script(bin_dir)
    full = f"set -eu\nmount --bind {bin_dir} /usr/local/bin\n{script}"
    return subprocess.run(["unshare", "-m", "--propagation", "private", "bash", "-c", full],
                          capture_output=True, text=True, env=cli_env(), cwd=tmp_path, timeout=120)


@needs_root_mount
def test_acceptance_6_mount_t_fuse_p2pfs_and_an_fstab_line(tmp_path, home):
    src = make_tree(tmp_path / "src", files=30)
    key = create(home, src)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# a test-owned fstab\np2pfs://{key} {b} fuse.p2pfs "
                     f"ro,allow_other,noauto,nofail,home={home},no_lan,no_dht 0 0\n")
    status = f"{sys.executable} -m p2pfs --home {home} status --json"
    r = _in_mount_namespace(tmp_path, f"""
mount -t fuse.p2pfs {key} {a} -o ro,allow_other,home={home},no_lan,no_dht
grep -F " {a} " /proc/self/mountinfo
diff -r --no-dereference {src} {a} && echo SAME-A
mount -T {fstab} {b}
grep -F " {b} " /proc/self/mountinfo
diff -r --no-dereference {src} {b} && echo SAME-B
{status} > {tmp_path}/running.json
umount {a}
umount {b}
for i in $(seq 100); do [ "$({status})" = "[]" ] && break; sleep 0.1; done
{status} > {tmp_path}/after.json
grep -F " fuse.p2pfs " /proc/self/mountinfo | grep -c -F -e " {a} " -e " {b} " || true
""")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert "SAME-A" in lines and "SAME-B" in lines, r.stdout + r.stderr
    mounts = [l for l in lines if "fuse.p2pfs" in l]
    assert len(mounts) == 2 and all("allow_other" in l and f"p2pfs://{key}" in l for l in mounts)
    running = json.loads((tmp_path / "running.json").read_text())
    assert sorted(s["mountpoint"] for s in running) == sorted([str(a), str(b)])
    assert all(s["kind"] == "mount" for s in running)
    assert json.loads((tmp_path / "after.json").read_text()) == []  # both exited cleanly
    assert lines[-1] == "0"
    for pid in (s["pid"] for s in running):
        wait_until(lambda: not os.path.exists(f"/proc/{pid}"), what=f"mount process {pid} to end")
    assert mount_layers(a) == [] and mount_layers(b) == []


def test_acceptance_6_the_systemd_units_verify(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("needs systemd-analyze (apt-get install systemd; scripts/setup-env.sh does)")
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = {**cli_env(), "XDG_RUNTIME_DIR": str(runtime)}
    shipped = REPO / "p2pfs" / "systemd"
    installed = tmp_path / "units"
    out = run_cli(tmp_path / "home", "units", "--install", "--dir", installed).out
    names = sorted(p.name for p in shipped.glob("*.service"))
    assert names == ["p2pfs-mount@.service", "p2pfs-seed.service", "p2pfs-seed@.service",
                     "p2pfs-share@.service"]
    assert sorted(p.name for p in installed.iterdir()) == names and "installed" in out
    for unit_dir in (shipped, installed):
        work = tmp_path / f"verify-{unit_dir.name}"
        work.mkdir()
        for name in names:
            shutil.copy(unit_dir / name, work / name)
        instances = ["p2pfs-seed.service", "p2pfs-seed@" + "y" * 52 + ".service",
                     "p2pfs-mount@" + "y" * 52 + ".service",
                     "p2pfs-share@" + subprocess.run(["systemd-escape", "--path", str(tmp_path)],
                                                     capture_output=True, text=True,
                                                     check=True).stdout.strip() + ".service"]
        for inst in instances:
            if "@" in inst and not (work / inst).exists():
                os.symlink(inst.split("@")[0] + "@.service", work / inst)
            v = subprocess.run(["systemd-analyze", "verify", "--user", str(work / inst)],
                               capture_output=True, text=True, env=env)
            assert v.returncode == 0 and v.stderr.strip() == "", (unit_dir, inst, v.stderr)
    text = (installed / "p2pfs-seed@.service").read_text()
    assert "/usr/bin/env p2pfs" not in text and "p2pfs seed %i" in text
    # the check is not vacuous: a unit whose program is missing fails
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "p2pfs-seed.service").write_text(
        (shipped / "p2pfs-seed.service").read_text().replace("/usr/bin/env p2pfs", "/nonexistent/p2pfs"))
    v = subprocess.run(["systemd-analyze", "verify", "--user", str(broken / "p2pfs-seed.service")],
                       capture_output=True, text=True, env=env)
    assert v.returncode != 0 and "not executable" in v.stderr
