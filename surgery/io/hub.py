"""Hugging Face Hub repo ids where a path goes: `org/name` (or `org/name@revision`) → a local snapshot folder;
`org/name[@revision]/path/in/repo` → that file or folder of it (one LoRA of a collection, a `checkpoint-500/`).

A local path always wins. Otherwise the id is looked up in the local cache first (huggingface_hub's layout:
blobs, symlinked snapshots, refs), then — unless HF_HUB_OFFLINE is set — downloaded with huggingface_hub's own
progress bars, only the files the command reads (`ROLES`). Results never go into the cache: a default output
of a cached input is named after the repo in the current directory (`output_home`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import SurgeryError

# what each kind of input reads: configs, safetensors (every component of a pipeline), tokenizers, GGUF adapters
ROLES = {
    "adapter": ["*.json", "*.safetensors", "*.gguf", "*.md"],
    "model": ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "tokenizer*"],
    "config": ["*.json"],  # a base that only names modules for llama.cpp (its config.json says how)
}
_SEG = r"[A-Za-z0-9][\w.-]*"
# org/name, a revision (a `refs/pr/1`, else up to the next /), a path inside the repo; or a bare name[@revision]
_ID = re.compile(rf"^(?P<repo>{_SEG}/{_SEG})(?:@(?P<rev>refs/[^/]+/[^/]+|[^/]+))?(?:/(?P<sub>.+))?$"
                 rf"|^(?P<name>{_SEG})(?:@(?P<rev1>[^/].*))?$")
_TRUE = {"1", "on", "yes", "true"}


def split_id(text: str) -> tuple[str, str | None, str | None] | None:
    """(repo, revision or None, path inside the repo or None) of what from_pretrained takes as a repo id —
    `name` or `org/name`, `@revision` — optionally followed by a path in the repo (`org/name/style.safetensors`,
    as huggingface_hub's file system writes it); None for anything else (a local path)."""
    m = _ID.match(str(text))
    if m is None:
        return None
    repo, rev, sub = m["repo"] or m["name"], m["rev"] or m["rev1"], m["sub"] and m["sub"].removesuffix("/")
    if repo.endswith((".safetensors", ".gguf", ".json")) or ".." in repo or sub is not None and any(
            c in ("", ".", "..") for c in sub.split("/")):
        return None
    return repo, rev, sub


def is_repo_id(text: str) -> bool:
    """`name` or `org/name`, optionally `@revision` and a path inside the repo."""
    return split_id(text) is not None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def cache_dir() -> Path:
    """The hub cache as huggingface_hub finds it now (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/…)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def resolve(path: str | os.PathLike, revision: str | None = None, role: str = "model") -> str:
    """`path` itself when it exists (or is not a repo id); else the local snapshot folder of the repo id it
    names (or the file or folder inside it that the id's path names), from the cache or (online) downloaded —
    the files of `role` only."""
    text = str(path)
    parts = None if os.path.lexists(text) else split_id(text)
    if parts is None:
        return text
    repo, pinned, sub = parts
    revision = pinned or revision
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
    except ImportError:
        raise SurgeryError(f"{text}: no such local path (install huggingface_hub to name Hub repos)") from None
    where = f"{text}" + (f" (revision {revision})" if revision and not pinned else "")
    patterns = ROLES[role] if sub is None else [sub, *(f"{sub}/{p}" for p in ROLES[role])]
    kwargs = dict(revision=revision, allow_patterns=patterns, cache_dir=cache_dir())
    inside = (lambda snapshot: snapshot) if sub is None else (lambda snapshot: os.path.join(snapshot, sub))
    try:
        found = inside(snapshot_download(repo, local_files_only=True, **kwargs))
        if os.path.exists(found):
            return found
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass
    if offline():
        raise SurgeryError(f"{where}: no such local path, and not in the Hugging Face cache "
                           f"{cache_dir()} (HF_HUB_OFFLINE is set)") from None
    try:
        found = inside(snapshot_download(repo, **kwargs))
    except GatedRepoError:
        raise SurgeryError(f"{where}: a gated Hugging Face repo; accept its terms and log in (hf auth login)") \
            from None
    except RepositoryNotFoundError:
        raise SurgeryError(f"{where}: no such local path or Hugging Face repo") from None
    except RevisionNotFoundError:
        raise SurgeryError(f"{where}: the Hugging Face repo has no such revision") from None
    except (LocalEntryNotFoundError, OSError, ValueError) as e:
        raise SurgeryError(f"{where}: no such local path, and the Hugging Face Hub could not be reached "
                           f"({str(e).splitlines()[0]})") from None
    if not os.path.exists(found):
        raise SurgeryError(f"{where}: the Hugging Face repo {repo} has no {sub} (of the files this reads: "
                           f"{', '.join(ROLES[role])})")
    return found


def _in_snapshot(path: str | os.PathLike) -> tuple[str, tuple[str, ...]] | None:
    """(repo name — `name` of `org/name` —, the path's parts inside its snapshot) when `path` lies in a hub cache
    snapshot (`models--org--name/snapshots/<rev>/…`), else None."""
    parts = Path(os.path.abspath(path)).parts
    for i, part in enumerate(parts[:-1]):
        if part.startswith(("models--", "datasets--", "spaces--")) and parts[i + 1] == "snapshots":
            return part.split("--")[-1], parts[i + 3:]
    return None


def cached_repo(path: str | os.PathLike) -> str | None:
    """The repo name (`name` of `org/name`) when `path` lies in a hub cache snapshot, else None."""
    found = _in_snapshot(path)
    return found and found[0]


def output_home(source: str | os.PathLike) -> Path:
    """Where a default output of `source` is named from: the input itself, or for an input in the hub cache, a
    path in the current directory (outputs never go into the cache) named after the repo — or after the file or
    folder inside it that was named (`org/name/style.safetensors` → `./style.safetensors`)."""
    found = _in_snapshot(source)
    if found is None:
        return Path(source)
    repo, inside = found
    return Path.cwd() / (inside[-1] if inside else repo)


def in_cache(path: str | os.PathLike) -> bool:
    """Whether `path` — or where its links lead — is inside the hub cache (or any hub cache snapshot)."""
    cache = Path(os.path.realpath(cache_dir()))
    return any(cached_repo(p) is not None or p.is_relative_to(cache)
               for p in {Path(os.path.abspath(path)), Path(os.path.realpath(path))})
