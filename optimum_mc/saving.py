"""Atomic, verified saves: write into a hidden temporary folder beside the target, check it, then rename it in.

Every save and push of an MC model also writes its model card (README.md, ``model_card.py``).

An interrupted save (exception, Ctrl-C, SIGKILL, power loss after fsync) never leaves a half-written checkpoint at
the target: the previous content stays as it was until the complete new folder is renamed into place. Folders left
behind by a killed process (``.<name>.mc-tmp-<pid>-*``) are removed by the next save into the same parent; a
previous checkpoint moved aside (``.<name>.mc-old-<pid>-*``) by a save killed between its two renames is moved
back. Files of the previous folder that the new save does not write, other than the previous model's top-level
weights, shard index and config (e.g. a tokenizer saved earlier, notes, sub-folders), are carried over.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import OutputPathError, SaveError

TMP_TAG = ".mc-tmp-"
OLD_TAG = ".mc-old-"
# top-level files a new save replaces (transformers' weight / shard / index names); everything else is carried over
_REPLACED = re.compile(
    r"^(model|pytorch_model|tf_model|flax_model)(-\d{5}-of-\d{5})?\.(safetensors|bin|h5|msgpack)(\.index\.json)?$"
    r"|^(config|generation_config)\.json$"
)


def _same_path(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_output_dir(target: str | os.PathLike, source: str | os.PathLike | None = None) -> Path:
    """Check that ``target`` can receive a saved model folder; return it as a Path. Cheap: run it before quantizing.

    Raises OutputPathError when ``target`` (or a parent) is a file, is the ``source`` model folder, or cannot be
    written (a probe folder is created and removed in the nearest existing parent).
    """
    if not str(target).strip():
        raise OutputPathError("the output path is empty; pass a folder to save into.")
    target = Path(target).expanduser()
    if target.exists() and not target.is_dir():
        raise OutputPathError(f"{target} is a file, not a folder: choose another output path or remove the file.")
    for parent in target.absolute().parents:
        if parent.exists() and not parent.is_dir():
            raise OutputPathError(f"cannot create {target}: {parent} is a file; choose another output path.")
    if source is not None and os.path.isdir(source) and _same_path(target, Path(source)):
        raise OutputPathError(
            f"{target} is the folder of the source model being quantized; saving there would overwrite the float "
            f"checkpoint. Choose another output folder."
        )
    probe_parent = next(p for p in (target.absolute(), *target.absolute().parents) if p.exists())
    try:
        probe = tempfile.mkdtemp(prefix=".mc-write-probe-", dir=probe_parent)
        os.rmdir(probe)
    except OSError as exc:
        raise OutputPathError(
            f"cannot write into {probe_parent} ({exc.strerror or exc}); choose a writable output folder."
        ) from exc
    return target


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError as exc:  # EPERM: alive, owned by someone else
        return exc.errno == errno.EPERM
    return True


def _owner_pid(entry: str, tag: str) -> int | None:
    rest = entry.split(tag, 1)[1]
    head = rest.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def clean_stale(parent: Path, name: str) -> None:
    """Remove temporaries of dead savers of ``parent/name``; move back a previous folder a killed save set aside."""
    if not parent.is_dir():
        return
    target = parent / name
    for tag in (OLD_TAG, TMP_TAG):
        prefix = f".{name}{tag}"
        for entry in sorted(os.listdir(parent)):
            if not entry.startswith(prefix):
                continue
            pid = _owner_pid(entry, tag)
            if pid is None or _pid_alive(pid):
                continue
            path = parent / entry
            if tag == OLD_TAG and not target.exists():
                os.rename(path, target)
            else:
                shutil.rmtree(path, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems do not fsync folders
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _carry_over(old: Path, new: Path) -> None:
    """Link (or copy) into ``new`` the files of ``old`` it lacks, except the previous model's weights / config."""
    for dirpath, _, files in os.walk(old):
        rel = Path(dirpath).relative_to(old)
        for f in files:
            if rel == Path(".") and _REPLACED.match(f):
                continue
            dst = new / rel / f
            if dst.exists():
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(Path(dirpath) / f, dst)
            except OSError:
                shutil.copy2(Path(dirpath) / f, dst)


def _commit(tmp: Path, target: Path) -> None:
    parent = target.parent
    if not target.exists():
        os.rename(tmp, target)
        _fsync_dir(parent)
        return
    _carry_over(target, tmp)
    _fsync_tree(tmp)
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}{OLD_TAG}{os.getpid()}-", dir=parent))
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if not target.exists():
            os.rename(old, target)
        raise
    _fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(
    target: str | os.PathLike,
    source: str | os.PathLike | None = None,
    verify: Callable[[Path], None] | None = None,
) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; on success verify it, fsync it and rename it to ``target``.

    On any exception (KeyboardInterrupt included) the temporary folder is removed and ``target`` is untouched.
    """
    target = check_output_dir(target, source).absolute()
    if target.is_symlink():  # replace the folder the link points to, keep the link
        target = target.resolve()
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    clean_stale(parent, target.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_TAG}{os.getpid()}-", dir=parent))
    try:
        yield tmp
        if verify is not None:
            verify(tmp)
        _fsync_tree(tmp)
        _commit(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------ model saves


def verify_saved_model(model, folder: Path) -> None:
    """Check a folder just written by ``save_pretrained``: config.json names method "mc", every tensor of the
    model is in its safetensors files with its shape, inside the file (not truncated), and every scale / zero is
    finite."""
    from .checkpoint import check_all_tensors

    cfg_path = folder / "config.json"
    try:
        saved = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SaveError(f"the saved config.json is missing or unreadable ({exc}); nothing was replaced.") from exc
    qc = saved.get("quantization_config") or {}
    if qc.get("quant_method") != "mc":
        raise SaveError("the saved config.json has no MC quantization_config; nothing was replaced.")
    files = sorted(str(p) for p in folder.glob("*.safetensors"))
    if not files:
        raise SaveError(f"no safetensors file was written in {folder}; nothing was replaced.")
    try:
        check_all_tensors(model, files, getattr(model, "hf_quantizer", None))
    except Exception as exc:
        raise SaveError(f"the saved checkpoint does not verify: {exc} Nothing was replaced.") from exc
    bad = _nonfinite_quant_params(files)
    if bad:
        raise SaveError(
            f"the quantized model holds NaN/Inf scales or zeros ({', '.join(bad[:3])}); such a checkpoint would be "
            f"refused at load. Re-quantize (e.g. with other attn_bits / group_size) and report this. Nothing was "
            f"replaced."
        )


def _nonfinite_quant_params(files: list[str]) -> list[str]:
    """Names of saved quantization parameters (scales, zeros, absmax) holding NaN or Inf."""
    import torch
    from safetensors import safe_open

    from .verify import PACKED_FLOAT_BUFFERS

    bad = []
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if key.rsplit(".", 1)[-1] in PACKED_FLOAT_BUFFERS:
                    t = f.get_tensor(key)
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        bad.append(key)
    return bad


def _read_readme(folder: str | os.PathLike) -> str | None:
    path = Path(folder) / "README.md"
    try:
        return path.read_text(encoding="utf-8") if path.is_file() else None
    except (OSError, UnicodeDecodeError):
        return None


def atomic_save_pretrained(model, save, save_directory: str | os.PathLike, *args, **kwargs) -> None:
    """Run ``save(model, folder, ...)`` (transformers' save_pretrained) atomically and verified (module docstring),
    with the model card (``model_card.py``) written beside the weights."""
    from .checkpoint import sort_shard_metadata
    from .model_card import write_card

    card = kwargs.pop("_mc_card", None) or {}
    push = kwargs.pop("push_to_hub", False)
    hub_kwargs = {
        k: kwargs.pop(k) for k in ("repo_id", "commit_message", "private", "token", "create_pr") if k in kwargs
    }
    source = getattr(model, "_mc_source_dir", None)
    existing = card.pop("existing", None) or _read_readme(save_directory)
    location = card.pop("location", None) or os.fspath(save_directory)

    def verify_then_card(folder: Path) -> None:  # the card reads the shards' headers: only once they verify
        verify_saved_model(model, folder)
        write_card(model, folder, existing=existing, location=location, **card)

    with atomic_directory(save_directory, source, verify=verify_then_card) as tmp:
        save(model, tmp, *args, **kwargs)
        for shard in sorted(tmp.glob("*.safetensors")):  # deterministic bytes (checkpoint.sort_shard_metadata)
            sort_shard_metadata(shard)
    if push:
        repo_id = hub_kwargs.pop("repo_id", Path(save_directory).name)
        model.push_to_hub(repo_id, **hub_kwargs)


def _is_mc_model(model) -> bool:  # still MC-quantized (``dequantize()`` makes it a float model again)
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    return getattr(qc, "quant_method", None) == "mc"


def _mc_save_pretrained(self, save_directory, *args, **kwargs):
    """``save_pretrained`` of an MC model: transformers' own, run by :func:`atomic_save_pretrained`."""
    if not _is_mc_model(self):
        return type(self).save_pretrained(self, save_directory, *args, **kwargs)
    return atomic_save_pretrained(self, type(self).save_pretrained, save_directory, *args, **kwargs)


def _remote_readme(repo_id: str, token) -> str | None:
    """The README.md of a Hub repo (None when it has none)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, "README.md", token=token)).read_text(encoding="utf-8")
    except EntryNotFoundError:
        return None


def push_mc_model(
    model,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
):
    """``push_to_hub`` of an MC model: transformers' flow (create the repo, save into a temporary folder, upload it)
    with our model card as README.md, where transformers would upload its generic card over it. A README the repo
    already has that a person wrote is kept (``model_card.py``)."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    card = {"repo_id": repo_id, "tags": list(tags or []), "existing": _remote_readme(repo_id, token)}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size, _mc_card=card)
        return upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            commit_message=commit_message or "Upload model (optimum-mc)",
            commit_description=commit_description,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )


def _mc_push_to_hub(self, repo_id, *args, **kwargs):
    """``push_to_hub`` of an MC model: :func:`push_mc_model` (positional extras: transformers' own)."""
    if args or not _is_mc_model(self):
        return type(self).push_to_hub(self, repo_id, *args, **kwargs)
    return push_mc_model(self, repo_id, **kwargs)


def install_atomic_save(model, source: str | os.PathLike | None = None) -> None:
    """Make ``model.save_pretrained`` atomic and verified, and give saves / pushes the MC model card; ``source``: the
    float model quantized (a folder it must never overwrite; its Hub id becomes the card's ``base_model``)."""
    from .model_card import remember_base_model

    model._mc_source_dir = str(source) if source is not None else None
    remember_base_model(model, source)
    # bound on this model only (no class is patched: other models in the process keep transformers' methods)
    model.save_pretrained = ModelMethod(model, _mc_save_pretrained)
    model.push_to_hub = ModelMethod(model, _mc_push_to_hub)


class ModelMethod:
    """``fn`` bound to one model, as an instance attribute. Unlike a bound method (pickled as ``getattr(model,
    fn.__name__)``, which a model being unpickled cannot answer), it pickles and deep-copies with its model and stays
    bound to the copy."""

    def __init__(self, model, fn: Callable) -> None:
        self.__self__, self.__func__ = model, fn

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    def __reduce__(self):
        return ModelMethod, (self.__self__, self.__func__)
