"""Write rendered files: deterministic, idempotent, never deleting what kvrouter did not write.

A manifest (``.kvrouter-render.json``) in the output folder lists what the last
render wrote. A later render removes only listed files it no longer produces,
and refuses to overwrite a file that is not listed (a hand-written file).
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, List

from kvrouter.errors import RenderError

MANIFEST = ".kvrouter-render.json"


def _read_manifest(out_dir: str) -> List[str]:
    try:
        with open(os.path.join(out_dir, MANIFEST), encoding="utf-8") as fh:
            return list(json.load(fh).get("files", []))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as err:
        raise RenderError(f"{os.path.join(out_dir, MANIFEST)}: unreadable manifest: {err}") \
            from None


def write_files(out_dir: str, files: Dict[str, str], extra_dirs=(),
                private=(), scope: Callable[[str], bool] = lambda rel: True
                ) -> Dict[str, List[str]]:
    """Write ``files`` under out_dir (those in ``private``, which hold credentials, readable
    by their owner only); return {"written": [...], "unchanged": [...], "removed": [...]}.
    Only the files ``scope`` admits are written or removed (``render --only systemd``);
    what the last render wrote outside it is left as it is."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    files = {rel: text for rel, text in files.items() if scope(rel)}
    listed = set(_read_manifest(out_dir))
    outside = {rel for rel in listed if not scope(rel)}
    owned = listed - outside
    for rel in sorted(files):
        path = os.path.join(out_dir, rel)
        if os.path.exists(path) and rel not in owned:
            with open(path, encoding="utf-8", errors="replace") as fh:
                if fh.read() != files[rel]:
                    raise RenderError(f"{path}: exists and was not written by kvrouter render; "
                                      "move it away or render into another --out folder")
    report: Dict[str, List[str]] = {"written": [], "unchanged": [], "removed": []}
    for rel in sorted(files):
        path = os.path.join(out_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with open(path, encoding="utf-8") as fh:
                if fh.read() == files[rel]:
                    if rel in private:
                        os.chmod(path, 0o600)
                    report["unchanged"].append(rel)
                    continue
        except FileNotFoundError:
            pass
        tmp = path + ".tmp"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                          0o600 if rel in private else 0o666), "w", encoding="utf-8") as fh:
            fh.write(files[rel])
        os.replace(tmp, path)
        report["written"].append(rel)
    for rel in sorted(owned - set(files)):
        path = os.path.join(out_dir, rel)
        if os.path.isfile(path):
            os.remove(path)
            report["removed"].append(rel)
    manifest = json.dumps({"files": sorted(set(files) | outside)}, indent=1) + "\n"
    with open(os.path.join(out_dir, MANIFEST), "w", encoding="utf-8") as fh:
        fh.write(manifest)
    for d in extra_dirs:
        os.makedirs(d, exist_ok=True)
    return report
