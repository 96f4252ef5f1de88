"""The LoRA folder behind the web UI: every `.safetensors` file in it loaded into one shared `Studio`, and
the only ways to change it (upload, hub download, rename, delete), none of which can reach outside it.

A file's adapter name is its file name without `.safetensors` (made safe the way `Studio` wants names);
files that cannot be loaded (another model family, corrupt) stay listed with the reason. Previews follow
A1111: a sidecar `NAME.preview.png` beside the file, else one rendered once from the trigger words and kept
in the preview folder.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from studio import lora_io
from studio.adapters import ADAPTER_NAME, AdapterInfo, Studio, resolve_lora_source
from studio.errors import StudioError
from studio.paths import DEMO_LORAS_DIR
from studio.prompts import check_clip_skip, pipeline_text_encoders

SUFFIX = ".safetensors"
PREVIEW_SUFFIX = ".preview.png"
DEFAULT_MAX_UPLOAD_BYTES = 2 * 1024**3
PREVIEW_STEPS = 20
TRIGGER_PROMPT_KEY = "studio.trigger_prompt"  # the instance prompt, in the metadata of LoRAs our trainer made


@dataclass(frozen=True)
class LibraryEntry:
    """One LoRA file of the folder: loaded (`info`) or not (`error` says why)."""

    name: str
    path: Path
    info: AdapterInfo | None
    error: str | None

    @property
    def loaded(self) -> bool:
        return self.info is not None


class LoraLibrary:
    """A folder of LoRA files, kept loaded in `studio`. Safe to share between the UI's threads."""

    def __init__(
        self, studio: Studio, folder: Path, preview_dir: Path, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    ):
        self.studio = studio
        self.folder = Path(folder).resolve()
        self.preview_dir = Path(preview_dir).resolve()
        self.max_upload_bytes = max_upload_bytes
        self.version = 0  # bumped on every change, so pages can tell their adapter list is stale
        self._entries: dict[str, LibraryEntry] = {}
        self._lock = threading.RLock()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.preview_dir.mkdir(parents=True, exist_ok=True)

    # Reading -------------------------------------------------------------------------------------------

    def scan(self) -> None:
        """Load every `.safetensors` file of the folder not loaded yet; remember why a file fails."""
        with self._lock:
            for path in sorted(self.folder.glob(f"*{SUFFIX}")):
                if path.name.startswith(".") or any(entry.path == path for entry in self._entries.values()):
                    continue
                name = safe_name(path.name.removesuffix(SUFFIX))
                if name in self._entries:
                    self._entries[f"{path.name} (clash)"] = LibraryEntry(
                        name=path.name, path=path, info=None, error=f"its safe name {name!r} clashes with another file"
                    )
                    continue
                self._entries[name] = self._load(name, path)
            self.version += 1

    def entries(self) -> list[LibraryEntry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda entry: entry.name.lower())

    def loaded(self) -> list[AdapterInfo]:
        """The adapters usable in a blend, by name."""
        return [entry.info for entry in self.entries() if entry.info is not None]

    def entry(self, name: str) -> LibraryEntry:
        with self._lock:
            if name not in self._entries:
                raise StudioError(f"no LoRA named {name!r} in {self.folder}")
            return self._entries[name]

    def inspect(self, name: str) -> lora_io.LoraReport:
        return lora_io.inspect(self.entry(name).path)

    def preview(self, name: str) -> Path | None:
        """The sidecar preview if the file has one, else the rendered one if it was rendered."""
        entry = self.entry(name)
        sidecar = entry.path.with_name(entry.path.name.removesuffix(SUFFIX) + PREVIEW_SUFFIX)
        for path in (sidecar, self._rendered_preview(name)):
            if path.is_file():
                return path
        return None

    def render_preview(self, name: str, prompt: str, steps: int = PREVIEW_STEPS) -> Path:
        """Render the adapter alone at weight 1, once, and keep it: from the prompt it was trained with (our
        trainer records it), else its trigger words, else `prompt`; at the clip skip it was trained with."""
        existing = self.preview(name)
        if existing is not None:
            return existing
        info = self.entry(name).info
        if info is None:
            raise StudioError(f"{name}: not loaded, so it has no preview")
        text = info.metadata.get(TRIGGER_PROMPT_KEY) or ", ".join(info.trigger_words[:3]) or prompt
        blend = self.studio.make_blend({name: 1.0})
        image = self.studio.generate(text, seed=0, steps=steps, blend=blend, clip_skip=self._trained_clip_skip(info))[0]
        path = self._rendered_preview(name)
        _save_image_atomically(image, path)
        return path

    def _trained_clip_skip(self, info) -> int:
        """kohya's `ss_clip_skip` (our trainer's too) where this model takes it, else 1."""
        try:
            clip_skip = int(info.metadata.get("ss_clip_skip") or 1)  # kohya writes "None" when unset
            check_clip_skip(self.studio.family, pipeline_text_encoders(self.studio.pipeline), clip_skip)
        except (ValueError, StudioError):
            return 1
        return clip_skip

    # Changing ------------------------------------------------------------------------------------------

    def add_file(self, source: Path, file_name: str, name: str | None = None, replace: bool = False) -> LibraryEntry:
        """Copy an uploaded or downloaded file into the folder as NAME.safetensors and load it.

        `file_name` is what the user called the file (only its suffix matters); `name` the adapter name
        wanted, else one made from `file_name`. The file is checked (size, safetensors, family) before it
        enters the folder; an existing name is replaced only when `replace` says so.
        """
        source = Path(source)
        if not file_name.lower().endswith(SUFFIX):
            raise StudioError(
                f"{file_name}: only .safetensors LoRA files are accepted (pickle files such as .ckpt/.pt can run code)"
            )
        size = source.stat().st_size
        if size > self.max_upload_bytes:
            raise StudioError(
                f"{file_name}: {size / 1024**2:.0f} MB is over the {self.max_upload_bytes / 1024**2:.0f} MB upload limit"
            )
        name = check_name(name) if name and name.strip() else safe_name(Path(file_name).name[: -len(SUFFIX)])
        try:
            lora_io.check_family(lora_io.read_lora(source), self.studio.family)
        except StudioError as error:  # name the user's file, not the server's temporary copy
            raise StudioError(str(error).replace(str(source), file_name)) from None
        with self._lock:
            target = self._path_for(name)
            exists = name in self._entries or target.exists()
            if exists and not replace:
                raise StudioError(f"a LoRA named {name!r} already exists; choose another name or tick 'replace'")
            temporary = target.with_name(f".{target.name}.{os.getpid()}.upload")
            backup = target.with_name(f".{target.name}.{os.getpid()}.replaced")
            try:
                shutil.copyfile(source, temporary)
                if exists:  # the old file stays aside until the new one has loaded
                    self._forget(name, delete_file=False)
                    if target.exists():
                        os.replace(target, backup)
                os.replace(temporary, target)
                entry = self._load(name, target)
                if entry.error:  # e.g. layers this base model does not have: put things back as they were
                    target.unlink()
                    if backup.exists():
                        os.replace(backup, target)
                        self._entries[name] = self._load(name, target)
                    raise StudioError(entry.error.replace(str(target), file_name))
                self._entries[name] = entry
            finally:
                temporary.unlink(missing_ok=True)
                backup.unlink(missing_ok=True)
                self.version += 1
            return entry

    def add_from_hub(self, source: str, name: str | None = None, replace: bool = False) -> LibraryEntry:
        """Download a LoRA by hub id (needs the network, or the file in the local Hugging Face cache)."""
        path = resolve_lora_source(source.strip())
        return self.add_file(path, path.name, name=name or None, replace=replace)

    def rename(self, name: str, new_name: str) -> LibraryEntry:
        new_name = check_name(new_name)
        with self._lock:
            entry = self.entry(name)
            target = self._path_for(new_name)
            if new_name in self._entries or target.exists():
                raise StudioError(f"a LoRA named {new_name!r} already exists; delete it first or pick another name")
            self._forget(name, delete_file=False)
            os.rename(entry.path, target)
            sidecar = entry.path.with_name(entry.path.name.removesuffix(SUFFIX) + PREVIEW_SUFFIX)
            if sidecar.is_file():
                os.rename(sidecar, target.with_name(new_name + PREVIEW_SUFFIX))
            entry = self._entries[new_name] = self._load(new_name, target)
            self.version += 1
            return entry

    def delete(self, name: str) -> None:
        """Unload the adapter and delete its file and previews."""
        with self._lock:
            self.entry(name)
            self._forget(name, delete_file=True)
            self.version += 1

    # Internals -----------------------------------------------------------------------------------------

    def _load(self, name: str, path: Path) -> LibraryEntry:
        try:
            info = self.studio.load_adapter(path, name=name, weight=0.0)
        except StudioError as error:
            return LibraryEntry(name=name, path=path, info=None, error=str(error))
        return LibraryEntry(name=name, path=path, info=info, error=None)

    def _forget(self, name: str, delete_file: bool = True) -> None:
        entry = self._entries.pop(name, None)
        if entry is not None and entry.loaded:
            self.studio.delete_adapter(name)
        self._rendered_preview(name).unlink(missing_ok=True)
        if delete_file:
            path = entry.path if entry is not None else self._path_for(name)
            path.unlink(missing_ok=True)
            path.with_name(path.name.removesuffix(SUFFIX) + PREVIEW_SUFFIX).unlink(missing_ok=True)

    def _path_for(self, name: str) -> Path:
        path = (self.folder / f"{name}{SUFFIX}").resolve()
        if path.parent != self.folder:  # check_name already forbids separators; this is the last guard
            raise StudioError(f"{name!r}: a LoRA name cannot point outside {self.folder}")
        return path

    def _rendered_preview(self, name: str) -> Path:
        return self.preview_dir / f"{name}.png"


def check_name(name: str) -> str:
    """A name typed by a user: used as given, or refused with the rule it breaks (never silently changed)."""
    name = name.strip()
    if name.lower().endswith(SUFFIX):
        name = name[: -len(SUFFIX)]
    if not ADAPTER_NAME.match(name) or ".." in name:
        raise StudioError(
            f"{name!r} is not a usable LoRA name: use letters, digits, '_', '-' and '.', starting with a letter "
            "or digit (no folders, no '..')"
        )
    return name


def safe_name(stem: str) -> str:
    """A usable adapter name made from a file's name, as A1111 users name files ("My LoRA (v2)" -> My_LoRA_v2)."""
    name = re.sub(r"\.{2,}", ".", re.sub(r"[^\w.\-]+", "_", stem)).strip("._-")[:100]
    return name or "lora"


def _save_image_atomically(image: Image.Image, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(temporary, format="PNG")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def start_with_demo_loras(folder: Path) -> list[Path]:
    """Create the LoRA folder `folder` holding copies of the demo LoRAs the project ships (assets/loras), so a
    first start on the demo model has adapters to switch on. Only for a folder that does not exist yet."""
    if folder.exists():
        raise StudioError(f"{folder}: already exists; the demo LoRAs are only copied into a new LoRA folder")
    staging = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for lora in sorted(DEMO_LORAS_DIR.glob(f"*{SUFFIX}")):
        shutil.copy2(lora, staging / lora.name)
    os.replace(staging, folder)
    return sorted(folder.glob(f"*{SUFFIX}"))
