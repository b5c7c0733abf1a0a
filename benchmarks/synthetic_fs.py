"""A read-only fsspec filesystem whose listing is made up on the fly: N folders of M image names.

``synthetic://images`` holds ``d0000/img0000000.jpg`` ... with no storage behind it, so a
million-file listing costs nothing but the lister's own memory (what the listing
benchmark measures). Registered as the ``synthetic`` protocol on import.
"""
from __future__ import annotations

import fsspec
from fsspec.spec import AbstractFileSystem


class SyntheticFileSystem(AbstractFileSystem):
    protocol = "synthetic"
    root_marker = ""
    ls_calls = 0  # over all instances: how much listing a consumer made happen

    def __init__(self, folders: int = 1000, per_folder: int = 1000, **kwargs):
        super().__init__(**kwargs)
        self.folders, self.per_folder = int(folders), int(per_folder)

    @classmethod
    def _strip_protocol(cls, path):
        path = path[len("synthetic://"):] if path.startswith("synthetic://") else path
        return path.rstrip("/")

    def _parts(self, path: str) -> list[str]:
        return [p for p in self._strip_protocol(path).split("/") if p]

    def ls(self, path, detail=True, **kwargs):
        type(self).ls_calls += 1
        parts = self._parts(path)
        if len(parts) == 1:
            entries = [{"name": f"{parts[0]}/d{i:04d}", "type": "directory", "size": 0} for i in range(self.folders)]
        elif len(parts) == 2 and self._folder(parts[1]) is not None:
            base = self._folder(parts[1]) * self.per_folder
            entries = [{"name": f"{parts[0]}/{parts[1]}/img{base + j:07d}.jpg", "type": "file", "size": 1000}
                       for j in range(self.per_folder)]
        else:
            raise FileNotFoundError(path)
        return entries if detail else [e["name"] for e in entries]

    def _folder(self, name: str) -> int | None:
        if name.startswith("d") and name[1:].isdigit() and int(name[1:]) < self.folders:
            return int(name[1:])
        return None

    def info(self, path, **kwargs):
        parts = self._parts(path)
        if len(parts) <= 2 and (len(parts) < 2 or self._folder(parts[1]) is not None):
            return {"name": "/".join(parts), "type": "directory", "size": 0}
        if len(parts) == 3 and parts[2].startswith("img") and parts[2].endswith(".jpg"):
            return {"name": "/".join(parts), "type": "file", "size": 1000}
        raise FileNotFoundError(path)


fsspec.register_implementation("synthetic", SyntheticFileSystem, clobber=True)
