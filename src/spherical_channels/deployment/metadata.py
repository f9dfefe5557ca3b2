"""What an artefact says about itself: the metadata stored inside every exported model file.

Both kinds of artefact are PT2 archives (zip files). The metadata is one JSON document:

* ``exported-program`` (``torch.export.save``): the extra file ``extra/spherical_channels.json``;
* ``aoti`` (AOTInductor package): the key ``spherical_channels`` of the package's AOTInductor
  metadata (``aot_inductor.metadata``; also what ``compiled.get_metadata()`` returns).

:func:`read_info` reads it straight from the zip, without loading the program (no code from the
file runs), so that a file can be inspected, and refused, before it is trusted.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .inputs import GraphOptions
from .programs import ExportError

__all__ = ["ARTEFACT_FORMAT", "FORMATS", "METADATA_KEY", "ArtefactInfo", "is_exported_model", "read_info"]

#: Marks this package's artefacts (and their layout version).
ARTEFACT_FORMAT = "spherical_channels/exported-model-v1"
#: The kinds of artefact ``scn export`` writes.
FORMATS = ("aoti", "exported-program")
#: Name of the metadata: AOTInductor metadata key, and (with ``.json``) the extra file.
METADATA_KEY = "spherical_channels"
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class ArtefactInfo:
    """The metadata of an exported model (everything its loader needs but the program).

    Attributes:
        format: ``"aoti"`` or ``"exported-program"``.
        model_name: the registry name of the exported model (``"scn"``, ``"schnet"``).
        model_config: the model's ``config.to_dict()`` (for the record; nothing rebuilds it).
        graph: how the loader builds the graph (:class:`~.inputs.GraphOptions`).
        conservative, regress_forces: as the model's attributes.
        dtype, device: the precision and device the program was compiled for.
        max_atomic_number: largest atomic number of the model's element table.
        inputs, outputs: the program's argument and result names.
        package_version, torch_version: who wrote the file.
        source, weights: the checkpoint it came from and which weights (when known).
    """

    format: str
    model_name: str
    model_config: dict[str, Any]
    graph: GraphOptions
    conservative: bool
    regress_forces: bool
    dtype: str
    device: str
    max_atomic_number: int
    inputs: list[str]
    outputs: list[str]
    package_version: str
    torch_version: str
    source: str | None = None
    weights: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a ``torch.dtype``."""
        return _DTYPES[self.dtype]

    def to_json(self) -> str:
        """The JSON document stored in the artefact."""
        values = asdict(self)
        values["graph"] = self.graph.to_dict()
        return json.dumps({"artefact_format": ARTEFACT_FORMAT, **values}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "artefact") -> "ArtefactInfo":
        """Parse :meth:`to_json`'s document; :class:`ExportError` naming ``where`` otherwise."""
        try:
            values = json.loads(text)
        except (TypeError, ValueError) as err:
            raise ExportError(f"{where}: unreadable metadata ({err})") from None
        if not isinstance(values, dict) or values.get("artefact_format") != ARTEFACT_FORMAT:
            found = values.get("artefact_format") if isinstance(values, dict) else None
            raise ExportError(f"{where}: metadata of an unknown layout {found!r} (this package reads {ARTEFACT_FORMAT!r})")
        values.pop("artefact_format")
        try:
            values["graph"] = GraphOptions.from_dict(values["graph"])
            info = cls(**values)
        except (KeyError, TypeError, ValueError) as err:
            raise ExportError(f"{where}: incomplete metadata ({type(err).__name__}: {err})") from None
        if info.format not in FORMATS or info.dtype not in _DTYPES:
            raise ExportError(f"{where}: metadata names format {info.format!r}, dtype {info.dtype!r}")
        return info


def read_info(path: str | Path) -> ArtefactInfo:
    """The metadata of the artefact at ``path``, read without loading its program.

    Raises:
        FileNotFoundError: no such file.
        ExportError: the file is not an artefact written by this package (the message says
            what it is, as far as can be told).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such exported model: {path}")
    if path.is_dir():
        raise ExportError(f"{path}: is a directory, not an exported model")
    if not zipfile.is_zipfile(path):
        raise ExportError(f"{path}: not an exported model (not a PT2 archive; write one with 'scn export')")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            extra = [n for n in names if n.endswith(f"/extra/{METADATA_KEY}.json")]
            if extra:
                return ArtefactInfo.from_json(archive.read(extra[0]).decode(), str(path))
            for name in names:
                if "/data/aotinductor/" in name and name.endswith("wrapper_metadata.json"):
                    aoti = json.loads(archive.read(name).decode())
                    if METADATA_KEY in aoti:
                        return ArtefactInfo.from_json(aoti[METADATA_KEY], str(path))
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError, ValueError) as err:
        if isinstance(err, ExportError):
            raise
        raise ExportError(f"{path}: damaged archive ({type(err).__name__}: {err})") from None
    if any(n.endswith("data.pkl") for n in names):
        raise ExportError(f"{path}: a torch.save file (e.g. a checkpoint), not an exported model (export it with 'scn export')")
    raise ExportError(f"{path}: a PT2 archive without this package's metadata (not written by 'scn export')")


def is_exported_model(path: str | Path) -> bool:
    """Whether ``path`` is an artefact written by this package (its metadata reads), for
    callers that take either a checkpoint or an artefact. Loads nothing."""
    try:
        read_info(path)
    except (OSError, ExportError):
        return False
    return True
