"""Lesson 02's download of ChatGLM3-6B from ModelScope: one weight format, the disk checked first, resumable.

The repository may carry the weights twice (``*.safetensors`` and the older ``pytorch_model-*.bin`` shards, 12.5 GB
each); downloading everything fetches both. :func:`choose_files` picks ONE format (safetensors when present) plus
the config, tokenizer and code files, and hands the list to ``snapshot_download`` as ``allow_patterns``.

Interrupted downloads resume: ``modelscope`` (1.40, through ``modelscope_hub``) skips every file already in the
cache with the listed size / checksum (``_cache_hit``) and continues a partial ``*.incomplete`` file with an HTTP
``Range`` request (``_download_with_resume``), so re-running the same call fetches only what is missing.
"""

from __future__ import annotations

import fnmatch
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from .profiles import MODEL_ID, model_cache

#: Files besides the weights that a ChatGLM3 directory needs (config, tokenizer, the authors' code, licences).
SUPPORT_PATTERNS = ("config.json", "configuration_*.py", "modeling_*.py", "quantization.py", "tokenization_*.py",
                    "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                    "README*", "MODEL_LICENSE", "LICENSE*")
SAFETENSORS = ("*.safetensors", "model.safetensors.index.json")
BIN = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
GB = 10 ** 9


def repo_listing(model_id: str = MODEL_ID, revision: str | None = None) -> dict[str, int]:
    """``{path: size in bytes}`` of every file in the ModelScope repository (one request, no download)."""
    try:
        from modelscope.hub.api import HubApi
    except ImportError as e:
        raise RuntimeError("modelscope is not installed: pip install modelscope") from e
    try:
        files = HubApi().get_model_files(model_id, revision=revision, recursive=True)
    except Exception as e:  # network errors come in many types; the message is what matters
        raise RuntimeError(f"could not list the files of {model_id} on ModelScope ({type(e).__name__}: {e})") from None
    return {str(f["Path"]): int(f.get("Size") or 0) for f in files if f.get("Type", "blob") != "tree"}


def repo_files(model_id: str = MODEL_ID) -> list[str]:
    """The repository's file names (sorted), as ModelScope lists them."""
    return sorted(repo_listing(model_id))


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def weight_format(listing: Iterable[str]) -> str:
    """``"safetensors"`` if the repository has safetensors weights, else ``"bin"``; an error if it has neither."""
    names = list(listing)
    if any(fnmatch.fnmatch(n, "*.safetensors") for n in names):
        return "safetensors"
    if any(fnmatch.fnmatch(n, "pytorch_model*.bin") for n in names):
        return "bin"
    raise RuntimeError(f"no weight files (*.safetensors or pytorch_model*.bin) among the {len(names)} files listed: "
                       f"{', '.join(names[:12])}{' ...' if len(names) > 12 else ''}")


def choose_files(listing: Iterable[str] | Mapping[str, int]) -> list[str]:
    """``allow_patterns`` for ``snapshot_download``: the file names of ONE weight format plus the support files.

    Exact names (sorted) rather than wildcards, so the list says exactly what will be fetched; files of the other
    weight format, images and anything else are left out.
    """
    names = sorted(listing)
    weights = SAFETENSORS if weight_format(names) == "safetensors" else BIN
    return [n for n in names if _matches(Path(n).name, weights) or _matches(n, SUPPORT_PATTERNS)]


def download_size(listing: Mapping[str, int], chosen: Iterable[str] | None = None) -> int:
    """Bytes that ``chosen`` (default: :func:`choose_files` of the listing) add up to, from the listing's sizes."""
    files = choose_files(listing) if chosen is None else list(chosen)
    return sum(int(listing.get(n, 0)) for n in files)


def already_downloaded(directory: str | Path, listing: Mapping[str, int], chosen: Iterable[str]) -> int:
    """Bytes of ``chosen`` already complete in ``directory`` (same size as listed): a resumed download skips them."""
    root = Path(directory)
    return sum(listing[n] for n in chosen if n in listing and (root / n).is_file()
               and (root / n).stat().st_size == listing[n])


def check_free_space(directory: str | Path, needed_bytes: int) -> int:
    """Raise ``RuntimeError`` naming ``directory``, what is needed and what is free, if the disk has too little room.

    Checked on the nearest existing parent (the directory itself may not exist yet). Returns the free bytes.
    """
    path = Path(directory).expanduser().absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise RuntimeError(f"not enough disk space in {path}: {needed_bytes / GB:.1f} GB needed, {free / GB:.1f} GB "
                           f"free. Free some space, or point GLMLORA_MODEL_CACHE at a larger disk (on AutoDL: "
                           f"/root/autodl-tmp) and run again.")
    return free


def download_chatglm3(cache_dir: str | Path | None = None, with_conversion: bool = True) -> Path:
    """List -> choose one weight format -> check the disk -> ``modelscope.snapshot_download``; returns the folder.

    ``with_conversion``: also count the converted copy that lesson 02 writes next to the download (as large as
    the weights), so the disk does not fill up right after the download. Re-running resumes (module docstring).
    """
    cache_dir = Path(cache_dir) if cache_dir else model_cache()
    listing = repo_listing(MODEL_ID)
    chosen = choose_files(listing)
    weights = sum(size for name, size in listing.items() if name in chosen and name.endswith((".safetensors", ".bin")))
    needed = download_size(listing, chosen) - already_downloaded(cache_dir / MODEL_ID, listing, chosen)
    check_free_space(cache_dir, needed + (weights if with_conversion else 0))
    from modelscope import snapshot_download

    try:
        return Path(snapshot_download(MODEL_ID, cache_dir=str(cache_dir), allow_patterns=chosen))
    except Exception as e:  # network errors come in many types; the message is what matters
        raise RuntimeError(f"could not download {MODEL_ID} into {cache_dir} ({type(e).__name__}: {e}). Run again to "
                           f"resume; without a network, copy an existing download to {cache_dir / MODEL_ID} (the "
                           f"folder must contain config.json, tokenizer.model and the weight shards).") from None


__all__ = ["MODEL_ID", "already_downloaded", "check_free_space", "choose_files", "download_chatglm3", "download_size",
           "repo_files", "repo_listing", "weight_format"]
