"""`lincat push`: upload an exported folder to the Hugging Face Hub (huggingface_hub's create_repo + upload_folder)."""

import os
from fnmatch import fnmatch
from pathlib import Path

# Training state stays local; the model, its card and the run summary go up.
IGNORE = ["checkpoints/*", "train/*", ".*", "*/.*", "recipe.yaml"]


class HubError(ValueError):
    """Pushing is not possible (no folder, not logged in, offline); the message says what to do."""


def upload_list(out_dir: Path) -> list[tuple[str, int]]:
    files = []
    for p in sorted(out_dir.rglob("*")):
        rel = p.relative_to(out_dir).as_posix()
        if p.is_file() and not any(fnmatch(rel, pat) for pat in IGNORE):
            files.append((rel, p.stat().st_size))
    return files


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def push_folder(out_dir, repo_id: str, private: bool = False, revision: str | None = None, dry_run: bool = False,
                api=None) -> list[tuple[str, int]]:
    """Create `repo_id` if needed and upload the export. Returns [(file, bytes)] (what would go up, on a dry run)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise HubError(f"{out_dir} does not exist: export a model first (lincat export RUN_DIR {out_dir})")
    if not (out_dir / "config.json").exists():
        raise HubError(f"{out_dir} has no config.json: it is not a finished export; run lincat export again")
    if "/" not in repo_id or repo_id.count("/") != 1:
        raise HubError(f"repository id {repo_id!r} must look like owner/name")
    files = upload_list(out_dir)
    if dry_run:
        return files
    if _offline():
        raise HubError("HF_HUB_OFFLINE is set: the Hub cannot be reached; unset it (or use --dry-run)")
    from huggingface_hub import HfApi

    api = api or HfApi()
    try:
        user = api.whoami()
    except Exception as e:
        if "token" in str(e).lower() or "401" in str(e) or "unauthorized" in str(e).lower():
            raise HubError("not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN") from None
        raise HubError(f"cannot reach the Hugging Face Hub ({type(e).__name__}); check the network and retry") from None
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(out_dir), revision=revision, ignore_patterns=IGNORE,
                          commit_message=f"Upload lincat model ({len(files)} files) by {user.get('name', 'lincat')}")
    except Exception as e:
        raise HubError(f"upload to {repo_id} failed: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    return files
