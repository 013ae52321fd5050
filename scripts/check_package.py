"""The package as a new user gets it, from a clean copy of the repository (``make package-check``).

1. Copies the repository's files (tracked, and untracked ones git does not ignore) to a
   temporary folder: nothing built here (.venv, build/, the in-place _C) can leak in.
2. Builds the sdist there with torch made unimportable (an sdist must not need it), and
   checks it carries what the wheel build reads (requirement files, csrc/ sources and headers,
   the build description, README, LICENSE) and no binary.
3. Builds a wheel from that sdist against this interpreter's torch, without build isolation,
   and checks its metadata (torch pinned to the version compiled against, Python >= 3.11,
   licence, extras) and that its _C carries no debug information.
4. Installs the wheel into a temporary target folder and, from a folder outside the source
   tree, imports it: ``python -m xclip_kernels`` must show the cpp backend running on the CPU,
   and one op must match the reference.
5. Builds with pip's default (isolated) build: it must fail within the time limit with the
   message naming `pip install --no-build-isolation .`.

Prints what it checked and how long each step took; exits non-zero at the first failure.
"""

from __future__ import annotations

import argparse
import email.parser
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKING_COMMAND = "pip install --no-build-isolation ."


def fail(what: str) -> None:
    sys.exit(f"package-check: FAILED: {what}")


def ok(what: str) -> None:
    print(f"  ok: {what}", flush=True)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything that would put the source tree on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(extra)
    return env


def run(args: list[str], cwd: str, env: dict[str, str] | None = None, timeout: float = 900) -> str:
    result = subprocess.run(args, cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        print(result.stdout[-4000:], result.stderr[-4000:], sep="\n", file=sys.stderr)
        fail(f"`{' '.join(args)}` exited with {result.returncode}")
    return result.stdout


def step(title: str):  # noqa: ANN201
    print(f"package-check: {title}", flush=True)
    return time.perf_counter()


def done(start: float) -> None:
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)


def copy_repository(dest: str) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = os.path.join(ROOT, name)
        if not os.path.isfile(source):  # deleted in the work tree
            continue
        target = os.path.join(dest, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(source, "rb") as src, open(target, "wb") as out:
            out.write(src.read())


def check_sdist(copy: str, work: str) -> str:
    # A torch that cannot be imported, first on the path: the sdist must be made without it.
    blocker = os.path.join(work, "no-torch")
    os.makedirs(os.path.join(blocker, "torch"))
    with open(os.path.join(blocker, "torch", "__init__.py"), "w", encoding="utf-8") as f:
        f.write('raise ImportError("package-check: building an sdist must not import torch")\n')
    dist = os.path.join(work, "sdist")
    run([sys.executable, "setup.py", "-q", "sdist", "-d", dist], cwd=copy, env=clean_env(PYTHONPATH=blocker))
    (sdist,) = glob.glob(os.path.join(dist, "*.tar.gz"))
    ok(f"sdist built without importing torch: {os.path.basename(sdist)}")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    csrc = {os.path.relpath(p, copy) for pattern in ("*.h", "*.cpp", "*.inc", "*.cu", "*.cuh", "*.json")
            for p in glob.glob(os.path.join(copy, "csrc", "**", pattern), recursive=True)}
    needed = {"setup.py", "pyproject.toml", "README.md", "LICENSE", "requirements.txt", "requirements-test.txt",
              "requirements-peers.txt", "xclip_kernels/__init__.py", "xclip/__init__.py", *csrc}
    missing = sorted(needed - names)
    if missing:
        fail(f"the sdist lacks {', '.join(missing)} (MANIFEST.in)")
    ok(f"the sdist has the requirement files, README, LICENSE and all {len(csrc)} files under csrc/")
    binaries = sorted(n for n in names if n.endswith((".so", ".o", ".pyc")))
    if binaries:
        fail(f"the sdist carries built files: {', '.join(binaries)}")
    ok("the sdist carries no built file")
    return sdist


def check_wheel(sdist: str, work: str) -> str:
    import torch

    wheels = os.path.join(work, "wheels")
    run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--quiet", "-w", wheels, sdist],
        cwd=work)
    (wheel,) = glob.glob(os.path.join(wheels, "*.whl"))
    ok(f"wheel built from the sdist against torch {torch.__version__}: {os.path.basename(wheel)}")
    with zipfile.ZipFile(wheel) as archive:
        (metadata_name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = email.parser.Parser().parsestr(archive.read(metadata_name).decode())
        extension = [n for n in archive.namelist() if n.startswith("xclip_kernels/_C") and n.endswith(".so")]
        if len(extension) != 1:
            fail(f"the wheel should hold one xclip_kernels/_C*.so, holds {extension}")
        library = archive.read(extension[0])
    requires = metadata.get_all("Requires-Dist") or []
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    if torch_pin not in requires:
        fail(f"the wheel should require {torch_pin} (the torch it was compiled against), requires {requires}")
    ok(f"the wheel requires {torch_pin}, the torch it was compiled against")
    if metadata["Requires-Python"] != ">=3.11":
        fail(f"Requires-Python should be >=3.11, is {metadata['Requires-Python']}")
    licence = metadata["License-Expression"] or metadata["License"]
    if licence != "MIT" or "LICENSE" not in (metadata.get_all("License-File") or []):
        fail(f"the wheel's licence should be MIT with LICENSE, is {licence}, {metadata.get_all('License-File')}")
    extras = set(metadata.get_all("Provides-Extra") or [])
    if not {"video", "test", "triton", "peers", "all"} <= extras or not any(r.startswith("av") for r in requires):
        fail(f"the wheel should offer the extras video (av), test, triton, peers, all; offers {sorted(extras)}")
    if not metadata.get_payload().lstrip().startswith("# xclip-kernels"):
        fail("the wheel's long description should be README.md")
    ok(f"metadata: Requires-Python {metadata['Requires-Python']}, licence {licence}, extras {', '.join(sorted(extras))}, "
       "README as description")
    if b".debug_info" in library:
        fail(f"{extension[0]} carries debug information (.debug_info)")
    ok(f"{extension[0]}: {len(library) / 1e6:.2f} MB, no debug information")
    return wheel


# Runs in a fresh interpreter, outside the source tree, on the installed wheel only.
USE_INSTALLED = """
import sys, torch
import xclip_kernels as xk
from xclip_kernels.backends import reference
assert xk.__file__.startswith(sys.argv[1]), f"imported {xk.__file__}, not the installed wheel"
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(2, 17, 2, 64, generator=g) for _ in range(3))
mk, mv = (torch.randn(2, 2, 64, generator=g) for _ in range(2))
out = xk.frame_attention(q, k, v, mk, mv, backend="cpp")
err = (out.double() - reference.frame_attention(*(t.double() for t in (q, k, v, mk, mv)))).abs().max().item()
assert err < 1e-5, err
ext = sys.modules["xclip_kernels._C"]
assert ext.__file__.startswith(sys.argv[1]), ext.__file__
print(f"frame_attention on cpp: max error {err:.1e}; _C from {ext.__file__}; tiles {ext.has_cpu_tiles()}, "
      f"cpu_isa {ext.cpu_isa()}, compiled against torch {ext.torch_version()}")
"""


def check_install(wheel: str, work: str) -> None:
    target = os.path.join(work, "site")
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", target, wheel], cwd=work)
    elsewhere = os.path.join(work, "elsewhere")
    os.makedirs(elsewhere)
    env = clean_env(PYTHONPATH=target)
    table = run([sys.executable, "-m", "xclip_kernels"], cwd=elsewhere, env=env)
    lines = table.splitlines()
    cpp = [i for i, line in enumerate(lines) if line.split()[:2] == ["cpp", "yes"]]
    if not cpp or "on cpu: runs here" not in "\n".join(lines[cpp[0]:cpp[0] + 3]):
        print(table, file=sys.stderr)
        fail("`python -m xclip_kernels` from the installed wheel does not show the cpp backend running on the CPU")
    ok("`python -m xclip_kernels` (installed wheel, run outside the source tree): cpp available, runs on cpu")
    ok(run([sys.executable, "-c", USE_INSTALLED, target], cwd=elsewhere, env=env).strip())


def check_isolated_build_fails(copy: str, work: str, limit: float) -> None:
    start = time.perf_counter()
    try:
        result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", os.path.join(work, "isolated"),
                                 copy], cwd=work, env=clean_env(), capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        fail(f"the default (isolated) `pip wheel .` ran past {limit:.0f} s instead of failing at once")
    took = time.perf_counter() - start
    output = result.stdout + result.stderr
    if result.returncode == 0:
        fail("the default (isolated) `pip wheel .` succeeded: it must not build against a torch of its own")
    if WORKING_COMMAND not in output:
        print(output[-4000:], file=sys.stderr)
        fail(f"the isolated build failed without naming `{WORKING_COMMAND}`")
    ok(f"the default (isolated) `pip wheel .` fails in {took:.0f} s naming `{WORKING_COMMAND}`")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isolated-limit", type=float, default=120.0,
                        help="seconds the isolated build may take to fail (it downloads setuptools)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and print it")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="xclip-package-check-")
    total = time.perf_counter()
    try:
        copy = os.path.join(work, "source")
        start = step(f"a clean copy of {ROOT}")
        copy_repository(copy)
        done(start)
        start = step("sdist")
        sdist = check_sdist(copy, work)
        done(start)
        start = step("wheel from the sdist (pip wheel --no-build-isolation --no-deps)")
        wheel = check_wheel(sdist, work)
        done(start)
        start = step("install the wheel into a target folder and use it")
        check_install(wheel, work)
        done(start)
        start = step(f"default isolated build (pip wheel .), limit {args.isolated_limit:.0f} s")
        check_isolated_build_fails(copy, work, args.isolated_limit)
        done(start)
    finally:
        if args.keep:
            print(f"package-check: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"package-check: passed in {time.perf_counter() - total:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
