"""``midol app``: a local browser app for the people who judge the answers by looking at them.

Drop images or DICOM files; for each the app shows the modality ``auto`` chose, where that
answer came from (the DICOM header or the model) and its confidence, the routing map behind it,
the most similar cases of an index as thumbnails (score, labels, and the study / series / SOP
instance UIDs of cases indexed from a PACS), and a class heatmap when a classifier is given.

Gradio serves it. The page reads only what is uploaded: it has no field that names a server
path, and Gradio serves no file outside its upload cache. Files over ``max_file_bytes`` are
refused with a message, and a file that cannot be read is a message, never a traceback.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .dicomweb import is_dicomweb, read_instance
from .drawing import displayable
from .errors import DICOMwebError, ImageReadError, NonFiniteError
from .image_io import read_file
from .modeling_midol import MIDoLModel

THUMBNAIL = 160
MAX_FILE_BYTES = 64 * 2**20


@dataclass
class CaseReport:
    """What the app shows for one uploaded file."""

    name: str
    error: str = ""
    modality: str = ""
    source: str = ""
    confidence: float = 0.0
    routing_map: str | None = None
    heatmap: str | None = None
    neighbours: list[tuple[Image.Image, str]] = field(default_factory=list)
    neighbour_rows: list[dict[str, str]] = field(default_factory=list)

    @property
    def summary(self) -> str:
        if self.error:
            return f"**{self.name}**: cannot be read: {self.error}"
        source = "the DICOM header" if self.source == "dicom" else "the model"
        return f"**{self.name}**: **{self.modality}** (from {source}; confidence {self.confidence:.2f})"

    @property
    def neighbour_table(self) -> str:
        """The similar cases as a markdown table: rank, score, labels, and UIDs or file name."""
        lines = ["| # | score | labels | case |", "|---|---|---|---|"]
        lines += [f"| {row['rank']} | {row['score']} | {row['labels']} | {row['case']} |" for row in self.neighbour_rows]
        return "\n".join(lines)


class CaseViewer:
    """The app's work, without the page: one :class:`CaseReport` per uploaded file."""

    def __init__(self, model: MIDoLModel, index: Any = None, classifier: Any = None, k: int = 6,
                 max_file_bytes: int = MAX_FILE_BYTES, model_name: str | None = None) -> None:
        if index is not None:
            index.check_model(model)
        self.model, self.index, self.classifier, self.k, self.max_file_bytes = model, index, classifier, k, max_file_bytes
        self.model_name = model_name or model.config.name_or_path or "M-IDoL"
        self._pictures = tempfile.TemporaryDirectory(prefix="midol-app-")  # removed when the viewer goes or the app exits
        self.pictures = Path(self._pictures.name)

    def analyse(self, path: str, name: str | None = None) -> CaseReport:
        from .explain import draw_class_heatmaps, encode_and_draw_routing_maps

        name = name or Path(path).name
        size = Path(path).stat().st_size
        if size > self.max_file_bytes:
            return CaseReport(name, error=f"{_size(size)} is over this app's limit of {_size(self.max_file_bytes)} per file")
        try:
            folder = Path(tempfile.mkdtemp(dir=self.pictures))
            encoding, maps = encode_and_draw_routing_maps(self.model, [path], folder, frames="middle")  # one forward
            report = CaseReport(name, modality=encoding.modality[0], source=encoding.modality_source[0],
                                confidence=float(encoding.confidence[0]), routing_map=str(maps[0]))
            if self.index is not None:
                vectors = getattr(encoding, self.index.output).numpy()
                hits = self.index.search_vectors(vectors, encoding.modality, self.k, include_unknown=True)[0]
                report.neighbours = [(_thumbnail(hit.path, hit.frame), _caption(hit)) for hit in hits]
                report.neighbour_rows = [_row(hit) for hit in hits]
            if self.classifier is not None:
                report.heatmap = str(draw_class_heatmaps(self.classifier, [path], folder)[0])
        except (ImageReadError, NonFiniteError, DICOMwebError, ValueError) as error:
            return CaseReport(name, error=getattr(error, "reason", None) or str(error))
        return report

    def analyse_all(self, uploads: Sequence[Any] | None) -> list[CaseReport]:
        return [self.analyse(*_upload_path(upload)) for upload in uploads or []]


def _size(count: int) -> str:
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count / 2**10:.0f} KiB"


def _upload_path(upload: Any) -> tuple[str, str]:
    """(path in Gradio's upload cache, the name the user's file had)."""
    path = str(getattr(upload, "name", upload))
    return path, getattr(upload, "orig_name", None) or Path(path).name


def _thumbnail(location: str, frame: int | None) -> Image.Image:
    raw = read_instance(location, frame) if is_dicomweb(location) else read_file(Path(location), frame)
    image = Image.fromarray((displayable(raw.pixels) * 255).round().astype(np.uint8))
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    return image


def _row(hit: Any) -> dict[str, str]:
    """A hit as the page lists it: where it is (a PACS study / series / SOP instance, or a file)."""
    uids = hit.uids
    case = (f"study {uids['study_uid']}, series {uids['series_uid']}, SOP instance {uids['sop_instance_uid']}" if uids
            else Path(hit.path).name)
    return {"rank": str(hit.rank), "score": f"{hit.score:.3f}", "labels": ", ".join(f"{k}={v}" for k, v in hit.labels.items()),
            "case": case + ("" if hit.frame is None else f" [frame {hit.frame}]")}


def _caption(hit: Any) -> str:
    row = _row(hit)
    return f"#{row['rank']} {row['score']}" + (f" · {row['labels']}" if row["labels"] else "") + f" · {row['case']}"


def build_app(viewer: CaseViewer, title: str = "M-IDoL") -> Any:
    """The Gradio page over ``viewer``: an upload field, then one section per file."""
    try:
        import gradio as gr
    except ImportError:
        raise ImportError("the app needs gradio: pip install 'midol-hub[app]'") from None

    with gr.Blocks(title=title, analytics_enabled=False) as page:
        index = "no index" if viewer.index is None else f"index: {len(viewer.index)} case(s)"
        gr.Markdown(f"# {title}: modality, routing and similar cases\nModel `{viewer.model_name}`; "
                    f"{index}{'; class heatmaps' if viewer.classifier is not None else ''}. Images and DICOM files are read "
                    "from what you upload only.")
        uploads = gr.File(label="Images or DICOM files", file_count="multiple", elem_id="uploads")
        reports = gr.State([])

        @gr.render(inputs=reports)
        def show(found: list[CaseReport]) -> None:
            for report in found:
                with gr.Group(elem_classes=["case"]):
                    gr.Markdown(report.summary, elem_classes=["case-error" if report.error else "case-summary"])
                    if report.error:
                        continue
                    with gr.Row():
                        gr.Image(report.routing_map, label="routing map", show_label=True, elem_classes=["routing-map"])
                        if report.heatmap:
                            gr.Image(report.heatmap, label="class heatmap", elem_classes=["class-heatmap"])
                    if viewer.index is not None:
                        gr.Gallery(report.neighbours or None, label=f"{len(report.neighbours)} most similar case(s)",
                                   columns=min(6, viewer.k), rows=1 + (viewer.k - 1) // 6, height=THUMBNAIL + 80,
                                   allow_preview=True, elem_classes=["neighbours"])
                        gr.Markdown(report.neighbour_table, elem_classes=["neighbour-table"])

        uploads.change(viewer.analyse_all, uploads, reports)
    return page


def launch(viewer: CaseViewer, host: str = "127.0.0.1", port: int | None = None) -> None:
    """Serve the app until interrupted (bound to ``host``: 127.0.0.1, this machine only, unless told)."""
    build_app(viewer).launch(server_name=host, server_port=port, share=False, max_file_size=viewer.max_file_bytes,
                             show_error=False, quiet=False)
